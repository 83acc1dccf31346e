"""Score predictions against labels. Every evaluator follows one small interface:
`reset()`, `process(key, gt_record, predictions)` once per labelled image, `evaluate() -> dict`;
`evaluate_all` runs named ones together and merges their results by name.

A prediction is `(cls, score, x0, y0, x1, y1)` in pixels; a ground-truth record is a `labels` record.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np

from .cells import CLASSES, Threshold, class_counts, class_threshold
from .labels import LabelSet, box_counts, read_labels

COCO_STAT_NAMES = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR@1", "AR@10", "AR@100", "AR_small", "AR_medium", "AR_large"]


class COCOEvaluator:
    """The 12 COCO numbers and per-class AP/AP50 through pycocotools, on the labels as given; with
    `resamples`, also their 95% bootstrap intervals over the scored fields (`field_intervals`)."""

    def __init__(self, resamples: int = 0) -> None:
        self.resamples = resamples
        self.reset()

    def reset(self) -> None:
        self._images: list[dict] = []
        self._anns: list[dict] = []
        self._dets: list[dict] = []

    def process(self, key: str, gt: dict, preds: list[tuple]) -> None:
        image_id = len(self._images) + 1
        self._images.append({"id": image_id, "file_name": key, "width": gt["width"], "height": gt["height"]})
        for cls, x0, y0, x1, y1 in gt["boxes"]:
            self._anns.append({
                "id": len(self._anns) + 1, "image_id": image_id, "category_id": CLASSES.index(cls) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
        for cls, score, x0, y0, x1, y1 in preds:
            self._dets.append({"image_id": image_id, "category_id": CLASSES.index(cls) + 1,
                               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})

    def evaluate(self) -> dict:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        gt = COCO()
        gt.dataset = {"images": self._images, "annotations": self._anns,
                      "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            if not self._dets:
                return {"stats": dict.fromkeys(COCO_STAT_NAMES, 0.0), "per_class": {}, "n_images": len(self._images)}
            dt = gt.loadRes(self._dets)
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # precision[T, R, K, A, M]: IoU thresholds x recall points x classes x area ranges x maxDets.
        precision = ev.eval["precision"]
        per_class = {}
        for k, cls in enumerate(CLASSES):
            curves = precision[:, :, k, 0, -1]      # [IoU thresholds, recall points]
            per_class[cls] = {
                **_ap_ap50(curves),
                # AP at each IoU threshold 0.50, 0.55 ... 0.95: finding cells (the first) against
                # placing their box edges where the labels do (the last).
                "AP_by_iou": [round(_mean_valid(c), 4) for c in curves],
                # Recall points 0..1 step 0.01 at IoU 0.5: the PR curve the report draws.
                "pr50": [round(float(p), 4) for p in curves[0]],
                "n_gt": sum(1 for a in self._anns if a["category_id"] == k + 1),
            }
        out = {"stats": {n: float(v) for n, v in zip(COCO_STAT_NAMES, ev.stats)},
               "per_class": per_class, "n_images": len(self._images)}
        if self.resamples:
            out["intervals"] = field_intervals(ev, self.resamples)
        return out


def field_intervals(ev, resamples: int, seed: int = 0) -> dict:
    """95% percentile-bootstrap intervals of AP and AP50, overall and per class, over the fields of
    an evaluated, accumulated pycocotools COCOeval: how far the figures could move on another set of
    fields like these (87 val fields: about ±0.03 AP). Each resample draws the fields with
    replacement and re-accumulates their per-field matches (`evalImgs`, all areas, 100 detections),
    so the matching is done once: 200 resamples of 292 fields take ~6 s on 2 CPU cores."""
    pe = ev._paramsEval
    n_img, n_area, n_cls = len(pe.imgIds), len(pe.areaRng), len(pe.catIds)
    params = copy.deepcopy(pe)
    # Fields drawn twice need ids of their own; "all" areas and the largest maxDets are index 0 / -1.
    params.imgIds = list(range(n_img))
    params.areaRng, params.areaRngLbl, params.maxDets = pe.areaRng[:1], pe.areaRngLbl[:1], pe.maxDets[-1:]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        fields = rng.integers(0, n_img, n_img)
        r = copy.copy(ev)
        r.params = r._paramsEval = params
        # evalImgs is ordered category, area, field.
        r.evalImgs = [ev.evalImgs[k * n_area * n_img + i] for k in range(n_cls) for i in fields]
        with contextlib.redirect_stdout(io.StringIO()):
            r.accumulate()
        precision = r.eval["precision"][:, :, :, 0, 0]   # [IoU thresholds, recall points, classes]
        figures = _ap_ap50(precision)
        for k, cls in enumerate(CLASSES):
            figures.update({f"{cls} {m}": v for m, v in _ap_ap50(precision[:, :, k]).items()})
        for name, v in figures.items():
            draws.setdefault(name, []).append(v)

    def interval(name: str) -> list[float]:
        valid = [v for v in draws[name] if v > -1]   # a resample without a class's fields has no AP for it
        return [round(float(q), 4) for q in np.percentile(valid, [2.5, 97.5])] if valid else [-1.0, -1.0]

    return {"resamples": resamples, "level": 0.95, "AP": interval("AP"), "AP50": interval("AP50"),
            "per_class": {c: {"AP": interval(f"{c} AP"), "AP50": interval(f"{c} AP50")} for c in CLASSES}}


def _ap_ap50(precision: np.ndarray) -> dict[str, float]:
    """AP and AP50 from pycocotools' precision at one area range and maxDets, [IoU thresholds,
    recall points] or with a class axis after them: the means over the entries that have one."""
    return {"AP": _mean_valid(precision), "AP50": _mean_valid(precision[0])}


def _mean_valid(a: np.ndarray) -> float:
    """COCO marks 'no ground truth' with -1; a class with none gets -1, as pycocotools reports it."""
    valid = a[a > -1]
    return float(valid.mean()) if valid.size else -1.0


class CountEvaluator:
    """Per-image counting error per class at one score threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._diffs: dict[str, list[int]] = {c: [] for c in CLASSES}

    def process(self, key: str, gt: dict, preds: list[tuple]) -> None:
        n_pred, n_gt = class_counts(preds, self.threshold), box_counts(gt["boxes"])
        for cls in CLASSES:
            self._diffs[cls].append(n_pred[cls] - n_gt[cls])

    def evaluate(self) -> dict:
        out = {}
        for cls, d in self._diffs.items():
            a = np.asarray(d, dtype=float)
            out[cls] = {"MAE": float(np.abs(a).mean()) if a.size else 0.0,
                        "mean_signed_error": float(a.mean()) if a.size else 0.0}
        return {"threshold": self.threshold, "per_class": out}


# The count thresholds a model's is chosen from: 0.05 to 0.95.
COUNT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def choose_count_threshold(gt: dict[str, dict], preds: dict[str, list[tuple]],
                           thresholds: tuple[float, ...] = COUNT_THRESHOLDS, prefer: Threshold | None = None,
                           sources: dict[str, str] | None = None) -> dict:
    """Per class, the score threshold at which per-image counts err least (lowest per-image count
    MAE over the labelled fields; on a tie the lowest threshold, or the one nearest `prefer`'s, so a
    recalibration moves a threshold only where that lowers the error): a class's count depends on its
    own threshold alone. How a model card's count thresholds are chosen, on training fields with
    complete labels, so they are not tuned by eye or to the fields they are reported on.

    `sources` (field -> lab) of two labs or more: the error is the mean of each lab's per-image MAE,
    so every lab weighs the same whatever its number of fields. One set of thresholds serves every
    lab and a new lab's is unknown; pooled, the lab with the most labelled fields would set them."""
    groups: dict[str, list[str]] = {}
    for key in gt:
        groups.setdefault((sources or {}).get(key, ""), []).append(key)
    by_group = {g: evaluate_all({t: CountEvaluator(t) for t in thresholds}, {k: gt[k] for k in keys},
                                {k: preds[k] for k in keys}) for g, keys in groups.items()}

    def mean_over_groups(c: str, t: float, figure: str) -> float:
        return sum(r[t]["per_class"][c][figure] for r in by_group.values()) / len(by_group)

    mae = {c: [mean_over_groups(c, t, "MAE") for t in thresholds] for c in CLASSES}

    def best_of(c: str) -> int:
        least = min(mae[c])
        tied = [i for i, v in enumerate(mae[c]) if v == least]
        return tied[0] if prefer is None else min(tied, key=lambda i: abs(thresholds[i] - class_threshold(prefer, c)))

    best = {c: thresholds[best_of(c)] for c in CLASSES}
    chosen = {"count": best, "images": len(gt),
              "MAE": {c: mean_over_groups(c, t, "MAE") for c, t in best.items()},
              "bias": {c: mean_over_groups(c, t, "mean_signed_error") for c, t in best.items()},
              "MAE_by_threshold": {c: dict(zip(thresholds, v)) for c, v in mae.items()}}
    if len(groups) > 1:
        chosen["by_source"] = {g: {"images": len(groups[g]),
                                   "MAE": {c: r[t]["per_class"][c]["MAE"] for c, t in best.items()},
                                   "bias": {c: r[t]["per_class"][c]["mean_signed_error"] for c, t in best.items()}}
                               for g, r in sorted(by_group.items())}
    return chosen


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes; 0 for two empty ones."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class MatchEvaluator:
    """Greedy one-to-one matching at IoU >= 0.5 of the detections kept for counting: per-image
    TP/FP/FN/F1 (class-aware) and a confusion matrix over classes plus background (class-agnostic
    matching, so a WBC called RBC shows up as confusion rather than as a miss and a false alarm)."""

    def __init__(self, threshold: float, iou: float = 0.5) -> None:
        self.threshold, self.iou = threshold, iou
        self.reset()

    def reset(self) -> None:
        n = len(CLASSES) + 1
        self._confusion = [[0] * n for _ in range(n)]   # rows: ground truth, columns: prediction
        self._per_image: dict[str, dict] = {}

    def _match(self, gt_boxes, preds, same_class: bool) -> list[tuple[int, int]]:
        pairs, used = [], set()
        for pi, p in sorted(enumerate(preds), key=lambda x: -x[1][1]):
            best, best_iou = None, self.iou
            for gi, g in enumerate(gt_boxes):
                if gi in used or (same_class and g[0] != p[0]):
                    continue
                overlap = box_iou(g[1:], p[2:])
                if overlap >= best_iou:
                    best, best_iou = gi, overlap
            if best is not None:
                used.add(best)
                pairs.append((best, pi))
        return pairs

    def process(self, key: str, gt: dict, preds: list[tuple]) -> None:
        kept = [p for p in preds if p[1] >= class_threshold(self.threshold, p[0])]
        boxes = gt["boxes"]
        tp = len(self._match(boxes, kept, same_class=True))
        fp, fn = len(kept) - tp, len(boxes) - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
        self._per_image[key] = {"TP": tp, "FP": fp, "FN": fn, "F1": round(f1, 4)}
        bg = len(CLASSES)
        pairs = self._match(boxes, kept, same_class=False)
        for gi, pi in pairs:
            self._confusion[CLASSES.index(boxes[gi][0])][CLASSES.index(kept[pi][0])] += 1
        for gi in set(range(len(boxes))) - {g for g, _ in pairs}:
            self._confusion[CLASSES.index(boxes[gi][0])][bg] += 1
        for pi in set(range(len(kept))) - {p for _, p in pairs}:
            self._confusion[bg][CLASSES.index(kept[pi][0])] += 1

    def evaluate(self) -> dict:
        return {"threshold": self.threshold, "iou": self.iou, "labels": [*CLASSES, "background"],
                "confusion": self._confusion, "per_image": self._per_image}


class LabelGapEvaluator:
    """Fields whose labels have no box of a class the model finds there with high confidence.

    BCCD's labels leave whole classes out of some fields (4 of its 87 val fields have no RBC label,
    yet every smear field is full of red cells), and every detection there is scored as a false
    positive. Listing those fields tells a reader which of the errors above are the labels', and
    which fields to re-annotate; the scores themselves stay on the labels as given. At the default
    0.9 the highest-scoring such detections on val are, by eye, (nearly) all cells of the class named."""

    def __init__(self, score: float = 0.9) -> None:
        self.score = score
        self.reset()

    def reset(self) -> None:
        self._fields: dict[str, dict[str, int]] = {}

    def process(self, key: str, gt: dict, preds: list[tuple]) -> None:
        labelled = {b[0] for b in gt["boxes"]}
        found = {c: n for c, n in class_counts(preds, self.score).items() if n and c not in labelled}
        if found:
            self._fields[key] = found

    def evaluate(self) -> dict:
        return {"score": self.score, "fields": self._fields,
                "per_class": {c: sum(1 for f in self._fields.values() if c in f) for c in CLASSES}}


class GroupedEvaluator:
    """Runs its own named evaluators (a dict from `make()`) per group of fields (`group_of`: key ->
    group, e.g. the slide folder) and gives {group: {name: result}}, so a lab sees how the model does
    on each slide."""

    def __init__(self, group_of: dict[str, str], make) -> None:
        self.group_of, self.make = group_of, make
        self.reset()

    def reset(self) -> None:
        self._groups: dict[str, dict] = {}

    def process(self, key: str, gt: dict, preds: list[tuple]) -> None:
        evaluators = self._groups.setdefault(self.group_of[key], self.make())
        for ev in evaluators.values():
            ev.process(key, gt, preds)

    def evaluate(self) -> dict:
        return {g: {name: ev.evaluate() for name, ev in evs.items()} for g, evs in sorted(self._groups.items())}


def slide_summary(coco: dict, counting: dict) -> dict:
    """One slide's figures as metrics.json and the report give them."""
    return {"n_images": coco["n_images"], "AP": coco["stats"]["AP"], "AP50": coco["stats"]["AP50"],
            "per_class": {c: {"AP50": coco["per_class"].get(c, {}).get("AP50", -1.0),
                              "n_gt": coco["per_class"].get(c, {}).get("n_gt", 0),
                              "MAE": counting["per_class"][c]["MAE"], "bias": counting["per_class"][c]["mean_signed_error"]}
                          for c in CLASSES}}


def evaluate_all(evaluators: dict, gt: dict[str, dict], preds: dict[str, list[tuple]]) -> dict[str, dict]:
    """Each named evaluator over every labelled field (in key order; a field without predictions has
    none), their results merged by name."""
    for ev in evaluators.values():
        ev.reset()
    for key in sorted(gt):
        for ev in evaluators.values():
            ev.process(key, gt[key], preds.get(key, []))
    return {name: ev.evaluate() for name, ev in evaluators.items()}


def match_labels(labels: LabelSet, image_rels: list[str]) -> dict[str, str]:
    """image rel -> label key: the same relative path, else the same file name when that is unique
    on both sides (VOC labels name `BloodImage_00001.jpg`, a slide folder holds `slide1/BloodImage_00001.jpg`),
    else, for a VOC XML whose <filename> names no image (a renamed field's stale tag), the XML's own
    name against the image's, said once in `labels.warnings`."""
    def unique_by(names, key):
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(key(n), []).append(n)
        return {k: v[0] for k, v in groups.items() if len(v) == 1}

    name = lambda p: PurePosixPath(p).name  # noqa: E731
    keys = set(labels.records)
    by_name, rel_by_name = unique_by(keys, name), unique_by(image_rels, name)
    out = {r: r if r in keys else by_name[name(r)] for r in image_rels
           if r in keys or (name(r) in by_name and name(r) in rel_by_name)}
    left = keys - set(out.values())
    stem = lambda p: PurePosixPath(p).stem  # noqa: E731
    by_xml = unique_by([k for k in left if labels.records[k].get("label_stem")], lambda k: labels.records[k]["label_stem"])
    rel_by_stem = unique_by([r for r in image_rels if r not in out], stem)
    renamed = {r: by_xml[s] for s, r in rel_by_stem.items() if s in by_xml}
    if renamed:
        r, k = next(iter(sorted(renamed.items())))
        labels.warnings.append(f"{len(renamed)} VOC label files matched to their image by their own name, as their "
                               f"<filename> names no image (e.g. {labels.records[k]['label_stem']}.xml names {k!r}, matched to {r})")
    return {**out, **renamed}


def resolve_run_name(out: Path, run_name: str) -> str:
    """'latest' -> the run OUT/latest points at; other names pass through."""
    link = Path(out) / "latest"
    if run_name != "latest":
        return run_name
    if not link.is_symlink():
        raise FileNotFoundError(f"no runs yet in {out}")
    return Path(os.readlink(link)).name


def score_run(out: Path, run_name: str, labels_path: Path, resamples: int) -> dict:
    """Score a stored run against labels; writes metrics.json in the run folder and the store.
    `resamples`: bootstrap resamples of the fields for intervals of AP and AP50 (0: none)."""
    from .outputs import atomic_write, gather, stored_run
    from .store import STORE_NAME, Store

    out = Path(out)
    store = Store(out / STORE_NAME)
    try:
        run, folder = stored_run(store, out, run_name)
        labels = read_labels(labels_path)
        info = json.loads(run["info"])
        threshold = info["model"]["thresholds"]["count"]
        data = gather(store, run["id"], run["slides_root"], threshold)
        ok_rels = sorted(data["counts"])
        matched = match_labels(labels, ok_rels)
        gt = {rel: labels.records[key] for rel, key in matched.items()}
        for rel, rec in gt.items():
            if rec["width"] is None:  # labels without a size (some CSV/COCO files): use the image's
                row = next(r for r in data["images"] if r["rel"] == rel)
                gt[rel] = {**rec, "width": row["width"], "height": row["height"]}
        preds = {rel: data["detections"][rel] for rel in gt}
        slide_of = {r["rel"]: r["slide"] for r in data["images"]}
        by_slide = GroupedEvaluator(slide_of, lambda: {"coco": COCOEvaluator(), "counting": CountEvaluator(threshold)})
        results = evaluate_all({"coco": COCOEvaluator(resamples), "counting": CountEvaluator(threshold),
                                "matching": MatchEvaluator(threshold), "label_gaps": LabelGapEvaluator(),
                                "per_slide": by_slide}, gt, preds)
        metrics = {
            "run": run_name, "labels": str(labels_path), "n_images_scored": len(gt),
            "unlabelled_images": sorted(set(ok_rels) - set(gt)),
            "labels_without_image": sorted(set(labels.records) - set(matched.values())),
            "label_warnings": labels.warnings, "label_counts": labels.counts(),
            # Labelled fields scored on a later run's result (outputs.gather).
            "processed_later": len(set(data["later"]) & set(gt)),
            **{k: results[k] for k in ("coco", "counting", "matching", "label_gaps")},
            "per_slide": {slide: slide_summary(**r) for slide, r in results["per_slide"].items()},
            # Kept so the report can draw ground truth beside the predictions.
            "ground_truth": {rel: rec["boxes"] for rel, rec in gt.items()},
        }
        store.save_metrics(run["id"], metrics)
        atomic_write(folder / "metrics.json", json.dumps(metrics, indent=1) + "\n")
        return metrics
    finally:
        store.close()
