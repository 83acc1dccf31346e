import pytest
"""The nightly job end to end, through the real CLI in a subprocess, on real BCCD images."""

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_run_outputs_rerun_and_full(slides, tmp_path, bccd):
    (slides / "slide-B" / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"
    p = cli("run", slides, "--out", out, "--device", "cpu", check_rc=3)
    run_dir = out / "runs" / p.stdout.strip().split("/")[-1]
    assert (out / "latest").resolve() == run_dir.resolve()
    det = read_csv(run_dir / "detections.csv")
    assert det[0] == ["image", "slide", "width", "height", "class", "score", "xmin", "ymin", "xmax", "ymax"]
    assert len(det) > 5 * 5 and {r[1] for r in det[1:]} == {"slide-A", "slide-B"}
    counts = read_csv(run_dir / "counts.csv")
    assert counts[0] == ["image", "slide", "width", "height", "RBC", "WBC", "Platelets", "focus", "brightness",
                         "tint_red", "tint_blue", "stain", "cell_size", "recounted_at", "recoloured", "flags"] and len(counts) == 6
    assert all(int(r[4]) > 3 for r in counts[1:])  # every BCCD field has several RBCs
    # measured, unflagged, counted once
    assert all(float(r[7]) > 0 and float(r[8]) > 0 and abs(float(r[9])) < 0.08 and abs(float(r[10])) < 0.08
               and float(r[11]) > 0.1 and 0.165 < float(r[12]) < 0.295 and r[13:] == ["", "", ""] for r in counts[1:]), counts     # grey BCCD backgrounds
    slides_csv = read_csv(run_dir / "slides.csv")
    assert [r[:3] for r in slides_csv[1:]] == [["slide-A", "3", "0"], ["slide-B", "2", "1"]]
    assert read_csv(run_dir / "errors.csv") == [["image", "reason"], ["slide-B/notes.jpg", "not a recognised image format"]]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["images"] == {"discovered": 6, "new": 5, "skipped": 0, "failed": 1}
    assert info["model"]["sha256"] and info["engine"] == "torch-eager-fp32" and info["device"] == "cpu"

    again = cli("run", slides, "--out", out, "--device", "cpu", check_rc=3)
    info2 = json.loads((out / "latest" / "run.json").read_text())
    assert info2["images"] == {"discovered": 6, "new": 0, "skipped": 5, "failed": 1}
    assert "0 new" in again.stderr
    # Progress and the final line give one rate, of fields inferred: none on a rerun.
    assert "images: 6/6 0.0 inferred/s" in again.stderr and "(0.0 inferred/s)" in again.stderr
    assert read_csv(out / "latest" / "counts.csv") == counts

    os.utime(slides / "slide-A" / sorted(os.listdir(slides / "slide-A"))[0])  # touched, same content
    cli("run", slides, "--out", out, "--device", "cpu", check_rc=3)
    assert json.loads((out / "latest" / "run.json").read_text())["images"]["new"] == 1

    # The fourth night keeps the folders of only the newest two runs; a folder of someone else's stays.
    runs = sorted(os.listdir(out / "runs"))
    (out / "runs" / "notes").mkdir()
    cli("run", slides, "--out", out, "--device", "cpu", "--full", check_rc=3, env={"BCCD_BATCH_KEEP_RUNS": "2"})
    info4 = json.loads((out / "latest" / "run.json").read_text())
    assert info4["images"]["new"] == 5
    assert info4["pruned_runs"] == runs[1::-1]       # newest first
    assert sorted(os.listdir(out / "runs")) == sorted([runs[2], (out / "latest").resolve().name, "notes"])
    db = sqlite3.connect(out / "bccd-batch.sqlite")
    assert db.execute("SELECT COUNT(*) FROM runs WHERE status='finished'").fetchone()[0] == 4
    assert db.execute("SELECT COUNT(*) FROM images WHERE status='ok'").fetchone()[0] == 5    # replaced, not added
    index = (out / "index.html").read_text()
    assert all(name in index for name in runs) and f'href="runs/{runs[0]}/' not in index
    assert index.count("(folder removed)") == 2
    gone = cli("report", runs[0], "--out", out, check_rc=2)
    assert "no run folder" in gone.stderr and "--keep-runs" in gone.stderr
    # The third run's report rendered again says that the fourth (--full) has processed its 6 images since.
    cli("report", runs[2], "--out", out, check_rc=0)
    assert "a later run had processed 6 of this run" in (out / "runs" / runs[2] / "report.html").read_text()
    assert "later run" not in (out / "latest" / "report.html").read_text()
    scored = cli("score", runs[2], "--labels", bccd, "--out", out, "--bootstrap", "0", check_rc=0)
    assert "5 of" in scored.stderr and "scored on that run's result" in scored.stderr
    metrics = json.loads((out / "runs" / runs[2] / "metrics.json").read_text())
    assert metrics["processed_later"] == 5 and "intervals" not in metrics["coco"]   # --bootstrap 0: none
    assert "95% over fields" not in scored.stderr


# On a GPU the fields are decoded by nvJPEG and counted first by the compiled engine; the second
# pass is the eager model's on the same GPU.
@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fields_at_another_magnification_under_another_lamp_or_stain_are_counted_again_and_say_so(tmp_path, bccd, device):
    """A BCCD field, a copy at half the magnification (tiled 2x2, shrunk back), one under a bluish
    lamp and one as a paler stain shows it (every optical density halved), in one slide."""
    import numpy as np
    import torch
    from PIL import Image

    from bccd_batch.decode import decode_file
    from bccd_batch.transforms import restain
    from test_quality import under_another_lamp

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    slide = tmp_path / "slides" / "s"
    slide.mkdir(parents=True)
    field = decode_file(bccd / "JPEGImages" / "BloodImage_00003.jpg")
    Image.fromarray(field).save(slide / "native.jpg", quality=95)
    Image.fromarray(np.tile(field, (2, 2, 1))).resize((640, 480), Image.BILINEAR).save(slide / "half.jpg", quality=95)
    Image.fromarray(under_another_lamp(field)).save(slide / "lamp.jpg", quality=95)
    pale = restain(torch.from_numpy(field).permute(2, 0, 1), (0.5, 0.5, 0.5)).permute(1, 2, 0).numpy()
    Image.fromarray(pale).save(slide / "pale.jpg", quality=95)
    out = tmp_path / "out"
    cli("run", tmp_path / "slides", "--out", out, "--device", device, check_rc=0)
    info = json.loads((out / "latest" / "run.json").read_text())
    assert info["engine"] == ("torch-eager-fp32" if device == "cpu" else "compiled-fp16")
    assert info["fields_decoded_on_gpu"] == (0 if device == "cpu" else 4)
    counts = {r["image"]: r for r in csv.DictReader(open(out / "latest" / "counts.csv", newline=""))}
    native, half, lamp, pale = (counts[f"s/{n}.jpg"] for n in ("native", "half", "lamp", "pale"))
    assert native["recounted_at"] == native["recoloured"] == native["flags"] == ""
    assert float(half["recounted_at"]) > 1.5 and half["recoloured"] == "" and half["flags"] == "cell size"
    assert float(lamp["recounted_at"]) == 1.0 and lamp["recoloured"] == "white balance" and lamp["flags"] == "colour cast"
    assert float(lamp["tint_red"]) > 0.25
    # Paler than BCCD's, the nearer lab's: counted once the copy lost both platelets; given BCCD's colours it has them.
    assert float(pale["recounted_at"]) == 1.0 and pale["recoloured"] == "txl_pbc/BCCD" and pale["flags"] == "other stain"
    assert all(abs(int(pale[c]) - int(native[c])) <= max(1, int(native[c]) // 8) for c in ("RBC", "WBC", "Platelets")), counts
    # Counted again, the copy's RBCs come near four times the field's; counted once, the eager model
    # found 45 of the 4 x 17 (tests/test_quality.py). White-balanced, the other copy counts as the field.
    assert int(half["RBC"]) > 3.5 * int(native["RBC"]), counts
    assert all(abs(int(lamp[c]) - int(native[c])) <= max(1, int(native[c]) // 10) for c in ("RBC", "WBC", "Platelets")), counts
    report = (out / "latest" / "report.html").read_text()
    assert "counted again at x" in report and "counted again with its background made grey" in report
    assert "counted again with the colours of txl_pbc/BCCD&#39;s fields" in report


@pytest.mark.slow
def test_usage_errors_exit_2(tmp_path, slides):
    helped = cli("run", "--help", env={"COLUMNS": "80"}).stdout
    assert " run [OPTIONS] {SLIDES}" in helped          # the argument as the docs name it
    # Readable in an 80-column terminal: no line wider, every env var name whole.
    assert max(map(len, helped.splitlines())) <= 80 and "BCCD_BATCH_WORKERS_PER_DEVICE" in helped
    assert cli("run", tmp_path / "missing", "--out", tmp_path / "o").returncode == 2
    p = cli("run", slides, "--out", tmp_path / "o", "--engine", "warp-drive")
    assert p.returncode == 2 and "unknown engine" in p.stderr and "Traceback" not in p.stderr
    p = cli("run", slides, "--out", tmp_path / "o", "--precision", "fp8")
    assert p.returncode == 2 and "unknown precision 'fp8'" in p.stderr and "Traceback" not in p.stderr
    assert cli("run", slides, "--out", tmp_path / "o", "--labels", tmp_path / "nope").returncode == 2
    p = cli("run", slides, "--out", tmp_path / "o", "--wbc-factor", "0")
    assert p.returncode == 2 and "--wbc-factor must be a positive number" in p.stderr
    # Raised inside the worker process, reported by the parent as the same one-line usage error.
    p = cli("run", slides, "--out", tmp_path / "o", "--engine", "compiled", "--device", "cpu")
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr and "Traceback" not in p.stderr
    # A store written by a newer version: refused before any worker starts, and left as it was.
    newer = tmp_path / "newer"
    newer.mkdir()
    db = sqlite3.connect(newer / "bccd-batch.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    for args in (("run", slides), ("report", "a-run"), ("score", "a-run", "--labels", slides)):
        p = cli(*args, "--out", newer)
        assert p.returncode == 2 and "newer bccd-batch (store version 99)" in p.stderr, args
        assert "Traceback" not in p.stderr and not (newer / "runs").exists() and "engine:" not in p.stderr
    assert sqlite3.connect(newer / "bccd-batch.sqlite").execute("PRAGMA user_version").fetchone()[0] == 99
    # A store file that is no database at all (overwritten, truncated to junk): the same, naming the file.
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "bccd-batch.sqlite").write_bytes(b"not a database" * 100)
    for args in (("run", slides), ("report", "a-run"), ("score", "a-run", "--labels", slides)):
        p = cli(*args, "--out", junk)
        assert p.returncode == 2 and "bccd-batch.sqlite is not a bccd-batch store" in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr and not (junk / "runs").exists()
    assert (junk / "bccd-batch.sqlite").read_bytes() == b"not a database" * 100


def test_a_night_without_any_image_file_exits_66_and_says_so(empty_night):
    out, p = empty_night
    assert p.returncode == 66 and "no image files under" in p.stderr and "Traceback" not in p.stderr
    info = json.loads((out / "latest" / "run.json").read_text())
    assert info["status"] == "no_images" and info["images"]["discovered"] == 0
    index = (out / "index.html").read_text()
    assert 'class="l alert" title="no image file under the slides folder' in index and ">no_images<" in index
    assert index.count("no run to plot yet") == 2        # nothing inferred, no fields: neither trend has a point


def test_devices_are_parsed_once_to_what_each_worker_runs_on(monkeypatch):
    import torch

    from bccd_batch import workers
    from bccd_batch.backends import EngineError, cuda_device_count
    from bccd_batch.workers import parse_devices

    # The count the parent asks for without torch where it can: torch's own.
    assert cuda_device_count() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    said = []
    monkeypatch.setattr(workers, "cuda_device_count", lambda: 0)
    assert parse_devices("auto", said.append) == ["cpu"] and parse_devices("all", said.append) == ["cpu"] and not said
    assert parse_devices("cuda:0, cpu", said.append) == ["cpu", "cpu"]
    assert said == ["cuda:0 requested but no CUDA GPU is available: running on the CPU"]
    for bad in ("tpu", "cpu:1", "cuda:x", " , "):
        with pytest.raises(EngineError):
            parse_devices(bad)
    monkeypatch.setattr(workers, "cuda_device_count", lambda: 2)
    assert parse_devices("all") == ["cuda:0", "cuda:1"] and parse_devices("auto") == ["cuda"]
    with pytest.raises(EngineError, match="this machine has 2 CUDA GPUs"):
        parse_devices("cuda:0,cuda:2")


def test_worker_devices_repeat_each_device_in_order():
    from bccd_batch.workers import worker_devices

    assert worker_devices(["cuda:0", "cuda:1"], 2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert worker_devices(["cpu"]) == ["cpu"]       # the CPU's default: one worker (torch uses every core)


def test_decode_threads_share_three_quarters_of_the_cores_between_workers():
    from bccd_batch.workers import decode_threads

    assert decode_threads(3, cpus=16) == 4       # one GPU's three workers on a 16-core host
    assert decode_threads(3, cpus=64) == 8       # ... on a 64-core host (at most 8)
    assert decode_threads(12, cpus=64) == 4      # four GPUs' twelve
    assert decode_threads(1, cpus=2) == 2        # never fewer than 2


def _slow_folder(tmp_path, bccd, n):
    root = tmp_path / "many"
    names = sorted(p.name for p in (bccd / "JPEGImages").glob("*.jpg"))[:n]
    for i, name in enumerate(names):
        d = root / f"slide{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(bccd / "JPEGImages" / name, d / name)
    return root


def _start(slides, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "bccd_batch", "run", str(slides), "--out", str(out), "--device", "cpu",
                             "--batch-size", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_rows(out, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            db = sqlite3.connect(out / "bccd-batch.sqlite", timeout=1)
            if db.execute("SELECT COUNT(*) FROM images").fetchone()[0] >= n:
                return
        except sqlite3.Error:
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("run made no progress")


def _sigterm_after_two_rows(slides, out, n, *extra):
    """Start a run, SIGTERM it once two images are stored: exit 143 and a partial, interrupted run."""
    proc = _start(slides, out, *extra)
    _wait_for_rows(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    partial = json.loads((out / "latest" / "run.json").read_text())
    assert partial["status"] == "interrupted" and 2 <= partial["images"]["new"] < n
    return partial


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, bccd) -> tuple:
    """(slides, results) of an uninterrupted run over 12 fields: what interrupted runs must end equal to."""
    root = tmp_path_factory.mktemp("uninterrupted")
    slides = _slow_folder(root, bccd, 12)
    cli("run", slides, "--out", root / "out", "--device", "cpu", check_rc=0)
    return slides, root / "out"


@pytest.mark.slow
def test_sigterm_then_rerun_equals_uninterrupted(tmp_path, uninterrupted):
    slides, ref_out = uninterrupted
    out = tmp_path / "out"
    partial = _sigterm_after_two_rows(slides, out, 12)

    cli("run", slides, "--out", out, "--device", "cpu", check_rc=0)
    final = json.loads((out / "latest" / "run.json").read_text())
    assert final["images"]["new"] + partial["images"]["new"] == 12
    for name in ["detections.csv", "counts.csv", "slides.csv", "errors.csv"]:
        assert read_csv(out / "latest" / name) == read_csv(ref_out / "latest" / name), name


@pytest.mark.slow
def test_second_concurrent_run_exits_75_and_lock_recovers_after_kill(tmp_path, bccd):
    # 8 fields at batch 1 keep the first run busy for seconds after its first is stored; the second
    # run is refused at the lock, before it starts any worker.
    slides = _slow_folder(tmp_path, bccd, 8)
    out = tmp_path / "out"
    first = _start(slides, out)
    _wait_for_rows(out, 1, first)
    t = time.time()
    second = cli("run", slides, "--out", out, "--device", "cpu")
    assert second.returncode == 75 and "another bccd-batch run" in second.stderr
    assert time.time() - t < 30
    first.send_signal(signal.SIGKILL)   # leaves the lock file behind, but not the lock
    first.communicate()
    cli("run", slides, "--out", out, "--device", "cpu", check_rc=0)
    db = sqlite3.connect(out / "bccd-batch.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM images WHERE status='ok'").fetchone()[0] == 8


@pytest.mark.slow
def test_cuda_requested_without_gpu_falls_back_to_cpu_with_warning(slides, tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest
        pytest.skip("this machine has a GPU")
    p = cli("run", slides, "--out", tmp_path / "o", "--device", "cuda", check_rc=0)
    # One line, said once by the parent (not a Python warning per worker).
    assert p.stderr.count("cuda requested but no CUDA GPU is available: running on the CPU\n") == 1
    assert "Warning" not in p.stderr
    info = json.loads((tmp_path / "o" / "latest" / "run.json").read_text())
    assert info["device"] == "cpu" and info["gpu_decode"] is False     # allowed by default, but nothing ran on a GPU


@pytest.mark.slow
def test_two_device_workers_store_the_same_as_one_process(slides, tmp_path):
    """`--devices cpu,cpu`: two worker processes claiming chunks of one work list, this process the single
    writer. Same images, errors and detections as the in-process run (a second CPU stands in for
    a second GPU: the hand-off, not the device, is under test here)."""
    (slides / "slide-B" / "notes.jpg").write_text("not an image")
    one, two = tmp_path / "one", tmp_path / "two"
    cli("run", slides, "--out", one, "--device", "cpu", "--batch-size", "2", check_rc=3)
    p = cli("run", slides, "--out", two, "--devices", "cpu,cpu", "--batch-size", "2", check_rc=3)
    assert "2 device workers" in p.stderr
    info = json.loads((two / "latest" / "run.json").read_text())
    assert info["images"] == {"discovered": 6, "new": 5, "skipped": 0, "failed": 1}
    assert info["device"] == "cpu,cpu"
    assert [m["device"] for m in info["worker_memory"]] == ["cpu", "cpu"]     # each worker's, not each device's
    for name in ("detections.csv", "counts.csv", "errors.csv"):
        assert read_csv(two / "latest" / name) == read_csv(one / "latest" / name), name
    assert not (two / ".work-list").exists()      # the workers' work list goes with its run
    cli("run", slides, "--out", two, "--devices", "cpu,cpu", check_rc=3)
    assert json.loads((two / "latest" / "run.json").read_text())["images"] == {"discovered": 6, "new": 0, "skipped": 5, "failed": 1}


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_device_workers_on_sigterm_and_when_the_parent_is_killed(tmp_path, uninterrupted):
    """With worker processes: SIGTERM stores what the workers have in flight and exits 143; a
    SIGKILLed parent leaves no worker behind; reruns then equal an uninterrupted run."""
    slides, ref_out = uninterrupted
    out = tmp_path / "out"
    partial = _sigterm_after_two_rows(slides, out, 12, "--devices", "cpu,cpu")

    proc = _start(slides, out, "--devices", "cpu,cpu")
    _wait_for_rows(out, partial["images"]["new"] + 1, proc)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.kill()
    proc.communicate()
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(_alive(w) for w in workers), "worker processes outlived their killed parent"

    assert (out / ".work-list").exists()     # the killed run's: the next run writes its own over it

    cli("run", slides, "--out", out, "--devices", "cpu,cpu", check_rc=0)
    for name in ["detections.csv", "counts.csv", "slides.csv", "errors.csv"]:
        assert read_csv(out / "latest" / name) == read_csv(ref_out / "latest" / name), name
    assert not (out / ".work-list").exists()


def test_the_parent_of_a_run_on_a_host_without_gpus_imports_no_torch():
    """The parent parses --device, reads the card and stores what its workers send; only the workers
    need torch, so where no NVIDIA driver can be loaded the parent never imports it (seconds of every
    run's start-up, and its memory)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this host has an NVIDIA driver: the parent asks torch how many GPUs it has")
    except OSError:
        pass
    code = ("import sys; from bccd_batch import cli, mps, pipeline; from bccd_batch.card import read_card; "
            "from bccd_batch.workers import parse_devices, worker_devices; "
            "devices = worker_devices(parse_devices('auto')); mps.wanted(devices); read_card(cli.default_model_dir()); "
            "sys.exit(f'{devices} torch' if 'torch' in sys.modules else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_batches_submit_the_next_before_collecting_the_last():
    """An engine that can run ahead (the compiled one) is handed batch k+1 before batch k is
    collected, and every detection still lands on its own image, failures riding along."""
    import numpy as np

    from bccd_batch.discover import ImageFile
    from bccd_batch.batches import Prepared, batches, new_timings
    from bccd_batch.quality import Quality
    from bccd_batch.store import unpack_detections

    events = []

    class RunsAhead:
        card = {"thresholds": {"count": 0.5}}   # one RBC a field: too few to measure, none counted again

        def submit(self, images):
            k = sum(1 for e in events if e[0] == "submit")
            events.append(("submit", k))
            dets = [[("RBC", 1.0, float(a[0, 0, 0]), 0.0, 1.0, 1.0)] for a in images]
            return lambda: events.append(("collect", k)) or dets

    prepared = []
    for i in range(7):
        p = Prepared(ImageFile(f"s/{i}.jpg", "s", Path(f"/x/{i}.jpg")))
        if i == 3:
            p.error = "not a recognised image format"
        else:
            p.array, p.quality = np.full((4, 4, 3), i, np.uint8), Quality(None, float(i), 0.0, 0.0, 0.2)   # as a decode thread leaves it
        prepared.append(p)
    groups = list(batches(iter(prepared), RunsAhead(), 2, new_timings()))
    assert events == [("submit", 0), ("submit", 1), ("collect", 0), ("submit", 2), ("collect", 1),
                      ("collect", 2)]
    stored = [(p.file.rel, d) for g in groups for p, hw, d in g]
    assert sorted(rel for rel, _ in stored) == [f"s/{i}.jpg" for i in range(7)]
    for rel, d in stored:
        i = int(rel[2])
        assert d is None if i == 3 else unpack_detections(d) == [("RBC", 1.0, float(i), 0.0, 1.0, 1.0)]


@pytest.mark.slow
def test_fields_left_for_the_gpu_are_decoded_with_their_batch(bccd, monkeypatch, tmp_path):
    """The `--gpu-decode` path on the CPU (torchvision's decoder where nvJPEG would be, the eager
    engine taking the 3xHxW fields it gives): each JPEG is decoded with its batch, anything else
    as before, a field at half the magnification counted again from either; if the batch decoder
    refuses, every field still gets decode_bytes and its reason."""
    import numpy as np
    from PIL import Image

    from bccd_batch import batches, pipeline
    from bccd_batch.decode import decode_file
    from bccd_batch.discover import ImageFile
    from bccd_batch.backends.torch_eager import TorchEngine
    from bccd_batch.store import unpack_detections

    names = sorted((bccd / "JPEGImages").glob("*.jpg"))[:3]
    files = [ImageFile(f"s/{p.name}", "s", p) for p in names]
    bad = bccd / "JPEGImages" / "missing.jpg"
    files.append(ImageFile("s/missing.jpg", "s", bad))
    half = tmp_path / "half.jpg"
    Image.fromarray(np.tile(decode_file(names[0]), (2, 2, 1))).resize((640, 480), Image.BILINEAR).save(half, quality=95)
    files.append(ImageFile("s/half.jpg", "s", half))
    engine = TorchEngine(Path(__file__).resolve().parent.parent / "engines", "cpu")
    opts = pipeline.RunOptions(slides=bccd, out=bccd, model_dir=bccd, batch_size=2, decode_workers=2)

    def outcome(on_device):
        timings = batches.new_timings()
        groups = batches.decoded_groups(((f, None) for f in files), engine, opts, timings, on_device=on_device)
        got = {p.file.rel: (hw, p.error, d and [x[:1] + tuple(round(v) for v in x[2:]) for x in unpack_detections(d) if x[1] >= 0.6],
                            p.recounted_at) for g in groups for p, hw, d in g}
        return got, timings["fields_decoded_on_device"]

    host, n_host = outcome(False)
    device, n_device = outcome(True)
    assert n_host == 0 and n_device == 4
    assert device == host and host["s/missing.jpg"][1].startswith("cannot read")
    assert all(hw == (480, 640) and dets for rel, (hw, _, dets, _) in host.items() if rel != "s/missing.jpg")
    assert [rel for rel, (*_, again) in host.items() if again] == ["s/half.jpg"] and host["s/half.jpg"][3] > 1.5

    def refuse(datas, device):
        raise RuntimeError("Error while decoding JPEG images: Failed to decode batch: 10")
    monkeypatch.setattr(batches, "decode_on_device", refuse)
    refused, n_refused = outcome(True)
    assert n_refused == 0 and refused == host
