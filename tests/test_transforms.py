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
