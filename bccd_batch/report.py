"""The clinician's report: data gathered once from the store, rendered by Jinja2 templates into one
self-contained HTML file (CSS, JS and images inline; a CSP forbids any remote load).

Size budget: every field gets a 256-px-wide JPEG thumbnail (about 12 kB in base64; twice that with
labels, ground truth beside prediction); the first `FULL_SIZE_LIMIT` fields in review order also
carry a 640-px version for the click-through view. Past `GALLERY_LIMIT` fields the rest are listed
without pictures and the report says so, which keeps it under ~15 MB on any folder size.
"""

from __future__ import annotations

import base64
import io
import json
from importlib.resources import files
from pathlib import Path

import jinja2
from PIL import Image

from . import __version__
from .calibrate import FEW_FIELDS
from .cells import CLASSES, Threshold, class_threshold
from .decode import DecodeError, decode_file
from .labels import box_counts
from .outputs import atomic_write, gather, stored_run
from .store import STORE_NAME, Store

THUMB_WIDTH, FULL_WIDTH = 256, 640
GALLERY_LIMIT, FULL_SIZE_LIMIT = 400, 40
# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
CLASS_COLOURS = {"RBC": "#D55E00", "WBC": "#0072B2", "Platelets": "#009E73"}


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(files("bccd_batch.templates"))),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, d=3: "—" if v is None or (isinstance(v, float) and v < 0) else f"{v:.{d}f}"
    return env


def _data_uri(img: Image.Image, width: int, quality: int) -> str:
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# Uncertain detections (near misses) score from this share of the count threshold up to it.
UNCERTAIN_FROM = 0.5
# A labelled field's disagreement: each labelled cell the model missed or called another class counts
# 1, each counted detection that matches no label a quarter, since where labels leave cells out (BCCD's
# XML: ~8 RBCs a field) most of those are unlabelled cells, a fault of the labels, not of the model.
DISAGREEMENT_WEIGHTS = {"missed": 1.0, "unmatched": 0.25}
# Uncertain detections per counted cell: 0.41 on BCCD's val fields; a slide at twice that is unlike
# the training data (stain, focus, magnification).
UNCERTAIN_RATIO_FLAG = 0.8


def slide_flags(slide: dict, uncertain_ratio: float, flagged_fields: int = 0) -> list[tuple[str, str]]:
    """(flag, reason) pairs a hematologist should look at before trusting the slide's numbers;
    `flagged_fields`: how many of its fields have `quality.field_flags`."""
    flags = []
    if slide["unreadable"]:
        flags.append(("unreadable fields", f"{slide['unreadable']} field image(s) could not be read; see Errors"))
    if flagged_fields:
        flags.append(("flagged fields", f"{flagged_fields} field(s) blurred, badly exposed, with too few cells "
                                        "to count, faintly stained, or with cells of another size, another stain or a colour "
                                        "cast, counted again brought to the training labs' look (badged in Fields)"))
    if slide["fields"] and slide["WBC"] == 0:
        flags.append(("no WBC", "no white cell found in any field of this slide"))
    if slide["fields"] and slide["RBC_per_field"] < 5:
        flags.append(("few cells", f"{slide['RBC_per_field']} RBC per field (< 5): thin smear, focus or staining?"))
    if uncertain_ratio > UNCERTAIN_RATIO_FLAG:
        flags.append(("low confidence", f"{uncertain_ratio:.2f} near-threshold detections per counted cell "
                                        f"(BCCD val: 0.41): counts may be unreliable"))
    return flags


def uncertain_detections(dets: list[tuple], count_threshold: Threshold) -> int:
    """A field's near misses: detections scoring from half their class's count threshold up to it,
    which the count leaves out. Fields with many of them have the least trustworthy counts: on BCCD
    (train and val alike) the tenth of fields with the most had nearly twice the mean count error
    (scripts/review_order.py)."""
    return sum(1 for d in dets if UNCERTAIN_FROM * class_threshold(count_threshold, d[0]) <= d[1]
               < class_threshold(count_threshold, d[0]))


def _boxes(dets, threshold: Threshold | None = None) -> list[dict]:
    """Boxes to draw: all labels, or the detections from half their class's count `threshold` up,
    those under it (`uncertain_detections`, not counted) marked so the report can tell them apart."""
    cut = {c: class_threshold(threshold, c) for c in CLASSES} if threshold is not None else None
    return [{"cls": d[0], "x": d[-4], "y": d[-3], "w": d[-2] - d[-4], "h": d[-1] - d[-3],
             "score": d[1] if len(d) == 6 else None, "uncertain": cut is not None and d[1] < cut[d[0]]}
            for d in dets if cut is None or d[1] >= UNCERTAIN_FROM * cut[d[0]]]


def threshold_text(threshold: Threshold) -> str:
    """"0.5", or per class "RBC 0.35 · WBC 0.6 · Platelets 0.4"."""
    if isinstance(threshold, dict):
        return " · ".join(f"{c} {class_threshold(threshold, c):g}" for c in CLASSES)
    return f"{threshold:g}"


# A class's mean count error per field against complete labels at which the report suggests
# `bccd-batch calibrate` (the model card's targets allow ±0.5 RBC per field).
CALIBRATE_FROM = 0.5


def calibration_hint(metrics: dict | None, label_gaps: dict | None) -> dict[str, float]:
    """The classes counted off the labels by CALIBRATE_FROM or more per field on average, where
    enough fields were scored to fit thresholds to and no field's labels seem to leave a class out
    (incomplete labels would teach undercounting)."""
    # Metrics stored by older versions may lack any of these: no note then.
    if not metrics or metrics.get("n_images_scored", 0) < FEW_FIELDS or (label_gaps and label_gaps.get("fields")):
        return {}
    bias = {c: m["mean_signed_error"] for c, m in metrics.get("counting", {}).get("per_class", {}).items()}
    return {c: b for c, b in bias.items() if abs(b) >= CALIBRATE_FROM}


def build_context(store: Store, run) -> dict:
    """What report.html shows of `run` (the store's row)."""
    run_name = run["name"]
    info = json.loads(run["info"])
    thr = info["model"]["thresholds"]
    data = gather(store, run["id"], run["slides_root"], thr["count"], info.get("estimate_factors"))
    metrics = store.metrics(run["id"])
    per_image = (metrics or {}).get("matching", {}).get("per_image", {})
    gt = (metrics or {}).get("ground_truth", {})
    # Metrics stored before label gaps were scored have none.
    label_gaps = (metrics or {}).get("label_gaps")

    uncertain = {rel: uncertain_detections(ds, thr["count"]) for rel, ds in data["detections"].items()}
    flags = data["flags"]
    slides = []
    for name, s in sorted(data["slides"].items()):
        rels = [r["rel"] for r in data["images"] if r["slide"] == name and r["status"] == "ok"]
        counted = sum(s[c] for c in CLASSES)
        near = sum(uncertain[r] for r in rels)
        slides.append({**s, "flags": slide_flags(s, near / counted if counted else 0.0, sum(1 for r in rels if flags[r]))})

    gt_counts = {rel: box_counts(boxes) for rel, boxes in gt.items()}

    def badness(r):
        """Labelled fields by disagreement with their labels (DISAGREEMENT_WEIGHTS); the rest (a
        nightly run's fields have no labels) flagged ones first, then by uncertain detections, so the
        pictures and the 40 large views go to the fields whose counts most need a look."""
        if r["rel"] in per_image:
            m = per_image[r["rel"]]
            err = sum(abs(data["counts"][r["rel"]][c] - gt_counts[r["rel"]][c]) for c in CLASSES)
            return (0, -(DISAGREEMENT_WEIGHTS["missed"] * m["FN"] + DISAGREEMENT_WEIGHTS["unmatched"] * m["FP"]), -err, r["rel"])
        return (1, -len(flags[r["rel"]]), -uncertain[r["rel"]], r["rel"])

    ok_rows = sorted((r for r in data["images"] if r["status"] == "ok"), key=badness)
    gallery, skipped_pictures = [], []
    for i, r in enumerate(ok_rows):
        if i >= GALLERY_LIMIT:
            skipped_pictures.append(r["rel"])
            continue
        try:
            img = Image.fromarray(decode_file(Path(run["slides_root"]) / r["rel"]))
            thumb = _data_uri(img, THUMB_WIDTH, 70)
            full = _data_uri(img, FULL_WIDTH, 80) if i < FULL_SIZE_LIMIT else None
        except (DecodeError, OSError):
            thumb = full = None   # the file changed or vanished since the run: still report its numbers
        item = {"id": f"img{i}", "rel": r["rel"], "slide": r["slide"], "width": r["width"], "height": r["height"],
                "thumb": thumb, "full": full, "counts": data["counts"][r["rel"]],
                "pred": _boxes(data["detections"][r["rel"]], thr["count"]),
                "gt": _boxes(gt[r["rel"]]) if r["rel"] in gt else None,
                "match": per_image.get(r["rel"]), "gt_counts": gt_counts.get(r["rel"]), "uncertain": uncertain[r["rel"]],
                "flags": flags[r["rel"]],
                "label_gap": label_gaps["fields"].get(r["rel"]) if label_gaps else None}
        gallery.append(item)

    return {
        "title": f"bccd-batch report {run_name}", "run": info, "run_name": run_name, "version": __version__,
        "classes": CLASSES, "colours": CLASS_COLOURS, "count_threshold": threshold_text(thr["count"]),
        "uncertain_from": UNCERTAIN_FROM, "weights": DISAGREEMENT_WEIGHTS, "slides": slides, "totals": data["totals"],
        "fields": sum(s["fields"] for s in data["slides"].values()), "gallery": gallery,
        "skipped_pictures": skipped_pictures, "errors": data["errors"], "metrics": metrics, "later": data["later"],
        "label_gaps": label_gaps, "calibration_hint": calibration_hint(metrics, label_gaps),
        "gallery_limit": GALLERY_LIMIT, "full_size_limit": FULL_SIZE_LIMIT,
        "pr_curves": _pr_paths(metrics) if metrics else {},
    }


def _pr_paths(metrics: dict) -> dict[str, str]:
    """SVG polyline points of precision vs recall at IoU 0.5: both 0-1 over 180 px, origin at (40, 200)."""
    out = {}
    for cls, m in metrics["coco"]["per_class"].items():
        pts = [(i / 100, p) for i, p in enumerate(m.get("pr50", [])) if p >= 0]
        out[cls] = " ".join(f"{40 + 180 * r:.1f},{200 - 180 * p:.1f}" for r, p in pts)
    return out


def render_run(out: Path, run_name: str) -> Path:
    out = Path(out)
    store = Store(out / STORE_NAME)
    try:
        run, folder = stored_run(store, out, run_name)     # before the pictures are made
        ctx = build_context(store, run)
    finally:
        store.close()
    html = _env().get_template("report.html").render(**ctx)
    path = folder / "report.html"
    atomic_write(path, html)
    render_index(out)
    return path


def _trend(runs: list[dict], key: str, label: str) -> dict:
    """One number across runs on a 600x120 SVG canvas, oldest left: a dot per run that has it (None:
    left out, e.g. the throughput of a run with nothing new), joined by a line where there are two or
    more; the top 30 px hold the label, which the line never reaches."""
    xs = [300.0] if len(runs) == 1 else [20 + 560 * i / max(1, len(runs) - 1) for i in range(len(runs))]
    kept = [(x, r[key]) for x, r in zip(xs, runs) if r[key] is not None]
    peak = max([v for _, v in kept] + [1e-9])
    dots = [(round(x, 1), round(110 - 75 * v / peak, 1)) for x, v in kept]
    return {"label": label, "peak": peak, "dots": dots, "points": " ".join(f"{x},{y}" for x, y in dots)}


def render_index(out: Path) -> Path:
    out = Path(out)
    store = Store(out / STORE_NAME)
    try:
        runs = []
        for r in store.runs():
            info = json.loads(r["info"])
            rows = store.covered(r["id"])
            metrics = store.metrics(r["id"])
            folder = out / "runs" / r["name"]
            runs.append({"name": r["name"], "status": r["status"], "started": r["started_utc"],
                         "slides_root": r["slides_root"], "covered": rows,
                         # A killed run never wrote its info: show it with what the store knows.
                         "images": {"new": 0, "failed": 0, **info.get("images", {})},
                         "images_per_s": info.get("images_per_s"), "engine": info.get("engine"),
                         "totals": info.get("totals", {}),
                         "has_report": (folder / "report.html").is_file(),
                         "removed": not folder.is_dir(),      # run --keep-runs
                         "AP": metrics["coco"]["stats"]["AP"] if metrics else None})
    finally:
        store.close()
    for r in runs:
        r["fields"] = r["covered"] - r["images"]["failed"]      # as the run's report counts them: readable fields
        r["cells_per_field"] = sum(r["totals"].values()) / r["fields"] if r["fields"] > 0 and r["totals"] else None
        r["inferred_per_s"] = r["images_per_s"] if r["images"]["new"] else None
    trend = list(reversed(runs))
    charts = [_trend(trend, "inferred_per_s", "images/s (runs with new fields)"), _trend(trend, "cells_per_field", "cells per field")]
    html = _env().get_template("index.html").render(title="bccd-batch runs", runs=runs, charts=charts,
                                                   version=__version__)
    path = out / "index.html"
    atomic_write(path, html)
    return path
