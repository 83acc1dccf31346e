"""Lay out the val fields the model card reports on, one slide folder per source, as links (nothing copied).

Usage: python scripts/val_folders.py OUT [SHARED_DATA]
Writes OUT/bccd_complete (TXL-PBC's 42 BCCD val fields, complete labels), OUT/pbc (its 71 PBC val fields)
and OUT/bccd_voc (BCCD's 87 val fields, BCCD's own labels). Score a model on each with
`bccd-batch run OUT/<source> --labels SHARED_DATA/txl_pbc` (or `/bccd` for bccd_voc) `--model M --device cpu`.
"""

import csv
import sys
from pathlib import Path

out = Path(sys.argv[1])
data = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parents[2] / "shared" / "data")
txl = data / "txl_pbc"
source = {r["file"]: r["source"] for r in csv.DictReader(open(txl / "sources.csv", newline=""))}
folders = {"BCCD": out / "bccd_complete", "PBC": out / "pbc"}
for name in (txl / "splits" / "val.txt").read_text().split():
    folders[source[name]].mkdir(parents=True, exist_ok=True)
    (folders[source[name]] / name).symlink_to((txl / "images" / name).resolve())
(out / "bccd_voc").mkdir(parents=True, exist_ok=True)
for stem in (data / "bccd" / "ImageSets" / "Main" / "val.txt").read_text().split():
    (out / "bccd_voc" / f"{stem}.jpg").symlink_to((data / "bccd" / "JPEGImages" / f"{stem}.jpg").resolve())
for f in [*folders.values(), out / "bccd_voc"]:
    print(f, len(list(f.iterdir())))
