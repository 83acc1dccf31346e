"""Training augmentation for blood smears: plain functions on (uint8 CHW image, Nx4 xyxy boxes, N labels).

Smear fields have no canonical orientation, so all eight flips/90° rotations are equally valid
for the cells (other angles would turn a box into one that can only be estimated), though not always
for their labels: a labelling that draws its boxes to one side of the cells is only learnable from
fields kept as labelled (`augment`'s `orient` 0; docs/model.md); stain and illumination vary between labs, so colour jitter is strong; cells vary in size between
scanners, which the model's multi-scale training resize covers. Scale is not done here.
"""

from __future__ import annotations

import torch
from torchvision.ops import clip_boxes_to_image
from torchvision.transforms.v2 import functional as F


def hflip(img: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = img.shape[-1]
    return img.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)


def vflip(img: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = img.shape[-2]
    return img.flip(-2), torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], 1)


def rot90(img: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate 90° counter-clockwise: pixel (x, y) goes to (y, W - x)."""
    w = img.shape[-1]
    return img.rot90(1, (-2, -1)), torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], 1)


def random_crop(img, boxes, labels, rng, min_scale=0.6, min_kept=0.35):
    """Crop a random window; boxes keep their clipped part if at least `min_kept` of them remains."""
    _, h, w = img.shape
    s = rng.uniform(min_scale, 1.0)
    cw, ch = int(w * s), int(h * rng.uniform(max(min_scale, s * 0.8), min(1.0, s * 1.25)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    clipped = clip_boxes_to_image(_shifted(boxes, -x0, -y0), (ch, cw))
    return (img[:, y0:y0 + ch, x0:x0 + cw], *_keep_visible(boxes, clipped, labels, min_kept))


def colour_jitter(img: torch.Tensor, rng) -> torch.Tensor:
    img = F.adjust_brightness(img, rng.uniform(0.75, 1.25))
    img = F.adjust_contrast(img, rng.uniform(0.75, 1.25))
    img = F.adjust_saturation(img, rng.uniform(0.6, 1.4))
    img = F.adjust_hue(img, rng.uniform(-0.06, 0.06))
    return img


def restain(img: torch.Tensor, scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """A 3xHxW uint8 field with each channel's optical density (-log of the light let through)
    multiplied by `scale` and raised by `shift`, by Beer-Lambert: scaling recolours stained cells and
    leaves unstained plasma as it was (how much stain the cells took up); only the shift moves the
    plasma, as another lamp or camera white balance would."""
    a = torch.tensor(scale, dtype=torch.float32).view(3, 1, 1)
    b = torch.tensor(shift, dtype=torch.float32).view(3, 1, 1)
    od = -torch.log((img.float() + 1) / 256)
    return (256 * torch.exp(-(od * a + b)) - 1).round_().clamp_(0, 255).to(torch.uint8)


def stain_jitter(img: torch.Tensor, rng, scale: float = 0.3, shift: float = 0.1) -> torch.Tensor:
    """Another lab's staining (`restain`): each channel's optical density scaled by its own factor in
    1 ± `scale` and shifted by ± `shift`. Unlike RGB brightness or hue jitter it keeps the plasma's
    colour apart from the cells'."""
    return restain(img, [rng.uniform(1 - scale, 1 + scale) for _ in range(3)], [rng.uniform(-shift, shift) for _ in range(3)])


def _shifted(boxes: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    return boxes + torch.tensor([dx, dy, dx, dy], dtype=boxes.dtype)


def _keep_visible(boxes, clipped, labels, min_kept):
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = kept >= min_kept * area
    return clipped[keep], labels[keep]


def mosaic(samples, rng, min_kept=0.35):
    """Tile four (img, boxes, labels) samples 2x2 around a random centre, each tile a window of its
    own image at its own scale: a 205-image training set then shows cells in far more
    neighbourhoods and at more field positions than it has fields. The canvas has the first
    image's size; a tile larger than its source image is filled with that image's mean colour."""
    _, H, W = samples[0][0].shape
    cy, cx = int(H * rng.uniform(0.3, 0.7)), int(W * rng.uniform(0.3, 0.7))
    canvas = torch.empty((3, H, W), dtype=samples[0][0].dtype)
    out_boxes, out_labels = [], []
    for (img, boxes, labels), (x0, y0, x1, y1) in zip(samples, [(0, 0, cx, cy), (cx, 0, W, cy), (0, cy, cx, H), (cx, cy, W, H)]):
        _, h, w = img.shape
        tw, th = min(x1 - x0, w), min(y1 - y0, h)
        sx, sy = rng.randint(0, w - tw), rng.randint(0, h - th)
        canvas[:, y0:y1, x0:x1] = img.float().mean((1, 2), keepdim=True).to(canvas.dtype)
        canvas[:, y0:y0 + th, x0:x0 + tw] = img[:, sy:sy + th, sx:sx + tw]
        moved = _shifted(clip_boxes_to_image(_shifted(boxes, -sx, -sy), (th, tw)), x0, y0)
        b, l = _keep_visible(boxes, moved, labels, min_kept)
        out_boxes.append(b)
        out_labels.append(l)
    return canvas, torch.cat(out_boxes), torch.cat(out_labels)


def cell_crops(img, boxes, labels, wanted, margin=4):
    """(crop, box within the crop, label) for each cell of a `wanted` label, with `margin` pixels
    of its surroundings: what `paste_cells` blends into other fields."""
    _, h, w = img.shape
    out = []
    for b, l in zip(boxes.tolist(), labels.tolist()):
        if l not in wanted or b[2] - b[0] < 2 or b[3] - b[1] < 2:
            continue
        x0, y0 = max(0, int(b[0]) - margin), max(0, int(b[1]) - margin)
        x1, y1 = min(w, int(b[2] + 0.999) + margin), min(h, int(b[3] + 0.999) + margin)
        out.append((img[:, y0:y1, x0:x1].clone(), torch.tensor([b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0]), l))
    return out


def _soft_ellipse(h: int, w: int, feather: float = 0.3) -> torch.Tensor:
    """[h, w] alpha: 1 inside the ellipse inscribed in the crop, fading to 0 at its edge, so a pasted
    cell brings a little of its own plasma and no rectangular seam (cells are round)."""
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    r = (y[:, None].square() + x[None, :].square()).sqrt()
    return ((1 - r) / feather).clamp(0, 1)


def paste_cells(img, boxes, labels, bank, rng, n_max=3, max_cover=0.2, tries=10):
    """Copy-paste (Ghiasi et al., 2021) for boxes: blend 1..n_max crops from `bank` (`cell_crops`
    of other fields) at random spots where no labelled cell has more than `max_cover` of the new
    box over it, and label them. BCCD has about one platelet per field, the fewest examples of
    any class; pasting shows the network more of them, in new neighbourhoods."""
    if not bank:
        return img, boxes, labels
    _, H, W = img.shape
    img, new_boxes, new_labels = img.clone(), [boxes], [labels]
    occupied = boxes
    for _ in range(rng.randint(1, n_max)):
        crop, rel, label = bank[rng.randrange(len(bank))]
        _, ch, cw = crop.shape
        if ch >= H or cw >= W:
            continue
        for _ in range(tries):
            x0, y0 = rng.randint(0, W - cw), rng.randint(0, H - ch)
            box = rel + torch.tensor([x0, y0, x0, y0], dtype=rel.dtype)
            lt = torch.maximum(occupied[:, :2], box[:2])
            rb = torch.minimum(occupied[:, 2:], box[2:])
            inter = (rb - lt).clamp(min=0).prod(1)
            area = (box[2] - box[0]) * (box[3] - box[1])
            if len(occupied) == 0 or (inter <= max_cover * area).all():
                break
        else:
            continue
        alpha = _soft_ellipse(ch, cw)
        region = img[:, y0:y0 + ch, x0:x0 + cw].float()
        img[:, y0:y0 + ch, x0:x0 + cw] = (alpha * crop.float() + (1 - alpha) * region).round().to(img.dtype)
        occupied = torch.cat([occupied, box[None]])
        new_boxes.append(box[None])
        new_labels.append(torch.tensor([label], dtype=labels.dtype))
    return img, torch.cat(new_boxes), torch.cat(new_labels)


def augment(img, boxes, labels, rng, orient: float = 0.5):
    """`rng`: the `random` module or a `random.Random` (anything with random/uniform/randint);
    `orient`: the probability of each of the horizontal flip, vertical flip and 90° rotation (0 keeps
    fields as labelled; the draws are made either way, so the rest of the stream does not change)."""
    if rng.random() < orient:
        img, boxes = hflip(img, boxes)
    if rng.random() < orient:
        img, boxes = vflip(img, boxes)
    if rng.random() < orient:
        img, boxes = rot90(img, boxes)
    if rng.random() < 0.5:
        img, boxes, labels = random_crop(img, boxes, labels, rng)
    if rng.random() < 0.8:
        img = colour_jitter(img, rng)
    return img, boxes, labels
