"""MPS for a run's workers (mps.py). This machine has no GPU and no MPS: a stand-in control program
records what the run asks of it; on a GPU the bench runs the real one (docs/benchmarks.md)."""

import json
import os
import subprocess
import sys

import pytest

from bccd_batch import mps, pipeline
from bccd_batch.backends import EngineError
from conftest import MODEL

CONTROL = """#!/bin/sh
# Stand-in for nvidia-cuda-mps-control: logs each call (arguments, stdin, pipe directory).
read -r line || line=""
echo "$* | $line | $CUDA_MPS_PIPE_DIRECTORY" >> "{log}"
[ "$1" = "-d" ] && exit {start_rc}
[ "$line" = "get_server_list" ] && exit 1
exit 0
"""


@pytest.fixture
def control(tmp_path, monkeypatch):
    def make(start_rc=0):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        exe = bin_dir / mps.CONTROL
        exe.write_text(CONTROL.format(log=tmp_path / "calls.log", start_rc=start_rc))
        exe.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return tmp_path / "calls.log"

    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE_DIR", tmp_path / "no-system-daemon")
    monkeypatch.setattr(mps, "private_pipe_dir", lambda: tmp_path / "pipe")
    return make


def test_private_daemon_started_seen_by_spawned_processes_and_quit(control):
    calls = control()
    with mps.mps_for_workers(log=lambda m: None) as mode:
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['CUDA_MPS_PIPE_DIRECTORY'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    pipe = str(mps.private_pipe_dir())
    assert mode == "private" and child == pipe
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ      # restored once the run is over
    assert calls.read_text().splitlines() == [f"-d |  | {pipe}", f" | quit | {pipe}"]


def test_daemon_that_will_not_start_or_is_missing_means_no_mps(control, monkeypatch):
    calls = control(start_rc=1)
    logged = []
    with mps.mps_for_workers(log=logged.append) as mode:
        assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert mode == "unavailable" and "failed" in logged[0]
    assert [line.split(" |")[0] for line in calls.read_text().splitlines()] == ["-d"]    # no quit
    monkeypatch.setenv("PATH", "/nonexistent")
    with mps.mps_for_workers(log=logged.append) as mode:
        pass
    assert mode == "unavailable" and "not on PATH" in logged[1]


def test_an_operators_daemon_is_used_as_it_is(control, monkeypatch):
    calls = control()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/srv/mps")
    with mps.mps_for_workers(log=lambda m: None) as mode:
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == "/srv/mps"
    assert mode == "operator" and not calls.exists()


def test_workers_that_fail_under_a_private_daemon_are_started_again_without_it(slides, tmp_path, monkeypatch, control):
    control()
    real_pool, tries = pipeline.WorkerPool, []

    def pool(devices, opts, log):
        tries.append(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))
        if len(tries) == 1:
            raise EngineError("worker for cuda:0 failed to start: MPS client could not connect")
        return real_pool(devices, opts, log)

    monkeypatch.setattr(pipeline, "WorkerPool", pool)
    monkeypatch.setattr(pipeline, "mps_wanted", lambda devices: True)    # as with two workers on one GPU
    logged = []
    res = pipeline.run(pipeline.RunOptions(slides=slides, out=tmp_path / "out", model_dir=MODEL, device="cpu"),
                       log=logged.append)
    assert res.exit_code == 0 and res.info["mps"] == "off" and res.info["images"]["new"] == 5
    assert tries[0] and tries[1] is None and any("without it" in m for m in logged)
    assert json.loads((res.run_dir / "run.json").read_text())["mps"] == "off"


def test_mps_is_asked_for_only_where_workers_share_a_gpu(monkeypatch):
    monkeypatch.setattr(mps, "cuda_device_count", lambda: 2)
    assert mps.wanted(["cuda:0", "cuda:0", "cuda:1"]) and mps.wanted(["auto", "auto"])
    assert not mps.wanted(["cuda:0", "cuda:1"]) and not mps.wanted(["cpu", "cpu"])
    monkeypatch.setattr(mps, "cuda_device_count", lambda: 0)
    assert not mps.wanted(["cuda:0", "cuda:0"])
