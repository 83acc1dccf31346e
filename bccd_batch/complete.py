"""Complete a dataset whose labels leave cells out, with a teacher model's detections.

BCCD's XML leaves many RBCs (and some platelets) unlabelled; a detector trained on it learns to
leave them out. Here each field keeps its own boxes and gains the teacher's detections that overlap
none of them (IoU < 0.5, any class) and score at least the class's threshold. The thresholds are
chosen on the fields that a reference dataset labels completely (matched by pixels, not by name):
per class, the one whose completed counts err least against the reference's. The result is a YOLO
folder (`images` links to the dataset's images; nothing is copied) with the teacher's boxes listed
apart in `pseudo.csv`, so `train --data` takes it like any other dataset.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


from .cells import CLASSES
from .datasets import image_root, pixel_hash
from .decode import decode_file
from .labels import read_labels
from .score import CountEvaluator, box_iou, choose_count_threshold, evaluate_all


def unlabelled_detections(dets: list[tuple], boxes: list[tuple], iou: float = 0.5) -> list[tuple]:
    """The detections that overlap none of a field's labelled boxes at `iou` or more."""
    return [d for d in dets if all(box_iou(d[2:], b[1:]) < iou for b in boxes)]


def choose_thresholds(candidates: dict[str, list[tuple]], own: dict[str, list[tuple]],
                      reference: dict[str, list[tuple]]) -> dict:
    """Per class, the score from COUNT_THRESHOLDS at which own + candidate boxes count closest to the
    reference labels (lowest per-field MAE; the lowest score on a tie): `choose_count_threshold` with a
    field's own boxes as detections that every threshold counts."""
    keys = sorted(reference)
    gt = {k: {"boxes": reference[k]} for k in keys}
    sure = {k: [(b[0], 1.0, *b[1:]) for b in own[k]] for k in keys}
    chosen = choose_count_threshold(gt, {k: sure[k] + candidates[k] for k in keys})
    own_only = evaluate_all({"counting": CountEvaluator(1.0)}, gt, sure)["counting"]
    return {"thresholds": chosen["count"], "fields": len(keys),
            "MAE_own_labels": {c: round(v["MAE"], 3) for c, v in own_only["per_class"].items()},
            "MAE_completed": {c: round(v, 3) for c, v in chosen["MAE"].items()},
            "bias_own_labels": {c: round(v["mean_signed_error"], 3) for c, v in own_only["per_class"].items()}}


def complete_labels(data: Path, reference: Path, model_dir: Path, out: Path, split: str | None = "train",
                    device: str = "cpu", log=print) -> dict:
    import torch

    from .model import detections_to_tuples, image_to_input, load_model

    labels = read_labels(data)
    keys = labels.splits[split] if split else sorted(labels.records)
    root = image_root(data, labels)
    ref_labels = read_labels(reference)
    ref_root = image_root(reference, ref_labels)
    ref_by_hash = {}
    for key, rec in ref_labels.records.items():
        try:
            ref_by_hash[pixel_hash(decode_file(ref_root / key))] = rec["boxes"]
        except Exception as e:  # noqa: BLE001 - a bad reference field is only one fewer to choose on
            log(f"reference {key}: unusable ({e}), skipped")
    model, card = load_model(model_dir)
    dev = torch.device(device)
    model.to(dev)
    candidates, reference_boxes, own, sizes = {}, {}, {}, {}
    with torch.no_grad():
        for i, key in enumerate(keys):
            pixels = decode_file(root / key)
            boxes = labels.records[key]["boxes"]
            dets = detections_to_tuples(model([image_to_input(pixels, dev)])[0])
            candidates[key], own[key], sizes[key] = unlabelled_detections(dets, boxes), boxes, pixels.shape[1::-1]
            if (h := pixel_hash(pixels)) in ref_by_hash:
                reference_boxes[key] = ref_by_hash[h]
            if (i + 1) % 25 == 0:
                log(f"{i + 1}/{len(keys)} fields")
    if not reference_boxes:
        raise ValueError(f"none of {data}'s {split or 'all'} fields is in {reference}: nothing to choose thresholds on")
    chosen = choose_thresholds(candidates, own, reference_boxes)
    chosen.update(teacher=str(model_dir), teacher_sha256=card["weights"]["sha256"], data=str(data), split=split,
                  reference=str(reference))
    added = {k: [d for d in candidates[k] if d[1] >= chosen["thresholds"][d[0]]] for k in keys}
    write_yolo(out, root, {k: (sizes[k], own[k], added[k]) for k in keys})
    (out / "complete_labels.json").write_text(json.dumps(chosen, indent=1) + "\n")
    return chosen


def write_yolo(out: Path, images: Path, fields: dict[str, tuple]) -> None:
    """A YOLO folder, all in its train split: per key, ((width, height), own boxes, added detections)."""
    out = Path(out)
    (out / "splits").mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(images).resolve(), target_is_directory=True)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (out / "splits" / "train.txt").write_text("".join(f"{k}\n" for k in fields))
    (out / "splits" / "val.txt").write_text("")
    with open(out / "pseudo.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["file", "class", "score", "xmin", "ymin", "xmax", "ymax"])
        for key, ((width, height), own, added) in fields.items():
            lines = [f"{CLASSES.index(cls)} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                     f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}\n"
                     for cls, x0, y0, x1, y1 in own + [(d[0], *d[2:]) for d in added]]
            rows.writerows([key, *d] for d in added)
            label_file = (out / "labels" / key).with_suffix(".txt")
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text("".join(lines))
