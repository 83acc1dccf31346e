"""`bccd-batch calibrate`: count thresholds chosen on a lab's own labelled fields, the weights unchanged."""

import csv
import json
import shutil

from conftest import MODEL, cli


def _counts(out):
    return {r["image"]: {c: int(r[c]) for c in ("RBC", "WBC", "Platelets")}
            for r in csv.DictReader(open(out / "latest" / "counts.csv", newline=""))}


def test_calibrated_thresholds_count_as_the_lab_labels(tmp_path, slides):
    # A lab that labels only the cells the default model is sure of (score >= 0.8): its counts are
    # lower than the default's, and the calibrated model must count as it does on its own fields.
    base = tmp_path / "base"
    cli("run", slides, "--out", base, "--device", "cpu", check_rc=0)
    lab = tmp_path / "lab"
    (lab / "images").mkdir(parents=True)
    (lab / "labels").mkdir()
    (lab / "classes.txt").write_text("RBC\nWBC\nPlatelets\n")
    lines = {}
    for r in csv.DictReader(open(base / "latest" / "detections.csv", newline="")):
        w, h = float(r["width"]), float(r["height"])
        x0, y0, x1, y1 = (float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        entry = lines.setdefault(r["image"], [])
        if float(r["score"]) >= 0.8:
            entry.append(f"{('RBC', 'WBC', 'Platelets').index(r['class'])} {(x0 + x1) / 2 / w} {(y0 + y1) / 2 / h} "
                         f"{(x1 - x0) / w} {(y1 - y0) / h}")
    for image, rows in lines.items():
        name = image.split("/")[-1]
        (lab / "images" / name).symlink_to(slides / image)
        (lab / "labels" / name.replace(".jpg", ".txt")).write_text("\n".join(rows) + "\n")
    labelled = {i: {c: sum(1 for x in rows if x.split()[0] == str(k)) for k, c in enumerate(("RBC", "WBC", "Platelets"))}
                for i, rows in lines.items()}

    ours = tmp_path / "ours"
    p = cli("calibrate", lab, "--out", ours, check_rc=0)
    card, shipped = json.loads((ours / "model.json").read_text()), json.loads((MODEL / "model.json").read_text())
    assert f"RBC: threshold {shipped['thresholds']['count']['RBC']:g} -> " in p.stdout, p.stdout
    assert card["weights"]["sha256"] == shipped["weights"]["sha256"]
    assert (ours / card["weights"]["file"]).read_bytes() == (MODEL / shipped["weights"]["file"]).read_bytes()
    cal = card["calibration"]
    assert cal["fields"] == len(lines) and cal["thresholds"] == card["thresholds"]["count"]
    assert 0.55 <= card["thresholds"]["count"]["RBC"] <= 0.8     # of the tied best, the nearest the model's (below 0.55)
    assert cal["after"]["RBC"]["MAE"] == 0.0 < cal["before"]["RBC"]["MAE"]
    assert cal["cross_validated"]["RBC"]["MAE"] < cal["before"]["RBC"]["MAE"]

    out = tmp_path / "out"
    cli("run", slides, "--out", out, "--device", "cpu", "--model", ours, check_rc=0)
    rbc = lambda counts: {k: v["RBC"] for k, v in counts.items()}  # noqa: E731
    calibrated = _counts(out)
    assert rbc(calibrated) == rbc(labelled) and rbc(_counts(base)) != rbc(labelled)
    # A class whose cross-validated error is no lower keeps the model's threshold (here the WBC of
    # one field scored between the model's threshold and 0.8: held out, the other fields cannot see it).
    for c in ("WBC", "Platelets"):
        if cal["cross_validated"][c]["MAE"] >= cal["before"][c]["MAE"]:
            assert cal["thresholds"][c] == shipped["thresholds"]["count"][c]
    assert json.loads((out / "latest" / "run.json").read_text())["model"]["calibrated_on"] == {"labels": str(lab), "fields": len(lines)}


def test_a_lab_of_another_stain_is_calibrated_on_the_detections_run_counts(tmp_path, bccd):
    """Four completely labelled BCCD fields as a paler stain shows them: `run` counts them after its
    second pass (given BCCD's colours), and `calibrate` must judge the model's thresholds on those
    detections, not on the first pass's, which miss platelets."""
    import numpy as np
    import torch
    from PIL import Image

    from bccd_batch.decode import decode_file
    from bccd_batch.transforms import restain

    txl = bccd.parent / "txl_pbc"
    lab = tmp_path / "lab"
    (lab / "images").mkdir(parents=True)
    (lab / "labels").mkdir()
    shutil.copy(txl / "classes.txt", lab / "classes.txt")
    bccd_fields = [r["file"] for r in csv.DictReader(open(txl / "sources.csv", newline="")) if r["source"] == "BCCD"][:4]
    for name in bccd_fields:
        field = torch.from_numpy(decode_file(txl / "images" / name)).permute(2, 0, 1)
        pale = restain(field, (0.5, 0.5, 0.5)).permute(1, 2, 0).numpy()
        stem = name.rsplit(".", 1)[0]
        Image.fromarray(np.ascontiguousarray(pale)).save(lab / "images" / f"{stem}.jpg", quality=95)
        shutil.copy(txl / "labels" / f"{stem}.txt", lab / "labels" / f"{stem}.txt")
    out = tmp_path / "out"
    cli("run", lab / "images", "--labels", lab, "--out", out, "--device", "cpu", check_rc=0)
    assert {r["recoloured"] for r in csv.DictReader(open(out / "latest" / "counts.csv", newline=""))} == {"txl_pbc/BCCD"}
    counted = json.loads((out / "latest" / "metrics.json").read_text())["counting"]["per_class"]
    cli("calibrate", lab, "--out", tmp_path / "ours", check_rc=0)
    before = json.loads((tmp_path / "ours" / "model.json").read_text())["calibration"]["before"]
    for c in ("RBC", "WBC", "Platelets"):
        assert before[c] == {"MAE": round(counted[c]["MAE"], 3), "bias": round(counted[c]["mean_signed_error"], 3)}, (c, before, counted)


def test_calibrate_refuses_to_overwrite_the_model_it_starts_from(tmp_path, slides):
    model = tmp_path / "model"
    shutil.copytree(MODEL, model, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    before = (model / "model.json").read_bytes()
    p = cli("calibrate", slides, "--out", model, "--model", model)
    assert (model / "model.json").read_bytes() == before
    assert p.returncode == 2 and "new folder" in p.stderr and "Traceback" not in p.stderr


def test_a_corrupt_field_or_label_line_is_named_and_skipped(tmp_path, slides):
    lab = tmp_path / "lab"
    (lab / "images").mkdir(parents=True)
    (lab / "labels").mkdir()
    (lab / "classes.txt").write_text("RBC\nWBC\nPlatelets\n")
    for f in sorted(slides.rglob("*.jpg"))[:3]:
        shutil.copy(f, lab / "images" / f.name)
        (lab / "labels" / f"{f.stem}.txt").write_text("0 0.5 0.5 0.2 0.25\nnot a box\n")
    broken = sorted((lab / "images").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:3000])
    p = cli("calibrate", lab, "--out", tmp_path / "ours", check_rc=0)
    assert f"{broken.name}: image unusable" in p.stderr and "line skipped" in p.stderr, p.stderr
    assert json.loads((tmp_path / "ours" / "model.json").read_text())["calibration"]["fields"] == 2


def test_an_unknown_device_is_refused_before_any_work(tmp_path, slides):
    p = cli("calibrate", slides, "--out", tmp_path / "ours", "--device", "gpu")
    assert p.returncode == 2 and "unsupported device 'gpu'" in p.stderr and "Traceback" not in p.stderr
    assert "labelled fields" not in p.stderr and not (tmp_path / "ours").exists()
