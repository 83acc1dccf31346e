"""Per-source figures of a model, as the model card and docs/model.md give them, from `bccd-batch run
--labels` results: one results folder per val source (scripts/val_folders.py lays the sources out).

Usage: python scripts/model_table.py SOURCE=RESULTS_DIR [SOURCE=RESULTS_DIR ...] [--json]
Prints a markdown table (AP, AP50, per-class AP50, per-class count MAE and bias, with 95% bootstrap
intervals of AP and AP50), or with --json the same figures as the card's `metrics.per_source`.
"""

import json
import sys
from pathlib import Path

from bccd_batch.cells import CLASSES


def figures(results: Path) -> dict:
    m = json.loads((Path(results) / "latest" / "metrics.json").read_text())
    coco, ci = m["coco"], m["coco"].get("intervals", {})
    out = {"fields": m["n_images_scored"], "AP": round(coco["stats"]["AP"], 4), "AP50": round(coco["stats"]["AP50"], 4),
           "AP_95": ci.get("AP"), "AP50_95": ci.get("AP50"), "count_threshold": m["counting"]["threshold"]}
    for c in CLASSES:
        pc = coco["per_class"].get(c, {})
        count = m["counting"]["per_class"][c]
        out[c] = {"AP50": round(pc.get("AP50", -1.0), 4), "AP50_95": ci.get("per_class", {}).get(c, {}).get("AP50"),
                  "count_MAE": round(count["MAE"], 3), "count_bias": round(count["mean_signed_error"], 3)}
    return out


def main(argv: list[str]) -> None:
    as_json = "--json" in argv
    rows = {a.split("=", 1)[0]: figures(Path(a.split("=", 1)[1])) for a in argv if "=" in a}
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print("| source | fields | AP | AP50 | " + " | ".join(f"{c} AP50" for c in CLASSES) + " | "
          + " | ".join(f"{c} MAE / bias" for c in CLASSES) + " |")
    print("| --- " * (4 + 2 * len(CLASSES)) + "|")
    for name, f in rows.items():
        ap = f"{f['AP']:.3f}" + (f" ({f['AP_95'][0]:.3f}–{f['AP_95'][1]:.3f})" if f["AP_95"] else "")
        ap50 = f"{f['AP50']:.3f}" + (f" ({f['AP50_95'][0]:.3f}–{f['AP50_95'][1]:.3f})" if f["AP50_95"] else "")
        print(f"| {name} | {f['fields']} | {ap} | {ap50} | " + " | ".join(f"{f[c]['AP50']:.3f}" for c in CLASSES) + " | "
              + " | ".join(f"{f[c]['count_MAE']:.2f} / {f[c]['count_bias']:+.2f}" for c in CLASSES) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
