"""`run --executor ray`: the per-field work (read, hash, decode, quality, inference) on a Ray cluster,
behind the same driver as the local worker pool (pipeline.py), which still discovers, decides what is
new and alone writes the store. docs/ray.md says how to run it.

A Ray Data plan: the new fields' paths (and their prior store records) as Arrow rows -> an actor pool
(`map_batches` with a callable class: one engine per actor, GPU or CPU) that runs the local
executor's own per-field code (batches.decoded_groups) -> the driver iterating result blocks and
committing each as one transaction. Decode runs inside the actors, as in a local worker (threads,
nvJPEG on a GPU), so images never enter the object store: only detections and field facts travel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import re
import signal
import socket
from typing import TYPE_CHECKING

from .backends import EngineError
from .batches import Prepared, decoded_groups, new_timings, start_engine
from .discover import ImageFile
from .card import ModelError, read_card
from .mps import mps_for_workers, wanted as mps_wanted
from .quality import QUALITY, Quality
from .workers import WORKERS_PER_GPU, decode_threads

if TYPE_CHECKING:
    from .pipeline import RunOptions

INSTALL = "pip install 'bccd-batch[ray]'"


def import_ray():
    """Ray, or an EngineError that says how to install it (the CLI's exit 2)."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra, not only the core)
    except ImportError:
        raise EngineError(f"--executor ray needs Ray Data: {INSTALL}") from None
    return ray


def _reachable(address: str | None, timeout: float = 5.0) -> None:
    """An EngineError, within `timeout`, where nothing answers at a HOST:PORT or ray://HOST:PORT address:
    ray.init would otherwise go on retrying for minutes."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return      # not HOST:PORT: ray.init says what it makes of it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()     # [::1]:10001 too
    except OSError as e:
        raise EngineError(f"no Ray cluster answers at {address} ({e.strerror or e}): "
                          "start it (docs/ray.md) or leave --ray-address unset for a cluster of this host") from None


def _fields_table(pa, files: list[ImageFile], known: dict):
    """The work as Arrow columns: no Python-object column, so Ray never pickles rows into its store."""
    return pa.table({"rel": [f.rel for f in files], "slide": [f.slide for f in files], "path": [f.path for f in files],
                     "prior": [pickle.dumps(known[f.rel]) if f.rel in known else None for f in files]},
                    schema=pa.schema([("rel", pa.string()), ("slide", pa.string()), ("path", pa.string()), ("prior", pa.binary())]))


_TIMINGS = tuple(new_timings())


def _result_schema(pa):
    """Fixed column types: a block whose column is all None (no field skipped, say) stays typed."""
    text, count, real = pa.string(), pa.int64(), pa.float64()
    return pa.schema([("rel", text), ("size", count), ("mtime_ns", count), ("sha256", text), ("error", text),
                      ("skip", text), *[(k, real) for k in QUALITY], ("recounted_at", real), ("recoloured", text), ("height", count), ("width", count),
                      ("dets", pa.binary()), *[(f"t_{k}", real) for k in _TIMINGS], ("engine", text), ("device_name", text)])


def _result_table(pa, group: list[tuple], timings: dict, engine):
    """One task's (prepared, (h, w), packed detections) as Arrow columns; its seconds are spread evenly
    over its rows, so the driver's sum over rows is the actors' total (run.json's timings)."""
    n = len(group)
    ps = [p for p, _, _ in group]
    hws = [hw or (None, None) for _, hw, _ in group]
    return pa.table({
        "rel": [p.file.rel for p in ps], "size": [p.size for p in ps], "mtime_ns": [p.mtime_ns for p in ps],
        "sha256": [p.sha256 for p in ps], "error": [p.error for p in ps], "skip": [p.skip for p in ps],
        **{k: [getattr(p.quality, k) if p.quality else None for p in ps] for k in QUALITY},
        "recounted_at": [p.recounted_at for p in ps], "recoloured": [p.recoloured for p in ps],
        "height": [h for h, _ in hws], "width": [w for _, w in hws],
        "dets": [d for _, _, d in group],
        **{f"t_{k}": [timings[k] / max(1, n)] * n for k in _TIMINGS},
        "engine": [engine.name] * n, "device_name": [engine.device_name] * n,
    }, schema=_result_schema(pa))


class FieldActor:
    """One engine per actor; each call takes a block of fields through it (the local worker's loop)."""

    def __init__(self, opts: RunOptions, device: str, threads: int):
        import torch

        # Ray sets OMP_NUM_THREADS to the actor's CPUs; the local executor's thread count keeps the
        # eager engine's float sums, and so its detections, the same.
        torch.set_num_threads(threads)
        self.opts, self.problem = opts, None
        try:
            self.engine, self.on_device = start_engine(opts, device, log=lambda m: None)
        except (EngineError, ModelError) as e:
            self.problem = str(e)      # raised with the first block, so the driver says why and stops

    def __call__(self, block):
        import pyarrow as pa

        if self.problem:
            raise EngineError(self.problem)
        cols = block.to_pydict()
        work = [(ImageFile(r, s, p), pickle.loads(k) if k is not None else None)
                for r, s, p, k in zip(cols["rel"], cols["slide"], cols["path"], cols["prior"])]
        timings = new_timings()
        group = [x for g in decoded_groups(work, self.engine, self.opts, timings, on_device=self.on_device) for x in g]
        return _result_table(pa, group, timings, self.engine)


def _group(cols: dict, i: int, by_rel: dict) -> tuple:
    p = Prepared(by_rel[cols["rel"][i]], size=cols["size"][i], mtime_ns=cols["mtime_ns"][i], sha256=cols["sha256"][i],
                 error=cols["error"][i], skip=cols["skip"][i], recounted_at=cols["recounted_at"][i],
                 recoloured=cols["recoloured"][i])
    if cols["brightness"][i] is not None:
        p.quality = Quality(*(cols[k][i] for k in QUALITY))
    hw = (cols["height"][i], cols["width"][i]) if cols["height"][i] is not None else None
    return p, hw, cols["dets"][i]


def _engine_error(e: BaseException) -> str | None:
    """The message of the EngineError an actor raised. Ray Data hands back its own exception whose
    text carries the actor's traceback, not the exception object: found there by its type's name."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, EngineError):
            return str(e)
        if found := re.search(r"EngineError: (.+)", str(e)):
            return found.group(1).strip()
        e = getattr(e, "cause", None) or e.__cause__
    return None


def _quiet(ray) -> None:
    """A nightly log says what needs attention: Ray Data's progress and plan go to its own log file
    (ray-data.log in Ray's log folder), only its warnings to stderr."""
    ray.data.DataContext.get_current().print_on_execution_start = False
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)


class RayPool:
    """The local WorkerPool's interface (card, name, device, timings, memory, groups) over Ray actors."""

    def __init__(self, opts: RunOptions, log):
        self.ray = import_ray()
        self.opts, self.log = opts, log
        self.card = read_card(opts.model_dir)
        self.started_here = False
        self.mps, self.cleanup = "off", contextlib.ExitStack()

    def __enter__(self):
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)     # a cluster or MPS daemon started here does not outlive it
            raise

    def _start(self):
        ray = self.ray
        _quiet(ray)
        per_gpu = self.opts.workers_per_device or WORKERS_PER_GPU
        if not ray.is_initialized():
            local_cluster = self.opts.ray_address is None and "RAY_ADDRESS" not in os.environ
            if local_cluster and self.opts.mps and self.opts.device != "cpu" and mps_wanted(["cuda"] * per_gpu):
                # The cluster started here inherits this process's environment, so its actors sharing
                # a GPU do so under MPS as local workers do; on a cluster MPS is the operator's (docs/ray.md).
                self.mps = self.cleanup.enter_context(mps_for_workers(self.log))
            # ray.init makes SIGTERM exit with code 15; the CLI's handler (exit 143) is put back.
            on_sigterm = signal.getsignal(signal.SIGTERM)
            _reachable(self.opts.ray_address)
            try:
                ray.init(address=self.opts.ray_address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:     # no cluster at `auto`, a bad address
                raise EngineError(f"cannot join the Ray cluster ({self.opts.ray_address or 'RAY_ADDRESS'}): {e}") from None
            signal.signal(signal.SIGTERM, on_sigterm)
            self.started_here = True
        cluster = ray.cluster_resources()
        gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
        want_gpu = self.opts.device != "cpu" and gpus > 0
        if self.opts.device.startswith("cuda") and not gpus:
            self.log(f"{self.opts.device} requested but the Ray cluster has no GPU: running on CPUs")
        import torch

        self.threads = torch.get_num_threads()      # this host's default, as a local worker's
        if want_gpu:
            self.actors, self.resources = gpus * per_gpu, {"num_gpus": 1 / per_gpu, "num_cpus": 1}
        else:
            self.actors = self.opts.workers_per_device or max(1, cpus // self.threads)
            self.resources = {"num_cpus": max(1, min(self.threads, cpus))}
        self.kind = "cuda" if want_gpu else "cpu"
        self.device = ",".join([self.kind] * self.actors)     # per engine, as the local pool's
        # Decode threads per actor as a local worker's: its host's cores shared over its actors there.
        self.opts = dataclasses.replace(self.opts, decode_workers=self.opts.decode_workers or decode_threads(per_gpu if want_gpu else 1))
        self.name, self.device_name = "ray", ""
        self.timings, self.memory = new_timings(), []
        self.log(f"ray: {self.actors} {self.kind.upper()} actors on a cluster of {cpus} CPUs and {gpus} GPUs")
        return self

    def __exit__(self, *exc):
        if self.started_here:
            self.ray.shutdown()
        self.cleanup.close()        # MPS quits after the actors, its clients, are gone
        return False

    def groups(self, files: list[ImageFile], known: dict, work_list, stop):
        import pyarrow as pa

        if not files:
            return
        ray = self.ray
        block = 8 * self.opts.batch_size      # fields per task: one store transaction each
        table = _fields_table(pa, files, known)
        ds = ray.data.from_arrow([table.slice(i, block) for i in range(0, len(files), block)])
        # Ray Data restarts a lost actor and redoes its block (its default max_restarts/max_task_retries
        # of -1): each field still comes back once.
        ds = ds.map_batches(FieldActor, fn_constructor_kwargs={"opts": self.opts, "device": self.kind, "threads": self.threads},
                            batch_size=block, batch_format="pyarrow", zero_copy_batch=True,
                            compute=ray.data.ActorPoolStrategy(size=self.actors), **self.resources)
        by_rel = {f.rel: f for f in files}
        seen = set()
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                cols = out.to_pydict()
                if not cols["rel"]:
                    continue
                self.name = f"{cols['engine'][0]} (ray)"
                self.device_name = cols["device_name"][0]
                for k in _TIMINGS:
                    self.timings[k] += sum(cols[f"t_{k}"])
                group = [_group(cols, i, by_rel) for i in range(len(cols["rel"])) if cols["rel"][i] not in seen]
                seen.update(cols["rel"])
                yield group
                if stop():
                    return      # blocks in flight are dropped; the next run does their fields
        except Exception as e:      # a task's EngineError comes back wrapped by Ray
            if (message := _engine_error(e)) is not None:
                raise EngineError(message) from None
            raise
        finally:
            self.timings["fields_decoded_on_device"] = round(self.timings["fields_decoded_on_device"])
