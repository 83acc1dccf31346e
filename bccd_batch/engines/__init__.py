"""Inference backends. Each turns a batch of HxWx3 uint8 arrays into per-image detection lists
`[(cls, score, x0, y0, x1, y1), ...]` in pixel coordinates of the input image."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class EngineError(Exception):
    """A requested engine cannot be used here; the message says why."""


class Engine(Protocol):
    name: str          # e.g. "torch-eager-fp32"
    device: str        # e.g. "cpu", "cuda:0"
    device_name: str   # human-readable, e.g. "NVIDIA H100 80GB HBM3" or the CPU model

    def infer(self, images: list[np.ndarray]) -> list[list[tuple]]: ...


ENGINE_CHOICES = ("auto", "torch")


def select_engine(name: str, device: str, model_dir: Path, batch_size: int) -> Engine:
    """`auto` picks the fastest backend available here; today that is the torch backend on CUDA
    if present, else on CPU."""
    if name not in ENGINE_CHOICES:
        raise EngineError(f"unknown engine {name!r} (choose from {', '.join(ENGINE_CHOICES)})")
    from .torch_eager import TorchEngine

    return TorchEngine(model_dir, device=device, batch_size=batch_size)
