"""Training augmentation moves boxes with the pixels: each test paints a cell, transforms, and
checks the box still frames exactly the painted pixels."""

import random

import pytest
import torch

from bccd_batch import transforms as T


def painted(x0, y0, x1, y1, channel=0, hw=(48, 64)):
    img = torch.zeros((3, *hw), dtype=torch.uint8)
    img[channel, y0:y1, x0:x1] = 255
    return img, torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)


def frame(img, channel=0):
    ys, xs = torch.nonzero(img[channel] == 255, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("fn", [T.hflip, T.vflip, T.rot90])
def test_flips_and_rotation_move_boxes_with_pixels(fn):
    img, boxes = painted(10, 5, 30, 20)
    out, moved = fn(img, boxes)
    assert moved[0].tolist() == frame(out)


def test_crop_clips_boxes_to_the_window_and_drops_mostly_cut_cells():
    rng = random.Random(3)
    for _ in range(50):
        img, boxes = painted(10, 5, 30, 20)
        out, b, l = T.random_crop(img, boxes, torch.tensor([1]), rng)
        visible = (out[0] == 255).sum().item()
        if len(b):
            assert b[0].tolist() == frame(out) and visible >= 0.35 * 20 * 15
        else:
            assert visible < 0.35 * 20 * 15


def test_mosaic_keeps_each_cell_framed_and_labelled():
    rng = random.Random(0)
    cells = [(4, 4, 20, 16), (40, 6, 60, 22), (6, 28, 22, 44), (38, 26, 58, 44)]
    for _ in range(50):
        samples = []
        for k, c in enumerate(cells):
            img, boxes = painted(*c, channel=k % 3)
            samples.append((img, boxes, torch.tensor([k % 3])))
        canvas, boxes, labels = T.mosaic(samples, rng)
        assert canvas.shape == (3, 48, 64) and len(boxes) == len(labels) <= 4
        for b, l in zip(boxes, labels):
            x0, y0, x1, y1 = (int(v) for v in b.tolist())
            region = canvas[int(l), y0:y1, x0:x1]
            assert region.numel() and (region == 255).all()   # the box covers only its painted cell


def test_pasted_cells_are_labelled_where_they_land_and_cover_no_labelled_cell():
    rng = random.Random(1)
    donor, donor_box = painted(20, 10, 28, 18, channel=2)
    bank = T.cell_crops(donor, donor_box, torch.tensor([3]), wanted={3}, margin=2)
    assert len(bank) == 1 and bank[0][0].shape == (3, 12, 12)
    for _ in range(30):
        img, boxes = painted(4, 4, 30, 30, channel=0)
        out, b, l = T.paste_cells(img, boxes, torch.tensor([1]), bank, rng, n_max=3)
        assert b[0].tolist() == boxes[0].tolist() and 2 <= len(b) <= 4 and l[1:].tolist() == [3] * (len(b) - 1)
        for x0, y0, x1, y1 in b[1:].int().tolist():
            # The soft mask is fully opaque over the cell itself, so its pixels arrive unchanged ...
            assert (out[2, y0 + 2:y1 - 2, x0 + 2:x1 - 2] == 255).all()
            # ... and no pasted box lies more than a fifth over the labelled cell.
            overlap = max(0, min(x1, 30) - max(x0, 4)) * max(0, min(y1, 30) - max(y0, 4))
            assert overlap <= 0.2 * (x1 - x0) * (y1 - y0)


class _Draws:
    """A stand-in for `random` that returns the given draws in order."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def uniform(self, lo, hi):
        return self.draws.pop(0)

    def random(self):
        return self.draws.pop(0)


@pytest.mark.parametrize("orient", [0.5, 0.0])
def test_orient_zero_keeps_each_field_as_labelled(orient):
    # Draws of 0.3 for the two flips and the rotation, 0.9 (no crop, no colour jitter) after them.
    img, boxes = painted(10, 5, 30, 20)
    out, moved, _ = T.augment(img, boxes, torch.tensor([1]), _Draws(0.3, 0.3, 0.3, 0.9, 0.9), orient)
    assert moved[0].tolist() == frame(out)
    assert torch.equal(out, img) == (orient == 0.0)


def test_stain_jitter_scales_each_colours_optical_density():
    img = torch.tensor([[[255, 127]], [[255, 63]], [[255, 31]]], dtype=torch.uint8)   # plasma white, a stained pixel
    same = T.stain_jitter(img, _Draws(1.0, 1.0, 1.0, 0.0, 0.0, 0.0))
    assert torch.equal(same, img)
    twice_red = T.stain_jitter(img, _Draws(2.0, 1.0, 1.0, 0.0, 0.0, 0.0))
    # Twice the red absorbance: transmitted red light (128/256) squared; white stays white.
    assert twice_red[:, 0, 0].tolist() == [255, 255, 255] and twice_red[:, 0, 1].tolist() == [63, 63, 31]
