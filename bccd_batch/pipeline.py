"""`bccd-batch run`, the orchestration: lock, discover, hand the work to the workers, store what they
send back, write the run's files. The workers (workers.py) read+hash+decode (a thread pool; plain
JPEGs for a GPU engine decoded per batch by nvJPEG) and infer in batches (batches.py).

Every discovered image ends the run in exactly one state for this run: new (processed now),
skipped (unchanged since an earlier run with the same model) or failed (reason recorded).

Worker processes claim chunks of the run's work list and read, decode and infer them
(`worker_devices`: three per GPU by default, one on the CPU; `--devices cuda:0,cuda:1` or `all` for
several GPUs); this process is the single writer of the store. Processes, not threads, also for one
device: the decode threads, the engine's Python glue and the store's SQLite calls (each releases and
retakes the GIL) all take turns at one GIL, and in one process each waited (an earlier
single-process version on an H200: the storing thread 95% busy at ~750 fields/s end to end). A
worker also keeps a compiled engine's CUDA graph and buffers on the one thread that replays them.
`--executor ray` hands the same per-field work to actors on a Ray cluster instead (ray_pool.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .discover import discover
from .backends import EngineError
from .mps import mps_for_workers, wanted as mps_wanted
from .outputs import gather, point_latest, prune_runs, write_run_files
from .progress import Progress
from .quality import QUALITY
from .store import STORE_NAME, Store
from .workers import WorkerPool, decode_threads, parse_devices, worker_devices

if TYPE_CHECKING:
    from .ray_pool import RayPool


WORK_LIST = ".work-list"    # OUT/<this>: the running run's work for its workers (workers.write_work_list)

EXIT_OK, EXIT_INPUT_ERRORS, EXIT_LOCKED = 0, 3, 75    # 2 (usage), 74 (cannot write) and 1 (unexpected) come from cli.py
# No image file at all under SLIDES (an empty folder, a share that is not mounted): sysexits' EX_NOINPUT,
# so a cron wrapper can tell it from a quiet night (a rerun with nothing new exits 0).
EXIT_NO_IMAGES = 66
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
    decode_workers: int | None = None          # threads per worker; None: decode_threads()
    workers_per_device: int | None = None      # None: 3 per GPU, 1 on the CPU (worker_devices)
    precision: str = "fp16"                     # the GPU engines'; eager torch is fp32
    mps: bool = True                            # workers sharing a GPU under CUDA MPS (mps.py)
    gpu_decode: bool = True                     # plain JPEGs decoded by nvJPEG where the engine is on a GPU
    keep_runs: int | None = None                # once a run finishes, the folders of only the newest N runs are kept
    estimate_factors: dict = dataclasses.field(default_factory=dict)   # class -> the lab's factor (outputs.ESTIMATED)
    executor: str = "local"                     # or "ray": the per-field work on a Ray cluster (ray_pool.py)
    ray_address: str | None = None              # ray.init's address: None (RAY_ADDRESS or a local cluster), auto, ray://...


@dataclasses.dataclass
class RunResult:
    name: str
    run_dir: Path
    exit_code: int
    info: dict


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


def run(opts: RunOptions, log=print) -> RunResult:
    """Raises LockedError, EngineError, ModelError, StoreError for the CLI to map to exit codes."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out)
    try:
        store = Store(out / STORE_NAME)     # before any worker starts: a store we cannot use ends the run here
        try:
            if opts.executor == "ray":
                from .ray_pool import RayPool

                with RayPool(opts, log) as workers:
                    return _run_locked(workers.opts, out, store, workers, log, workers.mps)
            devices = worker_devices(parse_devices(opts.device, log), opts.workers_per_device)
            opts = dataclasses.replace(opts, decode_workers=opts.decode_workers or decode_threads(len(devices)))
            mps = mps_for_workers(log) if opts.mps and mps_wanted(devices) else contextlib.nullcontext("off")
            started, mode = False, "off"
            try:
                with mps as mode, WorkerPool(devices, opts, log) as workers:
                    started = True
                    return _run_locked(opts, out, store, workers, log, mode)
            except EngineError as e:
                if started or mode != "private":
                    raise
                log(f"the workers did not start under the MPS daemon started for this run; starting them without it ({e})")
            with WorkerPool(devices, opts, log) as workers:
                return _run_locked(opts, out, store, workers, log, "off")
        finally:
            store.close()
    finally:
        lock.close()


def _store_group(store: Store, run_id: int, root: str, model_sha: str, group: list[tuple]) -> int:
    """One transaction per group: a kill loses at most the group in flight, which the next run
    redoes, and never leaves half of one stored. Returns how many images had detections."""
    images, skipped = [], []
    for p, hw, dets in group:
        if p.skip:
            skipped.append((p.file.rel, p.skip))
            continue
        m = {"rel": p.file.rel, "slide": p.file.slide, "size": p.size, "mtime_ns": p.mtime_ns, "sha256": p.sha256}
        if dets is None:
            m["error"] = p.error
        else:
            m.update(dict(zip(QUALITY, p.quality.measures)) if p.quality else dict.fromkeys(QUALITY), width=hw[1], height=hw[0],
                     model_sha256=model_sha, detections=dets, recounted_at=p.recounted_at, recoloured=p.recoloured)
        images.append(m)
    with store.transaction():
        store.record_images(run_id, root, images)
        store.mark(run_id, skipped)
    return sum(1 for m in images if "detections" in m)


def _run_locked(opts: RunOptions, out: Path, store: Store, inference: WorkerPool | RayPool, log, mps: str) -> RunResult:
    card = inference.card
    model_sha = card["weights"]["sha256"]
    thresholds = card["thresholds"]
    if store.abandon_stale_runs():
        log("an earlier run was killed before it finished; its committed batches are kept")
    root = str(Path(opts.slides).resolve())
    started = _utc_now()
    t0 = time.monotonic()
    files = discover(opts.slides)
    discover_seconds = time.monotonic() - t0
    run_dir = _new_run_dir(out, started)
    run_id = store.begin_run(run_dir.name, started.isoformat(timespec="seconds"), root)
    known = {r["rel"]: (r["size"], r["mtime_ns"], r["sha256"], r["status"], r["error"], r["model_sha256"])
             for r in store.images_under(root)}
    log(f"{len(files)} images under {opts.slides} -> {run_dir}")
    if not files:
        log(f"no image files under {opts.slides}: nothing to process (an empty folder, or a share that is not mounted?)")
    status, n_inferred, store_seconds, first_group_seconds, first_group_fields = "failed", 0, 0.0, 0.0, 0
    stop = _StopFlag()
    try:
        with stop:
            prog = Progress(len(files), "images", counts=" inferred")
            # closing(): on an error the workers are stopped here, not at GC.
            with contextlib.closing(inference.groups(files, known, out / WORK_LIST,
                                                     lambda: stop.signum is not None)) as groups:
                for group in groups:
                    t = time.monotonic()
                    inferred = _store_group(store, run_id, root, model_sha, group)
                    n_inferred += inferred
                    store_seconds += time.monotonic() - t
                    # Discovery, then the first batch read, decoded and inferred (engines are warm by now).
                    if not first_group_seconds:
                        first_group_seconds, first_group_fields = time.monotonic() - t0, inferred
                    prog.update(len(group), counted=inferred)
            prog.close()
        status = "interrupted" if stop.signum is not None else "finished" if files else "no_images"
    finally:
        outcomes = store.outcomes(run_id)
        elapsed = time.monotonic() - t0
        timings = dict(inference.timings)
        decoded_on_gpu = timings.pop("fields_decoded_on_device")
        info = {
            "tool": "bccd-batch", "version": __version__, "run": run_dir.name, "status": status,
            "slides_root": root, "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": _utc_now().isoformat(timespec="seconds"),
            "model": {"name": card.get("name"), "sha256": model_sha, "thresholds": thresholds,
                      "backbone": card["architecture"]["backbone"], "input_size": card["architecture"]["test_min_size"],
                      "training_data": card.get("training", {}).get("data"),
                      "calibrated_on": {k: card["calibration"][k] for k in ("labels", "fields")} if "calibration" in card else None},
            "engine": inference.name, "device": inference.device, "device_name": inference.device_name, "mps": mps,
            "batch_size": opts.batch_size, "decode_threads_per_worker": opts.decode_workers, "full": opts.full,
            # What happened, not what was allowed: on the CPU nothing is decoded on a GPU.
            "gpu_decode": opts.gpu_decode and "cuda" in inference.device, "fields_decoded_on_gpu": decoded_on_gpu,
            "images": {"discovered": len(files), "new": outcomes.get("new", 0),
                       "skipped": outcomes.get("skipped", 0), "failed": outcomes.get("failed", 0)},
            "timings": {"wall_seconds": round(elapsed, 3), "store_seconds": round(store_seconds, 3),
                        "discover_seconds": round(discover_seconds, 3), "first_group_seconds": round(first_group_seconds, 3),
                        "first_group_fields": first_group_fields,
                        **{k: round(v, 3) for k, v in timings.items()}},
            "worker_memory": inference.memory, "estimate_factors": opts.estimate_factors,
            "images_per_s": round(n_inferred / elapsed, 2) if elapsed > 0 else 0.0,
        }
        data = gather(store, run_id, root, thresholds["count"], opts.estimate_factors)
        info["totals"] = data["totals"]
        if opts.keep_runs and status == "finished":
            # Under the lock, before this run's files: its run.json names what went. Only a
            # finished run prunes, so a night that failed or was stopped never costs history.
            info["pruned_runs"], problems = prune_runs(out, [r["name"] for r in store.runs()], opts.keep_runs)
            for problem in problems:
                log(f"could not remove an old run folder: {problem}")
            if info["pruned_runs"]:
                log(f"removed {len(info['pruned_runs'])} run folders beyond the newest {opts.keep_runs} "
                    "(the store and the index keep their counts)")
        store.finish_run(run_id, status, info["finished_utc"], info)
        write_run_files(run_dir, data, info)
        point_latest(out, run_dir)
    if stop.signum is not None:
        code = EXIT_SIGNAL[stop.signum]
    elif status == "no_images":
        code = EXIT_NO_IMAGES
    else:
        code = EXIT_INPUT_ERRORS if info["images"]["failed"] else EXIT_OK
    return RunResult(run_dir.name, run_dir, code, info)
