"""TensorRT backend: the split model's dense stages as TensorRT engines, glue in torchvision.

Built with the `tensorrt` Python API from the ONNX graphs of `onnx_export`, for TensorRT 10.x and
11.x alike: the network is strongly typed (11.x has no other kind and no FP16 builder flag), so the
precision is the exported graph's own (fp16 graphs for fp16 engines). One optimisation profile
covers batch 1..max_batch; the timing cache is kept beside the engines.

Buffers are torch tensors on torch's current CUDA stream: TensorRT reads and writes torch-owned
device memory through `set_tensor_address`, so there is one CUDA context (pycuda would create a
second one and copy through it for nothing).

NOT RUN in this workplace: TensorRT's builder libraries cannot be installed here and TensorRT-RTX
refuses the H100. The ONNX graphs it consumes are verified against PyTorch with onnxruntime
(tests/test_engines.py); tests of this module skip where `tensorrt` does not import.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import EngineError


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(f"TensorRT is not installed here ({e})") from None
    return trt


def engine_key(model_sha: str, precision: str, max_batch: int, device_index: int = 0) -> str:
    """Engines are only valid for one GPU model, TensorRT version, model, precision and batch range."""
    trt = import_tensorrt()
    props = torch.cuda.get_device_properties(device_index)
    parts = [props.name, f"sm{props.major}{props.minor}", f"trt{trt.__version__}", model_sha[:16], precision, f"b1-{max_batch}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _network(builder, trt):
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:            # 11.x: strong typing is the only mode
        return builder.create_network()
    return builder.create_network(1 << int(flag))


def build_engine(onnx_path: Path, engine_path: Path, input_name: str, min_shape, opt_shape, max_shape,
                 timing_cache: Path, workspace_gib: int = 8) -> Path:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _network(builder, trt)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, tuple(min_shape), tuple(opt_shape), tuple(max_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


class TensorRTStage:
    """One engine called like the torch stage it replaces: torch CUDA tensors in and out."""

    def __init__(self, engine_path: Path, device: torch.device):
        trt = import_tensorrt()
        self.trt, self.device = trt, device
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{engine_path} is not a TensorRT engine for this TensorRT/GPU; rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}

    def _torch_dtype(self, dt):
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.uint8: torch.uint8,
                 trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
        return table[dt]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (name,) = self.inputs
        x = x.to(self.device, self.dtypes[name]).contiguous()
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for o in self.outputs:
            t = torch.empty(tuple(self.context.get_tensor_shape(o)), dtype=self.dtypes[o], device=self.device)
            self.context.set_tensor_address(o, t.data_ptr())
            outs.append(t)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed")
        return tuple(outs)


def engine_cache_root() -> Path:
    """Per machine, never in git: $BCCD_BATCH_ENGINE_CACHE or ~/.cache/bccd-batch/engines."""
    import os

    return Path(os.environ.get("BCCD_BATCH_ENGINE_CACHE", Path.home() / ".cache" / "bccd-batch" / "engines"))


def built_here(model_sha: str) -> bool:
    """Whether `build-engine` ever built engines of this model on this machine (their manifests say
    so): only then does `--engine auto` try TensorRT, so a machine without one logs nothing about it."""
    for manifest in engine_cache_root().glob("*-b*/manifest.json"):
        try:
            if json.loads(manifest.read_text()).get("model_sha256") == model_sha:
                return True
        except (OSError, ValueError):
            continue
    return False


def cached_engine_dir(model_sha: str, precision: str, batch_size: int, box_names: list[str]) -> Path | None:
    """The built engines (dense.plan and one plan per `box_names`) for this exact
    GPU/TensorRT/model/precision, if their batch range covers batch_size; a key mismatch means
    another build, never loading a stale engine."""
    root = engine_cache_root()
    if not root.is_dir():
        return None
    for max_batch in sorted(int(p.name.split("-b")[-1]) for p in root.glob("*-b*") if p.name.split("-b")[-1].isdigit()):
        if max_batch >= batch_size:
            d = root / f"{engine_key(model_sha, precision, max_batch)}-b{max_batch}"
            if all((d / f"{name}.plan").is_file() for name in ["dense", *box_names]):
                return d
    return None


def build_all(model, model_sha: str, cache_dir: Path, precision: str, max_batch: int) -> dict:
    """Export ONNX, build the dense engine and one per box head into cache_dir/<key>/, return the manifest."""
    from .onnx_export import export_onnx
    from .split import box_stage_names

    key = engine_key(model_sha, precision, max_batch)
    d = Path(cache_dir) / f"{key}-b{max_batch}"
    d.mkdir(parents=True, exist_ok=True)
    dense_onnx, box_onnxs = export_onnx(model, d, precision, max_batch)
    per_image = model.rpn._post_nms_top_n["testing"]
    c = model.backbone.out_channels
    timing = Path(cache_dir) / "timing.cache"
    build_engine(dense_onnx, d / "dense.plan", "images", (1, 3, 480, 640), (max_batch // 2 or 1, 3, 480, 640),
                 (max_batch, 3, 480, 640), timing)
    for name, path in zip(box_stage_names(model), box_onnxs):
        build_engine(path, d / f"{name}.plan", "rois", (1, c, 7, 7), (max_batch // 2 * per_image or per_image, c, 7, 7),
                     (max_batch * per_image, c, 7, 7), timing)
    manifest = {"key": key, "model_sha256": model_sha, "precision": precision, "max_batch": max_batch,
                "gpu": torch.cuda.get_device_name(0), "tensorrt": import_tensorrt().__version__}
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
