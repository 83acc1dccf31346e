"""Render a run's files (CSVs, run.json) from the store. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from .cells import CLASSES, Threshold, class_counts, class_threshold
from .quality import QUALITY, field_flags, rbc_size
from .store import STORE_NAME, unpack_detections

DETECTION_COLUMNS = ["image", "slide", "width", "height", "class", "score", "xmin", "ymin", "xmax", "ymax"]
COUNT_COLUMNS = ["image", "slide", "width", "height", *CLASSES, *QUALITY, "cell_size", "recounted_at", "recoloured", "flags"]
# Estimates of a lab's blood counts: mean cells per field times the lab's own calibration factor
# (`run --platelet-factor/--wbc-factor`); blank where the lab has configured none.
ESTIMATED = ("Platelets", "WBC")
SLIDE_COLUMNS = ["slide", "fields", "unreadable", *CLASSES, *(f"{c}_per_field" for c in CLASSES), "WBC_per_1000_RBC",
                 *(f"{c}_estimate" for c in ESTIMATED)]
ERROR_COLUMNS = ["image", "reason"]


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _csv_text(columns: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def _blank_none(v):
    return "" if v is None else v


def gather(store, run_id: int, root: str, count_threshold: Threshold, factors: dict | None = None) -> dict:
    """Everything the run's files and report show, read once from the store. The store keeps each
    image's latest result, so for an earlier run, the fields a later run processed again show that
    run's result (`later`); the earlier run's own CSVs keep what it found. `factors`: class ->
    the lab's calibration factor, for the per-slide estimates of the classes in ESTIMATED."""
    images = store.run_images(run_id, root)
    dets = {r["rel"]: unpack_detections(r["detections"]) for r in images if r["status"] == "ok"}
    counts = {rel: class_counts(ds, count_threshold) for rel, ds in dets.items()}
    rbc_cut = class_threshold(count_threshold, "RBC")
    sizes = {r["rel"]: rbc_size(dets[r["rel"]], rbc_cut, r["width"], r["height"]) for r in images if r["status"] == "ok"}
    flags = {r["rel"]: field_flags(counts[r["rel"]], *(r[k] for k in QUALITY), sizes[r["rel"]], r["recounted_at"],
                                   r["recoloured"])
             for r in images if r["status"] == "ok"}
    slides: dict[str, dict] = {}
    for r in images:
        s = slides.setdefault(r["slide"], {"slide": r["slide"], "fields": 0, "unreadable": 0, **dict.fromkeys(CLASSES, 0)})
        if r["status"] == "ok":
            s["fields"] += 1
            for c in CLASSES:
                s[c] += counts[r["rel"]][c]
        else:
            s["unreadable"] += 1
    for s in slides.values():
        for c in CLASSES:
            s[f"{c}_per_field"] = round(s[c] / s["fields"], 2) if s["fields"] else 0.0
        s["WBC_per_1000_RBC"] = round(1000 * s["WBC"] / s["RBC"], 2) if s["RBC"] else None
        for c in ESTIMATED:
            f = (factors or {}).get(c)
            s[f"{c}_estimate"] = round(s[f"{c}_per_field"] * f, 1) if f and s["fields"] else None
    totals = {c: sum(s[c] for s in slides.values()) for c in CLASSES}
    return {"images": images, "detections": dets, "counts": counts, "cell_sizes": sizes, "flags": flags,
            "slides": slides, "totals": totals,
            "errors": [(r["rel"], r["error"]) for r in images if r["status"] != "ok"],
            "later": [r["rel"] for r in images if r["run_id"] > run_id]}


def write_run_files(run_dir: Path, data: dict, info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in data["images"] if r["status"] == "ok"]
    atomic_write(run_dir / "detections.csv", _csv_text(DETECTION_COLUMNS, (
        (r["rel"], r["slide"], r["width"], r["height"], d[0], f"{d[1]:.4f}", *(f"{v:.2f}" for v in d[2:]))
        for r in ok for d in data["detections"][r["rel"]])))
    atomic_write(run_dir / "counts.csv", _csv_text(COUNT_COLUMNS, (
        (r["rel"], r["slide"], r["width"], r["height"], *(data["counts"][r["rel"]][c] for c in CLASSES),
         *(_blank_none(r[k]) for k in QUALITY), _blank_none(data["cell_sizes"][r["rel"]]),
         _blank_none(r["recounted_at"]), _blank_none(r["recoloured"]),
         ";".join(f for f, _ in data["flags"][r["rel"]]))
        for r in ok)))
    atomic_write(run_dir / "slides.csv", _csv_text(SLIDE_COLUMNS, (
        [_blank_none(s[c]) for c in SLIDE_COLUMNS] for _, s in sorted(data["slides"].items()))))
    atomic_write(run_dir / "errors.csv", _csv_text(ERROR_COLUMNS, data["errors"]))
    atomic_write(run_dir / "run.json", json.dumps(info, indent=2) + "\n")


def stored_run(store, out: Path, run_name: str) -> tuple:
    """(the store's row for RUN, OUT/runs/RUN): a run's report or metrics are written only where
    the store knows the run and its folder is still there."""
    run = store.run_by_name(run_name)
    if run is None:
        raise FileNotFoundError(f"no run named {run_name!r} in {Path(out) / STORE_NAME}")
    folder = Path(out) / "runs" / run_name
    if not folder.is_dir():
        raise FileNotFoundError(f"no run folder {folder} (runs beyond `run --keep-runs` keep only their counts, "
                                f"listed in {Path(out) / 'index.html'})")
    return run, folder


def point_latest(out: Path, run_dir: Path) -> None:
    """OUT/latest is a relative symlink to the newest run folder, swapped atomically."""
    tmp = out / f".latest.tmp{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(run_dir, out), tmp)
    os.replace(tmp, out / "latest")


def prune_runs(out: Path, runs_newest_first: list[str], keep: int) -> tuple[list[str], list[str]]:
    """Delete the folders of all but the newest `keep` runs (names from the store, newest first):
    the store keeps every run's row, counts and totals, so the index still lists and charts them.
    A folder the store does not name is never touched. Returns (removed, reasons it could not
    remove one): a folder that will not go is reported, never the end of the night."""
    runs = (Path(out) / "runs").resolve()
    removed, problems = [], []
    for name in runs_newest_first[keep:]:
        folder = runs / name
        if folder.parent != runs or folder.is_symlink() or not folder.is_dir():
            continue        # already gone, or not a plain folder of ours
        try:
            shutil.rmtree(folder)
            removed.append(name)
        except OSError as e:
            problems.append(f"{name}: {e.strerror or e}")
    return removed, problems
