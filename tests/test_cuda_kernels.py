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

from edgeseg.spec import Preprocess
from runtime.cuda.kernels import SOURCE_DIR, PostTables, overlay_reference
from runtime.postprocess import Postprocessor, shown_lut

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


def _smooth_logits(rng, c, h, w):
    """Scores with regions, as a network gives: uniform cells and class edges both occur."""
    low = rng.standard_normal((c, h // 4 + 2, w // 4 + 2)).astype(np.float32)
    return np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in low])[None]


CLASSIFY_CASES = [  # (preprocess, frame size, score map size): upsampling, stride heads, shrinking, letterbox
    (Preprocess(size=(64, 96), resize="letterbox"), (480, 641), (64, 96)),
    (Preprocess(size=(128, 128)), (720, 1280), (32, 32)),
    (Preprocess(size=(100, 60), resize="letterbox"), (37, 53), (100, 60)),
    (Preprocess(size=(96, 160), resize="letterbox"), (1080, 1920), (12, 20)),
]


@pytest.mark.parametrize("pre,frame_hw,map_hw", CLASSIFY_CASES, ids=lambda v: "x".join(map(str, getattr(v, "size", v))))
@pytest.mark.parametrize("smooth", [True, False], ids=["regions", "noise"])
def test_host_classify_equals_the_cpu_postprocessing(host, rng, pre, frame_hw, map_hw, smooth):
    """Bit for bit the CPU path's class map: bilinear upsampling of the scores, letterbox removed."""
    post = Postprocessor([f"c{i}" for i in range(5)], PALETTE_RGB.tolist(), pre)
    logits = _smooth_logits(rng, 5, *map_hw) if smooth else rng.standard_normal((1, 5, *map_hw)).astype(np.float32)
    expected = post(logits, frame_hw).class_map
    box = post._box(map_hw, frame_hw)
    assert np.array_equal(host.classify(logits, box, frame_hw), expected)
    nhwc = np.ascontiguousarray(logits.transpose(0, 2, 3, 1))
    assert np.array_equal(host.classify(nhwc, box, frame_hw, layout="nhwc"), expected)


def test_host_classify_hidden_classes_use_the_postprocessors_table(host, rng):
    pre = Preprocess(size=(64, 64))
    post = Postprocessor(["background", "a", "b", "c", "d"], PALETTE_RGB.tolist(), pre, ignore=["b"], keep=None)
    logits = _smooth_logits(rng, 5, 64, 64)
    lut = PostTables.from_postprocessor(post).lut
    out = host.classify(logits, post._box((64, 64), (90, 120)), (90, 120), lut=lut)
    assert np.array_equal(out, post(logits, (90, 120)).class_map) and not np.any(out == 2)


def test_host_classify_one_channel_thresholds_the_upsampled_score(host, rng):
    logits = rng.standard_normal((1, 1, 33, 17)).astype(np.float32)
    up = cv2.resize(logits[0, 0], (40, 70), interpolation=cv2.INTER_LINEAR)
    out = host.classify(logits, (0, 0, 33, 17), (70, 40), threshold=0.25)
    near = np.abs(up - 0.25) < 1e-4  # OpenCV's float rounding may differ from the kernel's on the line
    assert np.array_equal(out[~near], (up > 0.25).astype(np.uint8)[~near])


def _upsampled_argmax(logits, box, frame_hw):
    """numpy.argmax over classes of the bilinearly upsampled crop (the CPU path's float32 arithmetic)."""
    from runtime.postprocess import bilinear_axis

    top, left, bh, bw = box
    crop = logits[0, :, top: top + bh, left: left + bw].astype(np.float32)
    y0, y1, wy = bilinear_axis(bh, frame_hw[0])
    x0, x1, wx = bilinear_axis(bw, frame_hw[1])
    a, b = crop[:, y0][:, :, x0], crop[:, y0][:, :, x1]
    c, d = crop[:, y1][:, :, x0], crop[:, y1][:, :, x1]
    t = a + (b - a) * wx[None, None, :]
    u = c + (d - c) * wx[None, None, :]
    return (t + (u - t) * wy[None, :, None]).argmax(0).astype(np.uint8)


def test_host_argmax_nan_follows_numpy(host, rng):
    """numpy.argmax returns the first NaN; the kernel must not skip NaN scores."""
    logits = np.zeros((1, 4, 2, 3), np.float32)
    logits[0, 1] = 5.0  # class 1 wins everywhere...
    logits[0, 2, 0, 0] = np.nan  # ...except where a NaN comes first
    logits[0, 0, 0, 1] = np.nan  # a NaN in class 0
    logits[0, 3, 1, 2] = np.nan
    logits[0, 2, 1, 2] = np.nan  # two NaNs: the first wins
    expected = logits[0].argmax(0).astype(np.uint8)
    assert expected.tolist() == [[2, 0, 1], [1, 1, 2]]
    assert np.array_equal(host.classify(logits, (0, 0, 2, 3), (2, 3)), expected)  # same size: the argmax itself
    # upsampled: NaN spreads into the samples it touches, and there the first NaN class wins, as numpy's
    # argmax of the interpolated scores says
    assert np.array_equal(host.classify(logits, (0, 0, 2, 3), (5, 7)), _upsampled_argmax(logits, (0, 0, 2, 3), (5, 7)))
    big = _smooth_logits(rng, 6, 24, 32)
    big[0, rng.integers(0, 6, 12), rng.integers(0, 24, 12), rng.integers(0, 32, 12)] = np.nan
    assert np.array_equal(host.classify(big, (2, 0, 20, 32), (90, 160)), _upsampled_argmax(big, (2, 0, 20, 32), (90, 160)))


def test_host_overlay_is_exact(host, rng):
    palette = np.zeros((256, 3), np.uint8)
    palette[:5] = PALETTE_RGB[:, ::-1]
    draw = shown_lut(5, 0, {3})  # background (0) and a hidden class (3) stay undrawn, as do unknown classes
    for fh, fw in [(480, 641), (37, 53), (1080, 1920)]:
        classes = rng.integers(0, 7, (fh, fw), dtype=np.uint8)
        frame = rng.integers(0, 256, (fh, fw, 3), np.uint8)
        for alpha in (0.45, 1.0):
            out = host.overlay(classes, frame, palette, draw, alpha=alpha)
            assert np.array_equal(out, overlay_reference(frame, classes, palette, alpha, draw)), (fh, fw, alpha)


def test_host_overlay_matches_the_results_overlay(host, rng):
    """Within a grey level of SegmentationResult.overlay (OpenCV's addWeighted rounds its own way)."""
    from runtime.postprocess import SegmentationResult

    classes = rng.integers(0, 5, (120, 160), dtype=np.uint8)
    frame = rng.integers(0, 256, (120, 160, 3), np.uint8)
    labels = ["background", "a", "b", "c", "d"]
    post = Postprocessor(labels, PALETTE_RGB.tolist(), Preprocess(size=(8, 8)))
    r = SegmentationResult(classes, labels, PALETTE_RGB.tolist(), frame=frame, background=post.background)
    t = PostTables.from_postprocessor(post)
    for alpha, mode in ((0.4, "blend"), (1.0, "fill")):
        diff = np.abs(host.overlay(classes, frame, t.palette_bgr, t.draw, alpha).astype(int)
                      - r.overlay(alpha=alpha, mode=mode).astype(int))
        assert diff.max() <= 1


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
    from runtime.cuda.kernels import GpuPostprocessor, host_library

    cuda = gpu.cuda
    pre, frame_hw, map_hw = CLASSIFY_CASES[0]
    post = Postprocessor([f"c{i}" for i in range(5)], PALETTE_RGB.tolist(), pre)
    logits = _smooth_logits(rng, 5, *map_hw).astype(dtype)
    logits[0, 2, 5, 7] = np.nan  # the NaN rule on the device too
    frame = rng.integers(0, 256, (*frame_hw, 3), np.uint8)
    tables = PostTables.from_postprocessor(post)
    k = GpuPostprocessor(tables, gpu)
    box = post._box(map_hw, frame_hw)
    with gpu.active():
        stream = cuda.Stream()
        h_logits = cuda.pagelocked_empty(logits.shape, logits.dtype)
        h_frame = cuda.pagelocked_empty(frame.shape, np.uint8)
        np.copyto(h_logits, logits)
        np.copyto(h_frame, frame)
        h_map, h_out = cuda.pagelocked_empty(frame_hw, np.uint8), cuda.pagelocked_empty(frame.shape, np.uint8)
        d_logits, d_frame = cuda.mem_alloc(logits.nbytes), cuda.mem_alloc(frame.nbytes)
        d_map, d_out = cuda.mem_alloc(h_map.nbytes), cuda.mem_alloc(frame.nbytes)
        cuda.memcpy_htod_async(d_logits, h_logits, stream)
        cuda.memcpy_htod_async(d_frame, h_frame, stream)
    k.classify(int(d_logits), logits.shape, logits.dtype, box, frame_hw, int(d_map), stream)  # pushes the context itself
    k.overlay(int(d_map), frame_hw, int(d_frame), frame.strides[0], int(d_out), frame.strides[0], stream, alpha=0.45)
    with gpu.active():
        cuda.memcpy_dtoh_async(h_map, d_map, stream)
        cuda.memcpy_dtoh_async(h_out, d_out, stream)
        stream.synchronize()
        for a in (d_logits, d_frame, d_map, d_out):
            a.free()
    k.close()
    expected = host_library().classify(logits.astype(np.float32), box, frame_hw)
    assert np.array_equal(h_map, expected)
    if dtype == np.float32:
        assert np.mean(h_map == post(logits, frame_hw).class_map) == 1.0 or np.isnan(logits).any()
    assert np.array_equal(h_out, overlay_reference(frame, expected, tables.palette_bgr, 0.45, tables.draw))


# -- GPU: the whole frame path around a device engine made of one CUDA kernel ---------------------------
HEAD_KERNEL = r"""
extern "C" __global__ void linear_head(const float* x, float* y, int hw, const float* w, const float* b, int c)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= hw) return;
    for (int k = 0; k < c; ++k) {
        float v = b[k];
        for (int j = 0; j < 3; ++j) v = __fadd_rn(v, __fmul_rn(w[k * 3 + j], x[j * hw + i]));
        y[k * hw + i] = v;
    }
}
"""


class _HeadEngine:
    """A device engine (what GpuFramePath drives, as it drives TensorRTEngine) whose network is a 1x1
    convolution from the input to C scores, in one CUDA kernel: the GPU frame path without TensorRT."""

    backend, precision = "cuda-test-head", "fp32"

    def __init__(self, gpu, pre, weights, bias):
        from pycuda.compiler import SourceModule

        from runtime.engines.base import TensorInfo

        self.gpu, self.pre = gpu, pre
        self.w, self.b = np.ascontiguousarray(weights, np.float32), np.ascontiguousarray(bias, np.float32)
        c, (h, w) = len(bias), pre.size
        self.inputs = [TensorInfo("input", pre.input_shape, np.dtype(np.float32))]
        self.outputs = [TensorInfo("logits", (1, c, h, w), np.dtype(np.float32))]
        with gpu.active():
            self.fn = SourceModule(HEAD_KERNEL, no_extern_c=True).get_function("linear_head")
            self.d_w, self.d_b = gpu.cuda.mem_alloc(self.w.nbytes), gpu.cuda.mem_alloc(self.b.nbytes)
            gpu.cuda.memcpy_htod(self.d_w, self.w)
            gpu.cuda.memcpy_htod(self.d_b, self.b)
        self.out: list = []

    def check_shape(self, info, shape):
        assert tuple(shape) == tuple(info.shape)

    def ensure_slots(self, n):
        with self.gpu.active():
            while len(self.out) < n:
                self.out.append(self.gpu.cuda.mem_alloc(int(np.prod(self.outputs[0].shape)) * 4))

    def infer_device(self, inputs, shapes=None, stream=None, slot=0):
        from runtime.engines.tensorrt import DeviceTensor

        _, c, h, w = self.outputs[0].shape
        with self.gpu.active():
            self.fn(np.intp(int(inputs["input"])), self.out[slot], np.int32(h * w), self.d_w, self.d_b, np.int32(c),
                    block=(256, 1, 1), grid=((h * w + 255) // 256, 1), stream=stream)
        return {"logits": DeviceTensor("logits", int(self.out[slot]), self.outputs[0].shape, np.dtype(np.float32))}

    def reference(self, frame):
        x = self.pre.apply(frame)[0].reshape(3, -1)
        return (self.w @ x + self.b[:, None]).reshape(1, len(self.b), *self.pre.size).astype(np.float32)

    def close(self):
        with self.gpu.active():
            for a in (self.d_w, self.d_b, *self.out):
                a.free()
        self.out = []


@pytest.mark.gpu
@pytest.mark.parametrize("pre", [Preprocess(size=(96, 128), resize="letterbox"), Preprocess(size=(128, 128))],
                         ids=["letterbox", "stretch"])
def test_gpu_frame_path_on_a_device_engine(gpu, rng, tmp_path, pre):
    from edgeseg.bundle import Bundle, Manifest
    from runtime.segmenter import Segmenter

    labels = ["background", "red", "green", "blue"]
    bundle = Bundle.create(tmp_path / "b", Manifest(labels=labels, palette=PALETTE_RGB[:4].tolist(), preprocess=pre))
    weights = np.array([[0, 0, 0], [3, -1, -1], [-1, 3, -1], [-1, -1, 3]], np.float32)
    engine = _HeadEngine(gpu, pre, weights, np.array([1.0, 0, 0, 0], np.float32))
    seg = Segmenter(bundle, engine=engine)
    cpu_post = Postprocessor.from_manifest(bundle.manifest)
    assert seg.frame_path == "gpu"
    frames = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(480, 640), (721, 1279), (1080, 1920), (480, 640)]]
    for f in frames:
        expected = cpu_post(engine.reference(f), f.shape[:2]).class_map
        assert np.mean(seg.segment(f).class_map == expected) >= 0.999
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames[:1] * 6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), f)
    results = list(seg.stream(str(folder), save=str(tmp_path / "out" / "%05d.png"), alpha=0.5))
    expected = cpu_post(engine.reference(frames[0]), frames[0].shape[:2])
    for r in results:
        assert np.mean(r.class_map == expected.class_map) >= 0.999
    written = cv2.imread(str(sorted((tmp_path / "out").iterdir())[-1]))
    same = results[-1].class_map == expected.class_map
    assert np.abs(written.astype(int) - results[-1].overlay(alpha=0.5).astype(int))[same].max() <= 1  # drawn on the GPU
    cuda_stages = seg.stats.summary()["cuda_stages"]
    assert cuda_stages["inference"]["count"] == 6 and cuda_stages["upload"]["mean_ms"] > 0
    seg.close()
    engine.close()
