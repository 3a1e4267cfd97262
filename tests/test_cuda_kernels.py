"""The CUDA kernels against the NumPy/OpenCV reference.

On every machine: the kernels' per-pixel code, compiled for the CPU, is checked against
`Preprocess.apply` (and cv2 for NV12, class maps, overlays), and nvcc (where installed) compiles the
kernels for the GPU. Marked `gpu`: the same comparisons with the kernels running on a CUDA device.
"""
from __future__ import annotations

import shutil
import subprocess

import cv2
import numpy as np
import pytest

from edgeseg.spec import Preprocess, unletterbox
from runtime.cuda.kernels import SOURCE_DIR, classify_reference, overlay_reference

FRAME_SIZES = [(37, 53), (480, 641), (721, 1279), (100, 30), (1080, 1920)]
SPECS = [
    Preprocess(size=(256, 256)),
    Preprocess(size=(240, 320), resize="letterbox", color="bgr", pad_value=114),
    Preprocess(size=(96, 160), resize="letterbox", layout="nhwc"),
    Preprocess(size=(123, 77), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
]
PALETTE_RGB = np.array([[0, 0, 0], [230, 60, 40], [40, 110, 240], [40, 200, 80], [240, 40, 220]], np.uint8)


@pytest.fixture(scope="module")
def host():
    if not (shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")):
        pytest.skip("no C++ compiler to build the kernels' host code")
    from runtime.cuda.kernels import host_library

    return host_library()


def _nv12(rng, h, w):
    return rng.integers(0, 256, (h * 3 // 2, w), np.uint8)


# -- CPU: the kernels' arithmetic --------------------------------------------------------------------
@pytest.mark.parametrize("pre", SPECS, ids=lambda p: f"{p.size[0]}x{p.size[1]}-{p.resize}-{p.color}-{p.layout}")
def test_host_preprocess_matches_reference(host, pre, rng):
    for h, w in FRAME_SIZES:
        frame = rng.integers(0, 256, (h, w, 3), np.uint8)
        ref, out = pre.apply(frame), host.preprocess(pre, frame)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert np.abs(out - ref).max() <= 1e-3, (h, w)


def test_host_preprocess_uint8_graph_input(host, rng):
    pre = Preprocess(size=(200, 300), resize="letterbox", dtype="uint8")
    frame = rng.integers(0, 256, (481, 643, 3), np.uint8)
    diff = np.abs(host.preprocess(pre, frame).astype(int) - pre.apply(frame).astype(int))
    # Rounding of x.5 values may differ in the last float bit from OpenCV's: at most one level, rarely.
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01


def test_host_preprocess_nv12_matches_opencv_conversion(host, rng):
    for h, w in [(480, 640), (38, 54), (1080, 1920)]:
        yuv = _nv12(rng, h, w)
        pre = Preprocess(size=(256, 256), resize="letterbox")
        ref = pre.apply(cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR_NV12))
        assert np.abs(host.preprocess(pre, yuv, "nv12") - ref).max() <= 1e-3


def test_host_classify_is_exact(host, rng):
    logits = rng.standard_normal((2, 5, 37, 41)).astype(np.float32)
    logits[0, 3, :6, :6] = logits[0, 1, :6, :6]  # ties: the first class wins, as numpy.argmax
    assert np.array_equal(host.classify(logits), classify_reference(logits))
    single = rng.standard_normal((1, 1, 33, 17)).astype(np.float32)
    assert np.array_equal(host.classify(single, 0.25), classify_reference(single, 0.25))


def test_host_overlay_and_frame_class_map_are_exact(host, rng):
    palette_bgr = PALETTE_RGB[:, ::-1]
    for (fh, fw), pre in [((480, 641), SPECS[1]), ((37, 53), SPECS[0]), ((1080, 1920), SPECS[2]), ((100, 30), SPECS[3])]:
        classes = rng.integers(0, 6, pre.size, dtype=np.uint8)  # 5 is out of the palette: left undrawn
        frame = rng.integers(0, 256, (fh, fw, 3), np.uint8)
        frame_classes, overlay = host.overlay(classes, pre, frame, palette_bgr, alpha=0.45)
        ref_classes = unletterbox(classes, pre, (fh, fw))
        assert np.array_equal(frame_classes, ref_classes), (fh, fw)
        assert np.array_equal(overlay, overlay_reference(frame, ref_classes, palette_bgr, 0.45)), (fh, fw)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
@pytest.mark.parametrize("source", ["preprocess.cu", "postprocess.cu"])
def test_nvcc_compiles_kernels(source, tmp_path):
    out = tmp_path / "k.ptx"
    r = subprocess.run(["nvcc", "-ptx", "-arch=compute_75", "-O3", "-o", str(out), str(SOURCE_DIR / source)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptx = out.read_text()
    for entry in {"preprocess.cu": ["edgeseg_preprocess"], "postprocess.cu": ["edgeseg_classify", "edgeseg_overlay"]}[source]:
        assert f".entry {entry}(" in ptx


# -- GPU ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu():
    from runtime.engines.tensorrt import gpu_context

    return gpu_context(0)


@pytest.mark.gpu
@pytest.mark.parametrize("pre", SPECS, ids=lambda p: f"{p.size[0]}x{p.size[1]}-{p.resize}-{p.color}-{p.layout}")
def test_gpu_preprocess_matches_reference(gpu, pre, rng):
    from runtime.cuda.kernels import GpuPreprocessor

    k = GpuPreprocessor(pre, gpu)
    for h, w in FRAME_SIZES:
        frame = rng.integers(0, 256, (h, w, 3), np.uint8)
        ref, out = pre.apply(frame), k(frame)
        assert out.shape == ref.shape and out.dtype == np.float32
        assert np.abs(out - ref).max() <= 1e-3, (h, w)


@pytest.mark.gpu
def test_gpu_preprocess_float16_uint8_and_nv12(gpu, rng):
    from runtime.cuda.kernels import GpuPreprocessor

    frame = rng.integers(0, 256, (719, 1283, 3), np.uint8)
    pre16 = Preprocess(size=(256, 384), resize="letterbox", dtype="float16")
    out16 = GpuPreprocessor(pre16, gpu)(frame)
    assert out16.dtype == np.float16
    ref32 = pre16.replace(dtype="float32").apply(frame)
    assert np.abs(out16.astype(np.float32) - ref32).max() <= 1e-3 + 2 ** -11 * np.abs(ref32).max()
    pre8 = Preprocess(size=(200, 300), dtype="uint8")
    diff = np.abs(GpuPreprocessor(pre8, gpu)(frame).astype(int) - pre8.apply(frame).astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
    yuv = _nv12(rng, 1080, 1920)
    pre = Preprocess(size=(512, 512), resize="letterbox")
    ref = pre.apply(cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR_NV12))
    assert np.abs(GpuPreprocessor(pre, gpu)(yuv, "nv12") - ref).max() <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_classify_and_overlay_are_exact(gpu, rng, dtype):
    from runtime.cuda.kernels import GpuPostprocessor

    cuda = gpu.cuda
    pre = Preprocess(size=(96, 160), resize="letterbox")
    logits = rng.standard_normal((1, 5, 96, 160)).astype(dtype)
    frame = rng.integers(0, 256, (721, 1279, 3), np.uint8)
    post = GpuPostprocessor(5, PALETTE_RGB, gpu)
    with gpu.active():
        stream = cuda.Stream()
        d_logits, d_cls = cuda.mem_alloc(logits.nbytes), cuda.mem_alloc(96 * 160)
        d_frame, d_out, d_map = cuda.mem_alloc(frame.nbytes), cuda.mem_alloc(frame.nbytes), cuda.mem_alloc(721 * 1279)
        cuda.memcpy_htod(d_logits, logits)
        cuda.memcpy_htod(d_frame, frame)
        post.classify(int(d_logits), logits.shape, logits.dtype, int(d_cls), stream)
        post.to_frame(int(d_cls), pre.size, pre.letterbox(frame.shape[:2]), frame.shape[:2], stream,
                      frame_classes_ptr=int(d_map), frame_ptr=int(d_frame), frame_pitch=frame.strides[0],
                      out_ptr=int(d_out), out_pitch=frame.strides[0], alpha=0.45)
        classes, frame_classes, overlay = np.empty((96, 160), np.uint8), np.empty((721, 1279), np.uint8), np.empty_like(frame)
        cuda.memcpy_dtoh_async(classes, d_cls, stream)
        cuda.memcpy_dtoh_async(frame_classes, d_map, stream)
        cuda.memcpy_dtoh_async(overlay, d_out, stream)
        stream.synchronize()
        for a in (d_logits, d_cls, d_frame, d_out, d_map):
            a.free()
    post.close()
    assert np.array_equal(classes, classify_reference(logits)[0])
    ref_classes = unletterbox(classes, pre, frame.shape[:2])
    assert np.array_equal(frame_classes, ref_classes)
    assert np.array_equal(overlay, overlay_reference(frame, ref_classes, PALETTE_RGB[:, ::-1], 0.45))
