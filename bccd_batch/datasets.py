"""Training data from one or more labelled datasets: their fields decoded once, split into train and
val, fields whose pixels two datasets share kept once, and each field's source named for per-source
metrics. No torch here: `train` wraps the fields in a torch Dataset.

A dataset is any path `labels.read_labels` takes (VOC root, YOLO folder or data.yaml, CSV, COCO
JSON). Its val fields are its own split list where it ships one, else a seeded fraction of its fields.
A dataset may carry `sources.csv` (`file,source,...`) naming where each field comes from (TXL-PBC's
BCCD and PBC fields); its metrics are then reported per source. One written by `complete-labels`
carries `pseudo.csv`, the teacher's boxes among its labels: trained on as labels, or kept apart as
ignore regions (`record["ignore"]`), which training counts neither as cells nor as background.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import random
from pathlib import Path, PurePosixPath

import numpy as np

from .decode import DecodeError, decode_file
from .labels import LabelSet, read_labels, read_split


@dataclasses.dataclass(eq=False)
class Field:
    key: str            # "<dataset>/<record key>": unique across datasets
    record: dict        # the labels record (boxes in pixels of `pixels`)
    source: str         # what per-source metrics group it under
    pixels: np.ndarray  # HxWx3 uint8


@dataclasses.dataclass
class TrainingData:
    train: list[Field]
    val: list[Field]
    warnings: list[str]
    summary: dict       # per dataset: fields train/val, duplicates dropped

    def val_sources(self) -> dict[str, list[Field]]:
        out: dict[str, list[Field]] = {}
        for f in self.val:
            out.setdefault(f.source, []).append(f)
        return dict(sorted(out.items()))


def dataset_name(path: Path) -> str:
    path = Path(path)
    return (path.parent.name if path.is_file() else path.name) or "data"


def image_root(path: Path, labels: LabelSet) -> Path:
    """Where a dataset's record keys point: the reader's root, else (CSV, COCO) the file's folder."""
    return labels.image_root or Path(path).parent


def split_keys(labels: LabelSet, train_split: str, val_split: str, val_fraction: float, seed: int) -> tuple[list, list, str]:
    """(train keys, val keys, how): the dataset's own split lists where it has them, else a seeded
    `val_fraction` of its fields, the same for the same fields and seed whatever the order they came in."""
    keys = sorted(labels.records)
    listed = {}
    for split in (train_split, val_split):
        if Path(split).is_file():   # a file of image names or stems, whatever the dataset's format
            stems = {Path(s).stem for s in read_split(split)}
            listed[split] = [k for k in keys if PurePosixPath(k).stem in stems]
    splits = {**labels.splits, **listed}
    if val_split in splits:
        val = set(splits[val_split])
        train = set(splits.get(train_split, [k for k in keys if k not in val]))
        return sorted(train - val), sorted(val), f"split lists {train_split}/{val_split}"
    shuffled = keys[:]
    random.Random(seed).shuffle(shuffled)
    n_val = round(len(keys) * val_fraction)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val]), f"seeded {val_fraction:.0%} val (seed {seed})"


def beside(path: Path, name: str) -> Path:
    """A dataset's companion file `name`: in its folder, or beside its label file (CSV, COCO, data.yaml)."""
    path = Path(path)
    return path / name if path.is_dir() else path.parent / name


def read_sources(path: Path) -> dict[str, str]:
    """file -> source from a dataset's sources.csv, where it has one."""
    f = beside(path, "sources.csv")
    if not f.is_file():
        return {}
    with open(f, newline="", encoding="utf-8") as fh:
        return {row["file"]: row["source"] for row in csv.DictReader(fh) if row.get("file") and row.get("source")}


PSEUDO_USES = ("labels", "ignore")


def read_pseudo(path: Path) -> dict[str, list[tuple]]:
    """file -> [(class, x0, y0, x1, y1)] of a dataset's pseudo.csv (complete-labels' teacher boxes)."""
    f = beside(path, "pseudo.csv")
    if not f.is_file():
        return {}
    out: dict[str, list[tuple]] = {}
    with open(f, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["file"], []).append((row["class"], *(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return out


def without_pseudo(record: dict, pseudo: list[tuple], tol: float = 0.05) -> dict:
    """The record with the teacher's boxes moved from its labels to `ignore` (corners only): a label
    is the teacher's where pseudo.csv has its class and corners to `tol` pixels (the YOLO file keeps
    six decimals of the field's size)."""
    def is_pseudo(b):
        return any(b[0] == p[0] and max(abs(x - y) for x, y in zip(b[1:], p[1:])) <= tol for p in pseudo)
    own = [b for b in record["boxes"] if not is_pseudo(b)]
    return {**record, "boxes": own, "ignore": [tuple(p[1:]) for p in pseudo]}


def pixel_hash(pixels: np.ndarray) -> str:
    """The decoded pixels' identity: the same field saved as another file (or format) hashes alike."""
    return hashlib.blake2b(pixels.tobytes() + str(pixels.shape).encode(), digest_size=16).hexdigest()


def load_training_data(paths: list[Path], train_split: str = "train", val_split: str = "val",
                       val_fraction: float = 0.2, seed: int = 0, pseudo: str = "labels", log=print) -> TrainingData:
    """Read, decode and split every dataset in `paths`. Where two datasets label the same pixels,
    the one given first wins (give the most complete labels first) and the field appears once; a
    field that is val in any of them is val, so no val field is ever trained on. `pseudo`: what a
    dataset's teacher boxes (pseudo.csv) are, one of PSEUDO_USES."""
    if pseudo not in PSEUDO_USES:
        raise ValueError(f"pseudo must be one of {PSEUDO_USES}, not {pseudo!r}")
    warnings: list[str] = []
    summary: dict[str, dict] = {}
    by_hash: dict[str, tuple[Field, bool]] = {}
    seen_val: set[str] = set()
    for path in paths:
        path = Path(path)
        name = dataset_name(path)
        if name in summary:
            name = f"{name}-{len(summary)}"
        labels = read_labels(path)
        root = image_root(path, labels)
        train_keys, val_keys, how = split_keys(labels, train_split, val_split, val_fraction, seed)
        origin = read_sources(path)
        teacher = read_pseudo(path) if pseudo == "ignore" else {}
        warnings += [f"{name}: {w}" for w in labels.warnings]
        stats = {"path": str(path), "split": how, "train": 0, "val": 0, "duplicates_dropped": 0, "unusable": 0,
                 **({"ignore_regions": sum(map(len, teacher.values()))} if teacher else {})}
        for key, is_val in [(k, False) for k in train_keys] + [(k, True) for k in val_keys]:
            try:
                pixels = decode_file(root / key)
            except (DecodeError, OSError) as e:
                warnings.append(f"{name}/{key}: image unusable for training ({e}), skipped")
                stats["unusable"] += 1
                continue
            rec = without_pseudo(labels.records[key], teacher[key]) if key in teacher else labels.records[key]
            h = pixel_hash(pixels)
            if is_val:
                seen_val.add(h)
            if h in by_hash:
                stats["duplicates_dropped"] += 1
                continue
            source = f"{name}/{origin[key]}" if key in origin else name
            by_hash[h] = (Field(f"{name}/{key}", rec, source, pixels), is_val)
        summary[name] = stats
    train, val = [], []
    for h, (field, is_val) in by_hash.items():
        part = "val" if is_val or h in seen_val else "train"
        (val if part == "val" else train).append(field)
        summary[field.key.split("/", 1)[0]][part] += 1
    for name, s in summary.items():
        log(f"{name}: {s['train']} train + {s['val']} val fields ({s['split']}); {s['duplicates_dropped']} "
            f"fields already labelled by an earlier dataset dropped, {s['unusable']} unusable")
    return TrainingData(train, val, warnings, summary)

