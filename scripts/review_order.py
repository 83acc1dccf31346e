"""Check the report's review order: do fields with many uncertain detections have worse counts?

Usage: python scripts/review_order.py RUN_DIR [VOC_ROOT]
RUN_DIR is a run folder of `bccd-batch run` over VOC_ROOT/JPEGImages (its detections.csv and
run.json). For the train and val splits it prints each field's absolute count error (summed over
classes, at the run's count threshold, against the labels as given), the mean over the tenth of
fields with the most uncertain detections (`report.uncertain_detections`), and how many of those
are among the tenth with the largest error.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np

from bccd_batch.labels import box_counts, read_labels
from bccd_batch.cells import CLASSES, class_counts
from bccd_batch.report import uncertain_detections

run = Path(sys.argv[1])
root = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/bccd")
threshold = json.loads((run / "run.json").read_text())["model"]["thresholds"]["count"]
dets: dict[str, list[tuple]] = {}
with open(run / "detections.csv", newline="") as f:
    for r in csv.DictReader(f):
        dets.setdefault(Path(r["image"]).name, []).append((r["class"], float(r["score"])))
for split in ("train", "val"):
    labels = read_labels(root, root / f"ImageSets/Main/{split}.txt").records
    keys = sorted(labels)
    truth = [box_counts(labels[k]["boxes"]) for k in keys]
    found = [class_counts(dets.get(k, []), threshold) for k in keys]
    err = np.array([sum(abs(p[c] - t[c]) for c in CLASSES) for p, t in zip(found, truth)])
    near = np.array([uncertain_detections(dets.get(k, []), threshold) for k in keys])
    tenth = max(1, len(keys) // 10)
    first = np.argsort(-near, kind="stable")[:tenth]
    worst = set(np.argsort(-err, kind="stable")[:tenth].tolist())
    print(f"{split}: {len(keys)} fields, mean count error {err.mean():.2f}; the {tenth} with the most uncertain "
          f"detections: mean count error {err[first].mean():.2f}, {len(worst & set(first.tolist()))} of them among "
          f"the {tenth} worst (by chance {tenth * tenth / len(keys):.1f})")
