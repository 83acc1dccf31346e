"""Read box labels from VOC XML, the seed's CSV or COCO JSON into one common record format.

Every reader returns `LabelSet`: records keyed by the image's path relative to the labels' image
root (POSIX separators), each `{"file_name", "width", "height", "boxes": [(cls, x0, y0, x1, y1)]}`,
plus human-readable warnings. Bad entries are warned about and dropped; only a file that cannot be
read at all raises `LabelError`. Label files never make us touch a path: file names are only keys,
and names that try to leave the root (`..`, absolute paths) are rejected.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path, PurePosixPath
from typing import Iterable

from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from .model import CLASSES

CSV_COLUMNS = ["filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax"]

_ALIASES = {
    "rbc": "RBC", "redbloodcell": "RBC", "erythrocyte": "RBC",
    "wbc": "WBC", "whitebloodcell": "WBC", "leukocyte": "WBC",
    "platelets": "Platelets", "platelet": "Platelets", "plt": "Platelets", "thrombocyte": "Platelets",
}


class LabelError(Exception):
    """A label source that cannot be read at all."""


@dataclasses.dataclass
class LabelSet:
    records: dict[str, dict]
    warnings: list[str]

    def counts(self) -> dict[str, int]:
        per_field = [box_counts(rec["boxes"]) for rec in self.records.values()]
        return {c: sum(n[c] for n in per_field) for c in CLASSES}


def box_counts(boxes: list[tuple]) -> dict[str, int]:
    """Labelled cells per class in one record's (cls, x0, y0, x1, y1) boxes."""
    out = dict.fromkeys(CLASSES, 0)
    for b in boxes:
        out[b[0]] += 1
    return out


def canonical_class(name: str) -> str | None:
    key = "".join(ch for ch in str(name).lower() if ch.isalnum())
    return _ALIASES.get(key) or _ALIASES.get(key.rstrip("s"))


def safe_key(name: str) -> str | None:
    """The POSIX relative key for a file name from a label file, or None if it escapes the root."""
    name = str(name).replace("\\", "/").strip()
    p = PurePosixPath(name)
    if not p.parts or p.is_absolute() or ".." in p.parts or ":" in p.parts[0]:   # "", "." name no file
        return None
    return p.as_posix()


def _finite(*vals: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)


class _Builder:
    """Collects boxes, applying the same validation to every format."""

    def __init__(self, source: str):
        self.source = source
        self.records: dict[str, dict] = {}
        self.warnings: list[str] = []
        self.unknown: dict[str, int] = {}

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def image(self, file_name: str, width: float | None, height: float | None) -> dict | None:
        key = safe_key(file_name)
        if key is None:
            self.warn(f"{self.source}: rejected file name {file_name!r} (absolute or leaves the root)")
            return None
        rec = self.records.get(key)
        if rec is None:
            ok = _finite(width, height) and width > 0 and height > 0 and width < 1e6 and height < 1e6
            rec = {"file_name": key, "width": int(width) if ok else None, "height": int(height) if ok else None, "boxes": []}
            self.records[key] = rec
        return rec

    def box(self, rec: dict, cls_name: str, x0, y0, x1, y1, where: str) -> None:
        cls = canonical_class(cls_name)
        if cls is None:
            self.unknown[str(cls_name)] = self.unknown.get(str(cls_name), 0) + 1
            return
        try:
            x0, y0, x1, y1 = (float(v) for v in (x0, y0, x1, y1))
        except (TypeError, ValueError):
            self.warn(f"{where}: non-numeric box coordinates, box dropped")
            return
        if not _finite(x0, y0, x1, y1):
            self.warn(f"{where}: non-finite box coordinates, box dropped")
            return
        if x1 < x0 or y1 < y0:
            self.warn(f"{where}: inverted box ({x0:g},{y0:g},{x1:g},{y1:g}), box dropped")
            return
        w, h = rec["width"], rec["height"]
        if w and h:
            cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                if cx1 <= cx0 or cy1 <= cy0:
                    self.warn(f"{where}: {cls} box lies outside the {w}x{h} image, box dropped")
                    return
                x0, y0, x1, y1 = cx0, cy0, cx1, cy1
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            self.warn(f"{where}: zero-area {cls} box ({x0:g},{y0:g},{x1:g},{y1:g}), box dropped")
            return
        rec["boxes"].append((cls, x0, y0, x1, y1))

    def result(self) -> LabelSet:
        for name, n in sorted(self.unknown.items()):
            self.warn(f"{self.source}: unknown class {name!r} ({n} boxes) ignored")
        return LabelSet(self.records, self.warnings)


def _text(node, tag: str) -> str | None:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text else None


def read_voc(folder: Path, stems: Iterable[str] | None = None) -> LabelSet:
    folder = Path(folder)
    if (folder / "Annotations").is_dir():
        folder = folder / "Annotations"
    files = sorted(folder.glob("*.xml")) if stems is None else [folder / f"{s}.xml" for s in stems]
    b = _Builder(str(folder))
    for path in files:
        try:
            root = SafeET.parse(path).getroot()
        except FileNotFoundError:
            b.warn(f"{path.name}: listed in the split but missing")
            continue
        except (SafeET.ParseError, DefusedXmlException, UnicodeDecodeError, OSError) as e:
            b.warn(f"{path.name}: unreadable XML ({type(e).__name__}: {e}), file skipped")
            continue
        size = root.find("size")
        try:
            w = float(_text(size, "width")) if size is not None else None
            h = float(_text(size, "height")) if size is not None else None
        except (TypeError, ValueError):
            w = h = None
        rec = b.image(_text(root, "filename") or f"{path.stem}.jpg", w, h)
        if rec is None:
            continue
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            coords = [_text(bb, k) if bb is not None else None for k in ("xmin", "ymin", "xmax", "ymax")]
            b.box(rec, _text(obj, "name") or "", *coords, where=path.name)
    return b.result()


def read_csv(path: Path) -> LabelSet:
    b = _Builder(str(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise LabelError(f"{path}: CSV lacks columns {missing} (expected {','.join(CSV_COLUMNS)})")
            for i, row in enumerate(reader, start=2):
                try:
                    w, h = float(row["width"]), float(row["height"])
                except (TypeError, ValueError):
                    w = h = None
                rec = b.image(row["filename"] or "", w, h)
                if rec is not None:
                    b.box(rec, row["class"] or "", row["xmin"], row["ymin"], row["xmax"], row["ymax"],
                          where=f"{path.name}:{i} ({row['filename']})")
    except (UnicodeDecodeError, csv.Error) as e:
        raise LabelError(f"{path}: unreadable CSV: {e}") from None
    return b.result()


def _coco_id(v):
    """COCO ids are ints (some tools write strings); anything else cannot identify an entry."""
    return v if isinstance(v, (int, str)) and not isinstance(v, bool) else None


def read_coco(path: Path) -> LabelSet:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LabelError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise LabelError(f"{path}: not a COCO file (no 'images' list)")
    b = _Builder(str(path))
    categories = data.get("categories")
    cats = {_coco_id(c.get("id")): str(c.get("name", "")) for c in (categories if isinstance(categories, list) else [])
            if isinstance(c, dict) and _coco_id(c.get("id")) is not None}
    by_id: dict = {}
    for im in data["images"]:
        if not isinstance(im, dict) or _coco_id(im.get("id")) is None:
            b.warn(f"{path.name}: image entry without a valid id skipped")
            continue
        rec = b.image(str(im.get("file_name", "")), im.get("width"), im.get("height"))
        if rec is not None:
            by_id[im["id"]] = rec
    annotations = data.get("annotations")
    for ann in annotations if isinstance(annotations, list) else []:
        if not isinstance(ann, dict):
            continue
        rec = by_id.get(_coco_id(ann.get("image_id")))
        bbox = ann.get("bbox")
        if rec is None or not isinstance(bbox, list) or len(bbox) != 4:
            b.warn(f"{path.name}: annotation {ann.get('id')} has no valid image or bbox, dropped")
            continue
        x, y, w, h = bbox
        try:
            cat = _coco_id(ann.get("category_id"))
            b.box(rec, cats.get(cat, str(cat)), x, y, x + w, y + h,
                  where=f"{path.name} ({rec['file_name']})")
        except TypeError:
            b.warn(f"{path.name}: annotation {ann.get('id')} has non-numeric bbox, dropped")
    return b.result()


def read_split(split: Path | str) -> list[str]:
    return [ln.strip() for ln in Path(split).read_text().splitlines() if ln.strip()]


def read_labels(source: Path, split: Path | None = None) -> LabelSet:
    """Pick the reader by what `source` is: a VOC folder/root, a .csv or a .json file."""
    source = Path(source)
    if not source.exists():
        raise LabelError(f"labels path does not exist: {source}")
    stems = read_split(split) if split else None
    if source.is_dir():
        if not (source / "Annotations").is_dir() and not any(source.glob("*.xml")):
            raise LabelError(f"{source}: no VOC XML files (expected *.xml or Annotations/)")
        return read_voc(source, stems)
    suffix = source.suffix.lower()
    if suffix == ".csv":
        labels = read_csv(source)
    elif suffix == ".json":
        labels = read_coco(source)
    elif suffix == ".xml":
        labels = read_voc_file(source)
    else:
        raise LabelError(f"{source}: unknown label format (use a VOC folder, .csv or COCO .json)")
    if stems is not None:
        keep = set(stems)
        labels.records = {k: v for k, v in labels.records.items() if PurePosixPath(k).stem in keep}
    return labels


def read_voc_file(path: Path) -> LabelSet:
    return read_voc(path.parent, [path.stem])
