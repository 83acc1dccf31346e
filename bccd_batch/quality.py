"""Per-field image quality: pixel measures taken when a field is decoded (focus, brightness, the
background's colour cast, the stain's colour), one taken from its detections (the RBCs' size: the magnification), and the
flags that tell a reviewer which fields' counts not to trust unseen. A field whose cells or background
are unlike the training labs' is counted a second time brought to their look (`second_pass`).

The model was trained on two labs' fields (BCCD, PBC), all in focus and evenly lit; a field unlike
them is counted wrong without any sign in its detections. With the model the thresholds were set
for (v2, 2026-11-27), copies of 20 BCCD val fields blurred with a Gaussian of radius 1/2/3/4 px lost
0/8/16/24% of their counted RBCs (v6 loses 0/3/5%, and 0/5/8% of PBC's: docs/report.md), and
copies darkened to x0.5/x0.7 or brightened to x1.2/x1.35 counted -20/-7/+4/+14%. The thresholds below catch those that
moved counts by 7% or more and leave every BCCD field unflagged; PBC's 353 fields (focus 72-1349,
green level 161-204, 6 or more RBCs counted) are none of them flagged either.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch


class Quality(NamedTuple):
    """A decoded field's measures (defined below); focus is None where the field is too small.
    `levels`, the background's and the stained cells' mean red, green and blue (8-bit), are what
    the colour measures are taken from and what `unlike_stain` compares with the training labs';
    they are not stored."""
    focus: float | None
    brightness: float
    tint_red: float
    tint_blue: float
    stain: float
    levels: tuple[float, ...] | None = None

    @property
    def measures(self) -> tuple:
        """The measures stored and reported (`QUALITY`), in `field_flags`' order."""
        return self[:len(QUALITY)]


QUALITY = Quality._fields[:-1]      # the stored measures' names: the store's and counts.csv's columns

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
# The background's colour cast: the optical density (-ln of the light let through) of its red and
# blue over its green's, the background being the sampled pixels with the brightest fifth of green
# levels (plasma and glass). BCCD's 292 fields: red -0.020..+0.057, blue -0.002..+0.077 (grey);
# PBC's 353: red -0.122..-0.030, blue -0.036..+0.141 (yellowish). 20 BCCD val fields under a bluish
# lamp (OD +0.3 red, -0.3 blue) lost all 23 platelets, 8 of 20 WBCs and 86% of their RBCs; counted
# again white-balanced to a grey background, they missed 8 RBCs and no WBC (scripts/recoloured_counts.py).
MIN_TINT_RED, MAX_TINT_RED = -0.14, 0.08
MIN_TINT_BLUE, MAX_TINT_BLUE = -0.06, 0.16
# The stain's colour: the green-over-red optical density of the darkest fifth of sampled greens
# (stained cells) less the background's, so a lamp's cast cancels out. BCCD's 292 fields 0.144-0.248,
# PBC's 353 0.124-0.489; a field in grey levels 0. 20 BCCD val fields in grey levels lost all 23
# platelets and 11 of 20 WBCs, with saturation x0.3 (0.049-0.057) 13 platelets; at x0.5 they counted
# as untouched (scripts/recoloured_counts.py, 2026-12-06).
MIN_STAIN = 0.07


# A field's stain against the training labs' (the card's `colours`, `colour_reference`): its
# `contrast`, the stained cells' optical density over the background's in red, green and blue, which
# a lamp's or a camera's colour balance leaves alone (it scales both alike) and a stain, a camera's
# contrast or its exposure curve move. A field within a training source's range, widened by this share
# of the range, is like that source's. BCCD's 205 training fields (red / green / blue 0.091-0.293 /
# 0.290-0.498 / 0.053-0.327) hold all of its 292 fields so; 350 of PBC's 353 (all 71 of TXL-PBC's val
# ones) lie further outside them, and with PBC's 282 training fields (0.263-0.767 / 0.404-1.256 /
# 0.183-0.360) in the ranges too, none of TXL-PBC's 485 fields does (2026-12-07). Ranges from only 90
# of BCCD's fields left 61 of its 292 outside (their blue up to 0.30): take them from every training field.
COLOUR_MARGIN = 0.1
# Under this much contrast in every channel (a blank field; BCCD's least is 0.29 in green) nothing is
# stained to match.
MIN_CONTRAST = 0.05
# The most a second pass stretches or squeezes a channel's contrast: a field with next to none
# (blank, or in grey levels) is not amplified into noise.
MIN_COLOUR_GAIN, MAX_COLOUR_GAIN = 0.25, 4.0


# The green channel, every other pixel of every other row, stands for the field: a Bayer sensor
# samples green twice, and stained cells contrast most with the plasma in it. That is ~0.2 ms a
# field on one host core (the three channels' mean at full resolution cost 1.2 ms); with the
# background's and the stained cells' colours 0.84 ms on the 2-core development machine (0.56 with
# the background's alone, 2026-12-06), which is why a GPU run measures every field on the GPU
# instead (batches.decoded_groups).
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


def _rounded(focus: float, brightness: float, tint_red: float, tint_blue: float, stain: float, *levels: float) -> Quality:
    """A `Quality` of raw values, `levels` last; focus is None for a field too small to have a Laplacian
    (under 5 pixels a side)."""
    return Quality(None if math.isnan(focus) else round(float(focus), 3), round(float(brightness), 2),
                   round(float(tint_red), 3), round(float(tint_blue), 3), round(float(stain), 3),
                   tuple(round(float(v), 2) for v in levels))


def _od(level):
    """Optical density of mean 8-bit levels (numpy or torch)."""
    return -((level + 1) / 256).log() if hasattr(level, "log") else -np.log((level + 1) / 256)


def _too_small(g) -> bool:
    return g.shape[-1] < 3 or g.shape[-2] < 3


def measure_host(field: np.ndarray) -> Quality:
    """The `Quality` of one HxWx3 uint8 field decoded on the host, in its decode thread (numpy, so
    the decode threads never contend for torch's thread pool)."""
    g = _sampled(field[..., 1])
    focus = math.nan if _too_small(g) else float(_laplacian(g).var(dtype=np.float64))
    # One partition per rank: numpy's partition at both ranks at once took 0.7 ms against 0.02 each.
    bright_cut, dark_cut = (np.partition(g.ravel(), rank)[rank] for rank in _ranks(g.size))
    # Channel by channel: 0.2 ms a mask, where gathering the pixels' three channels at once took 0.5.
    levels = [np.array([field[0::2, 0::2, c][chosen].mean(dtype=np.float64) for c in range(3)])
              for chosen in (g >= bright_cut, g <= dark_cut)]
    return _rounded(focus, float(g.mean(dtype=np.float64)), *_colour(*map(_od, levels)), *levels[0], *levels[1])


def _ranks(n: int) -> tuple[int, int]:
    """0-based ranks, among n sampled greens, of the brightest fifth's lowest and the darkest fifth's highest."""
    return int(0.8 * (n - 1)), int(0.2 * (n - 1))


def _colour(background, stained):
    """(tint_red, tint_blue, stain) from the background's and the stained cells' [red, green, blue]
    optical densities (numpy, or torch with the field in the first dimension)."""
    return (background[..., 0] - background[..., 1], background[..., 2] - background[..., 1],
            (stained[..., 1] - stained[..., 0]) - (background[..., 1] - background[..., 0]))


def measure_device(fields: list[torch.Tensor]) -> Callable[[], list[Quality]]:
    """Start measuring 3xHxW uint8 fields on their GPU (decoded there by nvJPEG, or uploaded for
    the engine); calling the result gives their `Quality`. Queued before the batch's
    inference, and read back through pinned memory behind an event, so reading them never waits
    for a later batch. (CPU tensors, from the same paths where there is no GPU, are measured at
    once.)"""
    import torch

    values = torch.empty((len(fields), len(QUALITY) + 6), device=fields[0].device)
    by_shape: dict[tuple, list[int]] = {}
    for i, f in enumerate(fields):
        by_shape.setdefault(tuple(f.shape), []).append(i)
    for idx in by_shape.values():       # one stacked pass per field size: usually the whole batch
        stacked = torch.stack([fields[i] for i in idx])
        rgb = stacked[..., 0::2, 0::2].flatten(2).float()     # n x 3 x pixels
        g = _sampled(stacked[:, 1])
        focus = torch.full((len(idx),), math.nan, device=g.device) if _too_small(g) else \
            _laplacian(g).flatten(1).float().var(1, correction=0)
        levels = []
        for rank, brighter in zip(_ranks(rgb.shape[2]), (True, False)):   # the host's cuts
            cut = rgb[:, 1].kthvalue(rank + 1, 1, keepdim=True).values
            chosen = (rgb[:, 1] >= cut if brighter else rgb[:, 1] <= cut).float()
            levels.append((rgb * chosen[:, None]).sum(2) / chosen.sum(1, keepdim=True))
        values[idx] = torch.cat([torch.stack([focus, g.flatten(1).float().mean(1), *_colour(*map(_od, levels))], 1),
                                 *levels], 1)
    if values.device.type != "cuda":
        measured = [_rounded(*v) for v in values.tolist()]
        return lambda: measured
    host = torch.empty(values.shape, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def collect() -> list[Quality]:
        done.synchronize()
        return [_rounded(*v) for v in host.tolist()]
    return collect


def contrast(levels: tuple[float, ...]) -> tuple[float, float, float]:
    """The stained cells' red, green and blue optical densities over the background's, from `levels`
    (`_od`'s difference, in plain floats: every field of a run passes here)."""
    return tuple(math.log((background + 1) / (stained + 1)) for background, stained in zip(levels[:3], levels[3:]))


def channel_spread(field) -> tuple[list[float], list[float]]:
    """Each channel's mean and standard deviation over the sampled pixels of an HxWx3 (numpy) or a
    3xHxW (torch) uint8 field."""
    if isinstance(field, np.ndarray):
        x = field[0::2, 0::2].reshape(-1, 3).astype(np.float64)
        return x.mean(0).tolist(), x.std(0).tolist()
    x = field[:, 0::2, 0::2].flatten(1).double()
    return x.mean(1).tolist(), x.std(1, correction=0).tolist()


def colour_reference(fields: Iterable[tuple[str, np.ndarray]]) -> dict[str, dict]:
    """The card's `colours` from (source, HxWx3 field) pairs of a model's training fields: per source
    the range of their `contrast` and the median of each channel's mean and standard deviation."""
    by_source: dict[str, list] = {}
    for source, field in fields:
        by_source.setdefault(source, []).append((contrast(measure_host(field).levels), *map(np.array, channel_spread(field))))
    out = {}
    for source, rows in sorted(by_source.items()):
        c, mean, std = (np.array(v) for v in zip(*rows))
        out[source] = {"fields": len(rows), "contrast_low": c.min(0).round(3).tolist(), "contrast_high": c.max(0).round(3).tolist(),
                       "mean": np.median(mean, 0).round(2).tolist(), "std": np.median(std, 0).round(2).tolist()}
    return out


def unlike_stain(levels: tuple[float, ...] | None, colours: dict[str, dict] | None) -> str | None:
    """The training lab whose stain a field's is nearest (the least optical density outside its range
    in any channel), where its `contrast` lies outside every lab's range (`COLOUR_MARGIN`); None for a
    field like one lab's, with nothing stained (`MIN_CONTRAST`), unmeasured, or a model whose card has
    no `colours`."""
    if levels is None or not colours:
        return None
    x = contrast(levels)
    if max(x) < MIN_CONTRAST:
        return None
    outside = {}       # lab -> how far outside its range: in optical density, and in ranges
    for lab, ref in colours.items():
        bounds = list(zip(x, ref["contrast_low"], ref["contrast_high"]))
        by = [max(low - v, v - high) for v, low, high in bounds]
        outside[lab] = (max(by), max(b / max(high - low, 1e-3) for b, (_, low, high) in zip(by, bounds)))
    if min(share for _, share in outside.values()) <= COLOUR_MARGIN:
        return None
    # Nearest in density, not in ranges: a paler stain than the paler lab's is that lab's, however
    # much wider the other lab's range.
    return min(outside, key=lambda lab: outside[lab][0])


def matched_colours(field, ref: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (gains, offsets), 8-bit levels x -> x * gain + offset, that give a field each
    channel's mean and standard deviation of a lab's fields (`colour_reference`)."""
    mean, std = channel_spread(field)
    gains = tuple(float(np.clip(r / max(s, 1e-3), MIN_COLOUR_GAIN, MAX_COLOUR_GAIN)) for r, s in zip(ref["std"], std))
    return gains, tuple(float(r - m * g) for r, m, g in zip(ref["mean"], mean, gains))


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


def off_training_tint(tint_red: float | None, tint_blue: float | None) -> bool:
    """Whether a field's background colour cast lies outside the training labs' (False where unmeasured)."""
    return tint_red is not None and not (MIN_TINT_RED <= tint_red <= MAX_TINT_RED and MIN_TINT_BLUE <= tint_blue <= MAX_TINT_BLUE)


WHITE_BALANCE = "white balance"      # `SecondPass.recoloured` for a field made grey; else a lab's name


class SecondPass(NamedTuple):
    """How a field unlike the training labs' is counted again (`second_pass`)."""
    scale: float                            # `recount_scale`'s, 1 where its RBCs' size is in range
    recoloured: str | None                  # WHITE_BALANCE, the lab whose colours it was given, or None
    gains: tuple[float, float, float] | None = None       # x -> x * gain + offset per channel, 8-bit levels
    offsets: tuple[float, float, float] | None = None


def second_pass(field, cell_size: float | None, quality: Quality | None, colours: dict[str, dict] | None) -> SecondPass | None:
    """How to count a field (HxWx3 numpy or 3xHxW torch) again, or None for one like the training
    labs': resized as `recount_scale` says, and recoloured where its colours are off theirs. A stain
    unlike every lab's (`unlike_stain`) is given the nearest lab's colours (each channel's mean and
    spread: `matched_colours`), which also undoes a lamp's cast; a colour cast alone (another lamp or
    camera white balance, `off_training_tint`) is white-balanced to a grey background (its red and
    blue optical densities brought to its green's)."""
    scale = recount_scale(cell_size)
    lab = unlike_stain(quality.levels if quality else None, colours)
    if lab is not None:
        return SecondPass(scale or 1.0, lab, *matched_colours(field, colours[lab]))
    if quality is not None and off_training_tint(quality.tint_red, quality.tint_blue):
        return SecondPass(scale or 1.0, WHITE_BALANCE, (math.exp(quality.tint_red), 1.0, math.exp(quality.tint_blue)), (0.0, 0.0, 0.0))
    return None if scale is None else SecondPass(scale, None)


def field_flags(counts: dict[str, int], focus: float | None, brightness: float | None,
                tint_red: float | None = None, tint_blue: float | None = None, stain: float | None = None,
                cell_size: float | None = None, recounted_at: float | None = None,
                recoloured: str | None = None) -> list[tuple[str, str]]:
    """(flag, reason) pairs for one field: its counts, its `Quality` measures, its RBCs' size and its
    second pass. Fields stored before a measure was taken have None for it; `cell_size` is
    `rbc_size`'s, None where it was not measured; `recounted_at` the scale at which the field was
    counted again (`second_pass`: 1 where only its colour was off), None where it was not, and
    `recoloured` how that pass recoloured it (`SecondPass.recoloured`)."""
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
    resized = recounted_at is not None and recounted_at != 1.0
    if resized or off_training_size(cell_size):
        size = "unmeasured" if cell_size is None else f"{cell_size:.3f} of the field's short side"
        again = f"; counted again at x{recounted_at:g}, with its RBCs at the training size" if resized else ""
        flags.append(("cell size", f"RBCs {size} (the training labs' fields 0.175-0.285): "
                                   f"another magnification? RBC counts drift as cells shrink or grow{again}"))
    lab = recoloured if recoloured not in (None, WHITE_BALANCE) else None
    if lab is not None:
        flags.append(("other stain", "the cells' contrast against the background (stained over background optical density "
                                     "in red, green and blue) unlike the training labs' fields: another stain, camera or "
                                     f"exposure? Platelets and WBCs are missed first; counted again with the colours of {lab}'s fields"))
    if off_training_tint(tint_red, tint_blue):
        again = {WHITE_BALANCE: "; counted again with its background made grey", None: ""}.get(
            recoloured, f"; counted again with the colours of {lab}'s fields")
        flags.append(("colour cast", f"background's red / blue optical density {tint_red:+.2f} / {tint_blue:+.2f} over its "
                                     "green's (the training labs' fields -0.12..+0.06 / -0.04..+0.14): another lamp, "
                                     f"filter or camera white balance? Platelet and WBC counts fall under a strong cast{again}"))
    if stain is not None and stain < MIN_STAIN:
        flags.append(("faint stain", f"the cells' colour {stain:.2f} (green over red optical density beyond the background's; "
                                     f"< {MIN_STAIN:g}, the training labs' fields 0.12-0.49): grey levels, a pale stain or "
                                     "a camera's saturation turned down? Platelets and WBCs are missed as colour fades"))
    return flags
