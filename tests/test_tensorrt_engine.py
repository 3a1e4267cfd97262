"""Real TensorRT: build the default model's engines (FP32, FP16, INT8), run them, compare masks with
ONNX Runtime, and stream frames through the GPU pipeline. Marked `tensorrt`: skipped where TensorRT
with its builder, pycuda or a GPU is missing."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgeseg.bundle import Bundle

pytestmark = pytest.mark.tensorrt

AGREEMENT = {"fp32": 0.995, "fp16": 0.99, "int8": 0.95}


@pytest.fixture(scope="module")
def bundle(default_bundle, tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("trt")
    saved = os.environ.get("EDGESEG_CACHE")
    os.environ["EDGESEG_CACHE"] = str(root / "cache")  # engines built here stay out of the user's cache
    dst = root / "bundle"
    shutil.copytree(default_bundle.path, dst)
    yield Bundle.load(dst)
    if saved is None:
        os.environ.pop("EDGESEG_CACHE", None)
    else:
        os.environ["EDGESEG_CACHE"] = saved


@pytest.fixture(scope="module")
def frames(bundle):
    from converters.parity import parity_frames

    return parity_frames(bundle.manifest.preprocess, 6, seed=7)


def _ort_outputs(bundle, frames):
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    eng = OnnxRuntimeEngine.from_bundle(bundle, "fp32")
    pre = bundle.manifest.preprocess
    return [next(iter(eng.infer(pre.apply(f)).values())) for f in frames]


def _qdq_graph(bundle, frames):
    """The TensorRT-style Q/DQ graph (symmetric int8, per-channel weights, no bias quantization)."""
    from converters.tensorrt import INT8_GRAPH
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    dst = bundle.path / INT8_GRAPH
    if dst.exists():
        return dst
    pre, name = bundle.manifest.preprocess, bundle.manifest.input_name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: pre.apply(f)} for f in frames])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(bundle.path / "model.onnx"), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    return dst


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_masks_match_onnxruntime(bundle, frames, precision):
    from converters.tensorrt import build_bundle_engine
    from runtime.engines.tensorrt import TensorRTEngine

    if precision == "int8":
        _qdq_graph(bundle, frames)
    art = build_bundle_engine(bundle.path, precision, parity_frames=4)
    assert art.backend == "tensorrt" and art.precision == precision and art.path.endswith(f".{precision}.engine")
    assert art.parity["mask_agreement"] >= AGREEMENT[precision]
    reloaded = Bundle.load(bundle.path)
    engine = TensorRTEngine.from_bundle(reloaded, precision)
    try:
        pre = reloaded.manifest.preprocess
        refs = _ort_outputs(reloaded, frames)
        for f, ref in zip(frames, refs):
            out = next(iter(engine.infer(pre.apply(f)).values()))
            assert out.shape == ref.shape
            assert np.mean(out.argmax(1) == ref.argmax(1)) >= AGREEMENT[precision]
            if precision == "fp32":
                assert np.abs(out - ref).max() < 1e-2 * max(1.0, np.abs(ref).max())
    finally:
        engine.close()


def test_second_build_uses_the_cache(bundle):
    import time

    from converters.tensorrt import build_bundle_engine

    first = build_bundle_engine(bundle.path, "fp32", parity_frames=0)
    t0 = time.monotonic()
    again = build_bundle_engine(bundle.path, "fp32", parity_frames=0)
    assert again.sha256 == first.sha256 and time.monotonic() - t0 < 30


def test_engine_from_another_tensorrt_is_not_loaded(bundle, caplog):
    import edgeseg
    from converters.tensorrt import build_bundle_engine, cache_dir
    from runtime.engines.base import EngineError, resolve_backend
    from runtime.engines.tensorrt import TensorRTEngine

    build_bundle_engine(bundle.path, "fp32", parity_frames=0)
    b = Bundle.load(bundle.path)
    for art in b.find("tensorrt"):
        art.info["trt_version"] = "9.0.0.1"
    with pytest.raises(EngineError, match="no TensorRT engine for this machine.*9.0.0.1.*build_missing=True"):
        TensorRTEngine.from_bundle(b, "fp32")
    name, why = resolve_backend("auto", b)
    assert name == "onnxruntime" and "9.0.0.1" in why
    before = (bundle.path / "manifest.json").read_text()
    seg = edgeseg.Segmenter(b, precision="fp32", build_missing=True)  # built into the cache, bundle untouched
    try:
        assert seg.backend == "tensorrt" and seg.engine.path.parent == cache_dir()
        assert "into the engine cache" in seg.backend_reason
        assert (bundle.path / "manifest.json").read_text() == before
    finally:
        seg.close()


def test_preprocess_kernel_feeds_the_engine_directly(bundle, frames):
    from runtime.cuda.kernels import GpuPreprocessor
    from runtime.engines.tensorrt import TensorRTEngine

    engine = TensorRTEngine.from_bundle(bundle, "fp32")
    try:
        pre = bundle.manifest.preprocess
        k = GpuPreprocessor(pre, engine.gpu)
        cuda = engine.cuda
        frame = np.ascontiguousarray(frames[0])
        with engine.gpu.active():
            d_frame, d_input = cuda.mem_alloc(frame.nbytes), cuda.mem_alloc(k.output_nbytes)
            cuda.memcpy_htod(d_frame, frame)
            k.launch(int(d_frame), frame.shape[:2], frame.strides[0], int(d_input), engine.stream)
            (out,) = engine.infer_device(int(d_input)).values()
            logits = cuda.pagelocked_empty(out.shape, out.dtype)  # async copies need page-locked memory
            cuda.memcpy_dtoh_async(logits, out.ptr, engine.stream)
            engine.stream.synchronize()
            d_frame.free()
            d_input.free()
        host = next(iter(engine.infer(pre.apply(frame)).values()))
        assert np.mean(logits.argmax(1) == host.argmax(1)) >= 0.999
    finally:
        engine.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_frame_path_two_frames_in_flight(bundle, frames, precision, tmp_path):
    """The Segmenter's GPU frame path on a real engine: class maps as ONNX Runtime's CPU path gives."""
    from converters.tensorrt import build_bundle_engine
    from runtime.segmenter import Segmenter

    build_bundle_engine(bundle.path, precision, parity_frames=0)
    b = Bundle.load(bundle.path)
    seg = Segmenter(b, backend="tensorrt", precision=precision)
    cpu = Segmenter(b, backend="onnxruntime")
    try:
        assert seg.frame_path == "gpu"
        for f in frames:
            assert np.mean(seg.segment(f).class_map == cpu.segment(f).class_map) >= AGREEMENT[precision]
        folder = tmp_path / "frames"
        folder.mkdir()
        import cv2

        for i, f in enumerate(frames):
            cv2.imwrite(str(folder / f"{i:02d}.png"), f)
        results = list(seg.stream(str(folder), save=str(tmp_path / "out" / "%05d.png")))
        assert [r.frame_index for r in results] == list(range(len(frames)))
        for f, r in zip(frames, results):
            assert np.mean(r.class_map == cpu.segment(f).class_map) >= AGREEMENT[precision]
        summary = seg.stats.summary()
        assert summary["cuda_stages"]["inference"]["mean_ms"] > 0
        assert len(list((tmp_path / "out").iterdir())) == len(frames)
    finally:
        seg.close()
