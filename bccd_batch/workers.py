"""The run's worker processes: which devices they run on (`--device` parsed once, here), how many per
device and how many decode threads each, the work list they claim chunks of, and the pool that starts
them and gathers their groups for the single writer of the store (pipeline.py)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from .discover import ImageFile
from .backends import EngineError, cuda_device_count, names_gpu
from .card import ModelError, read_card
from .batches import decoded_groups, new_timings, start_engine

if TYPE_CHECKING:
    from .pipeline import RunOptions


WORKERS_PER_GPU = 3     # worker processes (or Ray actors) sharing one GPU by default


def worker_devices(devices: list[str], per_device: int | None = None) -> list[str]:
    """One entry per worker process. By default three per GPU: a worker's decode threads and engine
    glue share one GIL and leave its GPU idle between batches, which the other workers' batches
    fill (and, under MPS, overlap: mps.py); docs/benchmarks.md has the measured worker counts. One
    on the CPU, where torch already spreads one worker over every core."""
    if per_device is None:
        gpus = cuda_device_count() > 0 and all(names_gpu(d) for d in devices)
        per_device = WORKERS_PER_GPU if gpus else 1
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
    n = cuda_device_count()
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

    def leave() -> None:
        # Everything is sent: flush it (unless nobody is left to read it), then leave without the
        # interpreter's teardown, which with torch loaded takes ~0.9 s on the 2-core CPU machine,
        # added to every run's end as the parent joins us.
        if parent_gone():
            abandon()
        results.close()
        results.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    try:
        engine, on_device = start_engine(opts, device, log=lambda m: send(("log", device, m)))
        send(("ready", device, engine.name, engine.device_name, engine.device))
        timings = new_timings()
        memory = {"rss_mb_first_group": None, "rss_mb_end": None}

        while True:     # the work list comes once the parent has discovered the files
            try:
                work_list = tasks.get(timeout=5)
                break
            except queue.Empty:
                if parent_gone():
                    abandon()
        if work_list is None:       # the run ended before it had work for us
            leave()
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
            for group in decoded_groups(claimed(work), engine, opts, timings, halt.is_set, on_device):
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
    leave()


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


class WorkerPool:
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
        # Summed over the workers (`new_timings`).
        self.timings = new_timings()
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

