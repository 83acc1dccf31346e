"""`bccd-batch run`: discover -> read+hash+decode (thread pool) -> infer (batches) -> store -> files.

Every discovered image ends the run in exactly one state for this run: new (processed now),
skipped (unchanged since an earlier run with the same model) or failed (reason recorded).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import __version__
from .decode import DecodeError, decode_bytes
from .discover import ImageFile, discover
from .engines import select_engine
from .outputs import gather, point_latest, write_run_files
from .progress import Progress
from .store import STORE_NAME, Store

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INPUT_ERRORS, EXIT_LOCKED = 0, 1, 2, 3, 75
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class LockedError(Exception):
    pass


@dataclasses.dataclass
class RunOptions:
    slides: Path
    out: Path
    model_dir: Path
    engine: str = "auto"
    device: str = "auto"
    batch_size: int = 8
    full: bool = False
    decode_workers: int = 4
    labels: Path | None = None


@dataclasses.dataclass
class RunResult:
    name: str
    run_dir: Path
    exit_code: int
    info: dict


@dataclasses.dataclass
class _Prepared:
    file: ImageFile
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    array: np.ndarray | None = None
    error: str | None = None
    skip: str | None = None       # "skipped" or "failed" (unchanged and failed before)


def acquire_lock(out: Path):
    """An flock on OUT/.lock: the kernel drops it when the holder dies, so a stale lock never blocks."""
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise LockedError(f"another bccd-batch run holds {out / '.lock'}") from None
        raise
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class _StopFlag:
    """SIGINT/SIGTERM ask the run to stop after the batch in flight; a second signal is the same ask."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in EXIT_SIGNAL:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_run_dir(out: Path, now: dt.datetime) -> Path:
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    base = now.strftime("%Y%m%dT%H%M%SZ")
    for i in range(1, 1000):
        d = runs / (base if i == 1 else f"{base}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder under {runs}")


def _prepare(f: ImageFile, known: dict, model_sha: str, full: bool) -> _Prepared:
    p = _Prepared(f)
    try:
        st = os.stat(f.path)
        with open(f.path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        p.error = f"cannot read: {e.strerror or e}"
        return p
    p.size, p.mtime_ns, p.sha256 = st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest()
    prior = known.get(f.rel)
    if not full and prior is not None and prior[:3] == (p.size, p.mtime_ns, p.sha256):
        if prior[3] == "error":
            p.skip, p.error = "failed", prior[4]
            return p
        if prior[5] == model_sha:
            p.skip = "skipped"
            return p
    try:
        p.array = decode_bytes(data)
    except DecodeError as e:
        p.error = str(e)
    return p


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


def run(opts: RunOptions, log=print) -> RunResult:
    """Raises LockedError, EngineError, ModelError for the CLI to map to exit codes."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out)
    try:
        engine = select_engine(opts.engine, opts.device, opts.model_dir, opts.batch_size, log=log)
        return _run_locked(opts, out, engine, log)
    finally:
        lock.close()


def _run_locked(opts: RunOptions, out: Path, engine, log) -> RunResult:
    card = engine.card
    model_sha = card["weights"]["sha256"]
    thresholds = card["thresholds"]
    store = Store(out / STORE_NAME)
    if store.abandon_stale_runs():
        log("an earlier run was killed before it finished; its committed batches are kept")
    root = str(Path(opts.slides).resolve())
    started = _utc_now()
    t0 = time.monotonic()
    files = discover(opts.slides)
    run_dir = _new_run_dir(out, started)
    run_id = store.begin_run(run_dir.name, started.isoformat(timespec="seconds"), root)
    known = {r["rel"]: (r["size"], r["mtime_ns"], r["sha256"], r["status"], r["error"], r["model_sha256"])
             for r in store.db.execute("SELECT * FROM images WHERE root=?", (root,))}
    log(f"{len(files)} images under {opts.slides} -> {run_dir}")
    status, infer_seconds, n_inferred = "failed", 0.0, 0
    stop = _StopFlag()
    try:
        with stop, ThreadPoolExecutor(max(1, opts.decode_workers)) as pool:
            prog = Progress(len(files), "images")
            batch: list[_Prepared] = []
            done: list[_Prepared] = []

            def flush() -> None:
                nonlocal infer_seconds, n_inferred
                dets: list[list[tuple]] = []
                if batch:
                    t = time.monotonic()
                    dets = engine.infer([p.array for p in batch])
                    infer_seconds += time.monotonic() - t
                    n_inferred += len(batch)
                with store.transaction():
                    for p, d in zip(batch, dets):
                        h, w = p.array.shape[:2]
                        store.record_image(run_id, root, p.file.rel, p.file.slide, size=p.size, mtime_ns=p.mtime_ns,
                                           sha256=p.sha256, width=w, height=h, model_sha256=model_sha, detections=d)
                    for p in done:
                        if p.skip:
                            store.mark(run_id, p.file.rel, p.skip)
                        else:
                            store.record_image(run_id, root, p.file.rel, p.file.slide, size=p.size,
                                               mtime_ns=p.mtime_ns, sha256=p.sha256, error=p.error)
                prog.update(len(batch) + len(done))
                batch.clear()
                done.clear()

            window = max(2 * opts.batch_size, 4 * opts.decode_workers)
            for p in _ordered(pool, lambda f: _prepare(f, known, model_sha, opts.full), files, window):
                if stop.signum is not None:
                    break
                (batch if p.array is not None else done).append(p)
                if len(batch) >= opts.batch_size or len(done) >= 256:
                    flush()
            if stop.signum is None:
                flush()
            prog.close()
        status = "interrupted" if stop.signum is not None else "finished"
    finally:
        outcomes = store.outcomes(run_id)
        elapsed = time.monotonic() - t0
        info = {
            "tool": "bccd-batch", "version": __version__, "run": run_dir.name, "status": status,
            "slides_root": root, "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": _utc_now().isoformat(timespec="seconds"),
            "model": {"name": card.get("name"), "sha256": model_sha, "thresholds": thresholds},
            "engine": engine.name, "device": engine.device, "device_name": engine.device_name,
            "batch_size": opts.batch_size, "full": opts.full,
            "images": {"discovered": len(files), "new": outcomes.get("new", 0),
                       "skipped": outcomes.get("skipped", 0), "failed": outcomes.get("failed", 0)},
            "timings": {"wall_seconds": round(elapsed, 3), "inference_seconds": round(infer_seconds, 3)},
            "images_per_s": round(n_inferred / elapsed, 2) if elapsed > 0 else 0.0,
        }
        data = gather(store, run_id, root, thresholds["count"])
        info["totals"] = data["totals"]
        store.finish_run(run_id, status, info["finished_utc"], info)
        write_run_files(run_dir, data, info)
        point_latest(out, run_dir)
        store.close()
    if stop.signum is not None:
        code = EXIT_SIGNAL[stop.signum]
    else:
        code = EXIT_INPUT_ERRORS if info["images"]["failed"] else EXIT_OK
    return RunResult(run_dir.name, run_dir, code, info)
