"""Faults injected for real: hostile files, killed runs, a full disk, fuzzed label files, a soak.

Each test prints its figures (run pytest with -s, or read the summary lines in CI's log).
"""

import csv
import errno
import gzip
import io
import json
import os
import random
import re
import resource
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bccd_batch.labels import LabelError, read_labels
from conftest import DATA, FIGURES, REPO, bccd_image, cli


def summary(line: str) -> None:
    FIGURES.append(f"reliability: {line}")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_declaring(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def _jpeg_declaring(w: int, h: int) -> bytes:
    data = bytearray(bccd_image("BloodImage_00000").read_bytes())
    i = data.index(b"\xff\xc0")          # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def hostile_corpus(root: Path) -> tuple[list[str], list[str]]:
    """Writes bad and good files under root/slide*; returns (bad rel paths, good rel paths)."""
    jpg = bccd_image("BloodImage_00000").read_bytes()
    rgb = Image.open(io.BytesIO(jpg)).convert("RGB")
    png, tif, bmp = _encode(rgb, "PNG"), _encode(rgb, "TIFF"), _encode(rgb, "BMP")
    rng = random.Random(7)
    bad = {
        **{f"trunc_jpg_{n}.jpg": jpg[:n] for n in (2, 100, 1000, 5000, 20000)},
        **{f"trunc_png_{n}.png": png[:n] for n in (8, 50, 500, 5000)},
        **{f"trunc_tif_{n}.tif": tif[:n] for n in (10, 100, 2000)},
        "trunc.bmp": bmp[:300],
        "zero.jpg": b"", "zero.png": b"", "zero.TIFF": b"",
        "random.jpg": rng.randbytes(4096), "random.tif": rng.randbytes(4096), "random.bmp": rng.randbytes(4096),
        "page.png": b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>",
        "notes.jpeg": b"just some text\n" * 20,
        "drawing.jpg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "archive.tif": gzip.compress(tif[:1000]),
        "doc.png": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n",
        "program.jpg": Path(sys.executable).read_bytes()[:8192],
        "bomb.png": _encode(Image.new("1", (12000, 12000)), "PNG"),
        "declared_20000.png": _png_declaring(20000, 20000),
        "declared_huge.jpg": _jpeg_declaring(30000, 30000),
        "one_pixel.png": _encode(Image.new("RGB", (1, 1)), "PNG"),
        "bad_crc.png": png[:33] + b"\x00\x00\x00\x00" + png[37:],
    }
    good = {
        "real.jpg": jpg,
        "sixteen_bit.tif": _encode(Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)), "TIFF"),
        "float.tif": _encode(Image.fromarray(np.asarray(rgb.convert("L"), np.float32) / 255.0), "TIFF"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "name with spaces.jpg": jpg,
        "ünïcødé-血.jpg": jpg,
        "new\nline.jpg": jpg,
        "<img src=x onerror=alert(1)>.png": png,
        "trailing_garbage.jpg": jpg + b"garbage" * 10,
    }
    out_bad, out_good = [], []
    for i, (name, data) in enumerate(bad.items()):
        (root / f"slide{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"slide{i % 3}" / name).write_bytes(data)
        out_bad.append(f"slide{i % 3}/{name}")
    for name, data in good.items():
        (root / "good").mkdir(parents=True, exist_ok=True)
        (root / "good" / name).write_bytes(data)
        out_good.append(f"good/{name}")
    os.symlink(root / "nowhere.jpg", root / "slide0" / "dangling.jpg")
    out_bad.append("slide0/dangling.jpg")
    (root / "slide1" / "folder.jpg").mkdir()   # not a file: must not appear anywhere
    if os.geteuid() != 0:                       # root reads anything, so this case only exists for users
        p = root / "slide2" / "locked.jpg"
        p.write_bytes(jpg)
        p.chmod(0)
        out_bad.append("slide2/locked.jpg")
    return out_bad, out_good


# On a GPU, JPEGs that pass decode.device_decodable are decoded by nvJPEG: the same outcomes.
@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hostile_corpus_every_input_accounted_for(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bad, good = hostile_corpus(tmp_path / "slides")
    assert len(bad) >= 30
    out = tmp_path / "out"
    cli("run", tmp_path / "slides", "--out", out, "--device", device, "--batch-size", "4", check_rc=3)
    errors = {r[0]: r[1] for r in read_csv(out / "latest" / "errors.csv")[1:]}
    counted = {r[0] for r in read_csv(out / "latest" / "counts.csv")[1:]}
    assert set(errors) == set(bad), set(errors) ^ set(bad)
    assert all(errors.values())
    assert counted == set(good)
    assert not any("folder.jpg" in r for r in set(errors) | counted)
    db = sqlite3.connect(out / "bccd-batch.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == len(bad) + len(good)
    html = (out / "latest" / "report.html").read_text()
    assert "<img src=x onerror=alert(1)>" not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html
    on_gpu = json.loads((out / "latest" / "run.json").read_text())["fields_decoded_on_gpu"]
    summary(f"hostile corpus on {device}: {len(bad)} bad files recorded with a reason, {len(good)} good files processed"
            f" ({on_gpu} decoded by nvJPEG)")


def _fixture_folder(tmp_path, n):
    root = tmp_path / "slides"
    names = sorted((DATA / "JPEGImages").glob("*.jpg"))[:n]
    for i, p in enumerate(names):
        (root / f"s{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"s{i % 2}" / p.name).write_bytes(p.read_bytes())
    return root


DETECTION_BYTES = "SELECT COUNT(*), SUM(length(detections)) FROM images"   # images and their packed detections


@pytest.mark.slow
def test_interrupts_lose_nothing_and_count_nothing_twice(tmp_path):
    slides = _fixture_folder(tmp_path, 4)
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    cli("run", slides, "--out", ref, "--device", "cpu", "--batch-size", "1", check_rc=0)
    whole_run = time.monotonic() - t0
    ref_files = {n: read_csv(ref / "latest" / n) for n in ("detections.csv", "counts.csv", "slides.csv", "errors.csv")}
    ref_rows = sqlite3.connect(ref / "bccd-batch.sqlite").execute(DETECTION_BYTES).fetchone()
    rng = random.Random(2026)
    trials = 6
    outcomes = {"SIGTERM": 0, "SIGKILL": 0, "finished first": 0}
    for t in range(trials):
        out = tmp_path / f"o{t}"
        sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
        proc = subprocess.Popen([sys.executable, "-m", "bccd_batch", "run", str(slides), "--out", str(out),
                                 "--device", "cpu", "--batch-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Kill times stratified over 1 s to the uninterrupted run's own length (one random time in each
        # sixth), whatever this machine's pace: start-up (~5 s of it on the 2-core CPU machine), the
        # fields' work and the run's files are each hit with few trials.
        time.sleep(1.0 + (whole_run - 1.0) * (t + rng.random()) / trials)
        if proc.poll() is None:
            proc.send_signal(sig)
            outcomes[sig.name] += 1
        else:
            outcomes["finished first"] += 1
        proc.communicate(timeout=120)
        if sig == signal.SIGTERM and proc.returncode not in (0, 143):
            # Death by the default action (-15; a shell reports 143 for it too) is only acceptable outside
            # a run: during interpreter start-up, before the CLI installs its handler, or during teardown
            # after the run finished, when Python has put the default handlers back.
            info = out / "latest" / "run.json"
            finished = info.exists() and json.loads(info.read_text())["status"] == "finished"
            if proc.returncode != -15 or ((out / "runs").exists() and not finished):
                pytest.fail(f"trial {t}: SIGTERM gave exit {proc.returncode} in the middle of a run")
        cli("run", slides, "--out", out, "--device", "cpu", check_rc=0)
        for name, rows in ref_files.items():
            assert read_csv(out / "latest" / name) == rows, f"trial {t} ({sig.name}): {name} differs"
        db = sqlite3.connect(out / "bccd-batch.sqlite")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute(DETECTION_BYTES).fetchone() == ref_rows, f"trial {t}: duplicates"
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0] == 0
    summary(f"interrupts: {trials} trials {outcomes} over {whole_run:.1f} s; images lost 0, detections duplicated 0")


@pytest.mark.slow
def test_disk_full_fails_clearly_and_keeps_earlier_runs(tmp_path):
    slides = _fixture_folder(tmp_path, 3)
    out = tmp_path / "out"
    cli("run", slides, "--out", out, "--device", "cpu", check_rc=0)
    before = read_csv(out / "latest" / "counts.csv")
    first_run = os.readlink(out / "latest")

    def limit_file_size():
        # Files may not grow past 16 kB: the store's WAL and the new run's CSVs hit it, like a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))

    p = subprocess.run([sys.executable, "-m", "bccd_batch", "run", str(slides), "--out", str(out), "--device", "cpu",
                        "--full"], capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert p.returncode == 74, p.stderr
    assert "Traceback" not in p.stderr and "Is the disk full" in p.stderr, p.stderr
    assert re.search(r"cannot write (the store \(bccd-batch.sqlite\): disk I/O error|.+: File too large)", p.stderr), p.stderr
    db = sqlite3.connect(out / "bccd-batch.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT status FROM runs ORDER BY id LIMIT 1").fetchone()[0] == "finished"
    assert read_csv(out / "runs" / Path(first_run).name / "counts.csv") == before
    cli("run", slides, "--out", out, "--device", "cpu", "--full", check_rc=0)   # and the next night works
    summary(f"disk full: exit 74 with '{p.stderr.strip().splitlines()[-1][:90]}', store intact")


def test_writes_refused_for_want_of_room_are_told_apart_from_other_failures():
    """ENOSPC, a quota, a file size limit or a read-only disk (and SQLite's words for them) exit 74
    naming what could not be written; any other error stays an unexpected one (exit 1)."""
    from bccd_batch.cli import _cannot_write

    assert _cannot_write(OSError(errno.ENOSPC, "No space left on device", "/r/runs/x/counts.csv")) == \
        "/r/runs/x/counts.csv: No space left on device"
    assert _cannot_write(OSError(errno.EDQUOT, "Disk quota exceeded")) == "Disk quota exceeded"
    assert _cannot_write(sqlite3.OperationalError("database or disk is full")) == \
        "the store (bccd-batch.sqlite): database or disk is full"
    assert _cannot_write(PermissionError(errno.EACCES, "Permission denied", "/r")) is None
    assert _cannot_write(sqlite3.OperationalError("no such table: images")) is None
    assert _cannot_write(ValueError("disk I/O error")) is None


def test_no_pickle_in_engines():
    suspicious = [p for p in (REPO / "engines").rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")]
    assert suspicious == []
    assert "torch.load" not in (REPO / "bccd_batch" / "model.py").read_text()


# Label readers under fuzzing: only LabelError may escape, and no key may leave the root.
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**12, 10**12), _text)


def _read_checked(path, size=None):
    """read_labels(path), or None where it refuses the whole source: whatever it keeps names no file
    outside the root and holds only finite boxes of positive area (inside a `size` image)."""
    try:
        labels = read_labels(path)
    except LabelError:
        return None
    assert all(not k.startswith("/") and ".." not in k.split("/") for k in labels.records)
    for rec in labels.records.values():
        for _, x0, y0, x1, y1 in rec["boxes"]:
            assert x1 > x0 and y1 > y0 and all(np.isfinite([x0, y0, x1, y1]))
            assert size is None or (0 <= x0 and x1 <= size[0] and 0 <= y0 and y1 <= size[1])
    return labels


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_text, _num, _num, _text, _num, _num, _num, _num), max_size=8))
def test_fuzz_csv(tmp_path, rows):
    p = tmp_path / "l.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax"])
        w.writerows(rows)
    _read_checked(p)


_json = st.recursive(st.one_of(st.none(), st.booleans(), _num, _text),
                     lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(_text, c, max_size=4)), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.lists(st.fixed_dictionaries({"id": _json, "file_name": _json, "width": _json, "height": _json}), max_size=3),
       anns=st.lists(st.fixed_dictionaries({"image_id": _json, "category_id": _json, "bbox": _json}), max_size=4),
       cats=st.lists(st.fixed_dictionaries({"id": _json, "name": _json}), max_size=3))
def test_fuzz_coco(tmp_path, images, anns, cats):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}, default=str))
    _read_checked(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(st.binary(max_size=300), _text.map(lambda s: f"<annotation><filename>{s}</filename></annotation>"),
                     st.tuples(_text, _num, _num, _num, _num).map(
                         lambda t: "<annotation><size><width>640</width><height>480</height></size><object><name>"
                                   f"{t[0]}</name><bndbox><xmin>{t[1]}</xmin><ymin>{t[2]}</ymin><xmax>{t[3]}</xmax>"
                                   f"<ymax>{t[4]}</ymax></bndbox></object></annotation>")))
def test_fuzz_voc(tmp_path, doc):
    (tmp_path / "a.xml").write_bytes(doc if isinstance(doc, bytes) else doc.encode("utf-8", "surrogatepass"))
    _read_checked(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_text, st.tuples(st.integers(-2, 5), _num, _num, _num, _num).map(
           lambda t: " ".join(map(str, t)))), max_size=8),
       names=st.one_of(st.lists(_text, max_size=4), st.binary(max_size=50)), body=st.one_of(st.none(), st.binary(max_size=200)))
def test_fuzz_yolo(tmp_path, lines, names, body):
    from PIL import Image

    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    Image.new("RGB", (64, 48)).save(root / "images" / "a.jpg")
    if isinstance(names, bytes):
        (root / "classes.txt").write_bytes(names)
    else:
        (root / "classes.txt").write_text("\n".join(names + ["RBC"]), encoding="utf-8")
    label = root / "labels" / "a.txt"
    if body is None:
        label.write_text("\n".join(lines), encoding="utf-8")
    else:
        label.write_bytes(body)
    _read_checked(root, size=(64, 48))


@pytest.mark.slow
def test_soak_memory_and_fds_stay_flat(tmp_path, small_model):
    """A few hundred images (CI's size; the 10,000-image soak runs on the GPU with the default
    model): this process (the store) and the worker that infers keep memory and file descriptors
    flat. On the CPU the untrained small model infers: the pipeline around it is the same."""
    from bccd_batch.workers import open_fds, rss_mb
    from bccd_batch.pipeline import RunOptions, run

    src = sorted((DATA / "JPEGImages").glob("*.jpg"))
    warm, soak = tmp_path / "warm", tmp_path / "soak"
    for i in range(16):
        (warm / "s").mkdir(parents=True, exist_ok=True)
        os.link(src[i], warm / "s" / f"w{i}.jpg")
    n = int(os.environ.get("BCCD_SOAK_IMAGES", "200"))
    for i in range(n):
        (soak / f"s{i % 4}").mkdir(parents=True, exist_ok=True)
        os.symlink(src[i % len(src)], soak / f"s{i % 4}" / f"f{i:05d}.jpg")
    # On a GPU: BCCD_SOAK_IMAGES=10000 BCCD_SOAK_DEVICE=cuda pytest -k soak tests/test_reliability.py
    device = os.environ.get("BCCD_SOAK_DEVICE", "cpu")
    opts = dict(out=tmp_path / "out", model_dir=small_model if device == "cpu" else REPO / "engines", device=device, batch_size=4 if device == "cpu" else 32)
    run(RunOptions(slides=warm, **opts), log=lambda m: None)
    rss0, fds0 = rss_mb(), open_fds()
    result = run(RunOptions(slides=soak, **opts), log=lambda m: None)
    rss1, fds1 = rss_mb(), open_fds()
    assert result.info["images"]["new"] == n
    assert fds1 <= fds0 + 2
    assert rss1 - rss0 < 150, (rss0, rss1)
    # Each worker that decoded and inferred (one on the CPU; a GPU may have several), from its first
    # stored batch (engine warm) to its end.
    workers = result.info["worker_memory"]
    assert workers and all(w["rss_mb_end"] - w["rss_mb_first_group"] < 150 for w in workers), workers
    grew = ", ".join(f"{w['rss_mb_first_group']} -> {w['rss_mb_end']}" for w in workers)
    summary(f"soak: {n} images on {result.info['device_name']} ({result.info['engine']}), "
            f"RSS {rss0:.0f} -> {rss1:.0f} MB (workers {grew} MB), open fds {fds0} -> {fds1}")


@pytest.mark.gpu
def test_cuda_out_of_memory_halves_the_batch_and_goes_on():
    """A real OOM: fill the GPU but 3 GiB, then ask for batch 64 at the model's input size."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bccd_batch.decode import decode_file
    from bccd_batch.backends.torch_eager import TorchEngine

    images = [decode_file(p) for p in sorted((DATA / "JPEGImages").glob("*.jpg"))[:64]]
    ref = TorchEngine(REPO / "engines", "cuda", batch_size=1).infer(images[:8])
    engine = TorchEngine(REPO / "engines", "cuda", batch_size=64)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - (3 << 30), dtype=torch.uint8, device="cuda")
    with pytest.warns(UserWarning, match="batch size halved"):
        got = engine.infer(images)
    del hog
    torch.cuda.empty_cache()     # give the memory back to the device: nvJPEG, in later tests, allocates outside torch
    assert len(got) == 64 and engine.batch_size < 64
    count = lambda dets: {c: sum(1 for d in dets if d[0] == c and d[1] >= 0.6) for c in ("RBC", "WBC", "Platelets")}
    for g, r in zip(got, ref):    # batch composition may move a score across 0.6, not more
        assert all(abs(count(g)[c] - count(r)[c]) <= 1 for c in count(r))
    summary(f"GPU OOM: batch 64 with 3 GiB free on {torch.cuda.get_device_name()} -> halved to "
            f"{engine.batch_size}, all 64 images inferred")


@pytest.mark.gpu
def test_a_second_pass_out_of_gpu_memory_keeps_the_first_count():
    """A real OOM in the second pass: a field at half magnification, counted once, then the GPU filled
    but 64 MiB; counted again at x2 it cannot be, so its first count stays. Memory back, it is."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bccd_batch.backends import count_again
    from bccd_batch.backends.torch_eager import TorchEngine

    engine = TorchEngine(REPO / "engines", "cuda", batch_size=1)
    image = Image.open(bccd_image("BloodImage_00003"))
    field = np.asarray(Image.fromarray(np.tile(np.asarray(image), (2, 2, 1))).resize(image.size, Image.BILINEAR))
    first = engine.infer([field])
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - (64 << 20), dtype=torch.uint8, device="cuda")
    with pytest.warns(UserWarning, match=r"second pass at x[0-9.]+ failed \(.*memory.*its first count is kept"):
        [(dets, scale, _)] = count_again(engine, [field], first, [None])
    del hog
    torch.cuda.empty_cache()     # give the memory back to the device: nvJPEG, in later tests, allocates outside torch
    assert dets is first[0] and scale is None
    [(dets, scale, _)] = count_again(engine, [field], first, [None])
    assert dets is not first[0] and scale > 1.5
    summary(f"GPU OOM in a second pass at x{scale:g} on {torch.cuda.get_device_name()}: first count kept; "
            "with memory back, counted again")
