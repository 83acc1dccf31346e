"""How counts move when a lab's stain, lamp, camera or compression differs from the training labs':
val fields recoloured or degraded past the training augmentations' range, counted by a model,
against the labels.

Usage: python scripts/recoloured_counts.py VAL [LABELS] [MODEL] [FIELDS]
VAL is the folder scripts/val_folders.py writes (its bccd_complete and pbc slide folders), LABELS
the TXL-PBC dataset (default ../shared/data/txl_pbc), MODEL a model folder (default engines),
FIELDS how many fields of each source (default 20, the first by name). Training jitters stain
optical density by x0.7-1.3 per channel (shift +-0.1), hue by +-0.06, saturation by x0.6-1.4.
Prints per source and change the count error of each class over the fields (counted against
labelled, in all and per field), once and with the fields unlike the training labs' counted again
as `run` does (`count_again`), and how many fields the report flags.
"""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from bccd_batch.backends import count_again
from bccd_batch.cells import CLASSES, class_counts
from bccd_batch.decode import decode_file
from bccd_batch.quality import field_flags, measure_host, rbc_size
from bccd_batch.transforms import restain
from rescaled_counts import arguments, model_and_labels


def optical_density(a: np.ndarray, scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Each channel's optical density scaled and shifted (`transforms.restain`, as training's stain jitter)."""
    return restain(torch.from_numpy(a).permute(2, 0, 1), scale, shift).permute(1, 2, 0).numpy()


def pil(change):
    return lambda a: np.array(change(Image.fromarray(a)).convert("RGB"))


def jpeg(quality: int):
    def save(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return Image.open(buf)
    return pil(save)


def hue(shift: float):
    def turn(im):
        h, s, v = im.convert("HSV").split()
        return Image.merge("HSV", (h.point(lambda x: (x + round(shift * 256)) % 256), s, v))
    return pil(turn)


CHANGES = {
    "as labelled": lambda a: a,
    "stain x0.5 (paler)": lambda a: optical_density(a, (0.5,) * 3),
    "stain x1.6 (heavier)": lambda a: optical_density(a, (1.6,) * 3),
    "stain x2.0": lambda a: optical_density(a, (2.0,) * 3),
    "red OD x1.6 (bluer)": lambda a: optical_density(a, (1.6, 1.0, 1.0)),
    "green OD x1.6 (pinker)": lambda a: optical_density(a, (1.0, 1.6, 1.0)),
    **{f"bluish lamp (OD +{d} R, -{d} B)": (lambda d: lambda a: optical_density(a, shift=(d, 0.0, -d)))(d) for d in (0.1, 0.2, 0.3)},
    **{f"yellowish lamp (OD -{d} R, +{d} B)": (lambda d: lambda a: optical_density(a, shift=(-d, 0.0, d)))(d) for d in (0.1, 0.2, 0.3)},
    "greenish cast (OD -0.15 G)": lambda a: optical_density(a, shift=(0.0, -0.15, 0.0)),
    "magenta cast (OD +0.15 G)": lambda a: optical_density(a, shift=(0.0, 0.15, 0.0)),
    "hue +0.12": hue(0.12),
    "hue -0.12": hue(-0.12),
    "greyscale": pil(lambda im: im.convert("L")),
    "saturation x2": pil(lambda im: ImageEnhance.Color(im).enhance(2.0)),
    "JPEG quality 30": jpeg(30),
    "noise sigma 8": lambda a: np.clip(a + np.random.default_rng(0).normal(0, 8, a.shape), 0, 255).astype(np.uint8),
    **{f"blur radius {r}": (lambda r: pil(lambda im: im.filter(ImageFilter.GaussianBlur(r))))(r) for r in (1, 2, 3)},
}


def _errors(counted: list[list[int]], expected: np.ndarray) -> str:
    diff = np.array(counted) - expected
    return ", ".join(f"{c} {diff[:, i].sum():+d}/{expected[:, i].sum()} (MAE {np.abs(diff[:, i]).mean():.2f})"
                     for i, c in enumerate(CLASSES))


def main(val: Path, labels: Path, model_dir: Path, n: int) -> None:
    engine, threshold, cut, records = model_and_labels(model_dir, labels)
    for source in ("bccd_complete", "pbc"):
        fields = [(p.name, decode_file(p)) for p in sorted((val / source).iterdir())[:n]]
        expected = np.array([[sum(1 for b in records[name]["boxes"] if b[0] == c) for c in CLASSES] for name, _ in fields])
        for change, apply in CHANGES.items():
            once, again, flagged = [], [], 0
            for _, pixels in fields:
                image = apply(pixels)
                quality = measure_host(image)
                dets = engine.infer([image])[0]
                [(second, scale, recoloured)] = count_again(engine, [image], [dets], [quality])
                counts = class_counts(second, threshold)
                once.append([class_counts(dets, threshold)[c] for c in CLASSES])
                again.append([counts[c] for c in CLASSES])
                h, w = image.shape[:2]
                flagged += bool(field_flags(counts, *quality.measures, cell_size=rbc_size(second, cut, w, h), recounted_at=scale,
                                            recoloured=recoloured))
            print(f"{source:13s} {change:34s}: once {_errors(once, expected)}; again {_errors(again, expected)}; "
                  f"{flagged} of {len(fields)} flagged", flush=True)


if __name__ == "__main__":
    main(*arguments(__doc__))
