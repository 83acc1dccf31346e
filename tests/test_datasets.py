"""Training data from several datasets: splits, per-source names and the duplicate-pixels rule."""

import numpy as np
from PIL import Image

from bccd_batch.datasets import load_training_data, split_keys
from bccd_batch.labels import LabelSet


def _field(path, seed, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def _yolo(root, names_seeds, val=(), sources=None):
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("WBC\nRBC\nPlatelets\n")
    for name, seed in names_seeds:
        _field(root / "images" / name, seed, "PNG")
        (root / "labels" / f"{name[:-4]}.txt").write_text("1 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.2 0.2\n0 0.8 0.8 0.2 0.2\n")
    if val:
        (root / "splits").mkdir()
        (root / "splits" / "val.txt").write_text("".join(f"{v}\n" for v in val))
        (root / "splits" / "train.txt").write_text("".join(f"{n}\n" for n, _ in names_seeds if n not in val))
    if sources:
        (root / "sources.csv").write_text("file,source\n" + "".join(f"{k},{v}\n" for k, v in sources.items()))


def _csv(root, names_seeds):
    rows = ["filename,width,height,class,xmin,ymin,xmax,ymax"]
    for name, seed in names_seeds:
        Image.open(_field_png(root, name, seed)).close()
        rows.append(f"{name},64,48,RBC,10,10,20,20")    # one RBC: incomplete labels of the same pixels
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def _field_png(root, name, seed):
    # The same pixels as the YOLO set's field, saved under another name (PNG keeps them exactly).
    return _field(root / name, seed, "PNG")


def test_fields_two_datasets_share_are_kept_once_with_the_first_datasets_labels(tmp_path):
    _yolo(tmp_path / "complete", [("a.png", 1), ("b.png", 2), ("c.png", 3)], val=["c.png"],
          sources={"a.png": "LabA", "b.png": "LabB", "c.png": "LabB"})
    _csv(tmp_path / "partial", [("renamed_a.png", 1), ("renamed_c.png", 3), ("own.png", 4), ("own2.png", 5)])
    logged = []
    data = load_training_data([tmp_path / "complete", tmp_path / "partial" / "labels.csv"], val_fraction=0.0,
                              seed=0, log=logged.append)
    keys = sorted(f.key for f in data.train)
    # renamed_a is a's pixels: dropped, a keeps its three complete boxes; renamed_c is val c's: never trained on.
    assert "partial/renamed_a.png" not in keys and "partial/renamed_c.png" not in keys
    assert [len(f.record["boxes"]) for f in data.train if f.key == "complete/a.png"] == [3]
    assert data.summary["partial"]["duplicates_dropped"] == 2
    assert {f.source for f in data.train if f.key.startswith("complete/")} == {"complete/LabA", "complete/LabB"}
    assert sorted(f.key for f in data.val) == ["complete/c.png"] and list(data.val_sources()) == ["complete/LabB"]
    assert keys == ["complete/a.png", "complete/b.png", "partial/own.png", "partial/own2.png"]
    assert any("2 fields already labelled by an earlier dataset dropped" in m for m in logged)
    # The order decides: the partial labels first would win for a.
    swapped = load_training_data([tmp_path / "partial" / "labels.csv", tmp_path / "complete"], val_fraction=0.0,
                                 log=logged.append)
    assert [len(f.record["boxes"]) for f in swapped.train if f.key == "partial/renamed_a.png"] == [1]
    # A field that is val in any dataset is val: renamed_c is c's pixels, listed as c in complete's val.
    assert [f.key for f in swapped.val] == ["partial/renamed_c.png"]


def test_seeded_val_fraction_does_not_depend_on_the_order_fields_came_in():
    recs = {f"f{i}.jpg": {} for i in range(10)}
    train, val, how = split_keys(LabelSet(recs, []), "train", "val", 0.3, seed=4)
    train2, val2, _ = split_keys(LabelSet(dict(reversed(list(recs.items()))), []), "train", "val", 0.3, seed=4)
    assert (train, val) == (train2, val2) and len(val) == 3 and not set(train) & set(val) and "seeded" in how


def test_completion_thresholds_count_own_boxes_plus_the_teachers_closest_to_complete_labels():
    from bccd_batch.complete import choose_thresholds, unlabelled_detections

    own = {"a": [("RBC", 0, 0, 10, 10)]}                                   # the incomplete labels: one of three RBCs
    reference = {"a": [("RBC", 0, 0, 10, 10), ("RBC", 20, 0, 30, 10), ("RBC", 40, 0, 50, 10)]}
    teacher = [("RBC", 0.9, 0, 0, 10, 10), ("RBC", 0.7, 20, 0, 30, 10), ("RBC", 0.6, 40, 0, 50, 10),
               ("RBC", 0.3, 60, 0, 70, 10)]                                 # the first is the labelled cell again
    candidates = {"a": unlabelled_detections(teacher, own["a"])}
    assert [d[1] for d in candidates["a"]] == [0.7, 0.6, 0.3]
    chosen = choose_thresholds(candidates, own, reference)
    assert chosen["thresholds"]["RBC"] == 0.35 and chosen["MAE_completed"]["RBC"] == 0.0   # adds 0.7 and 0.6, not 0.3
    assert chosen["MAE_own_labels"]["RBC"] == 2.0 and chosen["bias_own_labels"]["RBC"] == -2.0


def test_teacher_boxes_train_as_labels_or_as_ignore_regions(tmp_path):
    from bccd_batch.complete import write_yolo

    _field(tmp_path / "images" / "a.png", 1, "PNG")
    own = [("RBC", 1.0, 2.0, 20.0, 21.0), ("WBC", 30.0, 10.0, 60.0, 40.0)]
    added = [("RBC", 0.4, 40.3, 1.7, 58.9, 19.2)]                       # (class, score, corners): not a label of its own
    write_yolo(tmp_path / "done", tmp_path / "images", {"a.png": ((64, 48), own, added)})
    as_labels = load_training_data([tmp_path / "done"], log=lambda m: None).train[0].record
    assert len(as_labels["boxes"]) == 3 and "ignore" not in as_labels
    data = load_training_data([tmp_path / "done"], pseudo="ignore", log=lambda m: None)
    rec = data.train[0].record
    assert [b[0] for b in rec["boxes"]] == ["RBC", "WBC"] and rec["ignore"] == [(40.3, 1.7, 58.9, 19.2)]
    assert data.summary["done"]["ignore_regions"] == 1
