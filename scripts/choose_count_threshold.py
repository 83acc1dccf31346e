"""Choose a model folder's count threshold by per-image counting error on train+val.

Usage: python scripts/choose_count_threshold.py [MODEL_DIR] [VOC_ROOT]
Runs the model once (at its low detection threshold) over every trainval image, then prints the
sum over the classes of the per-image count MAE for thresholds 0.05..0.95 and the one with the
lowest (`score.choose_count_threshold`, which `bccd-batch train` runs on its best checkpoint).
For a model folder exported without one (a last.pt, an average of several runs).
"""

import sys
from pathlib import Path

import torch

from bccd_batch.labels import read_labels
from bccd_batch.model import load_model
from bccd_batch.score import choose_count_threshold
from bccd_batch.train import DetectionDataset, labelled_predictions

model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "engines")
root = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/bccd")
torch.set_num_threads(2)
labels = read_labels(root, root / "ImageSets/Main/trainval.txt")
ds = DetectionDataset(labels, root / "JPEGImages", train=False)
model, _ = load_model(model_dir)
chosen = choose_count_threshold(*labelled_predictions(model, ds, labels, "cpu"))
for t, total in chosen["sum_of_MAE_by_threshold"].items():
    print(f"{t:.2f} sum of per-class MAE {total:.3f}")
print(f"best count threshold {chosen['count']} (" + ", ".join(f"{c} {v:.3f}" for c, v in chosen["MAE"].items())
      + f", sum {chosen['sum_of_MAE']:.3f}) over {chosen['images']} trainval images")
