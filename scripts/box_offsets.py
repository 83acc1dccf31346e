"""Where a model's boxes sit against the labels' boxes, edge by edge, and what a fixed offset costs in COCO AP.

Usage: python scripts/box_offsets.py LABELS OUT [OUT ...]
  LABELS: what `run --labels` takes (e.g. ../shared/data/txl_pbc); OUT: a `run --out` folder (its latest run)
  or one run's folder, holding detections.csv.

Each labelled box is matched to the same-class detection (score >= 0.5) of highest IoU (>= 0.5). Printed per
class: matched pairs, their median IoU and the median offset of each edge (detection minus label, x0 y0 x1 y1,
in the field's pixels). Then the run's COCO AP as it is and with every detection's edges moved by those
medians: fitted on the fields it is scored on, so it bounds what a constant per-class offset is worth, it is
not a result. A model trained with flips and 90-degree rotations places boxes alike in every orientation,
so a labelling whose boxes sit to one side of the cells shows up here as an offset no such model can learn.
"""

import csv
import sys
from pathlib import Path

import numpy as np

from bccd_batch.cells import CLASSES
from bccd_batch.labels import read_labels
from bccd_batch.score import COCOEvaluator, box_iou, evaluate_all, match_labels


def detections(out: Path) -> dict[str, list[tuple]]:
    run = out / "latest" if (out / "latest").exists() else out
    preds: dict[str, list[tuple]] = {}
    for r in csv.DictReader(open(run / "detections.csv", newline="")):
        rel = f"{r['slide']}/{r['image']}" if r["slide"] else r["image"]
        preds.setdefault(rel, []).append((r["class"], float(r["score"]), *(float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return preds


def edge_offsets(gt: dict[str, dict], preds: dict[str, list[tuple]]) -> dict[str, np.ndarray]:
    """Per class, rows of (IoU, dx0, dy0, dx1, dy1) of each labelled box matched by a detection."""
    rows: dict[str, list[tuple]] = {c: [] for c in CLASSES}
    for key, rec in gt.items():
        sure = [p for p in preds.get(key, []) if p[1] >= 0.5]
        for g in rec["boxes"]:
            best = max((p for p in sure if p[0] == g[0]), key=lambda p: box_iou(p[2:], g[1:]), default=None)
            if best is not None and box_iou(best[2:], g[1:]) >= 0.5:
                rows[g[0]].append((box_iou(best[2:], g[1:]), *(best[2 + i] - g[1 + i] for i in range(4))))
    return {c: np.array(r).reshape(-1, 5) for c, r in rows.items()}


def coco_ap(gt: dict[str, dict], preds: dict[str, list[tuple]]) -> float:
    return evaluate_all({"coco": COCOEvaluator()}, gt, preds)["coco"]["stats"]["AP"]


def main(labels_path: Path, outs: list[Path]) -> None:
    labels = read_labels(labels_path)
    for out in outs:
        preds = detections(out)
        keys = match_labels(labels, sorted(preds))
        gt = {rel: labels.records[k] for rel, k in keys.items()}
        offsets = edge_offsets(gt, preds)
        med = {c: np.median(a[:, 1:], 0) if len(a) else np.zeros(4) for c, a in offsets.items()}
        print(f"{out}: {len(gt)} labelled fields")
        for c, a in offsets.items():
            if len(a):
                print(f"  {c}: {len(a)} pairs, median IoU {np.median(a[:, 0]):.3f}, edge offsets (x0 y0 x1 y1) {med[c].round(2)} px")
        moved = {k: [(c, s, *(np.array(b) - med[c])) for c, s, *b in v] for k, v in preds.items()}
        print(f"  AP {coco_ap(gt, preds):.4f}; with each class's median offset taken off {coco_ap(gt, moved):.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
