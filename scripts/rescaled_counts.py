"""How RBC counts and the "cell size" measure move when a lab's magnification differs from the
training labs': val fields rescaled, counted by a model, against the labels.

Usage: python scripts/rescaled_counts.py VAL [LABELS] [MODEL] [FIELDS]
VAL is the folder scripts/val_folders.py writes (its bccd_complete and pbc slide folders), LABELS
the TXL-PBC dataset (default ../shared/data/txl_pbc), MODEL a model folder (default engines),
FIELDS how many fields of each source (default 20, the first by name). A scale s < 1 tiles the field
2x2 and shrinks a window of 1/s of its size back to it (cells s times as large, s^-2 times as many);
s > 1 enlarges the centre 1/s of the field. The expected count is the labelled RBCs whose centres
lie in the window. Prints per source and scale the counted RBCs against the expected, once and
with the fields off the training RBC size counted again as `run` does (`count_again`), and
`quality.rbc_size` (min / median / max over the fields) with how many fields it flags.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bccd_batch.backends import count_again
from bccd_batch.backends.torch_eager import TorchEngine
from bccd_batch.cells import class_counts, class_threshold
from bccd_batch.decode import decode_file
from bccd_batch.labels import read_labels
from bccd_batch.quality import measure_host, off_training_size, rbc_size

SCALES = (0.5, 0.6, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0)


def rescaled(field: np.ndarray, s: float) -> tuple[np.ndarray, tuple[float, float, float, float], list[tuple[int, int]]]:
    """The field at scale `s`, the window of the (tiled, for s < 1) field it shows, and the tiles' offsets."""
    h, w = field.shape[:2]
    cw, ch = w / s, h / s
    x0, y0 = (0.0, 0.0) if s < 1 else ((w - cw) / 2, (h - ch) / 2)
    source, tiles = (np.tile(field, (2, 2, 1)), [(0, 0), (w, 0), (0, h), (w, h)]) if s < 1 else (field, [(0, 0)])
    window = (round(x0), round(y0), round(x0 + cw), round(y0 + ch))
    return np.array(Image.fromarray(source).crop(window).resize((w, h), Image.BILINEAR)), (x0, y0, cw, ch), tiles


def model_and_labels(model_dir: Path, labels: Path) -> tuple[TorchEngine, dict, float, dict]:
    """The eager engine on the CPU, its count thresholds, the RBCs' one, and each field's labels."""
    engine = TorchEngine(model_dir, "cpu")
    threshold = engine.card["thresholds"]["count"]
    return engine, threshold, class_threshold(threshold, "RBC"), read_labels(labels).records


def main(val: Path, labels: Path, model_dir: Path, n: int) -> None:
    engine, threshold, cut, records = model_and_labels(model_dir, labels)
    for source in ("bccd_complete", "pbc"):
        fields = sorted((val / source).iterdir())[:n]
        for s in SCALES:
            expected = counted = recounted = 0
            sizes = []
            for path in fields:
                pixels = decode_file(path)
                h, w = pixels.shape[:2]
                image, (x0, y0, cw, ch), tiles = rescaled(pixels, s)
                rbcs = [b for b in records[path.name]["boxes"] if b[0] == "RBC"]
                expected += sum(1 for b in rbcs for dx, dy in tiles
                                if x0 <= (b[1] + b[3]) / 2 + dx < x0 + cw and y0 <= (b[2] + b[4]) / 2 + dy < y0 + ch)
                dets = engine.infer([image])[0]
                counted += class_counts(dets, threshold)["RBC"]
                recounted += class_counts(count_again(engine, [image], [dets], [measure_host(image)])[0][0], threshold)["RBC"]
                sizes.append(rbc_size(dets, cut, w, h))
            known = [x for x in sizes if x is not None]
            flagged = sum(1 for x in known if off_training_size(x))
            spread = f"{min(known):.3f} / {np.median(known):.3f} / {max(known):.3f}" if known else "-"
            print(f"{source:13s} x{s:<4}: RBCs {expected:5d} expected, {counted:5d} counted ({counted / expected - 1:+.1%}), "
                  f"{recounted:5d} with the recount ({recounted / expected - 1:+.1%}); "
                  f"cell size {spread}, {flagged} of {len(fields)} fields flagged", flush=True)


def arguments(doc: str) -> tuple[Path, Path, Path, int]:
    """VAL [LABELS] [MODEL] [FIELDS] from the command line, with their defaults (this script's and
    recoloured_counts.py's); the usage `doc` where VAL is missing."""
    args = sys.argv[1:]
    if not args:
        sys.exit(doc)
    return (Path(args[0]), Path(args[1] if len(args) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data" / "txl_pbc"),
            Path(args[2] if len(args) > 2 else "engines"), int(args[3]) if len(args) > 3 else 20)


if __name__ == "__main__":
    main(*arguments(__doc__))
