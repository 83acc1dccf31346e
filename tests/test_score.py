import pytest

from bccd_batch.cells import CLASSES
from bccd_batch.score import COCOEvaluator, CountEvaluator, evaluate_all

GT = {"a.jpg": {"width": 640, "height": 480, "boxes": [("RBC", 100, 100, 200, 200), ("WBC", 300, 100, 460, 260)]},
      "b.jpg": {"width": 640, "height": 480, "boxes": [("RBC", 10, 10, 110, 110), ("Platelets", 400, 400, 440, 440)]}}


def as_preds(gt, score=0.9):
    return {k: [(c, score, *b) for c, *b in v["boxes"]] for k, v in gt.items()}


def test_predictions_equal_to_labels_give_ap_one():
    r = evaluate_all({"coco": COCOEvaluator(), "counts": CountEvaluator(0.5)}, GT, as_preds(GT))
    coco, counts = r["coco"], r["counts"]
    assert coco["stats"]["AP"] == pytest.approx(1.0)
    assert all(v["AP"] == pytest.approx(1.0) for v in coco["per_class"].values())
    assert all(v["MAE"] == 0 for v in counts["per_class"].values())


def test_shifted_box_iou_decides_the_threshold():
    # Shift the RBC in a.jpg by 25 px: IoU = 75*100 / (2*100*100 - 75*100) = 0.6.
    preds = as_preds(GT)
    preds["a.jpg"][0] = ("RBC", 0.8, 125, 100, 225, 200)   # ranked after the exact RBC in b.jpg
    coco = evaluate_all({"coco": COCOEvaluator()}, GT, preds)["coco"]
    rbc = coco["per_class"]["RBC"]
    assert rbc["AP50"] == pytest.approx(1.0)
    # IoU thresholds 0.50-0.60 (3 of 10): both RBCs found, AP 1. At 0.65-0.95: recall stops at 0.5
    # with precision 1, so 51 of COCO's 101 recall points have precision 1.
    assert rbc["AP"] == pytest.approx((3 * 1.0 + 7 * 51 / 101) / 10)
    assert rbc["AP_by_iou"] == pytest.approx([1.0] * 3 + [round(51 / 101, 4)] * 7)


def test_class_without_ground_truth_is_minus_one_and_count_errors_are_signed():
    gt = {k: {**v, "boxes": [b for b in v["boxes"] if b[0] != "Platelets"]} for k, v in GT.items()}
    preds = as_preds(gt)
    preds["a.jpg"].append(("RBC", 0.3, 0, 0, 50, 50))     # below the count threshold
    preds["b.jpg"].append(("RBC", 0.8, 300, 300, 350, 350))
    r = evaluate_all({"coco": COCOEvaluator(), "counts": CountEvaluator(0.5)}, gt, preds)
    coco, counts = r["coco"], r["counts"]
    assert coco["per_class"]["Platelets"]["AP"] == -1.0
    assert counts["per_class"]["RBC"] == {"MAE": 0.5, "mean_signed_error": 0.5}


def test_count_thresholds_are_per_class_the_lowest_with_the_least_count_error():
    from bccd_batch.score import choose_count_threshold

    preds = as_preds(GT, score=0.7)
    preds["a.jpg"].append(("RBC", 0.3, 0, 0, 50, 50))           # a false RBC: counted below 0.35
    preds["b.jpg"].append(("Platelets", 0.5, 0, 400, 40, 440))   # a false platelet: counted below 0.55
    chosen = choose_count_threshold(GT, preds)
    # Per class, the lowest score that counts every labelled cell and nothing else (above 0.70 nothing is counted).
    assert chosen["count"] == {"RBC": 0.35, "WBC": 0.05, "Platelets": 0.55} and chosen["images"] == 2
    assert chosen["MAE"] == dict.fromkeys(CLASSES, 0.0) and chosen["bias"] == dict.fromkeys(CLASSES, 0.0)
    by_t = chosen["MAE_by_threshold"]
    assert by_t["RBC"][0.3] == pytest.approx(0.5) and by_t["Platelets"][0.5] == pytest.approx(0.5)
    assert by_t["RBC"][0.75] == pytest.approx(1.0) and by_t["Platelets"][0.75] == pytest.approx(0.5)
    # A count threshold per class counts each class at its own score.
    from bccd_batch.cells import class_counts
    assert class_counts(preds["b.jpg"], {"RBC": 0.9, "WBC": 0.9, "Platelets": 0.45}) == {"RBC": 0, "WBC": 0, "Platelets": 2}


def test_count_thresholds_weigh_each_source_the_same_whatever_its_number_of_fields():
    """One lab's three fields each hold a false RBC scored 0.3; another lab's one field has two of its
    three RBCs scored 0.25. Pooled over the four fields, the larger lab's wish (above 0.3) wins; with
    each lab weighing the same, the error is as low below 0.25 (0.5 either way) and the lowest
    threshold of the tie is taken."""
    from bccd_batch.score import choose_count_threshold

    one = {"width": 640, "height": 480, "boxes": [("RBC", 10, 10, 110, 110)]}
    gt = {f"b{i}.jpg": one for i in range(3)}
    gt["a.jpg"] = {**one, "boxes": [("RBC", 10 + 120 * i, 10, 110 + 120 * i, 110) for i in range(3)]}
    preds = {k: [("RBC", 0.9, 10, 10, 110, 110), ("RBC", 0.3, 300, 300, 400, 400)] for k in gt if k != "a.jpg"}
    preds["a.jpg"] = [("RBC", 0.9, 10, 10, 110, 110), ("RBC", 0.25, 130, 10, 230, 110), ("RBC", 0.25, 250, 10, 350, 110)]
    pooled = choose_count_threshold(gt, preds)
    assert pooled["count"]["RBC"] == 0.35 and pooled["MAE"]["RBC"] == pytest.approx(0.5) and "by_source" not in pooled
    labs = {k: "A" if k == "a.jpg" else "B" for k in gt}
    balanced = choose_count_threshold(gt, preds, sources=labs)
    assert balanced["count"]["RBC"] == 0.05 and balanced["MAE"]["RBC"] == pytest.approx(0.5)
    assert balanced["MAE_by_threshold"]["RBC"][0.35] == pytest.approx(1.0)      # lab A misses 2, lab B none
    assert balanced["by_source"]["A"] == {"images": 1, "MAE": {"RBC": 0.0, "WBC": 0.0, "Platelets": 0.0},
                                          "bias": {"RBC": 0.0, "WBC": 0.0, "Platelets": 0.0}}
    assert balanced["by_source"]["B"]["images"] == 3 and balanced["by_source"]["B"]["bias"]["RBC"] == pytest.approx(1.0)
    # One source: the pooled choice.
    assert choose_count_threshold(gt, preds, sources=dict.fromkeys(gt, "A"))["count"] == pooled["count"]


def test_a_preferred_threshold_wins_only_among_the_least_count_errors():
    from bccd_batch.score import choose_count_threshold

    preds = as_preds(GT, score=0.7)
    preds["a.jpg"].append(("RBC", 0.3, 0, 0, 50, 50))
    chosen = choose_count_threshold(GT, preds, prefer={"RBC": 0.1, "WBC": 0.6, "Platelets": 0.95})["count"]
    # RBC: 0.1 counts the false RBC, so the nearest of the tied best (0.35-0.70); WBC: 0.6 is among them;
    # platelets: above 0.70 nothing is counted, so the nearest tied best to 0.95 is 0.70.
    assert chosen == {"RBC": 0.35, "WBC": 0.6, "Platelets": 0.7}


def test_match_counts_and_confusion():
    from bccd_batch.score import MatchEvaluator

    preds = as_preds(GT)
    preds["a.jpg"][1] = ("RBC", 0.9, 300, 100, 460, 260)      # the WBC called RBC
    preds["b.jpg"].append(("Platelets", 0.9, 600, 10, 620, 30))  # a false alarm
    m = evaluate_all({"m": MatchEvaluator(0.5)}, GT, preds)["m"]
    assert m["per_image"]["a.jpg"] == {"TP": 1, "FP": 1, "FN": 1, "F1": 0.5}
    assert m["per_image"]["b.jpg"] == {"TP": 2, "FP": 1, "FN": 0, "F1": 0.8}
    conf = m["confusion"]   # rows GT RBC, WBC, Platelets, background; columns predictions
    assert conf[1] == [1, 0, 0, 0] and conf[0][0] == 2 and conf[3] == [0, 0, 1, 0]


def test_label_gaps_name_classes_the_labels_leave_out_of_a_field():
    from bccd_batch.score import LabelGapEvaluator

    preds = as_preds(GT)
    preds["a.jpg"] += [("Platelets", 0.95, 0, 0, 30, 30), ("Platelets", 0.91, 50, 0, 80, 30),
                       ("Platelets", 0.5, 90, 0, 120, 30)]   # below the gap score: not counted
    preds["b.jpg"].append(("RBC", 0.99, 300, 300, 400, 400))   # b.jpg has RBC labels: an FP, not a gap
    gaps = evaluate_all({"gaps": LabelGapEvaluator(0.9)}, GT, preds)["gaps"]
    assert gaps["fields"] == {"a.jpg": {"Platelets": 2}}
    assert gaps["per_class"] == {"RBC": 0, "WBC": 0, "Platelets": 1}


def _varied_fields(n: int, seed: int = 1):
    """n synthetic fields with misses, false alarms and loose boxes in varying measure."""
    import random

    rnd = random.Random(seed)
    gt, preds = {}, {}
    for i in range(n):
        boxes = [(rnd.choice(["RBC", "RBC", "WBC", "Platelets"]), x, y, x + 60, y + 60)
                 for x, y in ((rnd.randrange(0, 560), rnd.randrange(0, 400)) for _ in range(rnd.randint(2, 6)))]
        key = f"f{i:02d}.jpg"
        gt[key] = {"width": 640, "height": 480, "boxes": boxes}
        preds[key] = [(c, rnd.random(), x0 + rnd.randint(-15, 15), y0, x1, y1) for c, x0, y0, x1, y1 in boxes
                      if rnd.random() < 0.8]
        preds[key] += [(rnd.choice(["RBC", "Platelets"]), rnd.random(), 0, 0, 40, 40) for _ in range(rnd.randint(0, 2))]
    return gt, preds


def test_field_intervals_equal_scoring_each_resample_afresh():
    """The fast intervals re-accumulate pycocotools' per-field matches; scoring each resampled set of
    fields from scratch (fields drawn twice scored twice) with the same draws must give the same."""
    import numpy as np

    gt, preds = _varied_fields(12)
    coco = evaluate_all({"coco": COCOEvaluator(resamples=40)}, gt, preds)["coco"]
    keys, rng, draws = sorted(gt), np.random.default_rng(0), {}
    for _ in range(40):
        ev = COCOEvaluator()
        for i in rng.integers(0, len(keys), len(keys)):
            ev.process(keys[i], gt[keys[i]], preds[keys[i]])
        c = ev.evaluate()
        for name, v in [("AP", c["stats"]["AP"]), ("AP50", c["stats"]["AP50"])] + [
                (f"{cls} {m}", pc[m]) for cls, pc in c["per_class"].items() for m in ("AP", "AP50")]:
            draws.setdefault(name, []).append(v)

    def interval(name):
        valid = [v for v in draws[name] if v > -1]
        return [round(float(q), 4) for q in np.percentile(valid, [2.5, 97.5])]

    ci = coco["intervals"]
    assert ci["resamples"] == 40 and ci["AP"] == interval("AP") and ci["AP50"] == interval("AP50")
    for cls, pc in ci["per_class"].items():
        assert pc == {"AP": interval(f"{cls} AP"), "AP50": interval(f"{cls} AP50")}
    assert ci["AP"][0] < coco["stats"]["AP"] < ci["AP"][1]   # varied fields: a real spread around the figure


def test_field_intervals_collapse_when_every_field_is_alike():
    gt, preds = _varied_fields(1)
    (field,), (dets,) = gt.values(), preds.values()
    gt = {f"c{i}.jpg": field for i in range(8)}
    coco = evaluate_all({"coco": COCOEvaluator(resamples=20)}, gt, {k: dets for k in gt})["coco"]
    assert coco["intervals"]["AP"] == [round(coco["stats"]["AP"], 4)] * 2
    assert coco["intervals"]["AP50"] == [round(coco["stats"]["AP50"], 4)] * 2
