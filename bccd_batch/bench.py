"""`bccd-batch bench`: model-only and end-to-end throughput of each engine, printed as a table.

Model-only: decoded images already on the device, timed with CUDA synchronisation, after a warm-up.
End-to-end: JPEG files on disk -> store + CSVs through `pipeline.run`, the nightly path.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .decode import decode_file
from .backends import EngineError, one_ahead, select_engine, submit
from .pipeline import RunOptions, run
from .workers import open_fds, parse_devices, rss_mb


class BenchError(Exception):
    """Nothing to benchmark with; the message says why."""


def make_folder(files: list[Path], n: int, dest: Path) -> Path:
    """n distinct file names (hard links to `files`, or copies across devices) spread over 10 slides."""
    for i in range(n):
        d = dest / f"slide{i % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        target = d / f"field{i:06d}.jpg"
        try:
            os.link(files[i % len(files)], target)
        except OSError:
            shutil.copy(files[i % len(files)], target)
    return dest


def model_only(engine, images: list[np.ndarray], batch: int, min_seconds: float = 3.0) -> float:
    """Images/s of the engine alone on decoded fields, batches submitted as `run` submits them
    (the next before the last is collected), passes over `images` repeated for at least
    `min_seconds` and 3 passes (3 passes of 64 fields were 6 batches of 32 on a GPU: ~0.1 s, and
    1,912 images/s where 60 batches on the same machine gave 2,167-2,287)."""
    engine.infer(images[:batch])       # warm-up: compilation, cudnn, allocator
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    passes = 0

    def batches():
        nonlocal passes
        while passes < 3 or time.perf_counter() - t < min_seconds:
            yield from (images[i:i + batch] for i in range(0, len(images), batch))
            passes += 1

    for _ in one_ahead((submit(engine, b) for b in batches()), lambda collect: collect()):
        pass
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return passes * len(images) / (time.perf_counter() - t)


def end_to_end(folder: Path, out: Path, model_dir: Path, engine: str, device: str, batch: int, **run_opts) -> dict:
    """One `bccd-batch run` over the folder. Images/s from the run's own clock, which starts once
    the engines are built (compiling takes tens of seconds per process and is paid once a night,
    so it is reported apart as startup_s), and how long the engines waited for decoded images.
    `run_opts`: other `RunOptions` fields (decode threads, workers per device, MPS, GPU decoding),
    as `run` chooses them unless given."""
    t = time.perf_counter()
    res = run(RunOptions(slides=folder, out=out, model_dir=model_dir, engine=engine, device=device, batch_size=batch, **run_opts),
              log=lambda m: None)
    wall = time.perf_counter() - t
    timings = res.info["timings"]
    # After the first stored group: engines built, warm and fed. The Ray executor builds its engines
    # inside the run (actors start with the plan), the local one before the run's clock starts.
    first = timings["first_group_seconds"]
    after_first = res.info["images"]["new"] - timings["first_group_fields"]
    span = timings["wall_seconds"] - first      # 0 where the last group came back with the first
    steady = round(after_first / span, 1) if after_first > 0 and span > 0 else "-"   # one group: no steady state
    # Summed over workers, so divide by their number to get the share of each engine's run.
    workers = res.info["device"].split(",")
    n_dev = len(workers)
    return {"devices": len(set(workers)), "workers": n_dev, "decode_threads": res.info["decode_threads_per_worker"], "mps": res.info["mps"],
            "gpu_decoded": res.info["fields_decoded_on_gpu"], "end_to_end_img_s": res.info["images_per_s"],
            "steady_img_s": steady, "executor": run_opts.get("executor", "local"),
            "startup_s": round(wall - timings["wall_seconds"], 1),
            **{f"{k}_pct": round(100 * timings[f"{k}_seconds"] / n_dev / timings["wall_seconds"], 1)
               for k in ("decode_wait", "file_wait", "device_decode", "store_wait")},
            "engine_busy_pct": round(100 * timings["inference_seconds"] / n_dev / timings["wall_seconds"], 1),
            "store_busy_pct": round(100 * timings["store_seconds"] / timings["wall_seconds"], 1),
            "discover_s": timings["discover_seconds"], "first_group_s": timings["first_group_seconds"],
            # The worker processes' own memory (they decode and infer), after their first batch -> at the end.
            "worker_rss_mb": ", ".join(f"{m['rss_mb_first_group']} -> {m['rss_mb_end']}"
                                       for m in res.info["worker_memory"])}


def run_bench(src: Path, n: int, model_dir: Path, device: str, engines: list[tuple[str, int]],
              device_sets: list[str] = (), log=print, executors: tuple[str, ...] = ("local",), **run_opts) -> list[dict]:
    """Rows for each engine:batch on `device`, one per executor (`run --executor`: the model-only
    figure is the engine's, measured once); then the last engine end to end over each set of
    several devices in `device_sets` (worker processes per device as in `run`). `run_opts`: as
    `end_to_end`'s."""
    files = sorted(Path(src).glob("*.jpg"))
    if not files:
        raise BenchError(f"no fields to copy: {src} holds no .jpg files")
    images = [decode_file(p) for p in files[:min(64, n)]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(files, n, Path(tmp) / "slides")
        for name, batch in engines:
            try:
                engine = select_engine(name, device, model_dir, batch, log=log)
            except EngineError as e:
                log(f"{name}: skipped ({e})")
                continue
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            mo = model_only(engine, images, batch)
            engine_name, device_name = engine.name, engine.device_name
            del engine
            for executor in executors:
                rss0, fds0 = rss_mb(), open_fds()
                e2e = end_to_end(folder, Path(tmp) / f"out-{name}-{batch}-{executor}", model_dir, name, device, batch,
                                 executor=executor, **run_opts)
                rows.append({"engine": engine_name, "batch": batch,
                             "model_only_img_s": round(mo, 1), **e2e, "images": n, "device": device_name,
                             "fds": f"{fds0} -> {open_fds()}",
                             "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
                             "rss_start_mb": round(rss0), "rss_end_mb": round(rss_mb()),
                             "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
                log(str(rows[-1]))
        single = rows[-1] if rows else None
        for spec in device_sets:
            multi = parse_devices(spec, log)
            if len(multi) < 2 or single is None:
                continue
            name, batch = next((e, b) for e, b in reversed(engines) if single["engine"].startswith(e))
            rss0, fds0 = rss_mb(), open_fds()
            e2e = end_to_end(folder, Path(tmp) / f"out-x{len(multi)}", model_dir, name, ",".join(multi), batch, **run_opts)
            rows.append({**single, "model_only_img_s": "-", **e2e, "peak_gpu_mb": "-",
                         "rss_start_mb": round(rss0), "rss_end_mb": round(rss_mb()), "fds": f"{fds0} -> {open_fds()}",
                         "scaling": round(e2e["end_to_end_img_s"] / single["end_to_end_img_s"], 2)})
            log(str(rows[-1]))
    return rows


def table(rows: list[dict]) -> str:
    cols = ["engine", "executor", "batch", "devices", "workers", "decode_threads", "mps", "gpu_decoded", "model_only_img_s", "end_to_end_img_s", "steady_img_s", "startup_s",
            "decode_wait_pct", "file_wait_pct", "device_decode_pct", "store_wait_pct", "engine_busy_pct", "store_busy_pct", "discover_s", "first_group_s", "images", "scaling",
            "peak_gpu_mb", "rss_start_mb", "rss_end_mb", "worker_rss_mb", "fds", "device"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
