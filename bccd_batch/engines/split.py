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
from torchvision.ops.boxes import clip_boxes_to_image

from ..model import detections_to_tuples, image_to_input
from ..nms import nms_image_by_image

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


class SplitDetector:
    """Runs the split model with pluggable dense and box stages (eager modules, ONNX sessions,
    TensorRT engines or compiled graphs: any callable with the stages' signatures).

    The glue between the stages computes what torchvision's RPN and RoI heads compute, with
    anchors made once and decoding, clipping and filtering done for the whole batch at once, where
    torchvision loops over images with a dozen small kernels each; only the proposals' NMS goes
    image by image."""

    def __init__(self, model: FasterRCNN, dense: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                 box: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 pad_rois_to: int | None = None):
        self.model, self.dense, self.box, self.device = model, dense, box, device
        self.resized_hw, self.padded_hw = model_input_geometry(model)
        # Static box graphs (CUDA graphs) need a fixed RoI count: pad with empty boxes, drop after.
        self.pad_rois_to = pad_rois_to
        self._anchors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pinned: dict[int, torch.Tensor] = {}

    def upload(self, fields: list[np.ndarray]) -> torch.Tensor:
        """Native-size HxWx3 fields -> [B, 3, H, W] uint8 on the device. On CUDA through a pinned
        host buffer kept per batch size: a copy from pageable memory is staged by the driver and
        blocks the host (4.0 ms of a 32-field batch's copies were pageable, profiled on an H200).
        Reusing the buffer is safe because every call ends by copying its results to the host,
        which waits for this upload too."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(fields)).permute(0, 3, 1, 2).contiguous()
        n = len(fields)
        if n not in self._pinned:
            self._pinned[n] = torch.empty((n, *NATIVE_HW, 3), dtype=torch.uint8, pin_memory=True)
        np.stack(fields, out=self._pinned[n].numpy())
        return self._pinned[n].to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()

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
        kept = nms_image_by_image(boxes, scores, levels, image, n, rpn.nms_thresh, rpn.post_nms_top_n())
        return [boxes[k] for k in kept]

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
        # The eager model's own last step (nms.py), for the whole batch at once.
        dets = self.model.roi_heads.postprocess_detections(logits[:r].float(), box_deltas[:r].float(), proposals,
                                                           [self.resized_hw] * n)
        counts = [len(s) for s in dets[1]]
        boxes, scores, labels = (torch.cat(t) for t in dets)
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
        for i, d in zip(idx, detector(detector.upload([images[i] for i in idx]))):
            out[i] = detections_to_tuples(d)
    with torch.inference_mode():
        for i, a in enumerate(images):
            if out[i] is None:
                out[i] = detections_to_tuples(model([image_to_input(a, device)])[0])
    return out  # type: ignore[return-value]
