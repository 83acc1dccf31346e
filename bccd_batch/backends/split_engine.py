"""The GPU engines built on the split model: `compiled` (the stages through torch.compile, fp16,
channels_last, and each whole batch replayed as one CUDA graph) and `tensorrt` (the cached TensorRT
engines, run op by op). Both run at one static batch size: short batches are padded, so no shape ever
recompiles or leaves the optimisation profile."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..model import load_model
from . import EngineError, field_hw
from .split import NATIVE_HW, DenseStage, SplitDetector, box_stage_names, box_stages, infer_split


class SplitEngine:
    """The split detector with the dense and box stages of one backend."""

    def __init__(self, model_dir: Path, device: str, batch_size: int, backend: str, precision: str = "fp16"):
        from .torch_eager import resolve_device

        self.dev = resolve_device(device)
        if self.dev.type != "cuda":
            raise EngineError(f"the {backend} engine needs a CUDA GPU")
        self.model, self.card = load_model(model_dir)
        self.model.to(self.dev)
        self.batch_size = batch_size
        self.name = f"{backend}-{precision}"
        self.device = str(self.dev)
        self.device_name = torch.cuda.get_device_name(self.dev)
        if backend == "compiled":
            dense, boxes = self._compiled(precision)
        elif backend == "tensorrt":
            dense, boxes = self._tensorrt(precision)
        else:
            raise EngineError(f"unknown split backend {backend!r}")
        # TensorRT's enqueue could be captured too, but that is unverified here: it runs op by op.
        self.detector = SplitDetector(self.model, dense, boxes, self.dev, cuda_graph=backend == "compiled")

    def _compiled(self, precision: str):
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[precision]
        # Copies: the eager model keeps its fp32 weights for fields of other sizes.
        stages_model = copy.deepcopy(self.model)
        dense = DenseStage(stages_model).eval().to(self.dev, dtype).to(memory_format=torch.channels_last)
        # No CUDA graphs of torch.compile's own: the detector captures stages and glue as one.
        dense_c = torch.compile(dense, dynamic=False, fullgraph=True)
        boxes_c = [torch.compile(b.eval().to(self.dev, dtype), dynamic=False, fullgraph=True) for b in box_stages(stages_model)]
        return (lambda x: dense_c(x.contiguous(memory_format=torch.channels_last)),
                [lambda r, box_c=box_c: box_c(r.to(dtype)) for box_c in boxes_c])

    def _tensorrt(self, precision: str):
        from .tensorrt import TensorRTStage, cached_engine_dir

        names = box_stage_names(self.model)
        d = cached_engine_dir(self.card["weights"]["sha256"], precision, self.batch_size, names)
        if d is None:
            raise EngineError("no TensorRT engine built for this GPU/model/precision: run `bccd-batch build-engine`")
        return TensorRTStage(d / "dense.plan", self.dev), [TensorRTStage(d / f"{b}.plan", self.dev) for b in names]

    def warm_up(self) -> None:
        """Compile, tune and capture now, on a blank full batch, rather than inside the first
        batches of a run (a fresh worker process compiles its graphs anew)."""
        self.submit([np.zeros((*NATIVE_HW, 3), np.uint8)] * self.batch_size)()

    def submit(self, images: list) -> Callable[[], list[list[tuple]]]:
        """A full batch of native fields is launched and returned at once (see
        SplitDetector.launch); anything else is inferred before this returns."""
        if len(images) == self.batch_size and all(field_hw(a) == NATIVE_HW for a in images):
            return self.detector.launch(images)
        dets = self.infer(images)
        return lambda: dets

    def infer(self, images: list) -> list[list[tuple]]:
        # Pad to the static batch with blank native-size fields; their detections are dropped.
        n = len(images)
        native = sum(1 for a in images if field_hw(a) == NATIVE_HW)
        pad = (-native) % self.batch_size
        blank = np.zeros((*NATIVE_HW, 3), np.uint8)
        return infer_split(self.detector, self.model, list(images) + [blank] * pad, self.dev, self.batch_size)[:n]
