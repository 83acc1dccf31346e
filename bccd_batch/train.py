"""Train the Faster R-CNN from scratch: dataset, one-epoch loop, evaluation, checkpoints.

Recipe (from-scratch detection needs these, see He et al., "Rethinking ImageNet Pre-training"):
trainable BatchNorm everywhere, strong augmentation, a long cosine schedule with warm-up, and an
exponential moving average of the weights, which is what gets evaluated and exported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import transforms as T
from .cells import CLASSES
from .datasets import Field, TrainingData
from .progress import Progress
from .quality import colour_reference
from .model import (IGNORE_LABEL, ModelConfig, build_model, detections_to_tuples, indices_by_size, load_model,
                    model_with_weights, set_inference_size)
from .score import COCOEvaluator, choose_count_threshold, evaluate_all


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 16
    lr: float = 0.03
    weight_decay: float = 4e-5
    warmup_iters: int = 300
    ema_decay: float = 0.998
    eval_every: int = 10
    workers: int = 8
    seed: int = 0
    amp: bool = True
    mosaic: float = 0.0           # probability that a training sample is a 2x2 mosaic of four fields
    copy_paste: float = 0.0       # probability that platelets from other fields are pasted into a sample
    stain: float = 0.0            # probability of a stain jitter (transforms.stain_jitter) per sample
    orient: float = 0.5           # probability of each flip and of the 90° rotation per sample
    # NHWC on CUDA: bf16 convolutions run on tensor cores without a layout transpose around each.
    channels_last: bool = True
    # Seconds for the whole run: after 3 and again after 20 epochs the epoch count is set to what
    # fits (never above `epochs`), so the cosine schedule still ends at its floor when the time is up.
    time_budget: float | None = None


# Epochs (counted from the start or resume) after which the epoch count is fitted to the time
# budget: early, from that epoch's time, so a short run is not planned far too long; again once
# warm-up is over, from the mean since: on an H100 epochs 4-300 took 2.6 s each against 4.3 s for
# the third, and a run fitted at 3 epochs alone used 774 s of a 1,300 s budget.
FIT_AFTER = (3, 20)


def fitted_epochs(budget: float, elapsed: float, per_epoch: float, done: int, cap: int) -> int:
    """The epoch count that ends a run near `budget` seconds: `done` epochs in `elapsed` seconds so
    far, `per_epoch` seconds for each further one, at most `cap`, and at least one more."""
    return max(done + 1, min(cap, done + int((budget - elapsed) / per_epoch)))


class DetectionDataset(torch.utils.data.Dataset):
    """Fields decoded once (datasets.load_training_data) held as tensors; augmentation per access."""

    def __init__(self, fields: list[Field], train: bool, mosaic: float = 0.0, copy_paste: float = 0.0, stain: float = 0.0,
                 orient: float = 0.5):
        self.train, self.mosaic, self.copy_paste, self.stain, self.orient, self.items = train, mosaic, copy_paste, stain, orient, []
        self.records = {f.key: f.record for f in fields}
        self.sources = {f.key: f.source for f in fields}
        for f in fields:
            img = torch.from_numpy(f.pixels).permute(2, 0, 1).contiguous()
            # Ignore regions travel with the labels through every augmentation, told apart by their label.
            ignore = f.record.get("ignore", []) if train else []
            boxes = torch.tensor([b[1:] for b in f.record["boxes"]] + [list(b) for b in ignore], dtype=torch.float32).reshape(-1, 4)
            cls = torch.tensor([CLASSES.index(b[0]) + 1 for b in f.record["boxes"]] + [IGNORE_LABEL] * len(ignore), dtype=torch.int64)
            self.items.append((f.key, img, boxes, cls))
        paste = {CLASSES.index("Platelets") + 1}
        self.paste_bank = [c for it in self.items for c in T.cell_crops(*it[1:], paste)] if copy_paste else []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, img, boxes, labels = self.items[i]
        if self.train:
            # The module-level generator: DataLoader seeds it per worker from the run's seed, and
            # (unlike a generator built from the epoch number) it keeps advancing in persistent workers.
            if random.random() < self.mosaic:
                others = [self.items[random.randrange(len(self.items))] for _ in range(3)]
                img, boxes, labels = T.mosaic([(img, boxes, labels)] + [o[1:] for o in others], random)
            if self.copy_paste and random.random() < self.copy_paste:   # no draw when off: same stream as before
                img, boxes, labels = T.paste_cells(img, boxes, labels, self.paste_bank, random)
            img, boxes, labels = T.augment(img, boxes, labels, random, self.orient)
            if self.stain and random.random() < self.stain:
                img = T.stain_jitter(img, random)
        return img, {"boxes": boxes, "labels": labels, "key": key}


def collate(batch):
    return tuple(zip(*batch))


def _to_float(img: torch.Tensor, device) -> torch.Tensor:
    return img.to(device, non_blocking=True).float().div_(255)


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_iters:
        return cfg.lr * (0.001 + 0.999 * step / cfg.warmup_iters)
    t = (step - cfg.warmup_iters) / max(1, total - cfg.warmup_iters)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def predict(model, dataset: DetectionDataset, device, batch_size: int = 8) -> dict[str, list[tuple]]:
    """Detections of every field of `dataset` at the model's test size, as `run` makes them. A model
    built for training (or its EMA copy) keeps the training sizes, whose largest eval mode would use."""
    model.eval()
    set_inference_size(model, model.config)
    # Fields of one size per batch: thresholds chosen here must see the detections `run` counts.
    out: dict[str, list[tuple]] = {}
    for idx in indices_by_size([it[1].shape for it in dataset.items]):
        for i in range(0, len(idx), batch_size):
            chunk = [dataset.items[k] for k in idx[i:i + batch_size]]
            dets = model([_to_float(it[1], device) for it in chunk])
            for it, d in zip(chunk, dets):
                out[it[0]] = detections_to_tuples(d)
    return out


def labelled_predictions(model, dataset: DetectionDataset, device) -> tuple[dict, dict]:
    """(labels, detections) of every field of `dataset`, keyed alike, as the evaluators take them."""
    return dataset.records, predict(model, dataset, device)


def evaluate(model, val_sets: dict[str, DetectionDataset], device) -> dict[str, dict]:
    """COCO figures per val source, and under "mean" the mean of each figure over the sources: what
    the best checkpoint is chosen by, so a model must serve every source, not the largest."""
    per_source = {}
    for source, ds in val_sets.items():
        per_source[source] = evaluate_all({"coco": COCOEvaluator()}, *labelled_predictions(model, ds, device))["coco"]
    names = next(iter(per_source.values()))["stats"]
    # A figure a source has none of (COCO's -1: no small boxes, say) is left out of its mean.
    mean = {k: [c["stats"][k] for c in per_source.values() if c["stats"][k] > -1] for k in names}
    return {**per_source, "mean": {"stats": {k: float(np.mean(v)) if v else -1.0 for k, v in mean.items()}}}


def checkpoint_weights(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """The architecture and weights of a training checkpoint (its EMA where it has one, as
    last.pt does; best.pt holds the EMA already) or of a model folder such as engines/, and what
    a checkpoint records of its run (epoch, val metrics, training config, the count threshold
    chosen for best.pt and its training fields' colours: None in checkpoints written without them;
    nothing for a folder)."""
    path = Path(path)
    if path.is_dir():
        model, card = load_model(path)
        return ModelConfig.from_dict(card["architecture"]), model.state_dict(), {}
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return (*_checkpoint_model(ck),
            {"epoch": ck.get("epoch"), "val": ck.get("val", {}), "config": json.loads(ck.get("train_config", "null")),
             "count_threshold": json.loads(ck.get("count_threshold", "null")), "colours": json.loads(ck.get("colours", "null"))})


def _checkpoint_model(ck: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A loaded checkpoint's architecture and weights: its EMA where it has one."""
    state = ck["ema"] if "ema" in ck else ck["model"]
    return (ModelConfig.from_dict(json.loads(ck["model_config"])),
            {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"})


def averaged_weights(paths: list[Path]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A uniform "model soup" (Wortsman et al., 2022): the mean of the weights of runs fine-tuned
    from one starting point, which stay in one basin, so their average is a model of its own and
    costs nothing extra at inference. BatchNorm statistics are averaged like the weights; integer
    buffers (BatchNorm's step counts) are the first ingredient's."""
    cfg, total, _ = checkpoint_weights(paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in total.items()}
    for path in paths[1:]:
        other_cfg, state, _ = checkpoint_weights(path)
        if other_cfg != cfg:
            raise ValueError(f"{path}: architecture differs from {paths[0]}'s, cannot average their weights")
        for k, v in state.items():
            if v.is_floating_point():
                total[k] += v.double()
    return cfg, {k: (v / len(paths)).float() if v.is_floating_point() else v for k, v in total.items()}


def _summary_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard not installed: no event files written", file=sys.stderr)
        return None
    return SummaryWriter(str(out_dir / "tb"))


def train(data: TrainingData, out_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, device: str,
          resume: Path | None = None, init: Path | None = None, max_steps: int | None = None, log=print) -> dict:
    """Train; writes out_dir/{last,best}.pt and history.json. Returns a summary dict. `init`: a
    model folder whose weights (and card architecture) to start from, on a fresh schedule. The
    best checkpoint is the one with the highest val AP averaged over the val sources."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    use_amp = cfg.amp and dev.type == "cuda"
    if dev.type == "cuda":
        # Multi-scale training gives hundreds of input shapes; cudnn autotuning each one made
        # training 10x slower on an H100 (measured), so leave it off.
        torch.backends.cudnn.benchmark = False

    train_ds = DetectionDataset(data.train, train=True, mosaic=cfg.mosaic, copy_paste=cfg.copy_paste, stain=cfg.stain,
                                orient=cfg.orient)
    val_sets = {source: DetectionDataset(fields, train=False) for source, fields in data.val_sources().items()}
    for w in data.warnings:
        log(f"warning: {w}")
    if len(train_ds) == 0:
        raise ValueError("no usable training images")

    ck = torch.load(resume, map_location=dev, weights_only=True) if resume else None
    if ck is not None:
        # The checkpoint's architecture wins: resuming with other --backbone/--input-size flags
        # would otherwise fail to load, or train a different network than the one saved.
        model_cfg = ModelConfig.from_dict(json.loads(ck["model_config"]))
        model = model_with_weights(model_cfg, ck["model"])
        # A resumed run started from whatever its first part started from.
        init_record = json.loads(ck.get("train_config", "{}")).get("init")
    elif init is not None:
        model, card = load_model(init)
        model_cfg = ModelConfig.from_dict(card["architecture"])
        init_record = {"model": str(init), "name": card.get("name"), "sha256": card["weights"]["sha256"],
                       "from_scratch": card.get("training", {}).get("from_scratch")}
        log(f"starting from the weights in {init}")
    else:
        model, init_record = build_model(model_cfg), None
    model = model.to(dev)
    if cfg.channels_last and dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    run_record = {"train_images": len(train_ds), "val_images": {k: len(v) for k, v in val_sets.items()},
                  "datasets": data.summary,
                  "init": init_record,
                  "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                  "torch": torch.__version__}

    def described() -> dict:
        """What every checkpoint says of its run, so an exported card records how its weights were
        trained (TrainConfig at save time: the epoch count a time budget fitted, the scaled lr)."""
        return {"model_config": json.dumps(model_cfg.to_dict()),
                "train_config": json.dumps({**dataclasses.asdict(cfg), **run_record})}

    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    start_epoch, step, best_ap, history, bad_steps = 0, 0, -1.0, [], 0
    if ck is not None:
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, step, best_ap, history = ck["epoch"], ck["step"], ck["best_ap"], json.loads(ck["history"])
        log(f"resumed from {resume} at epoch {start_epoch}, step {step}")

    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
        num_workers=cfg.workers, collate_fn=collate, pin_memory=dev.type == "cuda",
        persistent_workers=cfg.workers > 0, generator=torch.Generator().manual_seed(cfg.seed + start_epoch),
    )
    writer = _summary_writer(out_dir)
    t_start = time.monotonic()
    max_epochs, last_fit = cfg.epochs, None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        set_inference_size(model, model_cfg)
        prog = Progress(len(loader), f"epoch {epoch + 1}/{cfg.epochs}")
        t0, n_img, sums = time.monotonic(), 0, {}
        for images, targets in loader:
            lr = lr_at(step, total_steps, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            images = [_to_float(im, dev) for im in images]
            targets = [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                # One bad batch early in from-scratch training should not end an hour-long run;
                # a run that keeps diverging should.
                bad_steps += 1
                log(f"warning: non-finite loss at step {step}, batch skipped ({bad_steps} so far)")
                if bad_steps > 20:
                    raise FloatingPointError(f"loss non-finite {bad_steps} times by step {step}: lower --lr")
                step += 1
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            ema.update_parameters(model)
            step += 1
            n_img += len(images)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            prog.update(1, loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
            if writer and step % 10 == 0:
                writer.add_scalar("train/lr", lr, step)
                for k, v in losses.items():
                    writer.add_scalar(f"train/{k}", v.item(), step)
            if max_steps is not None and step >= max_steps:
                break
        prog.close()
        n_steps = max(1, prog.n)
        rec = {"epoch": epoch + 1, "step": step, "images_per_s": n_img / (time.monotonic() - t0),
               **{k: v / n_steps for k, v in sums.items()}}
        last_epoch = epoch + 1 == cfg.epochs or (max_steps is not None and step >= max_steps)
        fit_budget = cfg.time_budget is not None and epoch + 1 - start_epoch in FIT_AFTER and not last_epoch
        eval_now = bool(val_sets) and ((epoch + 1) % cfg.eval_every == 0 or last_epoch or fit_budget)
        train_seconds = time.monotonic() - t0
        if eval_now:
            t_eval = time.monotonic()
            coco = evaluate(ema.module, val_sets, dev)
            eval_seconds = time.monotonic() - t_eval
            rec.update({f"val_{k}": v for k, v in coco["mean"]["stats"].items()})
            for source, c in coco.items():
                if source != "mean" and len(val_sets) > 1:
                    rec.update({f"val_{source}_{k}": c["stats"][k] for k in ("AP", "AP50")})
                rec.update({f"val_{'' if len(val_sets) == 1 else source + '_'}AP50_{cls}": v["AP50"]
                            for cls, v in c.get("per_class", {}).items()})
            if writer:
                for source, c in coco.items():
                    for k, v in c["stats"].items():
                        writer.add_scalar(f"val/{k}" if source == "mean" else f"val_{source}/{k}", v, step)
            if coco["mean"]["stats"]["AP"] > best_ap:
                best_ap = coco["mean"]["stats"]["AP"]
                val_record = {source: c["stats"] for source, c in coco.items()} if len(val_sets) > 1 else coco["mean"]["stats"]
                torch.save({"model": ema.module.state_dict(), "epoch": epoch + 1, "val": val_record, **described()},
                           out_dir / "best.pt")
        if fit_budget:
            now = time.monotonic()
            if last_fit is None:
                per_epoch = train_seconds + (eval_seconds / cfg.eval_every if val_sets else 0.0)
            else:
                per_epoch = (now - last_fit[1]) / (epoch + 1 - last_fit[0])
            last_fit = (epoch + 1, now)
            cfg.epochs = fitted_epochs(cfg.time_budget, now - t_start, per_epoch, epoch + 1, max_epochs)
            total_steps = cfg.epochs * steps_per_epoch
            log(f"time budget {cfg.time_budget:.0f}s: {per_epoch:.2f}s per epoch, training for {cfg.epochs} epochs")
        history.append(rec)
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))
        if eval_now or last_epoch:  # a 185 MB checkpoint every 2-second epoch would cost 15% of the run
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch + 1, "step": step, "best_ap": best_ap, "history": json.dumps(history),
                        **described()}, out_dir / "last.pt.tmp")
            (out_dir / "last.pt.tmp").replace(out_dir / "last.pt")
        if last_epoch:
            break
    if writer:
        writer.close()
    if not (out_dir / "best.pt").exists():
        torch.save({"model": ema.module.state_dict(), "epoch": history[-1]["epoch"], "val": {}, **described()},
                   out_dir / "best.pt")
    first = next(iter(data.summary))
    # The first dataset's training fields (the most complete labels); all of them where it has none.
    reference = DetectionDataset([f for f in data.train if f.key.split("/", 1)[0] == first] or data.train, train=False)
    chosen = choose_count_threshold_for(out_dir / "best.pt", reference, dev,
                                        colour_reference((f.source, f.pixels) for f in data.train))
    averaged = f" averaged over {', '.join(chosen['by_source'])}" if "by_source" in chosen else ""
    log(f"count thresholds {chosen['count']}: per-image count MAE {chosen['MAE']}{averaged} on {chosen['images']} "
        f"training fields of {first}")
    return {"best_val_AP": best_ap, "epochs": history[-1]["epoch"], "steps": step, "count_threshold": chosen["count"],
            "train_seconds": time.monotonic() - t_start, "history": history}


def choose_count_thresholds(model, fields: DetectionDataset, device) -> dict:
    """The per-class count thresholds of `model` on `fields` (training fields with complete labels:
    thresholds fitted to val would be tuned to the fields they are reported on), each of their
    sources weighing the same."""
    model.to(device)
    return choose_count_threshold(*labelled_predictions(model, fields, device), sources=fields.sources)


def choose_count_threshold_for(checkpoint: Path, fields: DetectionDataset, device, colours: dict | None = None) -> dict:
    """`choose_count_thresholds` for a checkpoint's weights, recorded in the checkpoint with the
    training fields' `colours` (quality.colour_reference), where export-weights finds them for the card."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg, state = _checkpoint_model(ck)
    model = model_with_weights(cfg, state)
    chosen = choose_count_thresholds(model, fields, device)
    ck["count_threshold"] = json.dumps(chosen)
    if colours is not None:
        ck["colours"] = json.dumps(colours)
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(ck, tmp)
    tmp.replace(checkpoint)
    return chosen
