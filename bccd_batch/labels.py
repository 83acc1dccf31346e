"""Read box labels from VOC XML, YOLO txt, the seed's CSV or COCO JSON into one common record format.

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

from .cells import CLASSES
from .decode import DecodeError, image_size

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
    # The folder the record keys are relative to, where the format says (VOC's JPEGImages/, YOLO's
    # images/ or data.yaml's `path`); and the split lists a dataset ships (name -> record keys).
    image_root: Path | None = None
    splits: dict[str, list[str]] = dataclasses.field(default_factory=dict)

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
    """RBC, WBC or Platelets for a label's class name ("Platelet", "PLT", "White Blood Cell (WBC)"),
    else None: the whole name, then the name without its bracketed part, then that part."""
    name = str(name).lower()
    outside, _, inside = name.partition("(")
    for part in (name, outside, inside.partition(")")[0]):
        key = "".join(ch for ch in part if ch.isalnum())
        found = _ALIASES.get(key) or _ALIASES.get(key.rstrip("s"))
        if found:
            return found
    return None


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
        self.seen: dict[str, set] = {}       # per record key: its boxes so far

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
        box = (cls, x0, y0, x1, y1)
        seen = self.seen.setdefault(rec["file_name"], set())
        if box in seen:
            # Two cells never share a box to the last digit: the same label written twice, which
            # would count one cell twice and leave a "missed" cell no detector can find.
            self.warn(f"{where}: repeats an earlier {cls} box of this field exactly, box dropped")
            return
        seen.add(box)
        rec["boxes"].append(box)

    def result(self, image_root: Path | None = None, splits: dict[str, list[str]] | None = None) -> LabelSet:
        for name, n in sorted(self.unknown.items()):
            self.warn(f"{self.source}: unknown class {name!r} ({n} boxes) ignored")
        return LabelSet(self.records, self.warnings, image_root, splits or {})


def _text(node, tag: str) -> str | None:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text else None


def read_voc(folder: Path, stems: Iterable[str] | None = None) -> LabelSet:
    folder = Path(folder)
    root = folder if (folder / "Annotations").is_dir() else None
    if root is not None:
        folder = folder / "Annotations"
    files = sorted(folder.glob("*.xml")) if stems is None else [folder / f"{s}.xml" for s in stems]
    b = _Builder(str(folder))
    for path in files:
        try:
            xml = SafeET.parse(path).getroot()
        except FileNotFoundError:
            b.warn(f"{path.name}: listed in the split but missing")
            continue
        except (SafeET.ParseError, DefusedXmlException, UnicodeDecodeError, OSError) as e:
            b.warn(f"{path.name}: unreadable XML ({type(e).__name__}: {e}), file skipped")
            continue
        size = xml.find("size")
        try:
            w = float(_text(size, "width")) if size is not None else None
            h = float(_text(size, "height")) if size is not None else None
        except (TypeError, ValueError):
            w = h = None
        name = _text(xml, "filename") or f"{path.stem}.jpg"
        if (taken := b.records.get(safe_key(name) or "")) is not None and taken.get("label_stem") != path.stem:
            # Two XMLs naming one image: a copied file kept its <filename>; this one is its own field.
            b.warn(f"{path.name}: <filename> {name!r} is also {taken['label_stem']}.xml's, taken as {path.stem}'s own")
            name = f"{path.stem}{PurePosixPath(name).suffix or '.jpg'}"
        rec = b.image(name, w, h)
        if rec is None:
            continue
        # Exported sets often keep a stale <filename>: match_labels falls back to the XML's own name.
        rec["label_stem"] = path.stem
        for obj in xml.iter("object"):
            bb = obj.find("bndbox")
            coords = [_text(bb, k) if bb is not None else None for k in ("xmin", "ymin", "xmax", "ymax")]
            b.box(rec, _text(obj, "name") or "", *coords, where=path.name)
    if root is None:
        return b.result()
    by_stem = {PurePosixPath(k).stem: k for k in b.records}
    splits = {p.stem: [by_stem[s] for s in read_split(p) if s in by_stem]
              for p in sorted((root / "ImageSets" / "Main").glob("*.txt"))}
    return b.result(root / "JPEGImages", splits)


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


YOLO_CLASS_FILES = ("classes.txt", "labels/classes.txt")


def _yolo_label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `images` folder of the image's path becomes `labels`, .txt."""
    parts = list(image.parts)
    if "images" not in parts:   # not Ultralytics' layout: the label file beside the image
        return image.with_suffix(".txt")
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")


def _images_under(folder: Path) -> list[Path]:
    from .discover import IMAGE_SUFFIXES

    return sorted(q for q in folder.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())


def _listed_images(root: Path, entry, where: str, b: _Builder) -> list[Path]:
    """data.yaml's `train`/`val`: a folder of images, a .txt list of image paths, or a list of those."""
    out: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = root / str(item)
        if p.is_dir():
            out += _images_under(p)
        elif p.is_file() and p.suffix.lower() == ".txt":
            out += [(p.parent / ln).resolve() for ln in read_split(p)]
        else:
            b.warn(f"{where}: {item!r} is neither an image folder nor a list file, ignored")
    return out


def _yolo_names(names, where: str) -> dict[int, str]:
    if isinstance(names, dict):
        try:
            return {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise LabelError(f"{where}: `names` keys must be class ids") from None
    if isinstance(names, list):
        return dict(enumerate(map(str, names)))
    raise LabelError(f"{where}: `names` must be a list or a mapping of class ids to names")


def read_yolo(source: Path, stems: Iterable[str] | None = None) -> LabelSet:
    """YOLO labels: a folder with images/ and labels/ (class names in classes.txt; split lists in
    splits/*.txt), or an Ultralytics data.yaml (`path`, `train`/`val` image folders or lists, `names`).
    Each labels/*.txt line is `class cx cy w h`, normalised to the image's size, which is read from
    the image's header. An image without a label file is a field with no cells (YOLO's convention)."""
    source = Path(source)
    b = _Builder(str(source))
    splits: dict[str, list[Path]] = {}
    if source.is_file():
        import yaml

        try:
            spec = yaml.safe_load(source.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise LabelError(f"{source}: unreadable YAML: {e}") from None
        if not isinstance(spec, dict) or "names" not in spec:
            raise LabelError(f"{source}: not a YOLO data.yaml (no `names`)")
        names = _yolo_names(spec["names"], source.name)
        root = source.parent / str(spec.get("path") or ".")
        for split in ("train", "val", "test"):
            if spec.get(split):
                splits[split] = _listed_images(root, spec[split], source.name, b)
        images = sorted({p.resolve() for ps in splits.values() for p in ps})
        root = root.resolve()
    else:
        name_file = next((source / f for f in YOLO_CLASS_FILES if (source / f).is_file()), None)
        if name_file is None:
            raise LabelError(f"{source}: YOLO labels need class names in classes.txt (or a data.yaml)")
        try:
            names = dict(enumerate(read_split(name_file)))
            root = source / "images"
            images = _images_under(root)
            for p in sorted((source / "splits").glob("*.txt")):
                splits[p.stem] = [root / ln for ln in read_split(p)]
        except (UnicodeDecodeError, OSError) as e:
            raise LabelError(f"{source}: unreadable class names or split list: {e}") from None
    if stems is not None:
        keep = set(stems)
        images = [p for p in images if p.stem in keep or p.name in keep]
    no_label = 0
    for image in images:
        if (key := _rel(image, root)) is None:
            b.warn(f"{image}: outside the dataset's path {root}, skipped")
            continue
        label_file = _yolo_label_path(image)
        try:
            lines = label_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines, no_label = [], no_label + 1
        except (OSError, UnicodeDecodeError) as e:
            b.warn(f"{label_file.name}: unreadable ({type(e).__name__}), file skipped")
            continue
        try:
            w, h = image_size(image)
        except (DecodeError, OSError) as e:
            b.warn(f"{key}: image size unknown ({e}), its labels skipped")
            continue
        rec = b.image(key, w, h)
        for i, line in enumerate(lines, start=1):
            where = f"{label_file.name}:{i}"
            fields = line.split()
            if not fields:
                continue
            try:
                cls_id, cx, cy, bw, bh = int(fields[0]), *map(float, fields[1:5])
                if len(fields) != 5:
                    raise ValueError
            except ValueError:
                b.warn(f"{where}: not `class cx cy w h` ({line.strip()[:60]!r}), line skipped")
                continue
            if cls_id not in names:
                b.warn(f"{where}: class id {cls_id} not in the class names, line skipped")
                continue
            x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
            if _finite(x0, y0, x1, y1) and not all(-1e-3 <= v <= 1 + 1e-3 for v in (x0, y0, x1, y1)):
                b.warn(f"{where}: box reaches outside the image (normalised {x0:.3f},{y0:.3f},{x1:.3f},{y1:.3f}), clipped")
            b.box(rec, names[cls_id], x0 * w, y0 * h, x1 * w, y1 * h, where=where)
    if no_label:
        b.warn(f"{source}: {no_label} images have no label file: taken as fields with no cells")
    keys = set(b.records)
    named = {name: [k for k in (_rel(p, root) for p in ps) if k in keys] for name, ps in splits.items()}
    return b.result(root, named)


def _rel(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def is_yolo(source: Path) -> bool:
    source = Path(source)
    if source.is_file():
        return source.suffix.lower() in (".yaml", ".yml")
    return (source / "images").is_dir() and (source / "labels").is_dir()


def read_split(split: Path | str) -> list[str]:
    return [ln.strip() for ln in Path(split).read_text().splitlines() if ln.strip()]


def read_labels(source: Path, split: Path | None = None) -> LabelSet:
    """Pick the reader by what `source` is: a VOC folder/root, a YOLO folder or data.yaml, a .csv
    or a .json file. `split`: a file of image names or stems to keep."""
    source = Path(source)
    if not source.exists():
        raise LabelError(f"labels path does not exist: {source}")
    stems = [PurePosixPath(s).stem for s in read_split(split)] if split else None
    if is_yolo(source):
        return read_yolo(source, stems)
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
        raise LabelError(f"{source}: unknown label format (use a VOC or YOLO folder, data.yaml, .csv or COCO .json)")
    if stems is not None:
        keep = set(stems)
        labels.records = {k: v for k, v in labels.records.items() if PurePosixPath(k).stem in keep}
    return labels


def read_voc_file(path: Path) -> LabelSet:
    return read_voc(path.parent, [path.stem])
