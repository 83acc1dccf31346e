"""Per-field image quality: two pixel measures taken when a field is decoded, and the flags that tell
a reviewer which fields' counts not to trust unseen.

The model was trained on BCCD's fields, all in focus and evenly lit; a field unlike them is counted
wrong without any sign in its detections. Copies of 20 val fields blurred with a Gaussian of radius
1/2/3/4 px lost 0/8/16/24% of their counted RBCs, and copies darkened to x0.5/x0.7 or brightened to
x1.2/x1.35 counted -20/-7/+4/+14%. The thresholds below catch those that moved counts by 7% or more
and leave every BCCD field unflagged.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# Variance of the Laplacian of the grey image at half resolution (`_edges`): BCCD's 292 fields
# 13.3-44.3. The 20 val fields blurred and saved as JPEG: at radius 2 px 3.0-6.3 (quality 95),
# 5.5-9.7 (75), 7.4-13.2 (50: 8 of 20 caught); at 1 px, where counts did not move, 9.0-18.0 (95: 1
# of 20 flagged), 12.7-23.3 (75), 13.6-26.3 (50). JPEG compression adds edges of its own.
MIN_FOCUS = 10.0
# Mean grey level: BCCD's fields 166-195; the x0.7 copies 123-133, the x1.35 ones 234-248.
MIN_BRIGHTNESS, MAX_BRIGHTNESS = 140.0, 225.0
# Every one of BCCD's fields has 4 or more RBCs counted; a blank field, one far over- or
# under-exposed, or one blurred past use (radius 8 px) gave 0-2.
MIN_RBC = 3


# Grey is the sum of the three channels (int16 holds it, its 2x2 block sums and their Laplacian
# exactly): brightness divides by 3, and focus by (3 * 4)^2, to speak in mean grey levels.
def _edges(grey):
    """The 4-neighbour Laplacian of [..., H, W] grey sums (numpy or torch) at half resolution: 2x2
    blocks first, so less of the pixel noise JPEG compression adds passes for edges. At full
    resolution, a threshold at the same share of the least sharp BCCD field's value (4.5 of 6.0)
    caught the same 2-px copies but also flagged 6 of the 20 1-px ones (MIN_FOCUS's), against 1."""
    g = grey[..., : grey.shape[-2] // 2 * 2, : grey.shape[-1] // 2 * 2]
    g = g[..., 0::2, 0::2] + g[..., 1::2, 0::2] + g[..., 0::2, 1::2] + g[..., 1::2, 1::2]
    return g[..., :-2, 1:-1] + g[..., 2:, 1:-1] + g[..., 1:-1, :-2] + g[..., 1:-1, 2:] - 4 * g[..., 1:-1, 1:-1]


def _rounded(edge_variance: float, grey_mean: float) -> tuple[float, float]:
    return round(edge_variance / 144, 3), round(grey_mean / 3, 2)


def measure_host(field: np.ndarray) -> tuple[float, float]:
    """(focus, brightness) of one HxWx3 uint8 field decoded on the host: ~1 ms on one core, in the
    decode thread (numpy, so the decode threads never contend for torch's thread pool)."""
    grey = field[..., 0].astype(np.int16)
    grey += field[..., 1]
    grey += field[..., 2]
    return _rounded(float(_edges(grey).var(dtype=np.float64)), float(grey.mean(dtype=np.float64)))


def measure_device(fields: list[torch.Tensor]) -> Callable[[], list[tuple[float, float]]]:
    """Start measuring 3xHxW uint8 fields where nvJPEG decoded them, on their GPU; calling the
    result gives their (focus, brightness). Queued before the batch's inference, and read back
    through pinned memory behind an event, so reading them never waits for a later batch. (CPU
    tensors, from the same decode path where there is no GPU, are measured at once.)"""
    values = torch.empty((len(fields), 2), device=fields[0].device)
    by_shape: dict[tuple, list[int]] = {}
    for i, f in enumerate(fields):
        by_shape.setdefault(tuple(f.shape), []).append(i)
    for idx in by_shape.values():       # one stacked pass per field size: usually the whole batch
        grey = torch.stack([fields[i] for i in idx]).sum(1, dtype=torch.int16)
        values[idx] = torch.stack([_edges(grey).flatten(1).float().var(1, correction=0),
                                   grey.flatten(1).float().mean(1)], 1)
    if values.device.type != "cuda":
        measured = [_rounded(*v) for v in values.tolist()]
        return lambda: measured
    host = torch.empty(values.shape, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def collect() -> list[tuple[float, float]]:
        done.synchronize()
        return [_rounded(*v) for v in host.tolist()]
    return collect


def field_flags(counts: dict[str, int], focus: float | None, brightness: float | None) -> list[tuple[str, str]]:
    """(flag, reason) pairs for one field. Fields stored before quality was measured have None."""
    flags = []
    if focus is not None and focus < MIN_FOCUS:
        flags.append(("blurred", f"sharpness {focus:.1f} (< {MIN_FOCUS:g}; BCCD fields 13.3-44.3): out of focus? "
                                 "RBC counts fall as fields blur"))
    if brightness is not None and not MIN_BRIGHTNESS <= brightness <= MAX_BRIGHTNESS:
        flags.append(("too dark" if brightness < MIN_BRIGHTNESS else "too bright",
                      f"mean grey level {brightness:.0f} (BCCD fields 166-195): exposure or illumination?"))
    if counts["RBC"] < MIN_RBC:
        flags.append(("few cells", f"{counts['RBC']} RBC counted (< {MIN_RBC}; every BCCD field has 4 or more): "
                                   "blank, out of focus, badly exposed or off the smear?"))
    return flags
