"""The model split once for every fast backend.

Dense, static-shape graphs (what ONNX/TensorRT and torch.compile get):
  DenseStage: uint8 NCHW batch -> normalise -> backbone + FPN -> RPN head    (batch is the only dynamic axis)
  BoxStage:   RoI features [R, C, 7, 7] -> box head -> class logits, box deltas   (R = batch x proposals)
Data-dependent steps stay torchvision CUDA/CPU ops between them (`SplitDetector`): anchor decoding,
proposal top-k + NMS, MultiScaleRoIAlign and the final per-class NMS. They have no plugin-free
TensorRT form worth having (TensorRT's own NMS is slower than torchvision's, and its NMS/RoIAlign
plugins are deprecated), so no backend needs plugins.

The split computes what the eager model computes for fields of the native size, including its
resize to the model's test size (inside DenseStage, so it stays one static graph); other sizes (and
portrait fields) go through the eager model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import nms, remove_small_boxes
from torchvision.ops.boxes import clip_boxes_to_image

from ..model import detections_to_tuples, image_to_input

NATIVE_HW = (480, 640)


def model_input_geometry(model: FasterRCNN) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized, padded) height x width that the eager model's transform gives a native field:
    read off the transform itself, so the split can never drift from its rounding rules."""
    with torch.no_grad():
        batch, _ = model.transform([torch.zeros(3, *NATIVE_HW)])
    return tuple(batch.image_sizes[0]), tuple(batch.tensors.shape[-2:])  # type: ignore[return-value]


class DenseStage(nn.Module):
    """Outputs, in order: the FPN maps the RoI pooler reads ('0', '1', '2'), then per level
    (including 'pool') the RPN objectness logits, then per level the RPN box deltas."""

    def __init__(self, model: FasterRCNN):
        super().__init__()
        t = model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, 3, 1, 1) * 255.0)
        self.resized_hw, self.padded_hw = model_input_geometry(model)
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Same order as torchvision's transform: normalise, resize bilinearly, zero-pad to a
        # multiple of 32 at the bottom/right.
        x = (images_u8.to(self.mean.dtype) - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.resized_hw:
            x = F.interpolate(x, size=self.resized_hw, mode="bilinear", align_corners=False)
        (h, w), (ph, pw) = self.resized_hw, self.padded_hw
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))
        feats = list(self.backbone(x).values())
        objectness, deltas = self.rpn_head(feats)
        return (*feats[:3], *objectness, *deltas)


class BoxStage(nn.Module):
    def __init__(self, model: FasterRCNN):
        super().__init__()
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box_predictor(self.box_head(roi_features))


def dense_output_names(n_levels: int = 4) -> list[str]:
    return [f"fpn{i}" for i in range(3)] + [f"objectness{i}" for i in range(n_levels)] + [f"deltas{i}" for i in range(n_levels)]


def _nms_per_group(boxes: torch.Tensor, scores: torch.Tensor, group: torch.Tensor, thresh: float) -> torch.Tensor:
    """NMS within each group in one call, by moving each group to its own coordinate range (the
    trick torchvision's batched_nms uses), in float64 so the offsets never round a coordinate."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = group.to(torch.float64) * (boxes.max().to(torch.float64) + 1)
    return nms(boxes.to(torch.float64) + offsets[:, None], scores.to(torch.float64), thresh)


def _nms_image_by_image(boxes, scores, group, image, n_images: int, thresh: float, k: int) -> list[torch.Tensor]:
    """Per image (rows sorted by image), the indices NMS keeps within each group, best k first.
    Image by image, not one call for the batch: torchvision's CUDA NMS builds an N x N mask and
    walks it in a single thread, so one call over a batch's ~100k proposals took 60 ms on an
    H200 (profiled), where 32 calls over ~3k each take a fraction of a millisecond each."""
    out, start = [], 0
    for count in torch.bincount(image, minlength=n_images).tolist():
        rows = slice(start, start + count)
        out.append(_nms_per_group(boxes[rows], scores[rows], group[rows], thresh)[:k] + start)
        start += count
    return out


class SplitDetector:
    """Runs the split model with pluggable dense and box stages (eager modules, ONNX sessions,
    TensorRT engines or compiled graphs: any callable with the stages' signatures).

    The glue between the stages computes what torchvision's RPN and RoI heads compute, with
    anchors made once and decoding, clipping and filtering done for the whole batch at once, where
    torchvision loops over images with a dozen small kernels each; only NMS goes image by image."""

    def __init__(self, model: FasterRCNN, dense: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                 box: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 pad_rois_to: int | None = None):
        self.model, self.dense, self.box, self.device = model, dense, box, device
        self.resized_hw, self.padded_hw = model_input_geometry(model)
        # Static box graphs (CUDA graphs) need a fixed RoI count: pad with empty boxes, drop after.
        self.pad_rois_to = pad_rois_to
        self._anchors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _batch_anchors(self, n: int, fpn: list[torch.Tensor], objectness: list[torch.Tensor]):
        """(anchors of the batch, pyramid level of each anchor of one image): both depend only on
        the fixed geometry, so they are made once per batch size, not per batch."""
        if n not in self._anchors:
            # The anchor generator only reads the padded batch's shape: a zero-stride view will do.
            placeholder = fpn[0].new_empty(()).expand(n, 3, *self.padded_hw)
            anchors = self.model.rpn.anchor_generator(ImageList(placeholder, [self.resized_hw] * n), fpn + [objectness[-1]])
            per_level = torch.tensor([o[0].numel() for o in objectness], device=fpn[0].device)
            levels = torch.repeat_interleave(torch.arange(len(objectness), device=fpn[0].device), per_level)
            self._anchors = {n: (torch.cat(anchors), levels)}
        return self._anchors[n]

    def _proposals(self, objectness: list[torch.Tensor], deltas: list[torch.Tensor], fpn: list[torch.Tensor]):
        """RegionProposalNetwork.filter_proposals: per-level top-k, clip, drop small and low boxes
        for the whole batch, then NMS per level and the best post_nms_top_n, image by image."""
        rpn, n = self.model.rpn, objectness[0].shape[0]
        per_level = [o[0].numel() for o in objectness]
        obj, dl = concat_box_prediction_layers(objectness, deltas)
        anchors, anchor_levels = self._batch_anchors(n, fpn, objectness)
        proposals = rpn.box_coder.decode_single(dl, anchors).view(n, -1, 4)
        obj = obj.view(n, -1)
        top = rpn._get_top_n_idx(obj, per_level)
        levels = anchor_levels[top].reshape(-1)
        rows = torch.arange(n, device=obj.device)[:, None]
        boxes = clip_boxes_to_image(proposals[rows, top], self.resized_hw).reshape(-1, 4)
        scores = torch.sigmoid(obj[rows, top]).reshape(-1)
        image = rows.expand_as(top).reshape(-1)
        ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = torch.where((ws >= rpn.min_size) & (hs >= rpn.min_size) & (scores >= rpn.score_thresh))[0]
        boxes, scores, image, levels = boxes[ok], scores[ok], image[ok], levels[ok]
        kept = _nms_image_by_image(boxes, scores, levels, image, n, rpn.nms_thresh, rpn.post_nms_top_n())
        return [boxes[k] for k in kept]

    def _detections(self, logits: torch.Tensor, box_deltas: torch.Tensor, proposals: list[torch.Tensor], n: int):
        """RoIHeads.postprocess_detections: decode, clip, drop background, low and empty boxes for
        the whole batch, then NMS per class and the best detections_per_img, image by image."""
        heads = self.model.roi_heads
        n_cls = logits.shape[-1]
        boxes = clip_boxes_to_image(heads.box_coder.decode(box_deltas, proposals), self.resized_hw)[:, 1:]
        scores = torch.softmax(logits, -1)[:, 1:]
        per_image = torch.tensor([len(p) for p in proposals], device=logits.device)
        image = torch.repeat_interleave(torch.arange(n, device=logits.device), per_image)[:, None].expand_as(scores)
        labels = torch.arange(1, n_cls, device=logits.device).expand_as(scores)
        boxes, scores, image, labels = boxes.reshape(-1, 4), scores.reshape(-1), image.reshape(-1), labels.reshape(-1)
        ok = torch.where(scores > heads.score_thresh)[0]
        boxes, scores, image, labels = boxes[ok], scores[ok], image[ok], labels[ok]
        ok = remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, image, labels = boxes[ok], scores[ok], image[ok], labels[ok]
        kept = _nms_image_by_image(boxes, scores, labels, image, n, heads.nms_thresh, heads.detections_per_img)
        keep = torch.cat(kept)
        return boxes[keep], scores[keep], labels[keep], [len(k) for k in kept]

    @torch.inference_mode()
    def __call__(self, batch_u8: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """batch_u8: [B, 3, 480, 640] uint8 on self.device. Returns per-image CPU tensors."""
        n, _, h, w = batch_u8.shape
        outs = [o.float() for o in self.dense(batch_u8)]
        fpn, objectness, deltas = outs[:3], outs[3:7], outs[7:11]
        proposals = self._proposals(objectness, deltas, fpn)
        roi = self.model.roi_heads.box_roi_pool(dict(zip("012", fpn)), proposals, [self.resized_hw] * n)
        r = roi.shape[0]
        if self.pad_rois_to is not None and r < self.pad_rois_to:
            roi = torch.cat([roi, roi.new_zeros((self.pad_rois_to - r, *roi.shape[1:]))])
        logits, box_deltas = self.box(roi)
        boxes, scores, labels, counts = self._detections(logits[:r].float(), box_deltas[:r].float(), proposals, n)
        # Back to the field's pixels with torchvision's ratios (original / resized, per axis).
        rh, rw = (torch.tensor(o, dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)
                  for o, s in zip((h, w), self.resized_hw))
        boxes = boxes * torch.stack([rw, rh, rw, rh]).to(boxes.device)
        # One device-to-host copy per tensor for the batch instead of three per image.
        return [{"boxes": b, "scores": s, "labels": l}
                for b, s, l in zip(*(t.cpu().split(counts) for t in (boxes, scores, labels)))]


def infer_split(detector: SplitDetector, model: FasterRCNN, images: list[np.ndarray], device: torch.device,
                batch_size: int) -> list[list[tuple]]:
    """Native-size images through the split model in batches; any other size through the eager model."""
    out: list[list[tuple] | None] = [None] * len(images)
    native = [i for i, a in enumerate(images) if a.shape[:2] == NATIVE_HW]
    for k in range(0, len(native), batch_size):
        idx = native[k:k + batch_size]
        batch = torch.from_numpy(np.stack([images[i] for i in idx])).to(device, non_blocking=True).permute(0, 3, 1, 2)
        for i, d in zip(idx, detector(batch.contiguous())):
            out[i] = detections_to_tuples(d)
    with torch.inference_mode():
        for i, a in enumerate(images):
            if out[i] is None:
                out[i] = detections_to_tuples(model([image_to_input(a, device)])[0])
    return out  # type: ignore[return-value]
