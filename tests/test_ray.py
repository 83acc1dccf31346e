"""`run --executor ray` on a local Ray cluster (started once for these tests): the same outputs and
store rows as the local executor, bad files recorded, a driver interrupt resumed, a lost actor redone."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DATA, MODEL, cli
from test_pipeline import _slow_folder, _wait_for_rows, read_csv

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'bccd-batch[ray]')")

FIELD_COLUMNS = ("rel, slide, size, mtime_ns, sha256, width, height, status, error, model_sha256, detections, focus, brightness,"
                 " tint_red, tint_blue, stain, recounted_at, recoloured")


@pytest.fixture(scope="module")
def ray_address():
    """A 2-CPU local cluster; subprocess drivers join it through RAY_ADDRESS."""
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _fields(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / "bccd-batch.sqlite")
    return db.execute(f"SELECT {FIELD_COLUMNS} FROM images ORDER BY rel").fetchall()


def _ray_cli(address, *args, **kw):
    return cli(*args, "--executor", "ray", env={"RAY_ADDRESS": address}, **kw)


@pytest.mark.slow
def test_ray_executor_writes_what_the_local_one_does_and_records_bad_files(ray_address, slides, tmp_path, small_model):
    """The executor is under test, so the small model infers (each field's 100 detections compared)."""
    (slides / "slide-B" / "broken.jpg").write_bytes(b"not a jpeg")
    good = next((slides / "slide-A").glob("*.jpg")).read_bytes()
    (slides / "slide-B" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    local, remote, model = tmp_path / "local", tmp_path / "ray", ("--model", small_model, "--device", "cpu")
    cli("run", slides, "--out", local, *model, check_rc=3)
    p = _ray_cli(ray_address, "run", slides, "--out", remote, *model, check_rc=3)
    assert "ray: 1 CPU actors" in p.stderr
    for name in ("detections.csv", "counts.csv", "slides.csv", "errors.csv"):
        assert read_csv(remote / "latest" / name) == read_csv(local / "latest" / name), name
    assert _fields(remote) == _fields(local)
    errors = {row[0]: row[1] for row in read_csv(remote / "latest" / "errors.csv")[1:]}
    assert set(errors) == {"slide-B/broken.jpg", "slide-B/truncated.jpg"} and all(errors.values())
    # An unchanged folder is skipped through Ray as locally: nothing inferred again.
    p = _ray_cli(ray_address, "run", slides, "--out", remote, *model, check_rc=3)
    assert "finished: 0 new, 5 unchanged, 2 failed" in p.stderr


@pytest.mark.slow
def test_ray_driver_sigterm_commits_what_came_back_and_the_next_run_finishes(ray_address, tmp_path, bccd):
    slides, out = _slow_folder(tmp_path, bccd, 24), tmp_path / "out"
    # Batch 1: blocks of 8 fields, so the first block is stored while the others are in flight.
    proc = subprocess.Popen([sys.executable, "-m", "bccd_batch", "run", str(slides), "--out", str(out), "--device", "cpu",
                             "--batch-size", "1", "--executor", "ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "RAY_ADDRESS": ray_address})
    _wait_for_rows(out, 1, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    partial = read_csv(out / "latest" / "counts.csv")[1:]
    assert 8 <= len(partial) < 24
    p = _ray_cli(ray_address, "run", slides, "--out", out, "--device", "cpu", "--batch-size", "1", check_rc=0)
    assert f"finished: {24 - len(partial)} new, {len(partial)} unchanged" in p.stderr
    rows = _fields(out)
    assert len(rows) == 24 and len({r[0] for r in rows}) == 24 and all(r[7] == "ok" for r in rows)


def _field_actor_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"FieldActor" in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_every_field_is_stored_once(ray_address, tmp_path, bccd):
    from bccd_batch.pipeline import RunOptions, run

    slides, out = _slow_folder(tmp_path, bccd, 16), tmp_path / "out"
    killed = []

    def kill_one_actor_after_the_first_block():
        t0 = time.time()
        while time.time() - t0 < 180 and not killed:
            try:
                stored = sqlite3.connect(out / "bccd-batch.sqlite", timeout=1).execute("SELECT COUNT(*) FROM images").fetchone()[0]
            except sqlite3.Error:
                stored = 0
            if stored:
                for pid in _field_actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_actor_after_the_first_block)
    killer.start()
    result = run(RunOptions(slides=slides, out=out, model_dir=MODEL, device="cpu", batch_size=1, executor="ray"), log=lambda m: None)
    killer.join()
    assert killed, "no actor was killed: the run finished first"
    assert result.exit_code == 0 and result.info["status"] == "finished" and result.info["images"]["new"] == 16
    rows = _fields(out)
    assert len(rows) == 16 and len({r[0] for r in rows}) == 16 and all(r[7] == "ok" for r in rows)


def test_executor_ray_without_ray_installed_is_a_usage_error_with_the_install_command(tmp_path, slides):
    shadow = tmp_path / "no-ray"
    shadow.mkdir()
    (shadow / "ray.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    p = cli("run", slides, "--out", tmp_path / "out", "--executor", "ray", env={"PYTHONPATH": str(shadow)})
    assert p.returncode == 2 and "pip install 'bccd-batch[ray]'" in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_cluster_nobody_runs_is_a_usage_error_within_seconds(tmp_path, slides):
    """Nothing answers at the address (ray.init would retry for minutes): exit 2 naming it, nothing stored."""
    with socket.socket() as s:      # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    p = cli("run", slides, "--out", tmp_path / "out", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--device", "cpu")
    assert p.returncode == 2 and f"no Ray cluster answers at 127.0.0.1:{port}" in p.stderr, p.stderr
    assert time.monotonic() - t < 60 and not (tmp_path / "out" / "latest").exists()


@pytest.mark.slow
def test_an_engine_the_actors_cannot_build_is_a_usage_error_with_its_reason(ray_address, slides, tmp_path):
    p = _ray_cli(ray_address, "run", slides, "--out", tmp_path / "out", "--engine", "compiled", "--device", "cpu")
    assert p.returncode == 2 and "the compiled engine needs a CUDA GPU" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_bench_runs_each_engine_with_each_executor(ray_address, small_model):
    from bccd_batch.bench import run_bench

    rows = run_bench(DATA / "JPEGImages", 10, small_model, "cpu", [("torch", 1)], log=lambda m: None, executors=("local", "ray"))
    assert [(r["engine"], r["executor"]) for r in rows] == [("torch-eager-fp32", "local"), ("torch-eager-fp32", "ray")]
    assert rows[0]["model_only_img_s"] == rows[1]["model_only_img_s"]     # the engine's, measured once
    # Batch 1: the Ray executor's blocks are 8 fields, so 2 come after its first block.
    assert all(r["end_to_end_img_s"] > 0 and r["steady_img_s"] > 0 for r in rows)


def test_what_crosses_ray_is_plain_arrow_columns():
    """Ray pickles a column it cannot type as Arrow (its Python-object extension) row by row into the
    object store and spills it: the work and the results are strings, integers, floats and bytes only."""
    import pyarrow as pa

    from bccd_batch.batches import Prepared, new_timings
    from bccd_batch.discover import ImageFile
    from bccd_batch.quality import Quality
    from bccd_batch.ray_pool import _fields_table, _result_table

    files = [ImageFile("s/a.jpg", "s", "/x/s/a.jpg"), ImageFile("s/b.jpg", "s", "/x/s/b.jpg")]
    work = _fields_table(pa, files, {"s/a.jpg": (10, 5, "ab" * 32, "ok", None, "m" * 64)})
    ok = Prepared(files[0], size=10, mtime_ns=5, sha256="ab" * 32, quality=Quality(1.5, 0.6, 0.01, -0.02, 0.19))
    bad = Prepared(files[1], size=3, mtime_ns=6, sha256="cd" * 32, error="not a recognised image format")
    engine = type("Engine", (), {"name": "torch-eager-fp32", "device_name": "cpu"})
    result = _result_table(pa, [(ok, (480, 640), b"\x00" * 24), (bad, None, None)], new_timings(), engine)
    plain = (pa.types.is_string, pa.types.is_binary, pa.types.is_integer, pa.types.is_floating)
    for table in (work, result):
        assert all(any(is_(f.type) for is_ in plain) for f in table.schema), table.schema
    assert result.column("error").to_pylist() == [None, "not a recognised image format"]
    assert result.column("tint_blue").to_pylist() == [-0.02, None]
