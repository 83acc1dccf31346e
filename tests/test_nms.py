"""The detection step every engine shares: Matrix NMS against its formula written as plain loops,
hard NMS against torchvision's batched_nms, and the batch form against image-by-image calls."""

import math

import torch
from torchvision.ops import batched_nms, box_iou, nms

from bccd_batch.model import ModelConfig
from bccd_batch.nms import greedy_nms_keep, matrix_nms_decay, select_detections


def _random_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 5
    return torch.cat([xy, xy + wh], 1)


def _decay_by_loops(boxes: torch.Tensor, sigma: float) -> list[float]:
    iou = box_iou(boxes, boxes).tolist()
    n = len(boxes)
    comp = [max([iou[i][j] for i in range(j)], default=0.0) for j in range(n)]
    return [min([math.exp(-(iou[i][j] ** 2 - comp[i] ** 2) / sigma) for i in range(j)], default=1.0)
            for j in range(n)]


def test_matrix_decay_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    boxes = _random_boxes(g, 40)
    got = matrix_nms_decay(boxes, torch.ones(40, dtype=torch.bool), 0.5)
    assert torch.allclose(got, torch.tensor(_decay_by_loops(boxes, 0.5)), atol=1e-5)


def test_matrix_decay_cases():
    a = torch.tensor([0.0, 0, 10, 10])
    far = torch.tensor([100.0, 100, 110, 110])
    half = torch.tensor([5.0, 0, 15, 10])  # IoU 1/3 with a
    d = matrix_nms_decay(torch.stack([a, a, far, half]), torch.ones(4, dtype=torch.bool), 0.5)
    assert d[0] == 1 and d[2] == 1  # the best box and a disjoint one keep their scores
    assert math.isclose(d[1], math.exp(-1 / 0.5), rel_tol=1e-5)  # an exact duplicate decays most
    assert 0 < d[3] < 1 and d[3] > d[1]
    # An invalid (filtered) candidate suppresses nothing.
    d = matrix_nms_decay(torch.stack([a, a]), torch.tensor([False, True]), 0.5)
    assert d[1] == 1


def test_greedy_keep_is_torchvision_nms_in_each_group():
    g = torch.Generator().manual_seed(3)
    boxes, scores = _random_boxes(g, 4 * 75).view(4, 75, 4), torch.rand(4, 75, generator=g)
    order = scores.argsort(-1, descending=True)
    sorted_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    keep, converged = greedy_nms_keep(sorted_boxes, torch.ones(4, 75, dtype=torch.bool), 0.5)
    assert bool(converged)
    for i in range(4):   # leading axes are independent groups
        assert sorted(order[i][keep[i]].tolist()) == sorted(nms(boxes[i], scores[i], 0.5).tolist())


def test_greedy_keep_reports_too_few_rounds():
    # A chain: each box overlaps the next by IoU 0.6, so box 0 removes 1, 2 survives and removes 3,
    # ... each round settles one more link.
    boxes = torch.tensor([[4.0 * i, 0, 4.0 * i + 16, 10] for i in range(8)])
    valid = torch.ones(8, dtype=torch.bool)
    keep, converged = greedy_nms_keep(boxes, valid, 0.5, rounds=2)
    assert not bool(converged)
    keep, converged = greedy_nms_keep(boxes, valid, 0.5, rounds=8)
    assert bool(converged) and keep.tolist() == [True, False] * 4


def _candidates(g: torch.Generator, n_images: int, n_cls: int = 3):
    boxes, scores = [], []
    for i in range(n_images):
        r = 0 if i == 1 else 30 + 7 * i  # one image with no proposals at all
        boxes.append(_random_boxes(g, r * n_cls).view(r, n_cls, 4))
        scores.append(torch.rand(r, n_cls, generator=g) ** 2)
    return boxes, scores


def test_hard_select_equals_torchvision_batched_nms():
    g = torch.Generator().manual_seed(1)
    cfg = ModelConfig(box_nms="hard", detections_per_img=20)
    boxes, scores = _candidates(g, 4)
    b, s, l, counts = select_detections(boxes, scores, cfg)
    start = 0
    for bi, si, n in zip(boxes, scores, counts):
        labels = torch.arange(1, 4).repeat(len(si))
        fb, fs = bi.reshape(-1, 4), si.reshape(-1)
        ok = fs > cfg.detection_threshold
        keep = batched_nms(fb[ok], fs[ok], labels[ok], cfg.box_nms_thresh)[:20]
        assert torch.equal(b[start:start + n], fb[ok][keep]) and torch.equal(l[start:start + n], labels[ok][keep])
        start += n


def test_matrix_select_batch_equals_one_image_at_a_time():
    g = torch.Generator().manual_seed(2)
    cfg = ModelConfig(box_nms="matrix", detections_per_img=25)
    boxes, scores = _candidates(g, 5)
    b, s, l, counts = select_detections(boxes, scores, cfg)
    assert counts[1] == 0 and all(0 < c <= 25 for i, c in enumerate(counts) if i != 1)
    start = 0
    for bi, si, n in zip(boxes, scores, counts):
        b1, s1, l1, (n1,) = select_detections([bi], [si], cfg)
        assert n1 == n
        assert torch.allclose(b[start:start + n], b1) and torch.allclose(s[start:start + n], s1)
        assert torch.equal(l[start:start + n], l1)
        assert bool((s1[:-1] >= s1[1:]).all()) and bool((s1 > cfg.detection_threshold).all())
        start += n


def test_matrix_select_on_no_candidates():
    cfg = ModelConfig(box_nms="matrix")
    b, s, l, counts = select_detections([torch.zeros(0, 3, 4)] * 2, [torch.zeros(0, 3)] * 2, cfg)
    assert counts == [0, 0] and len(b) == len(s) == len(l) == 0
