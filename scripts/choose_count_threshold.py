"""Choose the model card's count threshold by per-image counting error on train+val.

Usage: python scripts/choose_count_threshold.py [MODEL_DIR] [VOC_ROOT]
Runs the model once (at its low detection threshold) over every trainval image, then prints the
mean absolute count error per class for thresholds 0.05..0.95 and the one with the lowest sum.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from bccd_batch.labels import box_counts, read_labels
from bccd_batch.model import CLASSES, class_counts, load_model
from bccd_batch.train import DetectionDataset, predict

model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "engines")
root = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/bccd")
torch.set_num_threads(2)
labels = read_labels(root, root / "ImageSets/Main/trainval.txt")
ds = DetectionDataset(labels, root / "JPEGImages", train=False)
model, card = load_model(model_dir)
preds = predict(model, ds, "cpu", batch_size=4)
truth = {k: box_counts(labels.records[k]["boxes"]) for k in preds}
best = None
for t in np.arange(0.05, 0.96, 0.05):
    found = {k: class_counts(preds[k], t) for k in preds}
    mae = {c: np.mean([abs(found[k][c] - truth[k][c]) for k in preds]) for c in CLASSES}
    total = sum(mae.values())
    print(f"{t:.2f} " + " ".join(f"{c} {v:.3f}" for c, v in mae.items()) + f" sum {total:.3f}")
    if best is None or total < best[1]:
        best = (round(float(t), 2), total)
print(f"best count threshold {best[0]} (sum of per-class MAE {best[1]:.3f}) over {len(preds)} trainval images")
