import json
import shutil

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from bccd_batch.backends.split import box_stages
from bccd_batch.model import (ClassBalancedSampler, ModelConfig, ModelError, build_model, load_model, read_card,
                              save_model)
from conftest import MODEL


def test_default_model_card_and_weights_agree():
    card = read_card(MODEL)
    model, _ = load_model(MODEL)
    assert card["classes"] == ["RBC", "WBC", "Platelets"]
    assert set(card["thresholds"]["count"]) == {"RBC", "WBC", "Platelets"}   # one count threshold per class
    assert all(0 < card["thresholds"]["detection"] < t < 1 for t in card["thresholds"]["count"].values())
    assert (MODEL / card["weights"]["file"]).stat().st_size <= 64 * 2**20
    assert not model.training


def test_tampered_weights_are_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODEL, d, ignore=shutil.ignore_patterns("__*"))
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ModelError, match="sha256"):
        load_model(d)


def test_card_pointing_outside_its_folder_is_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODEL, d, ignore=shutil.ignore_patterns("__*"))
    card = json.loads((d / "model.json").read_text())
    card["weights"]["file"] = "../model.safetensors"
    (d / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="outside"):
        load_model(d)


def test_save_load_round_trip_is_fp16_close(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg).eval()
    card = save_model(model, cfg, tmp_path, {"name": "untrained test placeholder"})
    loaded, card2 = load_model(tmp_path)
    assert card2["weights"]["sha256"] == card["weights"]["sha256"]
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a)


def test_input_size_scales_sizes_and_anchors_together():
    assert ModelConfig.for_input_size(480) == ModelConfig()
    cfg = ModelConfig.for_input_size(640, backbone="resnet34")
    assert cfg.backbone == "resnet34" and cfg.test_min_size == 640
    assert cfg.anchor_sizes[0] == (43, 60) and cfg.max_size == 1365
    assert min(cfg.train_min_sizes) == 512 and max(cfg.train_min_sizes) == 800
    assert all(s % 32 == 0 for s in cfg.train_min_sizes)


def test_cards_without_box_nms_mean_hard_nms():
    arch = ModelConfig().to_dict()
    del arch["box_nms"]
    assert ModelConfig.from_dict(arch).box_nms == "hard"
    with pytest.raises(ModelError, match="box_nms"):
        ModelConfig.from_dict({**arch, "box_nms": "soft"})


def test_cards_with_retired_architecture_keys_still_load():
    """Cards written while the stem and the box loss were options carry them at the values that are
    now the only ones; any other value is a network this version cannot build."""
    arch = ModelConfig().to_dict()
    assert ModelConfig.from_dict({**arch, "stem": "7x7", "box_loss": "smooth_l1"}) == ModelConfig()
    for key, value in (("stem", "deep"), ("box_loss", "giou")):
        with pytest.raises(ModelError, match=key):
            ModelConfig.from_dict({**arch, key: value})


def test_class_balanced_sampler_gives_the_rare_class_its_share():
    # One field's RoI labels: 300 RBC, 20 platelet positives, 600 negatives, 20 ignored (-1).
    labels = torch.tensor([1] * 300 + [3] * 20 + [0] * 600 + [-1] * 20)
    platelets = {"plain": [], "balanced": []}
    for seed in range(20):
        for name, sampler in (("plain", BalancedPositiveNegativeSampler(256, 0.25)), ("balanced", ClassBalancedSampler(256, 0.25))):
            torch.manual_seed(seed)
            pos, neg = (m[0].bool() for m in sampler([labels]))
            assert int(pos.sum()) == 64 and int(neg.sum()) == 192
            assert not (pos & (labels < 1)).any() and not (neg & (labels != 0)).any()
            platelets[name].append(int((pos & (labels == 3)).sum()))
    # In proportion to instances the platelets' expected share of 64 is 64 * 20 / 320 = 4; with equal
    # weights per class it is half the quota, capped by the 20 there are (measured: mean 18.2).
    assert sum(platelets["plain"]) / 20 < 6 and sum(platelets["balanced"]) / 20 > 15
    # Fewer positives than the quota: all of them, as torchvision does.
    few = torch.tensor([1] * 10 + [3] * 2 + [0] * 500)
    assert int(ClassBalancedSampler(256, 0.25)([few])[0][0].sum()) == 12


def _two_cells():
    return [torch.rand(3, 480, 640)], [{"boxes": torch.tensor([[101.3, 203.7, 151.9, 251.1], [400.2, 300.6, 431.4, 333.3]]),
                                        "labels": torch.tensor([1, 3])}]


def test_box_head_targets_are_float32_under_bf16_autocast():
    """torchvision matches ground truth in the proposals' dtype: with bfloat16 RPN outputs the box
    head's ground truth moved by up to 2 px and its targets were bfloat16."""
    torch.manual_seed(0)
    # Trained at half the field's size: the dtypes do not depend on it, and bf16 is slow on a CPU.
    model = build_model(ModelConfig(train_min_sizes=(240,))).train()
    seen = []
    sample = model.roi_heads.select_training_samples
    model.roi_heads.select_training_samples = lambda p, t: seen.append(sample(p, t)) or seen[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*_two_cells())
    proposals, _, _, targets = seen[0]
    assert proposals[0].dtype == targets[0].dtype == torch.float32


def test_cascade_of_identical_heads_without_box_deltas_is_the_one_head_model():
    """With every head a copy of the first and box deltas of zero, each head sees the same RoIs and
    gives the same probabilities, so the cascade (mean of heads, last head's boxes) must give the
    one-head model's detections: what is left to differ is the plumbing between the heads."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig())
    cascade = build_model(ModelConfig(cascade_ious=(0.6, 0.7)))
    assert [s.proposal_matcher.high_threshold for s in cascade.roi_heads.stages] == [0.6, 0.7]
    # The first head keeps its names: a one-head model's weights fill everything but the new heads.
    missing, unexpected = cascade.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("roi_heads.stages.") for k in missing)
    with torch.no_grad():
        for heads in (plain.roi_heads, cascade.roi_heads, *cascade.roi_heads.stages):
            heads.box_predictor.bbox_pred.weight.zero_()
            heads.box_predictor.bbox_pred.bias.zero_()
        for stage in cascade.roi_heads.stages:
            stage.box_head.load_state_dict(cascade.roi_heads.box_head.state_dict())
            stage.box_predictor.load_state_dict(cascade.roi_heads.box_predictor.state_dict())
        image = [torch.rand(3, 480, 640)]
        a, b = plain.eval()(image)[0], cascade.eval()(image)[0]
    assert len(a["boxes"]) > 0
    for k in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-4)


def test_cascade_trains_every_head_and_round_trips_through_its_card(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(cascade_ious=(0.6, 0.7))
    model = build_model(cfg).train()
    losses = model(*_two_cells())
    for stage in ("", "1", "2"):
        assert torch.isfinite(losses[f"loss_classifier{stage}"]) and torch.isfinite(losses[f"loss_box_reg{stage}"])
    save_model(model.eval(), cfg, tmp_path, {"name": "untrained test placeholder"})
    loaded, card = load_model(tmp_path)
    assert card["architecture"]["cascade_ious"] == [0.6, 0.7] and len(loaded.roi_heads.stages) == 2
    # The split engines (compiled, ONNX, TensorRT) get one box stage per head, in the order they run.
    stages = box_stages(loaded)
    assert [s.box_head for s in stages] == [loaded.roi_heads.box_head, *(h.box_head for h in loaded.roi_heads.stages)]


def test_ignore_regions_are_neither_cells_nor_background():
    """A teacher's box kept apart from the labels (IGNORE_LABEL): the anchors and RoIs on it are
    left out of both samples; a labelled cell's are positive, the rest background, as without it."""
    from bccd_batch.model import IGNORE_LABEL

    torch.manual_seed(0)
    model = build_model(ModelConfig(cascade_ious=(0.6,))).train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [100.0, 100.0, 150.0, 150.0]]),
                "labels": torch.tensor([1, IGNORE_LABEL])}]
    on_ignore, on_cell, elsewhere = [101.0, 101.0, 151.0, 151.0], [12.0, 12.0, 60.0, 60.0], [200.0, 10.0, 250.0, 60.0]
    boxes = [torch.tensor([on_ignore, on_cell, elsewhere])]
    rpn_labels, _ = model.rpn.assign_targets_to_anchors(boxes, targets)
    _, roi_labels = model.roi_heads.assign_targets_to_proposals(boxes, [targets[0]["boxes"]], [targets[0]["labels"]])
    assert rpn_labels[0].tolist() == [-1.0, 1.0, 0.0] and roi_labels[0].tolist() == [-1, 1, 0]
    # Without ignore regions the RPN is torchvision's: the same box is plain background.
    cell_only = [{"boxes": targets[0]["boxes"][:1], "labels": targets[0]["labels"][:1]}]
    assert model.rpn.assign_targets_to_anchors(boxes, cell_only)[0][0].tolist() == [0.0, 1.0, 0.0]
    losses = model([torch.rand(3, 240, 320)], targets)
    assert all(torch.isfinite(v) for v in losses.values())
