"""Inside a worker: read, hash and decode a work list's fields on a thread pool (plain JPEGs for a GPU
engine read only, decoded per batch by nvJPEG), measure their quality, and run them through the engine
in batches, two in flight, as groups ready for the store. A field unlike the training labs' (its RBCs'
size, its background's colour cast) is counted a second time brought to their look
(`backends.count_again`)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from .decode import DecodeError, decode_bytes, decode_on_device, device_decodable, device_decoder_problem
from .discover import ImageFile
from .backends import count_again, field_hw, one_ahead, select_engine, submit
from .quality import Quality, measure_device, measure_host
from .store import pack_detections

if TYPE_CHECKING:
    from .model import Uploads
    from .pipeline import RunOptions


@dataclasses.dataclass
class Prepared:
    file: ImageFile
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    array: np.ndarray | None = None    # the decoded field (a tensor on the device once nvJPEG decoded it)
    encoded: bytes | None = None      # a JPEG left for nvJPEG to decode with the rest of its batch
    error: str | None = None
    skip: str | None = None       # "skipped" or "failed" (unchanged and failed before)
    quality: Quality | None = None    # the decoded field's measures: quality.py
    recounted_at: float | None = None      # the scale of its second pass (quality.second_pass), None: counted once
    recoloured: str | None = None          # how that pass recoloured it (quality.SecondPass.recoloured)


def _prepare(f: ImageFile, prior: tuple | None, model_sha: str, full: bool, on_device: bool = False,
             measure: bool = True) -> Prepared:
    """Read, hash and decode `f`, unless its `prior` record (size, mtime_ns, sha256, status, error,
    model sha256, from the store) says it is unchanged and already done. `on_device`: a JPEG that
    nvJPEG can take is only read here and decoded with its batch on the GPU (`_decode_on_device`).
    `measure`: the field's quality measured here (on the host); a GPU engine's are measured on it."""
    p = Prepared(f)
    try:
        st = os.stat(f.path)
        with open(f.path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        p.error = f"cannot read: {e.strerror or e}"
        return p
    p.size, p.mtime_ns, p.sha256 = st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest()
    if not full and prior is not None and prior[:3] == (p.size, p.mtime_ns, p.sha256):
        if prior[3] == "error":
            p.skip, p.error = "failed", prior[4]
            return p
        if prior[5] == model_sha:
            p.skip = "skipped"
            return p
    if on_device and device_decodable(data):
        p.encoded = data
    else:
        _decode_on_host(p, data, measure)
    return p


def _decode_on_host(p: Prepared, data: bytes, measure: bool) -> None:
    """`data` decoded by Pillow into `p.array`, or the reason it cannot be into `p.error`."""
    try:
        p.array = decode_bytes(data)
    except DecodeError as e:
        p.error = str(e)
        return
    if measure:
        p.quality = measure_host(p.array)


def _ordered(pool: ThreadPoolExecutor, fn, items, window: int):
    """pool.map with at most `window` items in flight, so memory stays flat on any folder size."""
    pending: collections.deque = collections.deque()
    it = iter(items)
    for x in it:
        pending.append(pool.submit(fn, x))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        for x in it:
            pending.append(pool.submit(fn, x))
            break


def batches(prepared, engine, batch_size: int, timings: dict, stop=lambda: False, uploads: Uploads | None = None):
    """Groups of (prepared, (h, w) or None, packed detections or None) ready to store: decoded images go
    through the engine `batch_size` at a time, failures and skips ride along with the next group.
    Each batch is submitted before the one before it is collected, so an engine that runs ahead
    (`engines.submit`) has the GPU busy while this thread stacks the next batch. Decoded arrays are
    dropped once inferred so memory stays flat. `timings` accumulates seconds spent in the engine
    and seconds the engine sat waiting for decoded images. `uploads`: a GPU engine's, which host
    fields go through before they are measured there and submitted."""
    yield from one_ahead(_submitted(prepared, engine, batch_size, timings, stop, uploads),
                         lambda submitted: _collect_group(engine, *submitted, timings))


def _submitted(prepared, engine, batch_size: int, timings: dict, stop, uploads: Uploads | None):
    batch: list[Prepared] = []
    done: list[Prepared] = []
    it = iter(prepared)
    while True:
        if stop():
            return      # what is decoded but not submitted is left to the next run
        t = time.monotonic()
        p = next(it, None)
        timings["decode_wait_seconds"] += time.monotonic() - t
        if p is None:
            break
        (batch if p.array is not None or p.encoded is not None else done).append(p)
        if len(batch) >= batch_size or len(done) >= 256:
            yield _submit_group(engine, batch, done, timings, uploads)
            batch, done = [], []
    if batch or done:
        yield _submit_group(engine, batch, done, timings, uploads)


def start_engine(opts: RunOptions, device: str, log):
    """A device worker's (or Ray actor's) engine, compiled before its first field where it compiles,
    and whether its JPEGs go to nvJPEG (`decoded_groups`'s `on_device`)."""
    engine = select_engine(opts.engine, device, opts.model_dir, opts.batch_size, log=log, precision=opts.precision)
    if hasattr(engine, "warm_up"):      # GPU engines: compile before the run's clock starts
        engine.warm_up()
    on_device = opts.gpu_decode and engine.device.startswith("cuda")
    if on_device and (problem := device_decoder_problem(engine.device)):
        log(f"JPEGs decoded on the CPU: nvJPEG cannot be used ({problem})")
        on_device = False
    return engine, on_device


def decoded_groups(work, engine, opts: RunOptions, timings: dict, stop=lambda: False, on_device: bool = False):
    """Read, hash and decode the files of `work` (any iterable of (file, prior record)) on a thread
    pool, at most a bounded window ahead, and yield the stored-ready groups of `batches`: each
    device worker's loop. `on_device`: JPEGs nvJPEG can take are decoded on the engine's GPU.
    Each field's quality (quality.py) is measured where the engine runs: on a GPU, from the copy
    that the engine reads, uploaded here, so that the decode threads (what a GPU run decoding with
    Pillow waits on) only decode: measured in those threads it cost such a run a fifth to a third
    of its images/s (docs/benchmarks.md)."""
    model_sha = engine.card["weights"]["sha256"]
    window = max(2 * opts.batch_size, 4 * opts.decode_workers)
    from .model import Uploads     # torch: here only, in a worker; the run's parent imports this module

    uploads = Uploads(engine.device) if engine.device.startswith("cuda") else None
    with ThreadPoolExecutor(max(1, opts.decode_workers)) as pool:
        prepared = _ordered(pool, lambda item: _prepare(*item, model_sha, opts.full, on_device, uploads is None),
                            work, window)
        yield from batches(prepared, engine, opts.batch_size, timings, stop, uploads)


def new_timings() -> dict:
    """Seconds a worker spent in its engine; waiting for decoded images (file_wait: the part of that
    spent claiming and reading chunks of the work list); decoding batches with nvJPEG; waiting for
    room to send results to the store. And how many fields nvJPEG decoded."""
    return {"inference_seconds": 0.0, "decode_wait_seconds": 0.0, "file_wait_seconds": 0.0,
            "device_decode_seconds": 0.0, "store_wait_seconds": 0.0, "fields_decoded_on_device": 0}


def _decode_on_device(engine, batch: list[Prepared], done: list[Prepared], timings: dict,
                      measure: bool) -> list[Prepared]:
    """Decode the batch's JPEGs left for the GPU in one nvJPEG call and return the batch's fields
    that have an image. If nvJPEG refuses any of them, each goes through `decode_bytes` instead, so
    a bad file is recorded with its reason (moved to `done`) and the others go on (`measure`: as
    `_prepare`'s)."""
    waiting = [p for p in batch if p.encoded is not None]
    if not waiting:
        return batch
    t = time.monotonic()
    try:
        for p, field in zip(waiting, decode_on_device([p.encoded for p in waiting], engine.device)):
            p.array = field
        timings["fields_decoded_on_device"] += len(waiting)
    except RuntimeError:
        for p in waiting:
            _decode_on_host(p, p.encoded, measure)
    for p in waiting:
        p.encoded = None
    timings["device_decode_seconds"] += time.monotonic() - t
    done.extend(p for p in batch if p.array is None)
    return [p for p in batch if p.array is not None]


def _submit_group(engine, batch: list[Prepared], done: list[Prepared], timings: dict, uploads: Uploads | None):
    batch = _decode_on_device(engine, batch, done, timings, measure=uploads is None)
    if uploads is not None:
        t = time.monotonic()
        on_host = [p for p in batch if isinstance(p.array, np.ndarray)]
        for p, field in zip(on_host, uploads([p.array for p in on_host])):
            p.array = field
        timings["inference_seconds"] += time.monotonic() - t     # the copy the engine reads
    # Measured before the batch is submitted (the fields the decode threads measured have their
    # quality already). Measured after it, runs were a third slower end to end (one H100, one
    # call: with Pillow 1,140-1,182 images/s against 1,711-1,817 with no measure at all; with
    # nvJPEG 1,635, where other calls gave 2,157-2,218), presumably because the host then waits
    # for pinned memory that the batch in flight holds.
    unmeasured = [p for p in batch if p.quality is None]
    measured = measure_device([p.array for p in unmeasured]) if unmeasured else list
    t = time.monotonic()
    collect = submit(engine, [p.array for p in batch]) if batch else list
    timings["inference_seconds"] += time.monotonic() - t
    return batch, done, collect, unmeasured, measured


def _collect_group(engine, batch: list[Prepared], done: list[Prepared], collect, unmeasured: list[Prepared], measured,
                   timings: dict) -> list[tuple]:
    t = time.monotonic()
    first = collect()
    timings["inference_seconds"] += time.monotonic() - t
    for p, q in zip(unmeasured, measured()):
        p.quality = q
    t = time.monotonic()
    dets = []
    for p, counted in zip(batch, count_again(engine, [p.array for p in batch], first, [p.quality for p in batch])):
        dets.append(counted.dets)
        p.recounted_at, p.recoloured = counted.scale, counted.recoloured
    timings["inference_seconds"] += time.monotonic() - t
    group = []
    for p, d in zip(batch, dets):
        # Only now is the field let go: a tensor nvJPEG decoded must outlive the batch's GPU work
        # (decode.decode_on_device).
        hw, p.array = field_hw(p.array), None
        group.append((p, hw, pack_detections(d)))      # here, so the single store writer only binds bytes
    return group + [(p, None, None) for p in done]

