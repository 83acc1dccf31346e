"""The cell classes, detection records and counting: what every stage shares, with no torch import,
so discovering, labels, the store, scoring and the report load in a fraction of a second.

A detection is `(cls, score, x0, y0, x1, y1)` in pixels of the field as stored.
"""

from __future__ import annotations

from typing import Mapping, Union

import numpy as np

CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")

# A count threshold: one score for every class, or one per class (a model card may give either).
Threshold = Union[float, Mapping[str, float]]


def class_threshold(threshold: Threshold, cls: str) -> float:
    return float(threshold[cls]) if isinstance(threshold, Mapping) else float(threshold)


def class_counts(dets: list[tuple], threshold: Threshold) -> dict[str, int]:
    """A field's cells per class: its (class, score, ...) detections scoring >= the class's threshold."""
    cut = {c: class_threshold(threshold, c) for c in CLASSES}
    counts = dict.fromkeys(CLASSES, 0)
    for d in dets:
        if d[1] >= cut[d[0]]:
            counts[d[0]] += 1
    return counts


def arrays_to_tuples(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> list[tuple]:
    """float32 boxes [N, 4], scores [N] and 1-based labels [N] -> detection tuples, rounded in
    float32 (so every engine's numbers round alike)."""
    return [(CLASSES[int(l) - 1], s, *b)
            for b, s, l in zip(boxes.round(2).tolist(), scores.round(4).tolist(), labels.tolist())]
