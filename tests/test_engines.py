"""The split model behind every fast backend, checked against the eager model on real val images:
torch stages on the CPU (exact), the ONNX graphs that TensorRT consumes through onnxruntime
(numerically), TensorRT and the compiled engine where they can run."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from bccd_batch.decode import decode_file
from bccd_batch.backends.split import DenseStage, SplitDetector, box_stages, infer_split
from bccd_batch.model import ModelConfig, Uploads, box_heads, build_model, detections_to_tuples, load_model
from conftest import DATA, FIGURES, MODEL


def _eager_detections(model, images):
    with torch.inference_mode():
        return [detections_to_tuples(model([torch.from_numpy(a).permute(2, 0, 1).float() / 255])[0]) for a in images]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, card = load_model(MODEL)
    names = (DATA / "ImageSets/Main/val.txt").read_text().split()[:5]
    images = [decode_file(DATA / "JPEGImages" / f"{n}.jpg") for n in names]
    images.append(np.ascontiguousarray(images[0].transpose(1, 0, 2)))   # a portrait field: eager fallback
    return model, images, _eager_detections(model, images)


@pytest.fixture(scope="module")
def first_head_only(setup):
    """The embedded model as a one-head Faster R-CNN: its first box head (which keeps its place and
    names in a cascade) without the later ones, so the split is checked with one head and with several."""
    model, images, _ = setup
    cfg = ModelConfig.from_dict({**dataclasses.asdict(model.config), "cascade_ious": []})
    plain = build_model(cfg).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("roi_heads.stages.") for k in unexpected)
    return plain, images, _eager_detections(plain, images)


def _assert_same_detections(got, ref, box_tol):
    for g, r in zip(got, ref):
        assert [d[0] for d in g] == [d[0] for d in r]
        assert np.allclose([d[1] for d in g], [d[1] for d in r], atol=1e-3)
        assert np.abs(np.array([d[2:] for d in g]) - np.array([d[2:] for d in r])).max() <= box_tol


def _counts_agree(got, ref, threshold=0.6, band=0.005):
    """Images whose per-class counts at `threshold` agree with `ref`'s, a detection scoring within
    `band` of it counting on either side: fp16, or the GPU kernels picked per batch size, move scores
    by up to ~0.003 (docs/benchmarks.md), so a detection on the threshold may fall either way, one
    further from it may not."""
    counts = lambda dets, t: Counter(d[0] for d in dets if d[1] >= t)
    # Counter <= Counter: every class's count at most the other's
    agree = lambda a, b: counts(a, threshold + band) <= counts(b, threshold - band)
    return sum(1 for g, r in zip(got, ref) if agree(g, r) and agree(r, g))


def _torch_stages(model):
    return SplitDetector(model, DenseStage(model).eval(), [b.eval() for b in box_stages(model)], torch.device("cpu"))


@pytest.mark.parametrize("which", ["setup", "first_head_only"])
def test_split_torch_stages_equal_eager(which, request):
    model, images, ref = request.getfixturevalue(which)
    _assert_same_detections(infer_split(_torch_stages(model), model, images, torch.device("cpu"), 2), ref, box_tol=0.011)


def test_eager_engine_gives_each_field_its_own_detections_whatever_its_batch(setup):
    """The eager engine batches on a GPU: a landscape field batched with a portrait one must not be
    padded to their common canvas (that moved counts by up to 2 RBCs). On the CPU, which infers one
    field at a time, the batch size is set by hand to run the same path."""
    from bccd_batch.backends.torch_eager import TorchEngine

    _, images, _ = setup
    eng = TorchEngine(MODEL, "cuda" if torch.cuda.is_available() else "cpu")
    alone = [eng.infer([a])[0] for a in images[::-1]]
    eng.batch_size = len(images)
    assert _counts_agree(eng.infer(images[::-1]), alone) == len(images)


def test_one_pass_roi_align_equals_torchvision_at_the_field_edges(setup, monkeypatch):
    """The split's RoIAlign (every level in one stack, each RoI on its own level) against
    torchvision's MultiScaleRoIAlign, with boxes of every level touching the field's right and
    bottom edges, where a level's last row and column are read; the stack's unwritten part is
    filled with NaN, so reading it would show."""
    from collections import OrderedDict

    model, _, _ = setup
    det = _torch_stages(model)
    (h, w), (ph, pw) = det.resized_hw, det.padded_hw
    fpn = [torch.randn(2, 8, ph // s, pw // s) for s in (8, 16, 32)]
    sizes = torch.tensor([12.0, 40.0, 100.0, 250.0, 600.0])
    corners = torch.tensor([[w, h], [w, 0.0], [0.0, h], [w / 2, h / 2]])
    boxes = torch.cat([torch.cat([(c - s).clamp(min=0), c.clamp(max=torch.tensor([w, h]))])[None]
                       for s in sizes for c in corners]).view(1, -1, 4).expand(2, -1, -1).contiguous()
    real_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: real_empty(t, *a, **k).fill_(float("nan")))
    got = det._roi_features(fpn, boxes)
    pool = model.roi_heads.box_roi_pool
    want = pool(OrderedDict((str(i), f) for i, f in enumerate(fpn)), list(boxes), [(h, w)] * 2)
    assert len(set(pool.map_levels([boxes[0]]).tolist())) == 3     # every level is exercised
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_onnx_graphs_match_pytorch(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from bccd_batch.backends.onnx_export import OnnxRuntimeStage, export_onnx

    model, images, ref = setup
    dense_path, box_paths = export_onnx(model, tmp_path, "fp32", max_batch=8)
    assert len(box_paths) == len(box_heads(model))
    dense_ort, boxes_ort = OnnxRuntimeStage(dense_path), [OnnxRuntimeStage(p) for p in box_paths]
    x = torch.from_numpy(np.stack(images[:2])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        want = DenseStage(model).eval()(x)
    got = dense_ort(x)
    rel = max(float((g - w).norm() / w.norm()) for g, w in zip(got, want))
    FIGURES.append(f"engines: ONNX dense stage max relative error vs PyTorch {rel:.2e}")
    assert rel < 1e-4
    det = SplitDetector(model, dense_ort, boxes_ort, torch.device("cpu"))
    _assert_same_detections(infer_split(det, model, images, torch.device("cpu"), 2), ref, box_tol=0.05)


def test_tensorrt_engine_matches_eager(setup, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (its builder cannot be installed in this workplace)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from bccd_batch.backends.split_engine import SplitEngine

    monkeypatch.setenv("BCCD_BATCH_ENGINE_CACHE", str(tmp_path))
    from bccd_batch.backends.tensorrt import build_all

    model, images, ref = setup
    build_all(model, load_model(MODEL)[1]["weights"]["sha256"], tmp_path, "fp32", 4)
    eng = SplitEngine(MODEL, "cuda", 4, "tensorrt", "fp32")
    _assert_same_detections(eng.infer(images), ref, box_tol=0.5)


def _compiled_counts_match(images, ref):
    from bccd_batch.backends.split_engine import SplitEngine

    eng = SplitEngine(MODEL, "cuda", 4, "compiled", "fp16")
    return eng, _counts_agree(eng.infer(images), ref)


@pytest.mark.gpu
def test_compiled_engine_matches_eager(setup):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, images, ref = setup
    _, same = _compiled_counts_match(images, ref)
    FIGURES.append(f"engines: compiled fp16 counts agreed with eager's (±0.005 at the threshold) on {same}/{len(images)} images")
    assert same == len(images)


@pytest.mark.gpu
def test_uploads_copy_batches_of_mixed_sizes_exactly():
    """Four batches through the two staging buffers in turn, the third refilling the first's (and
    growing it) while earlier copies may still be on their way: every field arrives as it left."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(0)
    shapes = ([(480, 640)] * 4, [(480, 640), (17, 33), (480, 640)], [(600, 800)] * 4, [(5, 5)])
    batches = [[rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in batch] for batch in shapes]
    uploads = Uploads("cuda")
    got = [uploads(b) for b in batches]
    for batch, fields in zip(batches, got):
        for host, field in zip(batch, fields):
            assert field.shape == (3, *host.shape[:2]) and field.device.type == "cuda"
            assert torch.equal(field.permute(1, 2, 0).cpu(), torch.from_numpy(host))


@pytest.mark.gpu
def test_compiled_engine_redoes_a_batch_whose_nms_did_not_settle(setup, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, images, ref = setup
    monkeypatch.setattr(SplitDetector, "GRAPH_NMS_ROUNDS", 1)
    eng, same = _compiled_counts_match(images, ref)
    (_, (_, converged), _), = eng.detector._graphs.values()
    assert not bool(converged.cpu().all())   # the graph's one round was not enough ...
    assert same == len(images)               # ... and the redone batches are still right


def test_auto_tries_tensorrt_only_for_a_model_built_on_this_machine(tmp_path, monkeypatch):
    from bccd_batch.backends.tensorrt import built_here

    monkeypatch.setenv("BCCD_BATCH_ENGINE_CACHE", str(tmp_path))
    assert not built_here("abc")                                   # no cache at all
    (tmp_path / "key-b16").mkdir()
    (tmp_path / "key-b16" / "manifest.json").write_text('{"model_sha256": "other"}')
    (tmp_path / "bad-b8").mkdir()
    (tmp_path / "bad-b8" / "manifest.json").write_text("{not json")
    assert not built_here("abc")                                   # another model's engines, a broken manifest
    (tmp_path / "key2-b32").mkdir()
    (tmp_path / "key2-b32" / "manifest.json").write_text('{"model_sha256": "abc"}')
    assert built_here("abc")
