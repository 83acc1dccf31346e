"""A CPU training smoke run: a few steps on two real images must lower the loss, and what it
writes must load back both as a training checkpoint and as an exported model."""

import json
import shutil

import numpy as np
import pytest
import torch

from bccd_batch.cli import cascade_thresholds, export_weights
from bccd_batch.datasets import load_training_data
from bccd_batch.model import ModelConfig, load_model, read_card
from bccd_batch.score import COUNT_THRESHOLDS
from bccd_batch.train import TrainConfig, train
from conftest import MODEL, cli


def _splits(tmp_path, val: str = "") -> tuple:
    """Split files of two BCCD training fields and `val` (stems), as `train --train-split` takes them."""
    (tmp_path / "two.txt").write_text("BloodImage_00000\nBloodImage_00001\n")
    (tmp_path / "val.txt").write_text(val)
    return tmp_path / "two.txt", tmp_path / "val.txt"


@pytest.fixture(scope="module")
def two(tmp_path_factory, bccd):
    """Two BCCD training fields and no val fields, as `train` reads them."""
    return load_training_data([bccd], *map(str, _splits(tmp_path_factory.mktemp("two"))), log=lambda m: None)


FINE_TUNE = TrainConfig(epochs=2, batch_size=2, lr=0.001, warmup_iters=1, workers=0, eval_every=8, amp=False)


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory, two) -> tuple:
    """(run folder, summary) of a two-epoch fine-tune of the shipped model on `two` stopped after its
    first step (= epoch): what --init, --resume and export-weights are tested on, trained once."""
    out = tmp_path_factory.mktemp("fine-tune")
    summary = train(two, out, FINE_TUNE, ModelConfig(), "cpu", init=MODEL, max_steps=1, log=lambda m: None)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    return out, summary


@pytest.mark.slow
def test_loss_falls_and_checkpoint_loads_back(tmp_path, bccd):
    cfg = TrainConfig(epochs=8, batch_size=2, lr=0.01, warmup_iters=2, workers=0, eval_every=8, amp=False)
    data = load_training_data([bccd], *map(str, _splits(tmp_path, "BloodImage_00003\n")), log=lambda m: None)
    summary = train(data, tmp_path / "run", cfg, ModelConfig.for_input_size(320), "cpu", log=lambda m: None)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses
    assert "val_AP" in summary["history"][-1]

    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["epoch"] == 8 and ck["step"] == 8
    export_weights([tmp_path / "run" / "best.pt"], tmp_path / "model", data="two BCCD images", train_split="two",
                   val_split="two")
    model, card = load_model(tmp_path / "model")
    assert card["training"]["data"] == "two BCCD images"
    run = card["training"]["config"]   # how the weights were trained, from the checkpoint itself
    assert (run["epochs"], run["batch_size"], run["lr"], run["train_images"], run["device"]) == (8, 2, 0.01, 2, "cpu")
    # The per-class count thresholds train chose for best.pt on its training fields.
    assert card["thresholds"]["count"] == summary["count_threshold"]
    assert set(summary["count_threshold"]) == {"RBC", "WBC", "Platelets"}
    assert all(t in COUNT_THRESHOLDS for t in summary["count_threshold"].values())
    assert card["threshold_choice"]["count"].startswith("per class, the score with the lowest per-image count MAE on the run's 2 training fields")
    with torch.no_grad():
        out = model([torch.rand(3, 480, 640)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_predictions_are_made_at_the_test_size_whatever_mode_the_model_was_built_in(two):
    """In-training evaluation and the count-threshold choice predict with a model built for training
    (its EMA copy): they must see fields at the test size, as `run` does, not the largest training size."""
    from bccd_batch.model import build_model
    from bccd_batch.train import DetectionDataset, predict

    model = build_model(ModelConfig.for_input_size(320))
    assert model.training and model.transform.min_size != (320,)
    ds = DetectionDataset(two.train[:1], train=False)
    sizes = []
    model.transform.register_forward_hook(lambda m, args, out: sizes.append(tuple(out[0].tensors.shape[-2:])))
    predict(model, ds, "cpu")
    assert model.transform.min_size == (320,) and min(sizes[0]) == 320


def test_each_field_gets_the_detections_it_gets_alone_whatever_its_batch(two):
    """`predict` (val figures, count thresholds) batches only fields of one size: a field padded to a
    taller neighbour's canvas gets other proposals and scores than `run` gives it alone."""
    import dataclasses

    from bccd_batch.train import DetectionDataset, predict

    model, _ = load_model(MODEL)
    big = two.train[0]
    # 420 high by 400 wide: resized to a 640-px short side it is 672 high, taller than the BCCD field's 640.
    tall = dataclasses.replace(two.train[1], key="tall", pixels=np.ascontiguousarray(two.train[1].pixels[:420, :400]))
    alone = {f.key: predict(model, DetectionDataset([f], train=False), "cpu")[f.key] for f in (big, tall)}
    together = predict(model, DetectionDataset([tall, big], train=False), "cpu", batch_size=2)
    assert together == alone and len(alone[big.key]) > 10


@pytest.mark.slow
def test_train_command_passes_its_options_to_the_run_and_the_card(tmp_path, bccd):
    """`bccd-batch train ... --export`: the options reach the run (lr scaled to the batch size) and
    the exported card says what they were."""
    split, val = _splits(tmp_path, "BloodImage_00003\n")
    cli("train", "--data", bccd, "--train-split", split, "--val-split", val, "--out", tmp_path / "run",
        "--epochs", 1, "--batch-size", 2, "--lr", 0.02, "--weight-decay", 1e-4, "--mosaic", 0, "--seed", 7,
        "--workers", 0, "--device", "cpu", "--input-size", 320, "--cascade", "0.6", "--backbone", "resnet18", "--export", tmp_path / "model", check_rc=0)
    card = read_card(tmp_path / "model")
    run = card["training"]["config"]
    assert (run["lr"], run["weight_decay"], run["mosaic"], run["seed"], run["val_images"]) == (0.0025, 1e-4, 0.0, 7, {"bccd": 1})
    arch = card["architecture"]
    assert (arch["test_min_size"], arch["cascade_ious"], arch["backbone"]) == (320, [0.6], "resnet18")
    assert cascade_thresholds("none") == cascade_thresholds("") == () and cascade_thresholds("0.6,0.75") == (0.6, 0.75)
    for option, bad, says in (("--cascade", "0.6,x", "--cascade takes IoU thresholds"), ("--cascade", "0.6,7", "--cascade takes"),
                              ("--backbone", "resnet99", "--backbone must be one of resnet18, resnet34, resnet50")):
        r = cli("train", "--data", bccd, "--out", tmp_path / "bad", option, bad, check_rc=2)
        assert says in r.stderr
    # An architecture option beside --init would be dropped: refused before any data is read.
    r = cli("train", "--data", tmp_path / "no-such-data", "--init", MODEL, "--cascade", "0.6,0.75", check_rc=2)
    assert "--init trains its weights' own network, so --cascade would be ignored" in r.stderr


def _knows_cells(step: dict) -> bool:
    """Whether a step's RPN objectness and first box head's classification losses are those of a
    trained network: a fresh one's sum to about 2.1 on these two fields, the shipped model's to 0.4
    (the total is no measure: a cascade adds its later heads' terms, and a fresh network, proposing
    few boxes on cells, has smaller box-regression terms than a trained one)."""
    return step["loss_objectness"] + step["loss_classifier"] < 0.5


def test_init_starts_from_a_model_folder(tmp_path, fine_tune):
    """--init: the shipped model's weights and architecture start the run, so its very first step
    already finds the cells."""
    run, summary = fine_tune
    assert _knows_cells(summary["history"][0]), summary["history"]
    saved = json.loads(torch.load(run / "last.pt", weights_only=True)["model_config"])
    assert ModelConfig.from_dict(saved) == ModelConfig.from_dict(read_card(MODEL)["architecture"])
    export_weights([run / "last.pt"], tmp_path / "model", data="two", train_split="two", val_split=None)
    card = read_card(tmp_path / "model")
    training = card["training"]
    assert training["config"]["init"]["sha256"] == read_card(MODEL)["weights"]["sha256"]
    assert card["thresholds"]["count"] == 0.5 and "threshold_choice" not in card   # chosen for best.pt only
    assert training["from_scratch"] is True   # the shipped model was, so a fine-tune of it is


@pytest.mark.slow
def test_resume_continues_the_run_where_its_last_checkpoint_left_it(tmp_path, two, fine_tune):
    """--resume: a run stopped after its first epoch goes on to the end of its schedule from last.pt,
    and still says what it started from."""
    shutil.copytree(fine_tune[0], tmp_path / "run")      # the shared run stays as the other tests read it
    logged = []
    summary = train(two, tmp_path / "run", FINE_TUNE, ModelConfig(), "cpu",
                    resume=tmp_path / "run" / "last.pt", log=logged.append)
    assert any("resumed from" in m and "epoch 1, step 1" in m for m in logged), logged
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and summary["steps"] == 2
    assert _knows_cells(summary["history"][1])   # the fine-tuned weights came back, not a fresh network
    export_weights([tmp_path / "run" / "last.pt"], tmp_path / "model", data="two", train_split="two", val_split=None)
    assert read_card(tmp_path / "model")["training"]["config"]["init"]["sha256"] == read_card(MODEL)["weights"]["sha256"]


def test_export_averages_runs_fine_tuned_from_one_model(tmp_path, two, fine_tune):
    """export-weights with several ingredients writes their mean (a model soup) and refuses
    ingredients of different architectures."""
    import typer

    tuned_run = fine_tune[0] / "last.pt"
    export_weights([MODEL, tuned_run], tmp_path / "soup", data="two", train_split="two", val_split=None)

    start, _ = load_model(MODEL)
    tuned = torch.load(tuned_run, weights_only=True)["ema"]
    soup, card = load_model(tmp_path / "soup")
    name = "roi_heads.box_predictor.cls_score.weight"   # a matrix: stored in fp16
    mean = (start.state_dict()[name] + tuned["module." + name]) / 2
    assert not torch.equal(start.state_dict()[name], tuned["module." + name])
    torch.testing.assert_close(soup.state_dict()[name], mean.half().float())
    assert card["training"]["averaged_weights_of"] == [str(MODEL), str(tuned_run)]
    # The runs averaged may have seen other fields: no training colours; a folder re-exported keeps its own.
    assert "colours" not in card
    export_weights([MODEL], tmp_path / "again", data="two", train_split="two", val_split=None)
    assert read_card(tmp_path / "again")["colours"] == read_card(MODEL)["colours"]

    other = tmp_path / "other"
    train(two, other, TrainConfig(epochs=1, batch_size=2, workers=0, amp=False),
          ModelConfig(), "cpu", max_steps=1, log=lambda m: None)
    with pytest.raises(typer.Exit):
        export_weights([MODEL, other / "last.pt"], tmp_path / "bad", data="two", train_split="two", val_split=None)
    assert not (tmp_path / "bad").exists()


def test_time_budget_fit_can_lengthen_the_run_up_to_epochs():
    from bccd_batch.train import fitted_epochs

    # After 3 slow warm-up epochs (4.3 s each) a 1,300 s budget looks like ~300 epochs ...
    first = fitted_epochs(1300, elapsed=13.0, per_epoch=4.3, done=3, cap=3000)
    assert first == 302
    # ... and after 20, at 2.6 s each, like ~500: the second fit lengthens the run, within the cap.
    assert fitted_epochs(1300, elapsed=57.2, per_epoch=2.6, done=20, cap=3000) == 497
    assert fitted_epochs(1300, elapsed=57.2, per_epoch=2.6, done=20, cap=400) == 400
    assert fitted_epochs(10, elapsed=57.2, per_epoch=2.6, done=20, cap=3000) == 21   # spent: one more epoch


def test_two_datasets_train_with_val_figures_per_source(tmp_path, bccd):
    """train --data txl_pbc --data bccd on a few fields (CPU smoke): BCCD's XML copy of a field that
    txl_pbc labels completely is dropped, and val is scored per source (txl_pbc's BCCD and PBC fields)."""
    txl = bccd.parent / "txl_pbc"
    (tmp_path / "t.txt").write_text("00565b1186cd5783a39283d119429a10.png\n023edb8ed3205da29377c5fb6a8a1edb.png\n"
                                    "BloodImage_00336\nBloodImage_00000\n")   # 00336: the same pixels as 023edb...
    (tmp_path / "v.txt").write_text("00fab69fff485b4f92f284d2a581d35d.png\n04ac2bddecd4555eb3714d75b1e5e760.png\n")
    data = load_training_data([txl, bccd], str(tmp_path / "t.txt"), str(tmp_path / "v.txt"), log=lambda m: None)
    assert sorted(f.key for f in data.train) == ["bccd/BloodImage_00000.jpg", "txl_pbc/00565b1186cd5783a39283d119429a10.png",
                                                 "txl_pbc/023edb8ed3205da29377c5fb6a8a1edb.png"]
    assert data.summary["bccd"]["duplicates_dropped"] == 1 and list(data.val_sources()) == ["txl_pbc/BCCD", "txl_pbc/PBC"]
    cfg = TrainConfig(epochs=1, batch_size=3, lr=0.001, warmup_iters=1, workers=0, eval_every=1, amp=False)
    summary = train(data, tmp_path / "run", cfg, ModelConfig.for_input_size(320), "cpu", max_steps=1, log=lambda m: None)
    last = summary["history"][-1]
    assert {"val_txl_pbc/BCCD_AP", "val_txl_pbc/PBC_AP", "val_AP"} <= set(last)
    assert last["val_AP"] == pytest.approx((last["val_txl_pbc/BCCD_AP"] + last["val_txl_pbc/PBC_AP"]) / 2)
    # Count thresholds on the first dataset's training fields, one BCCD and one PBC: each lab weighs the same.
    chosen = json.loads(torch.load(tmp_path / "run" / "best.pt", weights_only=True)["count_threshold"])
    assert {s: r["images"] for s, r in chosen["by_source"].items()} == {"txl_pbc/BCCD": 1, "txl_pbc/PBC": 1}
    export_weights([tmp_path / "run" / "best.pt"], tmp_path / "model", data="txl_pbc", train_split="t.txt", val_split="v.txt")
    card = read_card(tmp_path / "model")
    assert "averaged over the fields' sources with each weighing the same" in card["threshold_choice"]["count"]
    # The colours `run`'s second pass compares fields with: every training field's, per source.
    assert {s: c["fields"] for s, c in card["colours"].items()} == {"bccd": 1, "txl_pbc/BCCD": 1, "txl_pbc/PBC": 1}
