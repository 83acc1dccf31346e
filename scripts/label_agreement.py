"""How closely two labellings of the same BCCD fields agree (BCCD's XML and TXL-PBC's complete labels),
and what that disagreement leaves for any detector scored against one of them.

Usage: python scripts/label_agreement.py [TXL_PBC] [BCCD] [METRICS]
(defaults: ../shared/data/txl_pbc, ../shared/data/bccd; METRICS: the metrics.json of a run over TXL-PBC's
BCCD fields scored against TXL-PBC's labels, e.g. `bccd-batch run VAL/bccd_complete --labels TXL_PBC`)

Each XML box is matched to the same-class TXL-PBC box of highest IoU (>= 0.5, each used once). Printed per
class: matched pairs, their median IoU, each side's median offset (TXL-PBC minus XML, px) and median
absolute deviation from it. Then a simulation of boxes whose four sides move by independent Gaussian
errors: with sigma px from that deviation (the two labellings' difference) it reproduces the pairs'
median IoU; a detector that finds every cell's true box, scored against labels whose own error is sigma /
sqrt(2) (both labellings equally noisy) or sigma / 2 (TXL-PBC's a quarter of the difference's variance),
matches at IoU >= t the printed share of cells, averaged over t = 0.50, 0.55, ..., 0.95: the most COCO AP
it can score against them. With METRICS, each class's line per IoU threshold: the run's AP, then the
share of true boxes matched in either case.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np

from bccd_batch.cells import CLASSES
from bccd_batch.labels import read_voc, read_yolo
from bccd_batch.score import box_iou

THRESHOLDS = np.arange(0.5, 0.96, 0.05)


def matched_pairs(txl: Path, bccd: Path) -> dict[str, list[tuple]]:
    """Per class: (iou, dx0, dy0, dx1, dy1, xml width, xml height) of each XML box matched in TXL-PBC."""
    complete, xml = read_yolo(txl).records, read_voc(bccd).records
    by_name = {Path(k).name: v for k, v in complete.items()}
    xml_by_name = {Path(k).name: v for k, v in xml.items()}
    pairs: dict[str, list[tuple]] = {c: [] for c in CLASSES}
    for row in csv.DictReader(open(txl / "sources.csv", newline="")):
        if row["source"] != "BCCD":
            continue
        theirs = by_name[row["file"]]["boxes"]
        used: set[int] = set()
        for x in xml_by_name[row["original_name"]]["boxes"]:
            best, j = max(((box_iou(x[1:], t[1:]), j) for j, t in enumerate(theirs) if t[0] == x[0] and j not in used),
                          default=(0.0, None))
            if j is None or best < 0.5:
                continue
            used.add(j)
            t = theirs[j]
            pairs[x[0]].append((best, *(t[i] - x[i] for i in range(1, 5)), x[3] - x[1], x[4] - x[2]))
    return pairs


def simulated_ious(w: float, h: float, sigma: float, n: int = 200_000, seed: int = 0) -> np.ndarray:
    """IoU of a w x h box with copies whose sides move by independent N(0, sigma) px."""
    b = np.array([0.0, 0.0, w, h]) + np.random.default_rng(seed).normal(0.0, sigma, (n, 4))
    ix = np.clip(np.minimum(w, b[:, 2]) - np.maximum(0.0, b[:, 0]), 0, None)
    iy = np.clip(np.minimum(h, b[:, 3]) - np.maximum(0.0, b[:, 1]), 0, None)
    inter = ix * iy
    return inter / (w * h + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


def main(txl: Path, bccd: Path, metrics: Path | None) -> None:
    per_class = json.loads(metrics.read_text())["coco"]["per_class"] if metrics else None
    for cls, rows in matched_pairs(txl, bccd).items():
        a = np.array(rows)
        offsets = np.median(a[:, 1:5], 0)
        mad = np.median(np.abs(a[:, 1:5] - offsets), 0)
        sigma = float(mad.mean()) * 1.4826          # a Gaussian's sd from its median absolute deviation
        w, h = np.median(a[:, 5:7], 0)
        print(f"{cls}: {len(a)} pairs, median IoU {np.median(a[:, 0]):.3f}; side offsets (x0 y0 x1 y1) {offsets.round(1)} px, "
              f"deviation {mad.round(1)} px; box {w:.0f} x {h:.0f} px")
        print(f"  simulated difference of sigma {sigma:.2f} px: median IoU {np.median(simulated_ious(w, h, sigma)):.3f}")
        shares = {}
        for share, label in ((2 ** -0.5, "equally noisy"), (0.5, "TXL-PBC a quarter of the variance")):
            ious = simulated_ious(w, h, sigma * share)
            shares[label] = [(ious >= t).mean() for t in THRESHOLDS]
            print(f"  true boxes against labels {label}: median IoU {np.median(ious):.3f}, "
                  f"matched share over IoU 0.50:0.95 {np.mean(shares[label]):.3f}")
        if per_class:
            print("  IoU threshold      " + " ".join(f"{t:5.2f}" for t in THRESHOLDS))
            print("  the run's AP       " + " ".join(f"{a:5.3f}" for a in per_class[cls]["AP_by_iou"]))
            for label, row in shares.items():
                print(f"  {label[:18]:18s} " + " ".join(f"{a:5.3f}" for a in row))


if __name__ == "__main__":
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    args = sys.argv[1:]
    main(Path(args[0]) if args else data / "txl_pbc", Path(args[1]) if len(args) > 1 else data / "bccd",
         Path(args[2]) if len(args) > 2 else None)
