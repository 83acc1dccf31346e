"""ONNX export of the split model's dense stages, and an onnxruntime runner used to verify them.

The exported graphs are what the TensorRT backend builds from: static spatial shapes, a dynamic
batch (or RoI) axis, only standard ONNX operators (convolutions, BatchNorm folded by the exporter's
optimiser, ReLU, max-pool, nearest upsample, add, linear), no plugins.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN

from .split import NATIVE_HW, DenseStage, box_stage_names, box_stages, dense_output_names

OPSET = 18
MAX_BATCH = 64


def export_onnx(model: FasterRCNN, out_dir: Path, precision: str = "fp32", max_batch: int = MAX_BATCH) -> tuple[Path, list[Path]]:
    """Write dense-PRECISION.onnx and one box graph per box head (box-PRECISION.onnx, then
    box1-PRECISION.onnx, ... for a cascade; fp32 or fp16 weights and activations) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    dense = DenseStage(model).eval().to("cpu", dtype)
    images = torch.randint(0, 256, (2, 3, *NATIVE_HW), dtype=torch.uint8)
    rois_per_image = model.rpn._post_nms_top_n["testing"]
    channels = model.backbone.out_channels
    rois = torch.randn(2 * rois_per_image, channels, 7, 7, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    n_rois = torch.export.Dim("rois", min=1, max=max_batch * rois_per_image)
    dense_path = out_dir / f"dense-{precision}.onnx"
    box_paths = [out_dir / f"{name}-{precision}.onnx" for name in box_stage_names(model)]
    with torch.no_grad():
        torch.onnx.export(dense, (images,), str(dense_path), dynamo=True, opset_version=OPSET, external_data=False,
                          input_names=["images"], output_names=dense_output_names(),
                          dynamic_shapes={"images_u8": {0: batch}}, optimize=True)
        for box, path in zip(box_stages(model), box_paths):
            torch.onnx.export(box.eval().to("cpu", dtype), (rois,), str(path), dynamo=True, opset_version=OPSET,
                              external_data=False, input_names=["rois"], output_names=["class_logits", "box_deltas"],
                              dynamic_shapes={"roi_features": {0: n_rois}}, optimize=True)
    return dense_path, box_paths


class OnnxRuntimeStage:
    """Calls an ONNX graph through onnxruntime (CPU) with torch tensors in and out."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)
