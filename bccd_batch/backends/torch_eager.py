"""The reference backend: torchvision's Faster R-CNN in eager PyTorch, on CPU or CUDA."""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import numpy as np
import torch

from ..model import detections_to_tuples, image_to_input, indices_by_size, load_model
from . import EngineError, field_hw


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"{device} requested but no CUDA GPU is available: running on the CPU")
        return torch.device("cpu")
    if dev.type not in ("cpu", "cuda"):
        raise EngineError(f"unsupported device {device!r} (use cpu, cuda, cuda:N or auto)")
    return dev


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


class TorchEngine:
    def __init__(self, model_dir: Path, device: str = "auto", batch_size: int = 8):
        self.dev = resolve_device(device)
        self.model, self.card = load_model(model_dir)
        self.model.to(self.dev)
        # On the CPU, batching only adds padding and allocator churn: one field at a time measured
        # 0.85 s per field against 1.02 s in batches of 8 (2-core machine, ResNet-34 model).
        self.batch_size = batch_size if self.dev.type == "cuda" else 1
        self.name = "torch-eager-fp32"
        self.device = str(self.dev)
        self.device_name = torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else cpu_name()

    def infer(self, images: list[np.ndarray]) -> list[list[tuple]]:
        # Fields of one size per batch: a field's counts must not depend on its neighbours.
        out: list[list[tuple]] = [[] for _ in images]
        for idx in indices_by_size([field_hw(a) for a in images]):
            for i, dets in zip(idx, self._infer_one_size([images[i] for i in idx])):
                out[i] = dets
        return out

    @torch.inference_mode()
    def _infer_one_size(self, images: list[np.ndarray]) -> list[list[tuple]]:
        out: list[list[tuple]] = []
        i = 0
        while i < len(images):
            chunk = images[i:i + self.batch_size]
            try:
                batch = [image_to_input(a, self.dev) for a in chunk]
                dets = self.model(batch)
            except torch.cuda.OutOfMemoryError:
                # A huge field or a busy GPU: halve the batch and go on rather than lose the night.
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                torch.cuda.empty_cache()
                warnings.warn(f"CUDA out of memory: batch size halved to {self.batch_size}")
                continue
            out.extend(detections_to_tuples(d) for d in dets)
            i += len(chunk)
        return out
