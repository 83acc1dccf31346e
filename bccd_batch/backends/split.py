"""The model split once for every fast backend.

Dense, static-shape graphs (what ONNX/TensorRT and torch.compile get):
  DenseStage: uint8 NCHW batch -> normalise -> backbone + FPN -> RPN head    (batch is the only dynamic axis)
  BoxStage:   RoI features [R, C, 7, 7] -> box head -> class logits, box deltas   (R = batch x proposals)
              (one per head: a Cascade R-CNN model has one for each of its heads)
The steps between them stay torchvision ops (`SplitDetector`): anchor decoding, proposal top-k and
NMS, RoIAlign (again before each later head of a cascade) and the final per-class NMS, written in
fixed shapes (padded slots, masks, the sync-free NMS of nms.py) so that a CUDA graph can hold a whole
batch. They have no plugin-free TensorRT form worth having (TensorRT's own NMS is slower than
torchvision's, and its NMS/RoIAlign plugins are deprecated), so no backend needs plugins.

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
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import roi_align
from torchvision.ops.boxes import clip_boxes_to_image
from torchvision.ops.poolers import _setup_scales

from ..cells import arrays_to_tuples
from ..model import Uploads, box_heads, detections_to_tuples, image_to_input
from ..nms import greedy_nms_keep, select_padded
from . import field_hw, one_ahead

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


def box_stage_names(model: FasterRCNN) -> list[str]:
    """File stems of the box stages' graphs and engines: "box", then "box1", "box2" for a cascade."""
    return ["box"] + [f"box{i}" for i in range(1, len(box_heads(model)))]


class BoxStage(nn.Module):
    def __init__(self, head: RoIHeads):
        super().__init__()
        self.box_head = head.box_head
        self.box_predictor = head.box_predictor

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box_predictor(self.box_head(roi_features))


def box_stages(model: FasterRCNN) -> list[BoxStage]:
    return [BoxStage(h) for h in box_heads(model)]


def dense_output_names(n_levels: int = 4) -> list[str]:
    return [f"fpn{i}" for i in range(3)] + [f"objectness{i}" for i in range(n_levels)] + [f"deltas{i}" for i in range(n_levels)]


def _decode(coder: BoxCoder, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """BoxCoder.decode_single, same arithmetic in the same order, but with its 0.5 as a Python
    number: torchvision makes it a device tensor on every call, a host-to-device copy that a CUDA
    graph cannot hold."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = coder.weights
    dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=coder.bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=coder.bbox_xform_clip)
    pred_ctr_x, pred_ctr_y = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    half_w, half_h = 0.5 * (torch.exp(dw) * widths[:, None]), 0.5 * (torch.exp(dh) * heights[:, None])
    return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2).flatten(1)


class SplitDetector:
    """Runs the split model with pluggable dense and box stages (eager modules, ONNX sessions,
    TensorRT engines or compiled graphs: any callable with the stages' signatures; one box stage
    per box head, in `box_heads` order).

    The glue between the stages computes what torchvision's RPN and RoI heads compute, in fixed
    shapes for the whole batch: every image gets exactly post_nms_top_n proposal slots (unused ones
    masked), RoIAlign reads every RoI's own level from one stack of the levels, and
    NMS is `nms.py`'s sync-free form. Nothing waits on the GPU until the one copy of the results, so
    with `cuda_graph` the whole batch, stages and glue, is one CUDA-graph replay; without it
    (TensorRT, CPU) the same code runs op by op."""

    # NMS rounds in the captured graph: the proposals of 127 BCCD fields (all of val, 40 of train)
    # needed at most 11 (measured on the CPU); a batch that needs more is redone without the graph.
    GRAPH_NMS_ROUNDS = 16

    def __init__(self, model: FasterRCNN, dense: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                 boxes: Sequence[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]], device: torch.device,
                 cuda_graph: bool = False):
        self.heads = box_heads(model)
        if len(boxes) != len(self.heads):
            raise ValueError(f"{len(boxes)} box stages for a model with {len(self.heads)} box heads")
        self.model, self.dense, self.boxes, self.device = model, dense, list(boxes), device
        self.resized_hw, self.padded_hw = model_input_geometry(model)
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self._anchors: dict[int, torch.Tensor] = {}
        self._uploads = Uploads(device)
        self._host_out: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._launches = 0
        self._graphs: dict[int, tuple] = {}
        self._slots: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pool_levels = None

    def upload(self, fields: list) -> torch.Tensor:
        """Native-size fields, on the host or on the device already (decoded there, or uploaded
        by the pipeline) -> [B, 3, H, W] uint8 on the device."""
        host = iter(self._uploads([f for f in fields if isinstance(f, np.ndarray)]))
        return torch.stack([next(host) if isinstance(f, np.ndarray) else f for f in fields])

    def launch(self, fields: list) -> Callable[[], list[list[tuple]]]:
        """Start a batch of native-size fields; calling the result waits for and returns its
        detections. With the CUDA graph it returns as soon as the work is queued, so the caller
        can stack and upload the next batch while the GPU runs this one (two batches in flight,
        each with its own pinned output buffers: collect a batch before launching the second
        after it). Without it the batch is done before it returns."""
        batch = self.upload(fields)
        if not self.cuda_graph:
            dets = self(batch)
            return lambda: dets
        slot = self._launches % 2
        self._launches += 1
        n = len(fields)
        # The engine's device made current: graph capture and events use the current device's
        # streams, and a worker on cuda:1 does not change which device is current.
        with torch.cuda.device(self.device), torch.inference_mode():
            static_in, (packed, converged), graph = self._graph(batch)
            static_in.copy_(batch)
            graph.replay()
            if (n, slot) not in self._host_out:
                self._host_out[n, slot] = (torch.empty(packed.shape, pin_memory=True), torch.empty(2, dtype=torch.bool, pin_memory=True))
            host_packed, host_converged = self._host_out[n, slot]
            host_packed.copy_(packed, non_blocking=True)
            host_converged.copy_(converged, non_blocking=True)
            done = torch.cuda.Event()
            done.record()

        def collect() -> list[list[tuple]]:
            done.synchronize()
            if bool(host_converged.all()):
                return _to_tuples(host_packed)
            return self(batch)    # NMS needed more rounds than the graph has: redo without it

        return collect

    def _batch_anchors(self, n: int, objectness: list[torch.Tensor]) -> torch.Tensor:
        """The batch's anchors: they depend only on the fixed geometry, so they are made once per
        batch size, not per batch, and kept: a captured CUDA graph reads them where they are."""
        if n not in self._anchors:
            # The anchor generator reads only shapes, device and dtype: the padded batch's shape as a
            # zero-stride view, and each level's grid from its (float32) objectness map.
            placeholder = objectness[0].new_empty(()).expand(n, 3, *self.padded_hw)
            anchors = self.model.rpn.anchor_generator(ImageList(placeholder, [self.resized_hw] * n), objectness)
            self._anchors[n] = torch.cat(anchors)
        return self._anchors[n]

    def _level_slots(self, per_level_top: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each level's top-k proposals sit in the concatenated [sum k] axis, as [L, k_max]
        (shorter levels padded, with a mask), so that NMS can run level by level in one batch."""
        key = tuple(per_level_top)
        if key not in self._slots:
            k_max, starts = max(key), np.cumsum((0,) + key[:-1])
            idx = torch.tensor([[s + min(j, k - 1) for j in range(k_max)] for s, k in zip(starts, key)], device=device)
            used = torch.tensor([[j < k for j in range(k_max)] for k in key], device=device)
            self._slots[key] = (idx, used)
        return self._slots[key]

    def _proposals(self, objectness, deltas, rounds):
        """RegionProposalNetwork.filter_proposals in fixed shapes: per-level top-k, clip, drop small
        and low boxes, NMS within each level, the best post_nms_top_n. Returns proposals [n, k, 4],
        which slots hold one [n, k], and whether the NMS converged."""
        rpn, n = self.model.rpn, objectness[0].shape[0]
        per_level = [o[0].numel() for o in objectness]
        obj, dl = concat_box_prediction_layers(objectness, deltas)
        anchors = self._batch_anchors(n, objectness)
        proposals = _decode(rpn.box_coder, dl, anchors).view(n, -1, 4)
        obj = obj.view(n, -1)
        # Per level, best first (topk sorts): NMS within a level needs no further sorting, and
        # levels never suppress each other, so each is its own [k, k] block, not one [Lk, Lk].
        top = rpn._get_top_n_idx(obj, per_level)
        slots, used = self._level_slots([min(rpn.pre_nms_top_n(), c) for c in per_level], obj.device)
        top = top[:, slots]                                                   # [n, L, k]
        rows = torch.arange(n, device=obj.device)[:, None, None]
        boxes = clip_boxes_to_image(proposals[rows, top], self.resized_hw)
        scores = torch.sigmoid(obj[rows, top])
        wh = boxes[..., 2:] - boxes[..., :2]
        ok = used & (wh >= rpn.min_size).all(-1) & (scores >= rpn.score_thresh)
        keep, converged = greedy_nms_keep(boxes, ok, rpn.nms_thresh, rounds=rounds)
        best, slot = torch.where(keep, scores, -1.0).view(n, -1).topk(min(rpn.post_nms_top_n(), keep[0].numel()), dim=1)
        return boxes.view(n, -1, 4).gather(1, slot[..., None].expand(-1, -1, 4)), best >= 0, converged

    def _roi_features(self, fpn: list[torch.Tensor], proposals: torch.Tensor) -> torch.Tensor:
        """MultiScaleRoIAlign without its data-dependent split by level, in one RoIAlign call: the
        levels are stacked along the batch axis (level l of image i at index l * n + i, each padded
        to the largest level's size) and every RoI, its box scaled to its own level, points at its
        own level's entry. The scales are powers of two, so the scaled boxes are exact. Padding a
        level with one copy of its last row and column makes a sample in its last cell interpolate
        between equal values, as RoIAlign's clamp at the edge of the level itself does; clipped
        proposals never sample beyond that. Aligning every RoI on every level instead took three
        RoIAligns, 2.0 ms per batch of 32 against 0.7 ms for this one (H100, profiled)."""
        pool = self.model.roi_heads.box_roi_pool
        if self._pool_levels is None:
            # Made on the warm-up runs: a tensor made during graph capture would be a host-to-device copy.
            scales, mapper = _setup_scales(fpn, [self.resized_hw], pool.canonical_scale, pool.canonical_level)
            self._pool_levels = torch.tensor(scales, device=proposals.device, dtype=proposals.dtype), mapper
        scales, mapper = self._pool_levels
        n, k, _ = proposals.shape
        flat = proposals.reshape(-1, 4)
        image = torch.arange(n, device=flat.device)[:, None].expand(n, k).reshape(-1)
        level = mapper([flat])
        scale = scales[level]
        rois = torch.cat([(level * n + image).to(flat.dtype)[:, None], flat * scale[:, None]], 1)
        # Filled straight from the dense stage's output (fp16 in the compiled engine): one pass
        # instead of a float32 copy and then a concatenation. Beyond each level's copied part the
        # stack is never read, so it is left unwritten.
        stacked = fpn[0].new_empty((len(fpn) * n, *fpn[0].shape[1:]), dtype=torch.float32)
        stacked[:n] = fpn[0]
        for lvl, f in enumerate(fpn[1:], 1):
            h, w = f.shape[-2:]
            stacked[lvl * n:(lvl + 1) * n, :, :h + 1, :w + 1] = F.pad(f, (0, 1, 0, 1), mode="replicate")
        return roi_align(stacked, rois, pool.output_size, 1.0, pool.sampling_ratio)

    def _forward(self, batch_u8: torch.Tensor, rounds: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (detections [B, k, 7]: x0, y0, x1, y1 in field pixels, score, label, kept; converged [2])."""
        n, _, h, w = batch_u8.shape
        outs = self.dense(batch_u8)
        fpn, objectness, deltas = outs[:3], [o.float() for o in outs[3:7]], [o.float() for o in outs[7:11]]
        rois, slot_used, props_converged = self._proposals(objectness, deltas, rounds)
        k = rois.shape[1]
        probs = []
        # As CascadeRoIHeads.forward at test time (a one-head model is its first pass): each head
        # reads the RoIs the head before it refined, each RoI's box for its most likely foreground
        # class; the scores are the heads' mean probabilities, the boxes the last head's.
        for i, (box, head) in enumerate(zip(self.boxes, self.heads)):
            logits, box_deltas = box(self._roi_features(fpn, rois))
            probs.append(torch.softmax(logits.float(), -1))
            boxes = _decode(head.box_coder, box_deltas.float(), rois.reshape(-1, 4)).reshape(n * k, -1, 4)
            boxes = clip_boxes_to_image(boxes, self.resized_hw)
            if i + 1 < len(self.heads):
                rois = boxes[torch.arange(n * k, device=boxes.device), logits[:, 1:].argmax(1) + 1].view(n, k, 4)
        boxes = boxes[:, 1:].reshape(n, k, -1, 4)
        scores = torch.stack(probs).mean(0)[:, 1:].reshape(n, k, -1)
        b, s, l, kept, dets_converged = select_padded(boxes, scores, slot_used, self.model.config, rounds)
        # Back to the field's pixels with torchvision's float32 ratios (original / resized, per
        # axis), as Python scalars: a tensor made here would be a host-to-device copy in the graph.
        rh, rw = (float(np.float32(o) / np.float32(r)) for o, r in zip((h, w), self.resized_hw))
        b = torch.stack([b[..., 0] * rw, b[..., 1] * rh, b[..., 2] * rw, b[..., 3] * rh], -1)
        packed = torch.cat([b, s[..., None], l[..., None].to(b.dtype), kept[..., None].to(b.dtype)], -1)
        return packed, torch.stack([props_converged, dets_converged])

    def _graph(self, batch_u8: torch.Tensor):
        """(input buffer, output buffers, graph) for this batch shape, captured on first use after
        warm-up runs (which also compile any torch.compile'd stage)."""
        n = batch_u8.shape[0]
        if n not in self._graphs:
            static_in = batch_u8.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._forward(static_in, self.GRAPH_NMS_ROUNDS)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the pipeline's other threads (decode, store) may call CUDA meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self._forward(static_in, self.GRAPH_NMS_ROUNDS)
            self._graphs[n] = (static_in, static_out, graph)
        return self._graphs[n]

    @torch.inference_mode()
    def __call__(self, batch_u8: torch.Tensor) -> list[list[tuple]]:
        """batch_u8: [B, 3, 480, 640] uint8 on self.device -> per field its detection tuples, op by
        op (no CUDA graph), NMS iterated until it settles."""
        return _to_tuples(self._forward(batch_u8, None)[0].cpu())


def _to_tuples(packed: torch.Tensor) -> list[list[tuple]]:
    return [arrays_to_tuples(d[:, :4], d[:, 4], d[:, 5]) for d in (d[d[:, 6] > 0] for d in packed.numpy())]


def infer_split(detector: SplitDetector, model: FasterRCNN, images: list, device: torch.device,
                batch_size: int) -> list[list[tuple]]:
    """Native-size fields through the split model in batches, the next one launched before the
    last is collected; any other size through the eager model."""
    out: list[list[tuple] | None] = [None] * len(images)
    native = [i for i, a in enumerate(images) if field_hw(a) == NATIVE_HW]
    chunks = (native[k:k + batch_size] for k in range(0, len(native), batch_size))
    launched = ((idx, detector.launch([images[i] for i in idx])) for idx in chunks)
    for idx, dets in one_ahead(launched, lambda item: (item[0], item[1]())):
        for i, d in zip(idx, dets):
            out[i] = d
    with torch.inference_mode():
        for i, a in enumerate(images):
            if out[i] is None:
                out[i] = detections_to_tuples(model([image_to_input(a, device)])[0])
    return out  # type: ignore[return-value]
