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


def rss_mb() -> float:
    """Resident set size of this process, from /proc."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_folder(src: Path, n: int, dest: Path) -> Path:
    """n distinct file names (hard links, or copies across devices) spread over 10 slides."""
    files = sorted(Path(src).glob("*.jpg"))
    for i in range(n):
        d = dest / f"slide{i % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        target = d / f"field{i:06d}.jpg"
        try:
            os.link(files[i % len(files)], target)
        except OSError:
            shutil.copy(files[i % len(files)], target)
    return dest


def model_only(engine, images: list[np.ndarray], batch: int, repeats: int) -> float:
    engine.infer(images[:batch])       # warm-up: compilation, cudnn, allocator
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(images), batch):
            engine.infer(images[i:i + batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return repeats * len(images) / (time.perf_counter() - t)


def run_bench(src: Path, n: int, model_dir: Path, device: str, engines: list[tuple[str, int]], log=print) -> list[dict]:
    from .engines import EngineError, select_engine
    from .pipeline import RunOptions, run

    images = [decode_file(p) for p in sorted(Path(src).glob("*.jpg"))[:64]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(src, n, Path(tmp) / "slides")
        for name, batch in engines:
            try:
                engine = select_engine(name, device, model_dir, batch, log=log)
            except EngineError as e:
                log(f"{name}: skipped ({e})")
                continue
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            mo = model_only(engine, images, batch, repeats=3)
            rss0 = rss_mb()
            out = Path(tmp) / f"out-{name}-{batch}"
            t = time.perf_counter()
            res = run(RunOptions(slides=folder, out=out, model_dir=model_dir, engine=name, device=device,
                                 batch_size=batch, decode_workers=min(16, os.cpu_count() or 4)), log=lambda m: None)
            e2e = res.info["images"]["new"] / (time.perf_counter() - t)
            rows.append({"engine": engine.name, "batch": batch, "model_only_img_s": round(mo, 1),
                         "end_to_end_img_s": round(e2e, 1), "images": n, "device": engine.device_name,
                         "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
                         "rss_start_mb": round(rss0), "rss_end_mb": round(rss_mb()),
                         "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
            log(str(rows[-1]))
            del engine
    return rows


def table(rows: list[dict]) -> str:
    cols = ["engine", "batch", "model_only_img_s", "end_to_end_img_s", "images", "peak_gpu_mb", "rss_start_mb", "rss_end_mb", "device"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
