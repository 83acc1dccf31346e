"""The `bccd-batch` command line: typed functions, one per command."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__

app = typer.Typer(add_completion=False, rich_markup_mode=None, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Count RBC, WBC and platelets in folders of blood-smear images, score and report.")

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "bccd"
EXECUTORS = ("local", "ray")     # `run --executor`, `bench --executors`


def default_model_dir() -> Path:
    """engines/ of the source tree, installed as the package `bccd_batch.default_model`."""
    from importlib.resources import files

    return Path(str(files("bccd_batch.default_model")))


# `run --labels` and `score` take the same option.
Bootstrap = Annotated[int, typer.Option(min=0, help="Resamples of the scored fields for 95% intervals of AP and AP50 "
                                                      "(~6 s for 292 fields on 2 CPU cores); 0: none.")]


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"bccd-batch: {msg}", err=True)
    return typer.Exit(code)


def cascade_thresholds(spec: str) -> tuple[float, ...]:
    """`train --cascade`: the later box heads' IoU thresholds, comma-separated; 'none' or nothing: one head."""
    try:
        ious = tuple(float(t) for t in spec.split(",")) if spec.lower() not in ("none", "") else ()
        valid = all(0 < t < 1 for t in ious)
    except ValueError:
        valid = False
    if not valid:
        raise _fail(f"--cascade takes IoU thresholds between 0 and 1 separated by commas, not {spec!r}")
    return ious


def _one_device(spec: str) -> str:
    """A one-device command's --device, parsed as `run` parses it (a GPU asked for where there is none:
    the CPU, said once), before any work, so a typo costs nothing."""
    from .backends import EngineError
    from .workers import parse_devices

    try:
        devices = parse_devices(spec, log=lambda m: typer.echo(m, err=True))
    except EngineError as e:
        raise _fail(str(e))
    if len(devices) != 1:
        raise _fail(f"--device {spec}: this command runs on one device")
    return devices[0]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bccd-batch {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit.")) -> None:
    pass


@app.command()
def train(
    ctx: typer.Context,
    data: list[Path] = typer.Option([DEFAULT_DATA], envvar="BCCD_DATA",
                                    help="A labelled dataset (VOC root, YOLO folder or data.yaml, CSV, COCO JSON; images of "
                                         "CSV/COCO beside the file); repeat for several, the most completely labelled first."),
    train_split: str = typer.Option("train", help="Each dataset's split list of this name, or a file of image names."),
    val_split: str = typer.Option("val", help="As --train-split, for the val fields; a dataset without it gives --val-fraction."),
    val_fraction: float = typer.Option(0.2, min=0.0, max=0.9, help="Seeded share of val fields of a dataset without a val split list."),
    pseudo_labels: str = typer.Option("labels", help="A complete-labels dataset's teacher boxes (its pseudo.csv): 'labels' "
                                                     "trains on them as cells, 'ignore' as regions neither cell nor background."),
    out: Path = typer.Option(Path("train-out"), help="Checkpoints, history.json and TensorBoard events."),
    epochs: int = typer.Option(200, min=1),
    batch_size: int = typer.Option(16, min=1),
    lr: float = typer.Option(0.03, help="Peak learning rate for batch 16 (scaled linearly with --batch-size)."),
    weight_decay: float = typer.Option(4e-5, min=0.0, help="L2 weight decay on weights of two or more dimensions (none on biases and norms)."),
    workers: int = typer.Option(8, min=0),
    eval_every: int = typer.Option(10, min=1, help="Evaluate on the val split every N epochs."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="cuda, cpu or auto."),
    # The defaults are the embedded model's recipe (engines/model.json), so a plain `train` redoes it.
    backbone: str = typer.Option("resnet34", help="resnet18, resnet34 or resnet50."),
    mosaic: float = typer.Option(0.5, min=0.0, max=1.0, help="Probability of a 2x2 mosaic of four training fields per sample."),
    copy_paste: float = typer.Option(0.0, min=0.0, max=1.0, help="Probability of pasting platelets from other fields into a training sample."),
    stain_jitter: float = typer.Option(0.0, min=0.0, max=1.0, help="Probability of scaling each colour's optical density (another lab's staining) per sample."),
    flip_rotate: float = typer.Option(0.5, min=0.0, max=1.0, help="Probability of each of the horizontal flip, vertical flip and 90-degree "
                                                                    "rotation per sample; 0 keeps fields as labelled (a labelling's fixed "
                                                                    "offsets can then be learned)."),
    balance_roi_classes: bool = typer.Option(False, help="Equal share of the box head's positive RoIs per class (not in proportion to instances)."),
    cascade: str = typer.Option("0.6,0.7", help="IoU thresholds of the box heads after the first (Cascade R-CNN), comma-separated; 'none' for one box head."),
    channels_last: bool = typer.Option(True, help="NHWC weights and activations on CUDA."),
    input_size: int = typer.Option(640, min=256, help="Short side fields are resized to at test time (training jitters around it)."),
    resume: Optional[Path] = typer.Option(None, help="Continue from OUT/last.pt of an earlier run."),
    init: Optional[Path] = typer.Option(None, help="Start from a model folder's weights and architecture (e.g. engines) on a fresh schedule."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N steps (smoke runs)."),
    time_budget: Optional[float] = typer.Option(None, help="Seconds for the run; the epoch count (at most --epochs) is fitted to it after 3 and 20 epochs."),
    export: Optional[Path] = typer.Option(None, help="Also write the best weights + model card to this folder."),
) -> None:
    """Train the Faster R-CNN from scratch (AMP on CUDA) on one or more datasets, keeping the best
    checkpoint by val AP averaged over the val sources, and choose its per-class count thresholds on
    the first dataset's training fields by per-image count error, each of its sources weighing the same."""
    from .datasets import PSEUDO_USES, load_training_data
    from .labels import LabelError

    # Options checked before torch is imported (~4 s on a 2-core CPU machine): a typo costs nothing.
    cascade_ious = cascade_thresholds(cascade)
    if pseudo_labels not in PSEUDO_USES:
        raise _fail(f"--pseudo-labels must be one of {', '.join(PSEUDO_USES)}, not {pseudo_labels!r}")
    # The network --init or --resume load is the one their weights were trained as: an architecture
    # option beside them would otherwise be dropped without a word.
    given = [f"--{n.replace('_', '-')}" for n in ("backbone", "balance_roi_classes", "cascade", "input_size")
             if ctx.get_parameter_source(n).name != "DEFAULT"]
    if given and (init or resume):
        raise _fail(f"--{'init' if init else 'resume'} trains its weights' own network, so {', '.join(given)} "
                    f"would be ignored: leave {'it' if len(given) == 1 else 'them'} out")

    import torch

    from .model import BACKBONES, ModelConfig
    from .train import TrainConfig, train as run_training

    if backbone not in BACKBONES:
        raise _fail(f"--backbone must be one of {', '.join(BACKBONES)}, not {backbone!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    try:
        training_data = load_training_data(data, train_split, val_split, val_fraction, seed, pseudo_labels, log=log)
    except LabelError as e:
        raise _fail(str(e))
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr * batch_size / 16, weight_decay=weight_decay, workers=workers,
                      eval_every=eval_every, seed=seed, time_budget=time_budget, mosaic=mosaic,
                      copy_paste=copy_paste, stain=stain_jitter, orient=flip_rotate, channels_last=channels_last)
    model_cfg = ModelConfig.for_input_size(input_size, backbone=backbone, box_class_balanced=balance_roi_classes,
                                           cascade_ious=cascade_ious)
    typer.echo(f"training on {len(training_data.train)} fields ({device}), validating on "
               f"{ {k: len(v) for k, v in training_data.val_sources().items()} }", err=True)
    summary = run_training(training_data, out, cfg, model_cfg, device, resume=resume, init=init, max_steps=max_steps, log=log)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    if export:
        export_weights([out / "best.pt"], export, data=", ".join(map(str, data)), train_split=train_split, val_split=val_split)


@app.command("complete-labels")
def complete_labels_cmd(
    data: Path = typer.Argument(..., metavar="DATA", help="Dataset whose labels leave cells out (VOC root, YOLO folder, CSV or COCO JSON)."),
    reference: Path = typer.Option(..., help="Complete labels of some of DATA's fields (matched by pixels), to choose the teacher's thresholds on."),
    out: Path = typer.Option(..., help="YOLO folder to write (labels/, splits/, pseudo.csv; images/ links to DATA's)."),
    model: Optional[Path] = typer.Option(None, envvar="BCCD_BATCH_MODEL", help="Teacher model folder; default: the embedded model."),
    split: str = typer.Option("train", help="Split of DATA to complete ('all' for every field)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
) -> None:
    """Add a teacher's detections to fields whose labels leave cells out, for `train --data`."""
    from .complete import complete_labels
    from .labels import LabelError
    from .card import ModelError

    device = _one_device(device)
    try:
        chosen = complete_labels(data, reference, model or default_model_dir(), out, None if split == "all" else split,
                                 device, log=lambda m: typer.echo(m, err=True))
    except (LabelError, ModelError, KeyError, ValueError) as e:
        raise _fail(str(e))
    typer.echo(json.dumps(chosen, indent=1))


@app.command()
def calibrate(
    labels: Path = typer.Argument(..., metavar="LABELS", help="Your lab's fields with every cell labelled (VOC, YOLO folder or data.yaml, CSV or COCO JSON)."),
    out: Path = typer.Option(..., help="Folder for the calibrated model: the same weights, a card with your count thresholds."),
    model: Optional[Path] = typer.Option(None, envvar="BCCD_BATCH_MODEL", help="Model folder to calibrate; default: the embedded model."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
) -> None:
    """Choose each class's count threshold on your own labelled fields, so counts follow your lab's
    fields; then `run --model OUT` (or BCCD_BATCH_MODEL=OUT). Prints the count errors on those fields
    before and after."""
    from .calibrate import calibrate as calibrate_model
    from .cells import class_threshold
    from .labels import LabelError
    from .card import ModelError

    device = _one_device(device)
    try:
        record = calibrate_model(labels, model or default_model_dir(), out, device, log=lambda m: typer.echo(m, err=True))
    except (LabelError, ModelError, ValueError, OSError) as e:
        raise _fail(str(e))
    typer.echo(f"count MAE / bias per field on your {record['fields']} fields at the model's thresholds; at thresholds "
               "chosen on the other fields (cross-validated: what to expect on new fields); at the thresholds kept "
               "(in-sample). A class keeps the model's threshold unless the cross-validated error is lower.")
    for c, b in record["before"].items():
        x, a = record["cross_validated"][c], record["after"][c]
        typer.echo(f"  {c}: threshold {class_threshold(record['thresholds_before'], c):g} -> {record['thresholds'][c]:g}; "
                   f"{b['MAE']:.2f} / {b['bias']:+.2f}; {x['MAE']:.2f} / {x['bias']:+.2f}; {a['MAE']:.2f} / {a['bias']:+.2f}")
    typer.echo(f"wrote {out}: count with `run --model {out}`")


@app.command("export-weights")
def export_weights(
    checkpoints: list[Path] = typer.Argument(..., metavar="CHECKPOINTS", help="best.pt or last.pt from `bccd-batch train`, or model folders; several are averaged (a uniform model soup)."),
    out: Path = typer.Option(Path("engines"), help="Folder for model.safetensors and model.json."),
    data: str = typer.Option("BCCD train split", help="Training data, recorded in the card."),
    train_split: str = typer.Option("train"),
    val_split: Optional[str] = typer.Option("val"),
    # Annotated, so that a direct call (tests, train --export) gets None rather than typer's OptionInfo.
    thresholds_on: Annotated[Optional[Path], typer.Option(help="Choose the per-class count thresholds on this dataset's "
                                                          "--train-split fields (complete labels) instead of taking train's, "
                                                          "and take the training labs' colours (`run`'s second pass) from them.")] = None,
) -> None:
    """Write fp16 safetensors weights and a model card from a training checkpoint, or from the
    average of several runs fine-tuned from one model (`train --init`)."""
    from .card import ModelError, read_card
    from .model import model_with_weights, save_model
    from .train import averaged_weights, checkpoint_weights

    one_checkpoint = len(checkpoints) == 1 and checkpoints[0].is_file()
    one_folder = len(checkpoints) == 1 and checkpoints[0].is_dir()
    try:
        if one_checkpoint:
            cfg, state, record = checkpoint_weights(checkpoints[0])
        else:
            cfg, state = averaged_weights(checkpoints)
        training = {"data": data, "train_split": train_split, "val_split": val_split, "from_scratch": True}
        if one_folder:   # the same weights, new thresholds: the card keeps how they were trained
            folder_card = read_card(checkpoints[0])
            training = folder_card["training"]
    except (ModelError, ValueError, OSError) as e:
        raise _fail(str(e))
    model = model_with_weights(cfg, state)
    if one_checkpoint:
        hist_path = checkpoints[0].parent / "history.json"
        history = json.loads(hist_path.read_text()) if hist_path.is_file() else None
        training.update(epoch=record["epoch"], epochs_run=history[-1]["epoch"] if history else None,
                        config=record["config"])
        init = (record["config"] or {}).get("init")
        if init is not None:   # a fine-tune is from scratch only if what it started from was
            training["from_scratch"] = init["from_scratch"] is True
        metrics = {"val_during_training": record["val"]}
    else:
        if not one_folder:
            training["averaged_weights_of"] = [str(c) for c in checkpoints]
        metrics = {}
    extra = {"training": training, "metrics": metrics}
    chosen = record["count_threshold"] if one_checkpoint else None
    # The training fields' colours (`run`'s second pass); none for a soup, whose runs may have seen other fields.
    colours = record["colours"] if one_checkpoint else folder_card.get("colours") if one_folder else None
    where = "the run's {} training fields of its first dataset, chosen by `bccd-batch train`"
    if thresholds_on is not None:
        from .datasets import load_training_data
        from .labels import LabelError
        from .quality import colour_reference
        from .train import DetectionDataset, choose_count_thresholds

        try:
            fields = load_training_data([thresholds_on], train_split, val_split or "val", log=lambda m: typer.echo(m, err=True))
        except LabelError as e:
            raise _fail(str(e))
        chosen = choose_count_thresholds(model, DetectionDataset(fields.train, train=False), "cpu")
        colours = colour_reference((f.source, f.pixels) for f in fields.train)
        where = f"the {{}} {train_split} fields of {thresholds_on}, chosen by `bccd-batch export-weights --thresholds-on`"
    if chosen is not None:
        extra["thresholds"] = {"detection": cfg.detection_threshold, "count": chosen["count"]}
        sources = chosen.get("by_source") or {}
        averaged = ", averaged over the fields' sources with each weighing the same," if sources else ""
        extra["threshold_choice"] = {"count": (
            f"per class, the score with the lowest per-image count MAE{averaged} on {where.format(chosen['images'])} (MAE "
            + ", ".join(f"{c} {v:.3f}" for c, v in chosen["MAE"].items()) + ", bias "
            + ", ".join(f"{c} {v:+.3f}" for c, v in chosen["bias"].items())
            + "".join(f"; {s}, {r['images']} fields: bias " + ", ".join(f"{c} {v:+.3f}" for c, v in r["bias"].items())
                      for s, r in sources.items()) + ") for these weights")}
    else:
        typer.echo("no count thresholds were chosen for these weights (only `train`'s best.pt has them): the card "
                   "says 0.5", err=True)
    if colours:
        extra["colours"] = colours
    else:
        typer.echo("no training colours were recorded for these weights: `run` counts fields of another stain once", err=True)
    card = save_model(model, cfg, out, extra)
    typer.echo(f"wrote {out / card['weights']['file']} (sha256 {card['weights']['sha256'][:16]}…) and {out / 'model.json'}")


@app.command()
def run(
    slides: Path = typer.Argument(..., metavar="SLIDES", help="Folder of slides: each first-level subfolder is one slide."),
    out: Path = typer.Option(Path("results"), "--out", "-o", envvar="BCCD_BATCH_OUT", help="Results root kept across nights."),
    labels: Optional[Path] = typer.Option(None, help="Also score against these labels (VOC, YOLO folder or data.yaml, CSV or COCO JSON)."),
    bootstrap: Bootstrap = 200,
    model: Optional[Path] = typer.Option(None, envvar="BCCD_BATCH_MODEL", help="Model folder (model.json + weights); default: the embedded model."),
    engine: str = typer.Option("auto", envvar="BCCD_BATCH_ENGINE", help="auto, torch, compiled (CUDA) or tensorrt (CUDA, built engine)."),
    device: str = typer.Option("auto", "--device", "--devices", envvar="BCCD_BATCH_DEVICE",
                               help="auto, cpu, cuda, cuda:N, a list (cuda:0,cuda:1) or all; each gets --workers-per-device worker processes."),
    batch_size: int = typer.Option(8, min=1, help="Images per inference batch."),
    full: bool = typer.Option(False, "--full", help="Reprocess every image, not only new or changed ones."),
    decode_workers: Optional[int] = typer.Option(None, min=1, envvar="BCCD_BATCH_DECODE_WORKERS",
                                                 help="Threads that read, hash and decode images, per worker (default: three quarters of the cores shared over the workers, 2 to 8)."),
    workers_per_device: Optional[int] = typer.Option(None, min=1, envvar="BCCD_BATCH_WORKERS_PER_DEVICE",
                                                     help="Worker processes per device; default 3 per GPU, 1 on the CPU."),
    precision: str = typer.Option("fp16", envvar="BCCD_BATCH_PRECISION",
                                  help="GPU engines: fp16, or fp32 for per-image counts identical to eager torch "
                                       "at ~70% of fp16's speed (docs/gpu-engines.md)."),
    mps: bool = typer.Option(True, envvar="BCCD_BATCH_MPS",
                             help="Workers sharing a GPU run under CUDA MPS (an operator's daemon, else one started for the run)."),
    gpu_decode: bool = typer.Option(True, envvar="BCCD_BATCH_GPU_DECODE",
                                    help="Engines on a GPU get plain JPEGs decoded there by nvJPEG, in batches; other files on the CPU."),
    platelet_factor: Optional[float] = typer.Option(None, envvar="BCCD_BATCH_PLATELET_FACTOR",
                                                    help="The lab's calibration: platelet estimate per mean platelet per field "
                                                         "(docs/report.md; no default: calibrate against your analyser)."),
    wbc_factor: Optional[float] = typer.Option(None, envvar="BCCD_BATCH_WBC_FACTOR",
                                               help="As --platelet-factor, for the WBC estimate (only for fields not chosen around WBCs)."),
    keep_runs: Optional[int] = typer.Option(None, min=1, envvar="BCCD_BATCH_KEEP_RUNS",
                                            help="Once a run finishes, delete the folders of all but the newest N runs "
                                                 "(the store and index.html keep their counts); default: keep all."),
    executor: str = typer.Option("local", envvar="BCCD_BATCH_EXECUTOR",
                                 help="local (this host's worker processes) or ray (a Ray cluster; docs/ray.md)."),
    ray_address: Optional[str] = typer.Option(None, envvar="BCCD_BATCH_RAY_ADDRESS",
                                              help="With --executor ray: auto, ray://HOST:10001, or none for RAY_ADDRESS or a local cluster."),
) -> None:
    """Detect and count cells in every new or changed image under SLIDES; write OUT/runs/<UTC time>/.

    Exit codes: 0 all images processed, 3 some inputs unreadable (see errors.csv), 66 no image file
    under SLIDES at all, 2 usage or configuration error, 75 another run holds OUT's lock, 130/143
    interrupted, 74 results could not be written (disk full, quota, file size limit), 1 unexpected failure.
    """
    if not slides.is_dir():
        raise _fail(f"slides folder not found: {slides}")
    if labels is not None and not labels.exists():
        raise _fail(f"labels path not found: {labels}")
    for name, factor in (("--platelet-factor", platelet_factor), ("--wbc-factor", wbc_factor)):
        if factor is not None and not factor > 0:
            raise _fail(f"{name} must be a positive number, not {factor}")
    if executor not in EXECUTORS:
        raise _fail(f"--executor must be local or ray, not {executor!r}")
    if executor == "ray":
        _need_ray()
    # After the checks above: these import torch (3-4 s), which a mistyped cron line need not wait for.
    from .backends import EngineError
    from .labels import LabelError
    from .card import ModelError
    from .pipeline import EXIT_LOCKED, LockedError, RunOptions, run as run_pipeline
    from .store import StoreError

    opts = RunOptions(slides=slides, out=out, model_dir=model or default_model_dir(), engine=engine, device=device,
                      batch_size=batch_size, full=full, decode_workers=decode_workers,
                      workers_per_device=workers_per_device, precision=precision, mps=mps, gpu_decode=gpu_decode,
                      keep_runs=keep_runs, executor=executor, ray_address=ray_address,
                      estimate_factors={c: f for c, f in (("Platelets", platelet_factor), ("WBC", wbc_factor)) if f})
    try:
        result = run_pipeline(opts, log=lambda m: typer.echo(m, err=True))
    except LockedError as e:
        raise _fail(f"{e}; exiting", EXIT_LOCKED)
    except (EngineError, ModelError, StoreError) as e:
        raise _fail(str(e))
    code = result.exit_code
    if labels is not None and result.info["status"] == "finished":
        try:
            _score_run(out, result.name, labels, bootstrap)
        except LabelError as e:
            raise _fail(str(e))
    report = _render(out, result.name)
    n = result.info["images"]
    typer.echo(f"report: {report}", err=True)
    typer.echo(f"{result.info['status']}: {n['new']} new, {n['skipped']} unchanged, {n['failed']} failed "
               f"({result.info['images_per_s']} inferred/s) -> {result.run_dir}", err=True)
    typer.echo(str(result.run_dir))
    raise typer.Exit(code)


def _score_run(out: Path, run_name: str, labels: Path, resamples: int) -> dict:
    from .score import score_run

    metrics = score_run(out, run_name, labels, resamples)
    s, ci = metrics["coco"]["stats"], metrics["coco"].get("intervals")
    gaps = len(metrics["label_gaps"]["fields"])
    typer.echo(f"scored {metrics['n_images_scored']} labelled images: AP {s['AP']:.3f}, AP50 {s['AP50']:.3f}"
               + (f" (95% over fields: {ci['AP'][0]:.3f}-{ci['AP'][1]:.3f}, {ci['AP50'][0]:.3f}-{ci['AP50'][1]:.3f})" if ci else "")
               + (f"; {gaps} whose labels may omit a class (the report names them)" if gaps else ""), err=True)
    if metrics["processed_later"]:
        typer.echo(f"note: {metrics['processed_later']} of {run_name}'s fields were processed again by a later run; "
                   "they were scored on that run's result", err=True)
    return metrics


def _render(out: Path, run_name: str) -> Path:
    import time

    from .report import render_run

    t0 = time.monotonic()
    path = render_run(out, run_name)
    typer.echo(f"rendered {path} ({path.stat().st_size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s)", err=True)
    return path


@app.command()
def report(
    run_name: str = typer.Argument("latest", metavar="RUN", help="Run folder name under OUT/runs, or 'latest'."),
    out: Path = typer.Option(Path("results"), "--out", "-o", envvar="BCCD_BATCH_OUT"),
) -> None:
    """(Re)render OUT/runs/RUN/report.html and OUT/index.html from the store."""
    from .score import resolve_run_name
    from .store import StoreError

    try:
        typer.echo(str(_render(out, resolve_run_name(out, run_name))))
    except (FileNotFoundError, StoreError) as e:
        raise _fail(str(e))


@app.command()
def score(
    run_name: str = typer.Argument("latest", metavar="RUN", help="Run folder name under OUT/runs, or 'latest'."),
    labels: Path = typer.Option(..., help="VOC, YOLO folder or data.yaml, CSV or COCO JSON."),
    bootstrap: Bootstrap = 200,
    out: Path = typer.Option(Path("results"), "--out", "-o", envvar="BCCD_BATCH_OUT"),
) -> None:
    """Score a finished run against labels with pycocotools; writes metrics.json in the run folder."""
    from .labels import LabelError
    from .score import resolve_run_name
    from .store import StoreError

    try:
        name = resolve_run_name(out, run_name)
        _score_run(out, name, labels, bootstrap)
        _render(out, name)
    except (LabelError, FileNotFoundError, StoreError) as e:
        raise _fail(str(e))


@app.command()
def info(model: Optional[Path] = typer.Option(None, envvar="BCCD_BATCH_MODEL")) -> None:
    """Versions, devices, which engines can run here and why not, and the default model card."""
    import platform

    import torch
    import torchvision

    from .card import ModelError, read_card

    lines = [f"bccd-batch {__version__}", f"python {platform.python_version()}",
             f"torch {torch.__version__}, torchvision {torchvision.__version__}"]
    if torch.cuda.is_available():
        lines += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    else:
        lines.append("CUDA: not available (engine 'torch' runs on the CPU)")
    lines.append("engine torch (eager, CPU and CUDA): available")
    lines.append("engine compiled (torch.compile + CUDA graphs, fp16): " +
                 ("available" if torch.cuda.is_available() else "not available: needs a CUDA GPU"))
    try:
        import tensorrt

        lines.append(f"engine tensorrt: tensorrt {tensorrt.__version__} imports; build with `bccd-batch build-engine`")
    except ImportError:
        lines.append("engine tensorrt: not available: the tensorrt package is not installed")
    model_dir = model or default_model_dir()
    try:
        card = read_card(model_dir)
        lines.append(f"model: {model_dir} sha256 {card['weights']['sha256'][:16]}… thresholds {card['thresholds']}")
        lines.append(json.dumps(card.get("metrics", {}), indent=1))
    except ModelError as e:
        lines.append(f"model: unusable: {e}")
    typer.echo("\n".join(lines))


@app.command("build-engine")
def build_engine(
    backend: str = typer.Option("tensorrt", help="tensorrt or compiled."),
    precision: str = typer.Option("fp16", help="fp16 or fp32."),
    max_batch: int = typer.Option(32, min=1),
    model: Optional[Path] = typer.Option(None, envvar="BCCD_BATCH_MODEL"),
) -> None:
    """Build (and cache per GPU, backend version, model sha256, precision, batch range) a GPU engine."""
    from .backends import EngineError

    model_dir = model or default_model_dir()
    try:
        if backend == "tensorrt":
            from .backends.tensorrt import build_all, engine_cache_root
            from .model import load_model

            m, card = load_model(model_dir)
            manifest = build_all(m, card["weights"]["sha256"], engine_cache_root(), precision, max_batch)
            typer.echo(json.dumps(manifest))
        elif backend == "compiled":
            from .backends.split_engine import SplitEngine

            eng = SplitEngine(model_dir, "cuda", max_batch, "compiled", precision)
            eng.warm_up()
            typer.echo(f"compiled {eng.name} for batch {max_batch} (torch.compile caches it for this process' "
                       "inductor cache)")
        else:
            raise _fail(f"unknown backend {backend!r} (tensorrt or compiled)")
    except EngineError as e:
        raise _fail(str(e))


@app.command()
def bench(
    images: int = typer.Option(10_000, min=1, help="Copies of BCCD images (distinct names) to run end to end."),
    data: Path = typer.Option(DEFAULT_DATA, envvar="BCCD_DATA"),
    device: str = typer.Option("auto"),
    engines: str = typer.Option("torch:8,compiled:32,tensorrt:32", help="engine:batch pairs, comma-separated."),
    devices: list[str] = typer.Option([], help="Also run the last engine end to end on these devices (cuda:0,cuda:1 or all); repeatable."),
    model: Optional[Path] = typer.Option(None, envvar="BCCD_BATCH_MODEL"),
    decode_workers: Optional[int] = typer.Option(None, min=1, help="Decode threads per worker, as `run --decode-workers`."),
    workers_per_device: Optional[int] = typer.Option(None, min=1, help="As `run --workers-per-device`."),
    mps: bool = typer.Option(True, help="As `run --mps`."),
    gpu_decode: bool = typer.Option(True, help="As `run --gpu-decode`."),
    executors: str = typer.Option("local", help="Executors to run each engine end to end with, comma-separated: local, ray (docs/ray.md)."),
) -> None:
    """Throughput of each engine, model-only and end to end (JPEG files -> store + CSVs)."""
    try:
        pairs = [(name, int(batch)) for name, batch in (e.split(":") for e in engines.split(","))]
    except ValueError:
        raise _fail(f"--engines takes engine:batch pairs separated by commas (torch:8,compiled:32), not {engines!r}")
    chosen = tuple(x.strip() for x in executors.split(","))
    if not chosen or not set(chosen) <= set(EXECUTORS):
        raise _fail(f"--executors takes local and/or ray, comma-separated, not {executors!r}")
    if "ray" in chosen:
        _need_ray()
    from .bench import BenchError, run_bench, table   # imports torch: after the checks, as in `run`

    try:
        rows = run_bench(data / "JPEGImages", images, model or default_model_dir(), device, pairs, devices,
                         log=lambda m: typer.echo(m, err=True), decode_workers=decode_workers,
                         workers_per_device=workers_per_device, mps=mps, gpu_decode=gpu_decode,
                         executors=chosen)
    except BenchError as e:
        raise _fail(f"{e} (set --data or BCCD_DATA)")
    typer.echo(table(rows))


def _need_ray() -> None:
    """Exit 2 with the install command where Ray Data is missing, before anything runs."""
    from .backends import EngineError
    from .ray_pool import import_ray

    try:
        import_ray()
    except EngineError as e:
        raise _fail(str(e))


def _exit_on_signal(signum, frame) -> None:
    # Until a run installs its own graceful handler (finish the batch, commit), a SIGTERM ends the
    # process like Ctrl-C does: with its exit code, through `finally` blocks that release the lock.
    raise SystemExit(128 + signum)


# Writing failed for want of room or on a read-only disk (sysexits' EX_IOERR): a cron wrapper can tell a full
# disk from a fault of the tool's.
EXIT_CANNOT_WRITE = 74
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# What SQLite says where its file cannot grow (a full disk, a quota, a file size limit).
_STORE_NO_ROOM = ("disk I/O error", "database or disk is full")


def _cannot_write(e: Exception) -> str | None:
    """What could not be written, where `e` is a write refused for want of room; else None."""
    import sqlite3

    from .store import STORE_NAME

    if isinstance(e, OSError) and e.errno in _NO_ROOM:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, sqlite3.OperationalError) and str(e) in _STORE_NO_ROOM:
        return f"the store ({STORE_NAME}): {e}"
    return None


def run_cli() -> None:
    """Console-script entry: a write refused for want of room is exit 74, any other unexpected
    exception exit 1, each with a one-line message."""
    import signal

    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence for cron
        if os.environ.get("BCCD_BATCH_DEBUG"):
            raise
        what = _cannot_write(e)
        if what is not None:
            typer.echo(f"bccd-batch: cannot write {what}. Is the disk full, over quota, read-only or under a file "
                       "size limit? What was stored before is kept: make room and run again.", err=True)
            sys.exit(EXIT_CANNOT_WRITE)
        typer.echo(f"bccd-batch: unexpected error: {type(e).__name__}: {e} (set BCCD_BATCH_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
