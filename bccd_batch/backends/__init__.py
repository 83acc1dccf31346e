"""Inference backends. Each turns a batch of fields into per-image detection lists
`[(cls, score, x0, y0, x1, y1), ...]` in pixel coordinates of the input image. A field is an HxWx3
uint8 array on the host or, where it was decoded on the engine's GPU (`decode.decode_on_device`),
a 3xHxW uint8 tensor there."""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, TypeVar

import numpy as np

from ..card import read_card
from ..cells import class_threshold
from ..quality import Quality, rbc_size, second_pass


class EngineError(Exception):
    """A requested engine cannot be used here; the message says why."""


class Engine(Protocol):
    name: str          # e.g. "torch-eager-fp32"
    device: str        # e.g. "cpu", "cuda:0"
    device_name: str   # human-readable, e.g. "NVIDIA H100 80GB HBM3" or the CPU model
    card: dict         # the model card (model.json)
    model: object      # the eager torchvision model on `device`, for fields no static graph takes

    def infer(self, images: list[np.ndarray]) -> list[list[tuple]]: ...


def cuda_device_count() -> int:
    """The CUDA GPUs this process can use, as torch counts them. Where no NVIDIA driver can be loaded
    there are none and torch is not imported: a run's parent process on a CPU host leaves torch (~2.5 s
    of start-up and its memory) to its workers."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def names_gpu(device: str) -> bool:
    """Whether a device entry (`--device`, one per worker process) asks for a GPU; "auto" does,
    where one is present, so callers still check that CUDA is available."""
    return device == "auto" or device.startswith("cuda")


def field_hw(field) -> tuple[int, int]:
    """(height, width) of a field, on the host (HxWx3) or decoded on the device (3xHxW)."""
    return field.shape[:2] if isinstance(field, np.ndarray) else tuple(field.shape[1:])


def submit(engine: Engine, images: list[np.ndarray]) -> Callable[[], list[list[tuple]]]:
    """Start inferring a batch; calling the result returns its detections. Engines that can run
    ahead (the split engines with a CUDA graph) return while the GPU works, so the caller can
    prepare the next batch meanwhile; keep at most two batches in flight. Others finish first."""
    if hasattr(engine, "submit"):
        return engine.submit(images)
    dets = engine.infer(images)
    return lambda: dets


class Counted(NamedTuple):
    """A field's detections, the scale it was counted again at (None: it was not) and how it was
    recoloured for that (`quality.SecondPass.recoloured`)."""
    dets: list[tuple]
    scale: float | None = None
    recoloured: str | None = None


def count_again(engine: Engine, fields: list, dets: list[list[tuple]], qualities: list[Quality | None]) -> list[Counted]:
    """Each field's detections, counted again where it is unlike the training labs' (`quality.second_pass`:
    its RBCs' size, another magnification; its stain or its background's colour cast, another lab,
    lamp or camera): inferred again by the eager model resized so that its RBCs measure the training
    size and recoloured, and its detections are then that second pass's. A second pass that fails (out
    of memory: at x2 a field is four times the pixels) keeps the first pass's detections, with a
    warning; such a field is still flagged."""
    cut = class_threshold(engine.card["thresholds"]["count"], "RBC")
    colours = engine.card.get("colours")
    out = []
    for field, d, q in zip(fields, dets, qualities):
        h, w = field_hw(field)
        again = second_pass(field, rbc_size(d, cut, w, h), q, colours)
        if again is None:
            out.append(Counted(d))
            continue
        from ..model import detect_again     # torch: only where a field is counted again

        try:
            out.append(Counted(detect_again(engine.model, field, engine.device, again.scale, again.gains, again.offsets),
                               again.scale, again.recoloured))
        except RuntimeError as e:      # torch's out-of-memory errors, CUDA's and the CPU allocator's
            warnings.warn(f"a {w}x{h} field's second pass at x{again.scale:g} failed ({str(e).splitlines()[0][:200]}): "
                          "its first count is kept")
            out.append(Counted(d))
    return out


T = TypeVar("T")
R = TypeVar("R")


def one_ahead(submitted: Iterable[T], finish: Callable[[T], R]) -> Iterator[R]:
    """finish(item) for each item of `submitted`, in order, each only once the next one has been
    drawn, i.e. submitted: the one loop that keeps two batches in flight (`submit`)."""
    pending, have = None, False
    for item in submitted:
        if have:
            yield finish(pending)
        pending, have = item, True
    if have:
        yield finish(pending)


ENGINE_CHOICES = ("auto", "torch", "compiled", "tensorrt")
PRECISIONS = ("fp16", "fp32")


def select_engine(name: str, device: str, model_dir: Path, batch_size: int, log=print,
                  precision: str = "fp16") -> Engine:
    """`auto`: TensorRT where `build-engine` built this model's engines on this machine, else the
    compiled engine on CUDA, else eager torch (on the CPU when there is no GPU). run.json records
    the choice; a fast engine that was tried and could not be used is logged with the reason.
    `precision` is the GPU engines' (eager torch is the fp32 reference)."""
    if name not in ENGINE_CHOICES:
        raise EngineError(f"unknown engine {name!r} (choose from {', '.join(ENGINE_CHOICES)})")
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    from .split_engine import SplitEngine
    from .tensorrt import built_here
    from .torch_eager import TorchEngine, resolve_device

    if name == "torch":
        return TorchEngine(model_dir, device=device, batch_size=batch_size)
    if name in ("compiled", "tensorrt"):
        return SplitEngine(model_dir, device, batch_size, name, precision)
    if resolve_device(device).type == "cuda":
        built = built_here(read_card(model_dir)["weights"]["sha256"])
        for backend in ("tensorrt", "compiled") if built else ("compiled",):
            try:
                return SplitEngine(model_dir, device, batch_size, backend, precision)
            except EngineError as e:
                log(f"engine {backend} not used: {e}")
    return TorchEngine(model_dir, device=device, batch_size=batch_size)
