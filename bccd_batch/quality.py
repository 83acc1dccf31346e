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

# Variance of the Laplacian of the green channel at half resolution (`_edges`): BCCD's 292 fields
# 14.6-48.9. The 20 val fields blurred and saved as JPEG: at radius 2 px 4.6-8.8 (quality 95: all
# caught), 7.0-12.5 (75: 19 of 20), 8.4-15.5 (50: 8 of 20); at 1 px, where counts did not move,
# 10.6-21.4 (95: 1 of 20 flagged), 14.2-27.1 (75), 14.9-28.7 (50). JPEG compression adds edges
# of its own, so the lower its quality the sharper a field looks.
MIN_FOCUS = 12.0
# Mean green level: BCCD's fields 162-190; the x0.7 copies 119-129, the x1.35 ones 225-242 (and
# 2 of the 20 x1.2 ones, which counted 4% more, above 220).
MIN_BRIGHTNESS, MAX_BRIGHTNESS = 140.0, 220.0
# Every one of BCCD's fields has 4 or more RBCs counted; a blank field, one far over- or
# under-exposed, or one blurred past use (radius 8 px) gave 0-2.
MIN_RBC = 3


# The green channel stands for the field: a Bayer sensor samples it twice, and stained cells
# contrast most with the plasma in it. Measured alone it costs ~0.5 ms a field on one host core
# against 1.2 ms for the three channels' mean, which the decode threads of a GPU run decoding
# with Pillow could not spare (end to end 1,633 and 1,793 images/s fell to 1,074 and 1,517 on an
# H100; nvJPEG's fields are measured on the GPU).
def _edges(green):
    """[..., H, W] green levels (numpy or torch) -> (the 4-neighbour Laplacian of their 2x2 block
    sums, those sums). Half resolution, so less of the pixel noise JPEG compression adds passes for
    edges: at full resolution, a threshold at the same share of the least sharp BCCD field's value
    flagged 9 of the 20 1-px copies (MIN_FOCUS's), against 1, for about the same 2-px ones caught.
    int16 holds the sums and their Laplacian exactly."""
    g = green[..., : green.shape[-2] // 2 * 2, : green.shape[-1] // 2 * 2]
    h = g[..., 0::2, 0::2].astype(np.int16) if isinstance(g, np.ndarray) else g[..., 0::2, 0::2].to(torch.int16)
    h = h + g[..., 1::2, 0::2] + g[..., 0::2, 1::2] + g[..., 1::2, 1::2]
    return h[..., :-2, 1:-1] + h[..., 2:, 1:-1] + h[..., 1:-1, :-2] + h[..., 1:-1, 2:] - 4 * h[..., 1:-1, 1:-1], h


def _rounded(edge_variance: float, block_mean: float) -> tuple[float, float]:
    """In green levels: a 2x2 block sum is four of them."""
    return round(edge_variance / 16, 3), round(block_mean / 4, 2)


def measure_host(field: np.ndarray) -> tuple[float, float]:
    """(focus, brightness) of one HxWx3 uint8 field decoded on the host, in its decode thread
    (numpy, so the decode threads never contend for torch's thread pool)."""
    edges, blocks = _edges(field[..., 1])
    return _rounded(float(edges.var(dtype=np.float64)), float(blocks.mean(dtype=np.float64)))


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
        edges, blocks = _edges(torch.stack([fields[i][1] for i in idx]))
        values[idx] = torch.stack([edges.flatten(1).float().var(1, correction=0), blocks.flatten(1).float().mean(1)], 1)
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
        flags.append(("blurred", f"sharpness {focus:.1f} (< {MIN_FOCUS:g}; BCCD fields 14.6-48.9): out of focus? "
                                 "RBC counts fall as fields blur"))
    if brightness is not None and not MIN_BRIGHTNESS <= brightness <= MAX_BRIGHTNESS:
        flags.append(("too dark" if brightness < MIN_BRIGHTNESS else "too bright",
                      f"mean green level {brightness:.0f} (BCCD fields 162-190): exposure or illumination?"))
    if counts["RBC"] < MIN_RBC:
        flags.append(("few cells", f"{counts['RBC']} RBC counted (< {MIN_RBC}; every BCCD field has 4 or more): "
                                   "blank, out of focus, badly exposed or off the smear?"))
    return flags
