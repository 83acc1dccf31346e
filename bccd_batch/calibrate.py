"""Count thresholds fitted to one lab: the same weights, each class's count threshold chosen on that
lab's own completely labelled fields, so its counts follow how that lab's fields look and how it counts.

A model's count thresholds are chosen on its training labs' fields; on a lab it has never seen, its
scores sit elsewhere (another stain, camera, magnification) and the counts are biased: on the one unseen
lab measured, ten labelled fields removed most of that bias (docs/model.md, "Calibrating to a lab"). The
weights are copied unchanged (same sha256, so the store keeps counting each field once); only the card's
thresholds change, and the card records what they were chosen on and the count errors on those fields
before, cross-validated and after.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from .cells import CLASSES, Threshold, class_threshold
from .score import CountEvaluator, choose_count_threshold, evaluate_all

# Under this many fields a class's threshold rests on a handful of cells: said, not refused.
FEW_FIELDS = 10
# Folds of the cross-validated check (fewer with fewer fields: one field per fold).
FOLDS = 10


def cross_validated(gt: dict[str, dict], preds: dict[str, list[tuple]], prefer: Threshold, folds: int = FOLDS) -> dict:
    """Per class, count MAE and bias of each field at thresholds chosen on the other folds' fields
    (two fields at least): what calibrating on such fields does for fields it has not seen."""
    keys = sorted(gt)
    k = min(folds, len(keys))
    total = {c: {"MAE": 0.0, "bias": 0.0} for c in CLASSES}
    for i in range(k):
        held = set(keys[i::k])
        rest = [x for x in keys if x not in held]
        chosen = choose_count_threshold({x: gt[x] for x in rest}, {x: preds[x] for x in rest}, prefer=prefer)["count"]
        errors = _class_errors({x: gt[x] for x in held}, {x: preds[x] for x in held}, chosen)
        for c in CLASSES:
            for m in ("MAE", "bias"):
                total[c][m] += errors[c][m] * len(held) / len(keys)
    return _rounded(total)


def _class_errors(gt: dict, preds: dict, threshold: Threshold) -> dict[str, dict]:
    """Per class, the per-field count MAE and mean signed error (bias) at `threshold`."""
    per_class = evaluate_all({"count": CountEvaluator(threshold)}, gt, preds)["count"]["per_class"]
    return {c: {"MAE": e["MAE"], "bias": e["mean_signed_error"]} for c, e in per_class.items()}


def _rounded(errors: dict[str, dict]) -> dict[str, dict]:
    return {c: {m: round(v, 3) for m, v in e.items()} for c, e in errors.items()}


def calibrate(labels: Path, model_dir: Path, out: Path, device: str = "cpu", log=print) -> dict:
    """Write OUT (the weights and a card) with each class's count threshold chosen on every labelled
    field of `labels` (on the detections `run` counts, second pass included), where that choice counted
    better on fields it had not seen (cross-validated); the model's own threshold elsewhere. Returns the
    card's `calibration` record."""
    from .backends import count_again
    from .backends.torch_eager import TorchEngine
    from .card import CARD_NAME
    from .datasets import load_training_data
    from .quality import measure_host

    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out} is the model calibrated from: give a new folder, the model stays as it is")
    engine = TorchEngine(model_dir, device)
    card = engine.card
    # Every field goes to the choice: no val list, no val fraction (a lab labels a handful).
    fields = load_training_data([labels], val_split="", val_fraction=0.0, log=lambda m: None)
    for s in fields.summary.values():
        log(f"{s['train']} labelled fields in {labels}; {s['unusable']} unusable, {s['duplicates_dropped']} repeated pixels dropped")
    for w in fields.warnings:
        log(f"warning: {w}")
    if len(fields.train) < 2:
        raise ValueError(f"{len(fields.train)} usable labelled fields in {labels}: calibrating needs two at least")
    if len(fields.train) < FEW_FIELDS:
        log(f"warning: only {len(fields.train)} labelled fields; thresholds chosen on fewer than {FEW_FIELDS} vary from one "
            "handful of fields to the next")
    # The detections `run` counts: a field unlike the training labs' (another stain, size or lamp: a new
    # lab's, often) after its second pass, so the thresholds fit what the lab's runs will count.
    pixels = [f.pixels for f in fields.train]
    again = count_again(engine, pixels, engine.infer(pixels), [measure_host(p) for p in pixels])
    gt = {f.key: f.record for f in fields.train}
    preds = {f.key: c.dets for f, c in zip(fields.train, again)}
    before_thresholds = card["thresholds"]["count"]
    before = _rounded(_class_errors(gt, preds, before_thresholds))
    chosen = choose_count_threshold(gt, preds, prefer=before_thresholds)["count"]
    held_out = cross_validated(gt, preds, before_thresholds)
    thresholds = {c: chosen[c] if held_out[c]["MAE"] < before[c]["MAE"] else class_threshold(before_thresholds, c)
                  for c in CLASSES}
    record = {
        "labels": str(labels), "fields": len(gt), "weights_sha256": card["weights"]["sha256"],
        "thresholds_before": before_thresholds, "chosen": chosen, "thresholds": thresholds,
        "before": before, "cross_validated": held_out, "after": _rounded(_class_errors(gt, preds, thresholds)),
        "note": "count MAE / bias per field on the calibration fields: before (thresholds_before); cross_validated "
                "(each field at thresholds chosen on the other folds' fields, " + str(FOLDS) + " folds at most); after "
                "(thresholds: `chosen` on all the fields where the cross-validated MAE was lower than before, else "
                "thresholds_before; in-sample). The card's metrics were measured at thresholds_before.",
    }
    new = copy.deepcopy(card)
    new["thresholds"]["count"] = thresholds
    new.setdefault("threshold_choice", {})["count"] = (
        f"per class, the score with the lowest per-image count MAE on the {len(gt)} labelled fields of {labels} where "
        "that lowered the cross-validated count error, chosen by `bccd-batch calibrate` (its `calibration` record)")
    new["calibration"] = record
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / card["weights"]["file"], out / card["weights"]["file"])
    tmp = out / (CARD_NAME + ".tmp")
    tmp.write_text(json.dumps(new, indent=2) + "\n")
    tmp.replace(out / CARD_NAME)
    return record
