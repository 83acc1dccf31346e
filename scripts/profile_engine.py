"""Where a batch's time goes in an engine: torch.profiler over a few batches of real fields.

Usage: python scripts/profile_engine.py [ENGINE] [BATCH] [MODEL_DIR] [VOC_ROOT]   (needs a CUDA GPU)
Prints wall time per batch, GPU kernel time per batch (the GPU's busy share) and the top ops by
GPU time and by CPU time, which is what docs/benchmarks.md's "where the time goes" is read from.
"""

import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bccd_batch.decode import decode_file
from bccd_batch.backends import select_engine

name = sys.argv[1] if len(sys.argv) > 1 else "compiled"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
model_dir = Path(sys.argv[3] if len(sys.argv) > 3 else "engines")
root = Path(sys.argv[4] if len(sys.argv) > 4 else "../shared/data/bccd")
images = [decode_file(p) for p in sorted((root / "JPEGImages").glob("*.jpg"))[:batch]]
engine = select_engine(name, "cuda", model_dir, batch)
for _ in range(3):
    engine.infer(images)
torch.cuda.synchronize()
n = 10
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t = time.perf_counter()
    for _ in range(n):
        engine.infer(images)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
events = prof.key_averages()
by_gpu = events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)
# The table's own total counts each kernel once; summing the rows would count an op and its
# kernels twice (torchvision::nms and the two kernels it launches, say).
value, unit = re.search(r"Self CUDA time total: ([\d.]+)(us|ms|s)", by_gpu).groups()
gpu = float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit] / n
print(f"{engine.name} batch {batch}: {wall * 1e3:.1f} ms per batch wall ({batch / wall:.0f} img/s), "
      f"GPU kernels {gpu * 1e3:.1f} ms per batch (GPU busy {100 * gpu / wall:.0f}%)")
print(by_gpu)
print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
