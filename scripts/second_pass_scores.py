"""A model's COCO AP and count errors on val fields as `run` counts them once and after its second
pass (`backends.count_again`: fields of another size, stain or colour cast resized or recoloured),
on the fields as labelled and recoloured past the training augmentations' range.

Usage: python scripts/second_pass_scores.py VAL [LABELS] [MODEL] [FIELDS] [CHANGES]
VAL is the folder scripts/val_folders.py writes (its bccd_complete and pbc slide folders), LABELS the
TXL-PBC dataset (default ../shared/data/txl_pbc), MODEL a model folder (default engines), FIELDS how
many fields of each source (default: all; 0 is all too), CHANGES a ;-separated list of
scripts/recoloured_counts.py's changes (default "as labelled"). Prints per source and change the AP,
AP50, platelets' AP50 and the RBC / WBC / platelet count MAE / bias per field, once and again, and
how many fields the second pass recoloured and how.
"""

import collections
import sys
from pathlib import Path

from bccd_batch.backends import count_again
from bccd_batch.decode import decode_file
from bccd_batch.quality import measure_host
from bccd_batch.score import COCOEvaluator, CountEvaluator, evaluate_all
from recoloured_counts import CHANGES
from rescaled_counts import model_and_labels


def scores(truth: dict, dets: dict, threshold: dict) -> str:
    r = evaluate_all({"coco": COCOEvaluator(), "count": CountEvaluator(threshold)}, truth, dets)
    count = r["count"]["per_class"]
    return (f"AP {r['coco']['stats']['AP']:.3f} AP50 {r['coco']['stats']['AP50']:.3f} "
            f"Platelets AP50 {r['coco']['per_class']['Platelets']['AP50']:.3f}; "
            + ", ".join(f"{c} {count[c]['MAE']:.2f} / {count[c]['mean_signed_error']:+.2f}" for c in count))


def main(val: Path, labels: Path, model_dir: Path, n: int | None, changes: list[str]) -> None:
    engine, threshold, _, records = model_and_labels(model_dir, labels)
    print(f"{model_dir}: training labs' colours {sorted(engine.card.get('colours') or {}) or 'not in the card'}")
    for folder in ("bccd_complete", "pbc"):
        paths = sorted((val / folder).iterdir())[:n]
        truth = {p.name: records[p.name] for p in paths}
        pixels = [decode_file(p) for p in paths]
        for change in changes:
            fields = [CHANGES[change](a) for a in pixels]
            once = engine.infer(fields)
            again = count_again(engine, fields, once, [measure_host(a) for a in fields])
            how = collections.Counter(c.recoloured for c in again if c.scale is not None)
            for way, dets in (("once", once), ("again", [c.dets for c in again])):
                print(f"{folder:13s} {change:34s} {way:5s} {scores(truth, dict(zip(truth, dets)), threshold)}", flush=True)
            print(f"{folder:13s} {change:34s} counted again: "
                  + (", ".join(f"{k or 'resized only'} {v}" for k, v in how.items()) or "none") + f" of {len(paths)}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    main(Path(args[0]), Path(args[1] if len(args) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data" / "txl_pbc"),
         Path(args[2] if len(args) > 2 else "engines"), int(args[3]) or None if len(args) > 3 else None,
         args[4].split(";") if len(args) > 4 else ["as labelled"])
