"""`bccd-batch run`: discover -> read+hash+decode (thread pool; plain JPEGs for a GPU engine: read
there, decoded per batch by nvJPEG) -> infer (batches) -> store -> files.

Every discovered image ends the run in exactly one state for this run: new (processed now),
skipped (unchanged since an earlier run with the same model) or failed (reason recorded).

Worker processes claim chunks of the run's work list and read, decode and infer them
(`worker_devices`: three per GPU by default, one on the CPU; `--devices cuda:0,cuda:1` or `all` for
several GPUs); this process is the single writer of the store. Processes, not threads, also for one
device: the decode threads, the engine's Python glue and the store's SQLite calls (each releases and
retakes the GIL) all take turns at one GIL, and in one process each waited (an earlier
single-process version on an H200: the storing thread 95% busy at ~750 fields/s end to end). A
worker also keeps a compiled engine's CUDA graph and buffers on the one thread that replays them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import multiprocessing
import os
import pickle
import queue
import signal
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .decode import DecodeError, decode_bytes, decode_on_device, device_decodable, device_decoder_problem
from .discover import ImageFile, discover
from .backends import EngineError, field_hw, names_gpu, one_ahead, select_engine, submit
from .model import ModelError, Uploads, read_card
from .mps import mps_for_workers, wanted as mps_wanted
from .outputs import gather, point_latest, prune_runs, write_run_files
from .progress import Progress
from .quality import measure_device, measure_host
from .store import STORE_NAME, Store, pack_detections

WORK_LIST = ".work-list"    # OUT/<this>: the running run's work for its workers (`_write_work_list`)

EXIT_OK, EXIT_INPUT_ERRORS, EXIT_LOCKED = 0, 3, 75    # 2 (usage) and 1 (unexpected) come from cli.py
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
    array: np.ndarray | None = None    # the decoded field (a tensor on the device once nvJPEG decoded it)
    encoded: bytes | None = None      # a JPEG left for nvJPEG to decode with the rest of its batch
    error: str | None = None
    skip: str | None = None       # "skipped" or "failed" (unchanged and failed before)
    quality: tuple[float | None, float] | None = None    # (focus, brightness) of the decoded field: quality.py


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


def _prepare(f: ImageFile, prior: tuple | None, model_sha: str, full: bool, on_device: bool = False,
             measure: bool = True) -> _Prepared:
    """Read, hash and decode `f`, unless its `prior` record (size, mtime_ns, sha256, status, error,
    model sha256, from the store) says it is unchanged and already done. `on_device`: a JPEG that
    nvJPEG can take is only read here and decoded with its batch on the GPU (`_decode_on_device`).
    `measure`: the field's quality measured here (on the host); a GPU engine's are measured on it."""
    p = _Prepared(f)
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


def _decode_on_host(p: _Prepared, data: bytes, measure: bool) -> None:
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


def _batches(prepared, engine, batch_size: int, timings: dict, stop=lambda: False, uploads: Uploads | None = None):
    """Groups of (prepared, (h, w) or None, packed detections or None) ready to store: decoded images go
    through the engine `batch_size` at a time, failures and skips ride along with the next group.
    Each batch is submitted before the one before it is collected, so an engine that runs ahead
    (`engines.submit`) has the GPU busy while this thread stacks the next batch. Decoded arrays are
    dropped once inferred so memory stays flat. `timings` accumulates seconds spent in the engine
    and seconds the engine sat waiting for decoded images. `uploads`: a GPU engine's, which host
    fields go through before they are measured there and submitted."""
    yield from one_ahead(_submitted(prepared, engine, batch_size, timings, stop, uploads),
                         lambda submitted: _collect_group(*submitted, timings))


def _submitted(prepared, engine, batch_size: int, timings: dict, stop, uploads: Uploads | None):
    batch: list[_Prepared] = []
    done: list[_Prepared] = []
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


def _decoded_groups(work, engine, opts: RunOptions, timings: dict, stop=lambda: False, on_device: bool = False):
    """Read, hash and decode the files of `work` (any iterable of (file, prior record)) on a thread
    pool, at most a bounded window ahead, and yield the stored-ready groups of `_batches`: each
    device worker's loop. `on_device`: JPEGs nvJPEG can take are decoded on the engine's GPU.
    Each field's quality (quality.py) is measured where the engine runs: on a GPU, from the copy
    that the engine reads, uploaded here, so that the decode threads (what a GPU run decoding with
    Pillow waits on) only decode: measured in those threads it cost such a run a fifth to a third
    of its images/s (docs/benchmarks.md)."""
    model_sha = engine.card["weights"]["sha256"]
    window = max(2 * opts.batch_size, 4 * opts.decode_workers)
    uploads = Uploads(engine.device) if engine.device.startswith("cuda") else None
    with ThreadPoolExecutor(max(1, opts.decode_workers)) as pool:
        prepared = _ordered(pool, lambda item: _prepare(*item, model_sha, opts.full, on_device, uploads is None),
                            work, window)
        yield from _batches(prepared, engine, opts.batch_size, timings, stop, uploads)


def _new_timings() -> dict:
    """Seconds a worker spent in its engine; waiting for decoded images (file_wait: the part of that
    spent claiming and reading chunks of the work list); decoding batches with nvJPEG; waiting for
    room to send results to the store. And how many fields nvJPEG decoded."""
    return {"inference_seconds": 0.0, "decode_wait_seconds": 0.0, "file_wait_seconds": 0.0,
            "device_decode_seconds": 0.0, "store_wait_seconds": 0.0, "fields_decoded_on_device": 0}


def _decode_on_device(engine, batch: list[_Prepared], done: list[_Prepared], timings: dict,
                      measure: bool) -> list[_Prepared]:
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


def _submit_group(engine, batch: list[_Prepared], done: list[_Prepared], timings: dict, uploads: Uploads | None):
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


def _collect_group(batch: list[_Prepared], done: list[_Prepared], collect, unmeasured: list[_Prepared], measured,
                   timings: dict) -> list[tuple]:
    t = time.monotonic()
    dets = collect()
    timings["inference_seconds"] += time.monotonic() - t
    for p, q in zip(unmeasured, measured()):
        p.quality = q
    group = []
    for p, d in zip(batch, dets):
        # Only now is the field let go: a tensor nvJPEG decoded must outlive the batch's GPU work
        # (decode.decode_on_device).
        hw, p.array = field_hw(p.array), None
        group.append((p, hw, pack_detections(d)))      # here, so the single store writer only binds bytes
    return group + [(p, None, None) for p in done]


def worker_devices(devices: list[str], per_device: int | None = None) -> list[str]:
    """One entry per worker process. By default three per GPU: a worker's decode threads and engine
    glue share one GIL and leave its GPU idle between batches, which the other workers' batches
    fill (and, under MPS, overlap: mps.py); docs/benchmarks.md has the measured worker counts. One
    on the CPU, where torch already spreads one worker over every core."""
    if per_device is None:
        gpus = torch.cuda.is_available() and all(names_gpu(d) for d in devices)
        per_device = 3 if gpus else 1
    return [d for d in devices for _ in range(per_device)]


def decode_threads(workers: int, cpus: int | None = None) -> int:
    """Decode threads per worker by default: three quarters of the host's cores shared among its
    workers, 2 to 8. Compiled fp16 batch 32: on a 16-core H100 host three workers gave 1,970
    images/s with 4 threads each and 1,928 with 5; on a 64-core 4xH100 host one GPU's two workers
    gave 1,734 with 8 threads each against 1,589 with 4, and four GPUs' eight workers 5,215 with 4
    each against 4,296 with 8: too few threads leave the engines waiting for decoded images, too
    many take the CPU from the workers' own glue."""
    cpus = cpus or len(os.sched_getaffinity(0))
    return max(2, min(8, 3 * cpus // (4 * workers)))


def rss_mb() -> float:
    """Resident set size of this process, from /proc."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> int:
    """Open file descriptors of this process, from /proc."""
    return len(os.listdir("/proc/self/fd"))


def parse_devices(spec: str, log=print) -> list[str]:
    """`--device` once, in the parent, to what each worker runs on: `cuda:0,cuda:1` -> both; `all`
    -> every CUDA GPU; `auto` -> `cuda` where there is one; the CPU where a GPU is asked for and there
    is none (said once, in one line); an unknown device or GPU number is an EngineError."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "all":
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise EngineError(f"no device in {spec!r}")
    out = []
    for d in devices:
        kind, _, index = d.partition(":")
        if d == "auto":
            d = "cuda" if n else "cpu"
        elif kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise EngineError(f"unsupported device {d!r} (use cpu, cuda, cuda:N, all, auto or a list)")
        elif kind == "cuda" and not n:
            log(f"{d} requested but no CUDA GPU is available: running on the CPU")
            d = "cpu"
        elif index and int(index) >= n:
            raise EngineError(f"{d} requested but this machine has {n} CUDA GPU{'s' if n > 1 else ''}")
        out.append(d)
    return out


def run(opts: RunOptions, log=print) -> RunResult:
    """Raises LockedError, EngineError, ModelError, StoreError for the CLI to map to exit codes."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out)
    try:
        store = Store(out / STORE_NAME)     # before any worker starts: a store we cannot use ends the run here
        try:
            devices = worker_devices(parse_devices(opts.device, log), opts.workers_per_device)
            opts = dataclasses.replace(opts, decode_workers=opts.decode_workers or decode_threads(len(devices)))
            mps = mps_for_workers(log) if opts.mps and mps_wanted(devices) else contextlib.nullcontext("off")
            started, mode = False, "off"
            try:
                with mps as mode, _WorkerPool(devices, opts, log) as workers:
                    started = True
                    return _run_locked(opts, out, store, workers, log, mode)
            except EngineError as e:
                if started or mode != "private":
                    raise
                log(f"the workers did not start under the MPS daemon started for this run; starting them without it ({e})")
            with _WorkerPool(devices, opts, log) as workers:
                return _run_locked(opts, out, store, workers, log, "off")
        finally:
            store.close()
    finally:
        lock.close()


def _put_until(q, item, give_up, timeout: float = 0.5) -> bool:
    """Put on a bounded multiprocessing queue, waiting for room but never past `give_up()`; False
    if it gave up."""
    while not give_up():
        try:
            q.put(item, timeout=timeout)
            return True
        except queue.Full:
            continue
    return False


def _device_worker(device: str, opts: RunOptions, tasks, next_chunk, results, halt, parent_pid: int) -> None:
    """One per entry of `worker_devices` (a spawned process): build the engine, take the run's work
    list (`_write_work_list`) from `tasks`, then claim its chunks one at a time from the shared
    counter `next_chunk` and read, decode and infer them; send groups back on `results`.
    `halt` set: claim no more, finish the batch in flight and stop, leaving what is only decoded to
    the next run."""
    # The parent decides when to stop (it sets `halt` on SIGINT/SIGTERM); a terminal's Ctrl-C or a
    # service manager's SIGTERM to the whole process group must not kill workers mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def parent_gone() -> bool:
        return os.getppid() != parent_pid

    def abandon() -> None:
        results.cancel_join_thread()    # the parent was killed: nobody will read us
        os._exit(1)

    def send(msg) -> None:
        if not _put_until(results, msg, parent_gone):
            abandon()

    try:
        engine = select_engine(opts.engine, device, opts.model_dir, opts.batch_size,
                               log=lambda m: send(("log", device, m)), precision=opts.precision)
        if hasattr(engine, "warm_up"):      # GPU engines: compile before the run's clock starts
            engine.warm_up()
        on_device = opts.gpu_decode and engine.device.startswith("cuda")
        if on_device and (problem := device_decoder_problem(engine.device)):
            send(("log", device, f"JPEGs decoded on the CPU: nvJPEG cannot be used ({problem})"))
            on_device = False
        send(("ready", device, engine.name, engine.device_name, engine.device))
        timings = _new_timings()
        memory = {"rss_mb_first_group": None, "rss_mb_end": None}

        while True:     # the work list comes once the parent has discovered the files
            try:
                work_list = tasks.get(timeout=5)
                break
            except queue.Empty:
                if parent_gone():
                    abandon()
        if work_list is None:       # the run ended before it had work for us
            return
        path, offsets = work_list

        def claimed(work):
            # (file, prior record) of each chunk this worker claims, as one continuous stream so the
            # decode window stays full across chunks.
            while not halt.is_set():
                t = time.monotonic()
                with next_chunk.get_lock():
                    k = next_chunk.value
                    next_chunk.value = k + 1
                if k + 1 >= len(offsets):
                    return
                work.seek(offsets[k])
                chunk = pickle.loads(work.read(offsets[k + 1] - offsets[k]))
                timings["file_wait_seconds"] += time.monotonic() - t
                yield from chunk

        # Timed from here: waiting for the other workers to start or for discovery is not waiting for decode.
        with open(path, "rb") as work:
            for group in _decoded_groups(claimed(work), engine, opts, timings, halt.is_set, on_device):
                # After the first group: engine built, compiled, warmed up; growth from here is a leak.
                memory["rss_mb_first_group"] = memory["rss_mb_first_group"] or round(rss_mb())
                t = time.monotonic()
                send(("group", group))
                timings["store_wait_seconds"] += time.monotonic() - t
        memory["rss_mb_end"] = round(rss_mb())
        send(("done", device, timings, {**memory, "device": engine.device}))
    except (EngineError, ModelError) as e:
        send(("error", device, str(e), True))
    except BaseException:
        send(("error", device, traceback.format_exc(limit=8), False))


def _write_work_list(path: Path, files: list[ImageFile], known: dict, chunk_size: int) -> list[int]:
    """The run's work for the workers: chunks of (file, prior record), pickled one after another to
    `path`; returns their byte offsets (one more than chunks). Workers claim chunk numbers from a
    shared counter and read them from here, so this process, the single store writer, does nothing
    else while they run, and a worker holds one chunk, whatever the folder's size."""
    offsets = [0]
    with open(path, "wb") as f:
        for i in range(0, len(files), chunk_size):
            f.write(pickle.dumps([(x, known.get(x.rel)) for x in files[i:i + chunk_size]], pickle.HIGHEST_PROTOCOL))
            offsets.append(f.tell())
    return offsets


class _WorkerPool:
    """Worker processes (`worker_devices`) over a shared work list; groups come back here."""

    def __init__(self, devices: list[str], opts: RunOptions, log):
        ctx = multiprocessing.get_context("spawn")      # CUDA cannot be used in forked children
        self.opts, self.devices, self.log = opts, devices, log
        self.card = read_card(opts.model_dir)
        self.tasks = ctx.Queue()       # the work list's path and offsets, once for each worker
        self.next_chunk = ctx.Value("q", 0)
        # Bounded too: workers that outrun the store wait rather than pile results up in memory.
        self.results = ctx.Queue(maxsize=8 * len(devices))
        self.halt = ctx.Event()
        self.procs = [ctx.Process(target=_device_worker, args=(d, opts, self.tasks, self.next_chunk, self.results, self.halt, os.getpid()),
                                  name=f"bccd-batch {d}", daemon=True) for d in devices]

    def __enter__(self):
        for p in self.procs:
            p.start()
        names = []
        try:
            while len(names) < len(self.procs):
                msg = self._get()
                if msg[0] == "error":
                    where = "" if len(self.devices) == 1 else f"{msg[1]}: "
                    if msg[3]:      # the engine or model cannot be used: a usage error, no traceback
                        raise EngineError(where + msg[2])
                    raise EngineError(f"worker for {msg[1]} failed to start:\n{msg[2]}")
                if msg[0] == "ready":
                    names.append(msg)
                else:
                    self._log(msg)
        except BaseException:
            for p in self.procs:
                p.kill()
            raise
        names.sort(key=lambda m: self.devices.index(m[1]))
        self.name = names[0][2]
        # Summed over the workers (`_new_timings`).
        self.timings = _new_timings()
        self.memory: list[dict] = []      # per worker: its device, its RSS after its first group and at its end
        self.device = ",".join(m[4] for m in names)     # what the engines run on (cuda without a GPU: cpu)
        self.device_name = ", ".join(sorted({m[3] for m in names}))
        workers = ", ".join(f"{m[2]} on {m[4]} ({m[3]})" for m in names)
        self.log(f"{len(self.procs)} device workers: {workers}" if len(names) > 1 else f"engine: {workers}")
        return self

    def _log(self, msg) -> None:
        self.log(msg[2] if len(self.devices) == 1 else f"{msg[1]}: {msg[2]}")

    def __exit__(self, *exc):
        for _ in self.procs:    # for workers still waiting for a work list (the run failed before one)
            self.tasks.put(None)
        # Messages no worker took may still sit in the task pipe: don't wait to flush them.
        self.tasks.cancel_join_thread()
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        return False

    def _get(self, on_wait=lambda: None):
        while True:
            try:
                return self.results.get(timeout=0.5)
            except queue.Empty:
                on_wait()
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode}")

    def groups(self, files: list[ImageFile], known: dict, work_list: Path, stop):
        offsets = _write_work_list(work_list, files, known, chunk_size=2 * self.opts.batch_size)
        for _ in self.procs:
            self.tasks.put((str(work_list), offsets))

        def halt_on_stop():
            if stop():
                self.halt.set()

        finished = 0
        try:
            while finished < len(self.procs):
                halt_on_stop()
                msg = self._get(on_wait=halt_on_stop)
                if msg[0] == "group":
                    yield msg[1]
                elif msg[0] == "done":
                    finished += 1
                    for k, v in msg[2].items():
                        self.timings[k] += v
                    self.memory.append(msg[3])
                elif msg[0] == "log":
                    self._log(msg)
                else:
                    raise RuntimeError(f"worker for {msg[1]} failed:\n{msg[2]}")
        finally:
            if finished < len(self.procs):
                for p in self.procs:
                    p.kill()
            work_list.unlink(missing_ok=True)


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
            focus, brightness = p.quality or (None, None)
            m.update(width=hw[1], height=hw[0], model_sha256=model_sha, detections=dets, focus=focus, brightness=brightness)
        images.append(m)
    with store.transaction():
        store.record_images(run_id, root, images)
        store.mark(run_id, skipped)
    return sum(1 for m in images if "detections" in m)


def _run_locked(opts: RunOptions, out: Path, store: Store, inference: _WorkerPool, log, mps: str) -> RunResult:
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
    status, n_inferred, store_seconds, first_group_seconds = "failed", 0, 0.0, 0.0
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
                    first_group_seconds = first_group_seconds or time.monotonic() - t0
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
                      "training_data": card.get("training", {}).get("data")},
            "engine": inference.name, "device": inference.device, "device_name": inference.device_name, "mps": mps,
            "batch_size": opts.batch_size, "decode_threads_per_worker": opts.decode_workers, "full": opts.full,
            # What happened, not what was allowed: on the CPU nothing is decoded on a GPU.
            "gpu_decode": opts.gpu_decode and "cuda" in inference.device, "fields_decoded_on_gpu": decoded_on_gpu,
            "images": {"discovered": len(files), "new": outcomes.get("new", 0),
                       "skipped": outcomes.get("skipped", 0), "failed": outcomes.get("failed", 0)},
            "timings": {"wall_seconds": round(elapsed, 3), "store_seconds": round(store_seconds, 3),
                        "discover_seconds": round(discover_seconds, 3), "first_group_seconds": round(first_group_seconds, 3),
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
