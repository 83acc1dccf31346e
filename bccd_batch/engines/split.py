"""The model split once for every fast backend.

Dense, static-shape graphs (what ONNX/TensorRT and torch.compile get):
  DenseStage: uint8 NCHW batch -> normalise -> backbone + FPN -> RPN head    (batch is the only dynamic axis)
  BoxStage:   RoI features [R, C, 7, 7] -> box head -> class logits, box deltas   (R = batch x proposals)
Data-dependent steps stay torchvision CUDA/CPU ops between them (`SplitDetector`): anchor decoding,
proposal top-k + NMS, MultiScaleRoIAlign and the final per-class NMS. They have no plugin-free
TensorRT form worth having (TensorRT's own NMS is slower than torchvision's, and its NMS/RoIAlign
plugins are deprecated), so no backend needs plugins.

The split computes exactly what the eager model computes for images of the native size; other
sizes (and portrait fields) go through the eager model, which resizes as it was trained to.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ..model import detections_to_tuples, image_to_input

NATIVE_HW = (480, 640)


class DenseStage(nn.Module):
    """Outputs, in order: the FPN maps the RoI pooler reads ('0', '1', '2'), then per level
    (including 'pool') the RPN objectness logits, then per level the RPN box deltas."""

    def __init__(self, model: FasterRCNN):
        super().__init__()
        t = model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, 3, 1, 1) * 255.0)
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images_u8.to(self.mean.dtype) - self.mean) / self.std
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
    TensorRT engines or compiled graphs: any callable with the stages' signatures)."""

    def __init__(self, model: FasterRCNN, dense: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                 box: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 pad_rois_to: int | None = None):
        self.model, self.dense, self.box, self.device = model, dense, box, device
        # Static box graphs (CUDA graphs) need a fixed RoI count: pad with empty boxes, drop after.
        self.pad_rois_to = pad_rois_to

    @torch.inference_mode()
    def __call__(self, batch_u8: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """batch_u8: [B, 3, 480, 640] uint8 on self.device."""
        m = self.model
        n, _, h, w = batch_u8.shape
        sizes = [(h, w)] * n
        outs = [o.float() for o in self.dense(batch_u8)]
        fpn, objectness, deltas = outs[:3], outs[3:7], outs[7:11]
        # The anchor generator only reads shapes, so a placeholder of the right size is enough.
        anchors = m.rpn.anchor_generator(ImageList(batch_u8, sizes), fpn + [objectness[3]])
        per_level = [o[0].numel() for o in objectness]
        obj, dl = concat_box_prediction_layers(objectness, deltas)
        proposals = m.rpn.box_coder.decode(dl, anchors).view(n, -1, 4)
        boxes, _ = m.rpn.filter_proposals(proposals, obj, sizes, per_level)
        roi = m.roi_heads.box_roi_pool(dict(zip("012", fpn)), boxes, sizes)
        r = roi.shape[0]
        if self.pad_rois_to is not None and r < self.pad_rois_to:
            roi = torch.cat([roi, roi.new_zeros((self.pad_rois_to - r, *roi.shape[1:]))])
        logits, box_deltas = self.box(roi)
        logits, box_deltas = logits[:r].float(), box_deltas[:r].float()
        b, s, lab = m.roi_heads.postprocess_detections(logits, box_deltas, boxes, sizes)
        return [{"boxes": bb, "scores": ss, "labels": ll} for bb, ss, ll in zip(b, s, lab)]


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
