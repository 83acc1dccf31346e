import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BCCD_DATA", REPO.parent / "shared" / "data" / "bccd"))
MODEL = REPO / "engines"

# Figures tests measure (errors, counts, RSS...), printed once at the end of the run, where CI's log shows them.
FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def bccd() -> Path:
    if not (DATA / "JPEGImages").is_dir():
        pytest.fail(f"BCCD data not found at {DATA}; set BCCD_DATA")
    return DATA


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """An untrained small model (ResNet-18 at a 256-pixel short side) for tests of the machinery
    around the model (soak, bench): it infers in a quarter of the default model's time on the CPU
    and stores as many detections a field (the cap of 100)."""
    import torch

    from bccd_batch.model import ModelConfig, build_model, save_model

    torch.manual_seed(0)
    cfg, model_dir = ModelConfig.for_input_size(256), tmp_path_factory.mktemp("small-model")
    save_model(build_model(cfg).eval(), cfg, model_dir, {"name": "untrained test model"})
    return model_dir


def bccd_image(name: str) -> Path:
    return DATA / "JPEGImages" / f"{name}.jpg"


@pytest.fixture
def slides(tmp_path, bccd) -> Path:
    """Two slides of real BCCD fields (3 + 2 images)."""
    root = tmp_path / "slides"
    names = sorted(p.stem for p in (bccd / "JPEGImages").glob("*.jpg"))[:5]
    for i, n in enumerate(names):
        d = root / ("slide-A" if i < 3 else "slide-B")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(bccd_image(n), d / f"{n}.jpg")
    return root


@pytest.fixture(scope="session")
def empty_night(tmp_path_factory):
    """(results root, the CLI's result) of one run over a slides folder holding no image file at
    all (an unmounted share looks so), shared by the tests that check how such a night shows."""
    empty = tmp_path_factory.mktemp("night") / "slides"
    (empty / "slide-A").mkdir(parents=True)
    (empty / "slide-A" / "notes.txt").write_text("not an image")
    out = empty.parent / "out"
    return out, cli("run", empty, "--out", out, "--device", "cpu")


def cli(*args, check_rc=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as cron would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    p = subprocess.run([sys.executable, "-m", "bccd_batch", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, **kw)
    if check_rc is not None:
        assert p.returncode == check_rc, f"rc {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}"
    return p
