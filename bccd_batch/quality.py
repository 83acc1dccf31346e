"""Per-field image quality: two pixel measures taken when a field is decoded, one taken from its
detections (the RBCs' size: the magnification, which also decides whether a field is counted a second
time at the training size), and the flags that tell a reviewer which fields' counts not to trust unseen.

The model was trained on two labs' fields (BCCD, PBC), all in focus and evenly lit; a field unlike
them is counted wrong without any sign in its detections. Copies of 20 val fields blurred with a
Gaussian of radius 1/2/3/4 px lost 0/8/16/24% of their counted RBCs, and copies darkened to
x0.5/x0.7 or brightened to x1.2/x1.35 counted -20/-7/+4/+14%. The thresholds below catch those that
moved counts by 7% or more and leave every BCCD field unflagged; PBC's 353 fields (focus 72-1349,
green level 161-204, 6 or more RBCs counted) are none of them flagged either.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

# Variance of the Laplacian of the green channel sampled at every other pixel (`_sampled`): BCCD's
# 292 fields 20.3-73.0. The 20 val fields blurred and saved as JPEG: at radius 2 px 7.2-11.9
# (quality 95), 9.4-15.8 (75), 9.9-18.1 (50: 17 of 20 caught); at 1 px, where counts did not move,
# 14.9-27.3 (95: 1 of 20 flagged), 19.4-34.5 (75), 17.8-33.6 (50). JPEG compression adds edges of
# its own, so the lower its quality the sharper a field looks. Sampled rather than whole: at a
# threshold at about the same share of the least sharp BCCD field, the full-resolution measure
# flagged 9 of the 1-px copies and caught 8 of the 2-px ones at quality 50, 2x2 block means 1 and 8.
MIN_FOCUS = 16.0
# Mean green level (sampled likewise): BCCD's fields 162-190; the x0.7 copies 119-129, the x1.35
# ones 225-242 (and 2 of the 20 x1.2 ones, which counted 4% more, above 220).
MIN_BRIGHTNESS, MAX_BRIGHTNESS = 140.0, 220.0
# Every one of BCCD's fields has 4 or more RBCs counted; a blank field, one far over- or
# under-exposed, or one blurred past use (radius 8 px) gave 0-2.
MIN_RBC = 3
# The median long side of a field's counted RBC boxes over the field's short side: every field is
# resized to one short side, so this is the RBC size the model sees, which the microscope's
# magnification sets. The long side, as a cell cut by the field's edge keeps its full extent one way:
# measured as the square root of the box's area, enlarged fields (most cells cut) measured too small
# to be flagged (PBC's val fields at x1.4 / x1.7 / x2: 7 / 10 / 5 of 20 against 15 / 19 / 11).
# BCCD's 292 fields 0.199-0.282 and PBC's 353 0.175-0.285, medians 0.224 and 0.226 (2026-12-06).
MIN_RBC_SIZE, MAX_RBC_SIZE = 0.165, 0.295
# A field outside that range is counted a second time at the size that brings its RBCs to the
# training labs' median (`recount_scale`); at most 2x either way, a quarter or four times the pixels.
TRAINING_RBC_SIZE = 0.225
MIN_RECOUNT_SCALE, MAX_RECOUNT_SCALE = 0.5, 2.0


# The green channel, every other pixel of every other row, stands for the field: a Bayer sensor
# samples green twice, and stained cells contrast most with the plasma in it. That is ~0.2 ms a
# field on one host core (the three channels' mean at full resolution cost 1.2 ms), which is why a
# GPU run measures every field on the GPU instead (batches.decoded_groups).
def _sampled(green):
    """[..., H, W] green levels (numpy or torch) -> every other pixel of every other row, int16."""
    g = green[..., 0::2, 0::2]
    if isinstance(g, np.ndarray):
        return g.astype(np.int16)
    import torch   # only the device path is torch's: outputs and the report import this module for field_flags

    return g.to(torch.int16)


def _laplacian(g):
    """The 4-neighbour Laplacian over the interior (int16 holds it exactly)."""
    return g[..., :-2, 1:-1] + g[..., 2:, 1:-1] + g[..., 1:-1, :-2] + g[..., 1:-1, 2:] - 4 * g[..., 1:-1, 1:-1]


def _rounded(focus: float, brightness: float) -> tuple[float | None, float]:
    """Focus is None for a field too small to have a Laplacian (under 5 pixels a side)."""
    return (None if math.isnan(focus) else round(focus, 3)), round(brightness, 2)


def _too_small(g) -> bool:
    return g.shape[-1] < 3 or g.shape[-2] < 3


def measure_host(field: np.ndarray) -> tuple[float | None, float]:
    """(focus, brightness) of one HxWx3 uint8 field decoded on the host, in its decode thread
    (numpy, so the decode threads never contend for torch's thread pool)."""
    g = _sampled(field[..., 1])
    focus = math.nan if _too_small(g) else float(_laplacian(g).var(dtype=np.float64))
    return _rounded(focus, float(g.mean(dtype=np.float64)))


def measure_device(fields: list[torch.Tensor]) -> Callable[[], list[tuple[float | None, float]]]:
    """Start measuring 3xHxW uint8 fields on their GPU (decoded there by nvJPEG, or uploaded for
    the engine); calling the result gives their (focus, brightness). Queued before the batch's
    inference, and read back through pinned memory behind an event, so reading them never waits
    for a later batch. (CPU tensors, from the same paths where there is no GPU, are measured at
    once.)"""
    import torch

    values = torch.empty((len(fields), 2), device=fields[0].device)
    by_shape: dict[tuple, list[int]] = {}
    for i, f in enumerate(fields):
        by_shape.setdefault(tuple(f.shape), []).append(i)
    for idx in by_shape.values():       # one stacked pass per field size: usually the whole batch
        g = _sampled(torch.stack([fields[i][1] for i in idx]))
        focus = torch.full((len(idx),), math.nan, device=g.device) if _too_small(g) else \
            _laplacian(g).flatten(1).float().var(1, correction=0)
        values[idx] = torch.stack([focus, g.flatten(1).float().mean(1)], 1)
    if values.device.type != "cuda":
        measured = [_rounded(*v) for v in values.tolist()]
        return lambda: measured
    host = torch.empty(values.shape, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def collect() -> list[tuple[float | None, float]]:
        done.synchronize()
        return [_rounded(*v) for v in host.tolist()]
    return collect


def rbc_size(dets: list[tuple], rbc_threshold: float, width: int, height: int) -> float | None:
    """The median long side of a field's counted RBC boxes over its short side; None with fewer than
    MIN_RBC of them, whose median says little."""
    sides = [max(d[4] - d[2], d[5] - d[3]) for d in dets if d[0] == "RBC" and d[1] >= rbc_threshold]
    # statistics, not numpy: every field of a GPU run passes here (25 sides: under 1 us against 17).
    return round(statistics.median(sides) / min(width, height), 3) if len(sides) >= MIN_RBC else None


def off_training_size(cell_size: float | None) -> bool:
    """Whether a field's `rbc_size` lies outside the training labs' range (False where unmeasured)."""
    return cell_size is not None and not MIN_RBC_SIZE <= cell_size <= MAX_RBC_SIZE


def recount_scale(cell_size: float | None) -> float | None:
    """How much to enlarge (> 1) or shrink (< 1) a field whose `rbc_size` lies outside the training
    labs' range before counting it again, so that its RBCs are the size the model learned; None for
    a field in range or unmeasured."""
    if not off_training_size(cell_size):
        return None
    return round(min(MAX_RECOUNT_SCALE, max(MIN_RECOUNT_SCALE, TRAINING_RBC_SIZE / cell_size)), 2)


def field_flags(counts: dict[str, int], focus: float | None, brightness: float | None,
                cell_size: float | None = None, recounted_at: float | None = None) -> list[tuple[str, str]]:
    """(flag, reason) pairs for one field. Fields stored before quality was measured have None;
    `cell_size` is `rbc_size`'s, None where it was not measured; `recounted_at` the scale at which
    the field was counted again (`recount_scale`), None where it was not."""
    flags = []
    if focus is not None and focus < MIN_FOCUS:
        flags.append(("blurred", f"sharpness {focus:.1f} (< {MIN_FOCUS:g}; the training labs' fields 20.3-1349): out of focus? "
                                 "RBC counts fall as fields blur"))
    if brightness is not None and not MIN_BRIGHTNESS <= brightness <= MAX_BRIGHTNESS:
        flags.append(("too dark" if brightness < MIN_BRIGHTNESS else "too bright",
                      f"mean green level {brightness:.0f} (the training labs' fields 161-204): exposure or illumination?"))
    if counts["RBC"] < MIN_RBC:
        flags.append(("few cells", f"{counts['RBC']} RBC counted (< {MIN_RBC}; every training field has 4 or more): "
                                   "blank, out of focus, badly exposed or off the smear?"))
    # A field counted again stays flagged, also where its second pass measures otherwise.
    if recounted_at or off_training_size(cell_size):
        size = "unmeasured" if cell_size is None else f"{cell_size:.3f} of the field's short side"
        again = f"; counted again at x{recounted_at:g}, with its RBCs at the training size" if recounted_at else ""
        flags.append(("cell size", f"RBCs {size} (the training labs' fields 0.175-0.285): "
                                   f"another magnification? RBC counts drift as cells shrink or grow{again}"))
    return flags
