"""The Faster R-CNN definition and its on-disk form (fp16 safetensors + model card JSON).

The architecture is described by `ModelConfig`, which is stored in the model card, so a card alone
rebuilds the exact network its weights belong to. Weights are only ever read with safetensors:
nothing under engines/ is unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.boxes import box_iou, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .card import CARD_NAME, WEIGHTS_NAME, ModelError, read_card, sha256_file
from .cells import CLASSES, arrays_to_tuples
from .nms import select_detections

BACKBONES = ("resnet18", "resnet34", "resnet50")


# The training-target label of an ignore region: a cell the field's labels leave out (a teacher's
# detection, complete.py) that counts neither as an object nor as background (IgnoreRegionsRPN, and
# torchvision's RoI matching, which gives a proposal the label of the box it overlaps most).
IGNORE_LABEL = -1


# Architecture keys older cards carry, at the value that is now the only one.
RETIRED = {"stem": "7x7", "box_loss": "smooth_l1"}


@dataclasses.dataclass
class ModelConfig:
    backbone: str = "resnet18"
    fpn_channels: int = 128
    # Two sizes per level: platelets (~35 px), RBC (~100 px) and WBC (120-290 px) each meet an
    # anchor with IoU > 0.7, which a single octave-spaced size per level does not give RBCs.
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32, 45), (64, 90), (128, 180), (256, 360))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    train_min_sizes: tuple[int, ...] = (384, 416, 448, 480, 512, 544, 576, 608)
    test_min_size: int = 480
    max_size: int = 1024
    image_mean: tuple[float, ...] = (0.66, 0.62, 0.70)
    image_std: tuple[float, ...] = (0.18, 0.22, 0.16)
    # Test-time proposals: 300 per level before NMS and 150 after gave the v2 model the same val AP
    # as 600/300 (0.6460 vs 0.6456) with half the box-head work.
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 150
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    box_head_convs: tuple[int, ...] = (128, 128)
    box_head_fc: int = 512
    box_batch_size_per_image: int = 256
    # Training only: give each class an equal expected share of the box head's positive RoIs
    # (`ClassBalancedSampler`) instead of shares in proportion to its instances (~20 RBCs to 1-2
    # platelets per field).
    box_class_balanced: bool = False
    # Cascade R-CNN (Cai and Vasconcelos, 2018): one more box head per IoU threshold here, each
    # trained on the boxes the head before it refined, matched at that threshold; at test time the
    # last head places the boxes and the class scores are the heads' mean. Empty: one box head.
    cascade_ious: tuple[float, ...] = ()
    # Duplicate removal within a class (nms.py): "matrix" (Gaussian Matrix NMS, sigma) or "hard"
    # (greedy NMS at box_nms_thresh). Cards written before this choice existed mean "hard".
    box_nms: str = "matrix"
    box_nms_sigma: float = 0.5
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    detection_threshold: float = 0.05

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys of options since retired, at the values that change nothing: cards that carry them load.
        d = {k: v for k, v in d.items() if RETIRED.get(k, object()) != v}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"model card architecture has unknown keys: {sorted(unknown)}")
        d = {"box_nms": "hard", **d}
        if d["box_nms"] not in ("hard", "matrix"):
            raise ModelError(f"model card box_nms must be 'hard' or 'matrix', not {d['box_nms']!r}")
        # JSON turns tuples into lists; the dataclass fields are tuples.
        return cls(**{k: _tuplify(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_input_size(cls, short_side: int, **kw: Any) -> "ModelConfig":
        """The defaults (made for fields resized to a 480-pixel short side) scaled to `short_side`:
        upsampling gives platelets (~35 px at 480) more feature-map cells, and scaling the anchors,
        training sizes and size cap with it keeps every cell type matched the same way."""
        base = cls()
        f = short_side / base.test_min_size
        return cls(
            test_min_size=short_side,
            train_min_sizes=tuple(sorted({int(round(s * f / 32)) * 32 for s in base.train_min_sizes})),
            anchor_sizes=tuple(tuple(int(round(a * f)) for a in lvl) for lvl in base.anchor_sizes),
            max_size=int(round(base.max_size * f)),
            **kw,
        )


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _backbone(cfg: ModelConfig) -> BackboneWithFPN:
    if cfg.backbone not in BACKBONES:
        raise ModelError(f"unsupported backbone {cfg.backbone!r}")
    # Trained from scratch, so every layer trains and uses real BatchNorm (torchvision's
    # detection default freezes BN, which only makes sense with ImageNet statistics).
    body = getattr(resnet, cfg.backbone)(weights=None, norm_layer=nn.BatchNorm2d)
    c = 1 if cfg.backbone != "resnet50" else 4
    return BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128 * c, 256 * c, 512 * c],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d,
    )


def build_model(cfg: ModelConfig) -> FasterRCNN:
    backbone = _backbone(cfg)
    anchors = AnchorGenerator(cfg.anchor_sizes, (cfg.aspect_ratios,) * len(cfg.anchor_sizes))
    rpn_head = Float32RPNHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0])
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=cfg.train_min_sizes,
        max_size=cfg.max_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_roi_pool=roi_pool,
        box_head=_box_head(cfg),
        box_predictor=FastRCNNPredictor(cfg.box_head_fc, len(CLASSES) + 1),
        box_score_thresh=cfg.detection_threshold,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
    )
    # FasterRCNN builds its RPN itself; the subclass only changes how training targets are assigned.
    model.rpn.__class__ = IgnoreRegionsRPN
    if cfg.cascade_ious:
        model.roi_heads = CascadeRoIHeads(model.roi_heads, cfg)
    if cfg.box_class_balanced:
        model.roi_heads.fg_bg_sampler = ClassBalancedSampler(cfg.box_batch_size_per_image, 0.25)
    # FasterRCNN builds its RoIHeads itself: keep torchvision's forward (a cascade has its own),
    # swap only its last step, so the eager model and the split engines share one post-processing
    # (nms.py). Bound to the (last head's) box coder, not the heads: a heads -> partial -> heads
    # cycle would keep a dropped model (and its GPU memory) alive until the cyclic GC happened to run.
    model.roi_heads.postprocess_detections = functools.partial(postprocess_detections, cfg, box_heads(model)[-1].box_coder)
    model.config = cfg  # what the split engines' own glue reads (NMS kind, thresholds)
    set_inference_size(model, cfg)
    return model


def box_heads(model: FasterRCNN) -> list[RoIHeads]:
    """The model's box heads in the order they run: its one head, or a cascade's first head and
    then its later stages (`CascadeRoIHeads`)."""
    return [model.roi_heads, *getattr(model.roi_heads, "stages", ())]


class Float32RPNHead(RPNHead):
    """RPNHead with float32 outputs under autocast. torchvision decodes the proposals in the dtype of
    the RPN's deltas and then converts the ground truth to the proposals' dtype to make the box
    head's regression targets: in bfloat16 (8 significant bits) that moved ground-truth edges by up
    to 2 px at training scales (4 px beyond 1,024) and computed the targets themselves in bfloat16.
    Outside autocast the outputs are float32 already and this changes nothing."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class IgnoreRegionsRPN(RegionProposalNetwork):
    """torchvision's RPN whose training targets may hold ignore regions (label IGNORE_LABEL): they
    are matched as no object, and an anchor that would be background but overlaps one as much as
    it would need to be left out next to a labelled cell (IoU >= the background threshold) is left
    out of the sample. Without ignore regions it is torchvision's RPN."""

    def assign_targets_to_anchors(self, anchors, targets):
        objects = [{"boxes": t["boxes"][t["labels"] != IGNORE_LABEL]} for t in targets]
        labels, matched = super().assign_targets_to_anchors(anchors, objects)
        for lab, a, t in zip(labels, anchors, targets):
            ignore = t["boxes"][t["labels"] == IGNORE_LABEL]
            if len(ignore):
                near = box_iou(a, ignore).amax(1) >= self.proposal_matcher.low_threshold
                lab[near & (lab == 0)] = -1.0
        return labels, matched


def _box_head(cfg: ModelConfig) -> FastRCNNConvFCHead:
    return FastRCNNConvFCHead((cfg.fpn_channels, 7, 7), list(cfg.box_head_convs), [cfg.box_head_fc], norm_layer=nn.BatchNorm2d)


class CascadeRoIHeads(RoIHeads):
    """torchvision's RoI heads (boxes only) followed by one more head per `cfg.cascade_ious`, each
    a RoIHeads of its own (head, predictor, matcher at its IoU threshold, box coder) that reads the
    RoI features of the boxes the head before it refined. The first head keeps its place and names,
    so its weights load into a one-head model as they are."""

    # Cascade R-CNN's settings: each later head's box deltas are smaller (its boxes start closer), so
    # their coding is scaled up to keep the regression targets' spread; its losses count less.
    STAGE_REG_WEIGHTS = ((20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0), (40.0, 40.0, 20.0, 20.0))
    STAGE_LOSS_WEIGHTS = (0.5, 0.25, 0.125)

    def __init__(self, first: RoIHeads, cfg: ModelConfig):
        # Every head samples and thresholds as the one FasterRCNN built; only the IoU and coding differ.
        quota, fraction = first.fg_bg_sampler.batch_size_per_image, first.fg_bg_sampler.positive_fraction
        after = (first.score_thresh, first.nms_thresh, first.detections_per_img)
        super().__init__(first.box_roi_pool, first.box_head, first.box_predictor, first.proposal_matcher.high_threshold,
                         first.proposal_matcher.low_threshold, quota, fraction, first.box_coder.weights, *after)
        if len(cfg.cascade_ious) > len(self.STAGE_REG_WEIGHTS):
            raise ModelError(f"at most {len(self.STAGE_REG_WEIGHTS)} cascade stages, not {len(cfg.cascade_ious)}")
        self.stages = nn.ModuleList(
            RoIHeads(first.box_roi_pool, _box_head(cfg), FastRCNNPredictor(cfg.box_head_fc, len(CLASSES) + 1),
                     iou, iou, quota, fraction, w, *after)
            for iou, w in zip(cfg.cascade_ious, self.STAGE_REG_WEIGHTS))

    def forward(self, features, proposals, image_shapes, targets=None):
        heads = [self, *self.stages]
        losses, probs = {}, []
        for k, h in enumerate(heads):
            if self.training:
                proposals, _, labels, regression_targets = h.select_training_samples(proposals, targets)
            logits, deltas = h.box_predictor(h.box_head(self.box_roi_pool(features, proposals, image_shapes)))
            if self.training:
                w = 1.0 if k == 0 else self.STAGE_LOSS_WEIGHTS[k - 1]
                cls_loss, box_loss = fastrcnn_loss(logits, deltas, labels, regression_targets)
                losses[f"loss_classifier{k or ''}"], losses[f"loss_box_reg{k or ''}"] = w * cls_loss, w * box_loss
            else:
                probs.append(torch.softmax(logits, -1))
            if k + 1 < len(heads):
                # The next head's proposals: each RoI's box for its class (the labelled class of a
                # positive in training, else the most likely foreground class), not learned through.
                cls = logits[:, 1:].argmax(1) + 1
                if self.training:
                    labelled = torch.cat(labels)
                    cls = torch.where(labelled > 0, labelled, cls)
                boxes = h.box_coder.decode(deltas.detach().float(), proposals)[torch.arange(len(cls)), cls]
                proposals = [clip_boxes_to_image(b, hw) for b, hw in zip(boxes.split([len(p) for p in proposals]), image_shapes)]
        if self.training:
            return [], losses
        # postprocess_detections takes logits: the log of the heads' mean probability is one whose
        # softmax is that mean.
        boxes, scores, labels = self.postprocess_detections(torch.stack(probs).mean(0).log(), deltas, proposals, image_shapes)
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)], {}


class ClassBalancedSampler(BalancedPositiveNegativeSampler):
    """torchvision's RoI sampler (same quota, same negatives) with the positives drawn without
    replacement with weight 1 / (that class's positives in the field), so each class gets an equal
    expected share of the quota while it has RoIs to give."""

    def __call__(self, labels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pos, neg = super().__call__(labels)
        for lab, mask in zip(labels, pos):
            positive = torch.where(lab >= 1)[0]
            k = int(mask.sum())
            if k == positive.numel():
                continue
            cls = lab[positive]
            weight = 1.0 / torch.bincount(cls)[cls].float()
            # Weighted sampling without replacement (Efraimidis and Spirakis): the k largest u^(1/w).
            keys = torch.rand(positive.numel(), device=lab.device).log() / weight
            mask.zero_()
            mask[positive[keys.topk(k).indices]] = 1
        return pos, neg


def postprocess_detections(cfg: ModelConfig, box_coder: BoxCoder, class_logits: torch.Tensor, box_regression: torch.Tensor,
                           proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]):
    """RoIHeads.postprocess_detections with the card's duplicate removal: per image lists of
    boxes, scores and labels, best first."""
    per_image = [len(p) for p in proposals]
    boxes = box_coder.decode(box_regression, proposals).split(per_image)
    boxes = [clip_boxes_to_image(b, hw)[:, 1:] for b, hw in zip(boxes, image_shapes)]
    scores = torch.softmax(class_logits, -1)[:, 1:].split(per_image)
    b, s, l, counts = select_detections(boxes, scores, cfg)
    return list(b.split(counts)), list(s.split(counts)), list(l.split(counts))


def set_inference_size(model: FasterRCNN, cfg: ModelConfig) -> None:
    """Eval mode resizes to the last of min_size; keep the training jitter list for train mode."""
    model.transform.min_size = cfg.train_min_sizes if model.training else (cfg.test_min_size,)


def field_to_device(field: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A field as a 3xHxW uint8 tensor on `device`: an HxWx3 host array is copied there, a field
    nvJPEG decoded there is kept."""
    return field.to(device) if isinstance(field, torch.Tensor) else torch.from_numpy(field).to(device).permute(2, 0, 1)


class Uploads:
    """Host fields (HxWx3 uint8, any sizes) -> 3xHxW uint8 views on `device`, a whole batch in one
    copy through a pinned staging buffer: a copy from pageable memory is staged by the driver and
    blocks the host (4.0 ms of a 32-field batch's copies were pageable, profiled on an H200). Two
    buffers taken in turn, each refilled only once its last copy has left it, so a batch is staged
    while the one before it is still on its way. One instance per thread that uploads."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event] | None] = [None, None]
        self._turn = 0

    def __call__(self, fields: list[np.ndarray]) -> list[torch.Tensor]:
        if self.device.type != "cuda" or not fields:
            return [torch.from_numpy(f).permute(2, 0, 1) for f in fields]
        ends = np.cumsum([0] + [f.size for f in fields]).tolist()
        slot, self._turn = self._turn, 1 - self._turn
        staged = self._staging[slot]
        if staged is not None:
            staged[1].synchronize()
        # Grown, never shrunk: bounded by the largest batch of the run.
        pinned = staged[0] if staged is not None and staged[0].numel() >= ends[-1] else \
            torch.empty(ends[-1], dtype=torch.uint8, pin_memory=True)
        host = pinned.numpy()
        for f, a, b in zip(fields, ends, ends[1:]):
            np.copyto(host[a:b].reshape(f.shape), f)
        with torch.cuda.device(self.device):
            flat = pinned[:ends[-1]].to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self._staging[slot] = (pinned, copied)
        return [flat[a:b].view(f.shape).permute(2, 0, 1) for f, a, b in zip(fields, ends, ends[1:])]


def indices_by_size(sizes: list[tuple[int, ...]]) -> list[list[int]]:
    """The positions of the fields of each size (sizes as shapes), sizes in order of first
    appearance: batch the eager model within a group only. It pads a batch to its largest field,
    and a field padded to a larger neighbour's canvas gets other proposals and scores than it gets
    alone (BCCD fields batched with PBC ones: 2 of 8 counted one RBC more at 0.40)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    return list(groups.values())


def image_to_input(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An HxWx3 uint8 field (or a 3xHxW one decoded on the device) as the float CHW tensor in
    [0, 1] that the eager model takes."""
    return field_to_device(image, device).float().div_(255)


@torch.inference_mode()
def detect_again(model: FasterRCNN, field: np.ndarray | torch.Tensor, device: torch.device | str, scale: float,
                 gains: tuple[float, float, float] | None = None, offsets: tuple[float, float, float] | None = None) -> list[tuple]:
    """One field through the eager model resized to `scale` times the size its transform gives it
    (cells `scale` times as large in the network's input) and, with `gains` and `offsets`, each colour
    channel's 8-bit levels x taken to x * gain + offset; detections in the field's own pixels."""
    t = model.transform
    sizes = t.min_size, t.max_size
    t.min_size, t.max_size = tuple(round(s * scale) for s in sizes[0]), round(sizes[1] * scale)
    try:
        x = image_to_input(field, device)
        if gains is not None:
            g, o = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1) for v in (gains, offsets))
            x = (x * g + o / 255).clamp_(0, 1)
        return detections_to_tuples(model([x])[0])
    finally:
        t.min_size, t.max_size = sizes


def detections_to_tuples(d: dict[str, torch.Tensor]) -> list[tuple]:
    """torchvision's output dict -> [(cls, score, x0, y0, x1, y1)], rounded to what the CSVs keep."""
    return arrays_to_tuples(d["boxes"].float().cpu().numpy(), d["scores"].float().cpu().numpy(), d["labels"].cpu().numpy())


def model_with_weights(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> FasterRCNN:
    """The network of `cfg` (on the CPU) holding the weights `state`, every one of them."""
    # Built on the meta device and given empty storage: the random initialisation, which the weights
    # overwrite, took 0.26-0.30 s of every worker's start on the 2-core CPU machine.
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"weights do not fit the card's architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def load_model(model_dir: Path) -> tuple[FasterRCNN, dict[str, Any]]:
    """Build the network from the card and load its weights after checking their sha256."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    weights_path = model_dir / card["weights"]["file"]
    if weights_path.parent.resolve() != model_dir.resolve():
        raise ModelError(f"model card names weights outside {model_dir}: {card['weights']['file']}")
    if not weights_path.is_file():
        raise ModelError(f"weights file missing: {weights_path}")
    digest = sha256_file(weights_path)
    if digest != card["weights"]["sha256"]:
        raise ModelError(
            f"weights {weights_path} have sha256 {digest[:16]}…, the model card expects "
            f"{card['weights']['sha256'][:16]}…: refusing to load"
        )
    cfg = ModelConfig.from_dict(card["architecture"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights_path).items()}
    model = model_with_weights(cfg, state)
    model.eval()
    set_inference_size(model, cfg)
    return model, card


def save_model(model: nn.Module, cfg: ModelConfig, model_dir: Path, card_extra: dict[str, Any]) -> dict[str, Any]:
    """Write the card and the weights: matrices and kernels in fp16, the small 1-D tensors (biases,
    BatchNorm statistics, whose variances can overflow fp16) in fp32. Returns the card."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() and v.ndim >= 2 else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    weights_path = model_dir / WEIGHTS_NAME
    tmp = weights_path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(weights_path)
    card = {
        "name": card_extra.pop("name", "bccd-frcnn"),
        "classes": list(CLASSES),
        "architecture": cfg.to_dict(),
        "input_size": [640, 480],
        "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(weights_path), "dtype": "float16 (>=2-D tensors), float32 (1-D)"},
        **card_extra,
    }
    card.setdefault("thresholds", {"detection": cfg.detection_threshold, "count": 0.5})
    tmp = model_dir / (CARD_NAME + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(model_dir / CARD_NAME)
    return card
