"""CUDA preprocessing and postprocessing through pycuda, and the two-frames-in-flight GPU pipeline.

    from runtime.cuda.kernels import GpuPipeline
    pipe = GpuPipeline(engine, bundle.manifest)       # engine: runtime.engines.tensorrt.TensorRTEngine
    for res in pipe.run(frames):                      # frames: BGR uint8 arrays
        res.class_map, res.overlay, res.timings

Each frame goes: pinned host buffer -> async copy -> fused preprocessing kernel writing the engine's
input buffer -> TensorRT -> classify kernel -> frame-size class map (+ overlay) -> async copy back.
Two frames are in flight on two streams, so one frame's copies overlap the other's compute.

The kernels (`preprocess.cu`, `postprocess.cu`) are compiled once per device context with pycuda's
SourceModule (pycuda also caches the cubin on disk). `host_library()` compiles the same per-pixel
code for the CPU with the system C++ compiler, which the tests use to check the arithmetic against
`edgeseg.spec.Preprocess.apply` where no GPU exists.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from edgeseg.spec import Preprocess, check_frame
from runtime.engines.base import EngineError

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("preprocess.cu", "postprocess.cu")
SRC_FORMATS = {"bgr": 0, "rgb": 1, "nv12": 2}
OUT_DTYPES = {"float32": 0, "float16": 1, "uint8": 2}
LAYOUTS = {"nchw": 0, "nhwc": 1}
BLOCK = (32, 8, 1)
# Kernel argument formats for pycuda's prepared calls (struct codes: P pointer, i int32, f float32, d float64).
PRE_ARGS = "PPiiiiiPiiiiiiiiddifffffffi"
CLASSIFY_ARGS = "PiiiiiiifP"
OVERLAY_ARGS = "PiiiiiiPiiiPifiPiP"


def kernel_source(name: str) -> str:
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; have {SOURCES}")
    return (SOURCE_DIR / name).read_text()


# -- geometry shared by GPU and host launches ---------------------------------------------------------
@dataclass(frozen=True)
class PreArgs:
    """The scalar kernel arguments of `edgeseg_preprocess` for one frame size."""

    src_w: int
    src_h: int
    dst_w: int
    dst_h: int
    out_dtype: int
    layout: int
    box: tuple[int, int, int, int]  # top, left, height, width
    scale_x: float
    scale_y: float
    out_rgb: int
    pad: float
    mean: tuple[float, float, float]
    inv_std: tuple[float, float, float]
    normalize: int

    @classmethod
    def make(cls, pre: Preprocess, frame_hw: tuple[int, int]) -> "PreArgs":
        h, w = frame_hw
        H, W = pre.size
        box = pre.letterbox((h, w))
        mean = np.asarray(pre.mean, np.float32)
        inv_std = (1.0 / np.asarray(pre.std, np.float32)).astype(np.float32)  # as Preprocess.normalize
        return cls(
            src_w=w, src_h=h, dst_w=W, dst_h=H, out_dtype=OUT_DTYPES[pre.dtype], layout=LAYOUTS[pre.layout],
            box=(box.top, box.left, box.height, box.width),
            # OpenCV's resize uses 1 / (dst / src) in double precision.
            scale_x=1.0 / (box.width / w), scale_y=1.0 / (box.height / h),
            out_rgb=1 if pre.color == "rgb" else 0, pad=float(pre.pad_value),
            mean=tuple(float(m) for m in mean), inv_std=tuple(float(s) for s in inv_std),
            normalize=0 if pre.dtype == "uint8" else 1,
        )

    def scalars_after_dst(self) -> tuple:
        return (self.dst_w, self.dst_h, self.out_dtype, self.layout, *self.box, self.scale_x, self.scale_y,
                self.out_rgb, self.pad, *self.mean, *self.inv_std, self.normalize)


def _frame_hw(frame: np.ndarray, source_format: str) -> tuple[int, int]:
    if source_format == "nv12":
        if frame.ndim != 2 or frame.dtype != np.uint8 or frame.shape[0] % 3 or frame.shape[1] % 2:
            raise ValueError(f"an NV12 frame is a (H * 3 / 2, W) uint8 array with even H and W, got {frame.shape} {frame.dtype}")
        return frame.shape[0] * 2 // 3, frame.shape[1]
    check_frame(frame)
    return frame.shape[:2]


# -- NumPy references for postprocessing ------------------------------------------------------------
def classify_reference(logits: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """(N, C, H, W) scores -> (N, H, W) uint8: argmax (first maximum), or score > threshold when C == 1."""
    logits = np.asarray(logits)
    if logits.shape[1] == 1:
        return (logits[:, 0].astype(np.float32) > np.float32(threshold if threshold is not None else 0.0)).astype(np.uint8)
    return logits.argmax(1).astype(np.uint8)


def overlay_reference(frame_bgr: np.ndarray, frame_classes: np.ndarray, palette_bgr: np.ndarray, alpha: float,
                      skip_background: bool = True) -> np.ndarray:
    """round(frame * (1 - alpha) + colour * alpha) in float32 where a class is drawn."""
    palette_bgr = np.asarray(palette_bgr, np.uint8)
    a = np.float32(alpha)
    keep = np.float32(1.0) - a
    colour = palette_bgr[np.minimum(frame_classes, len(palette_bgr) - 1)].astype(np.float32)
    blended = np.clip(np.rint(frame_bgr.astype(np.float32) * keep + colour * a), 0, 255).astype(np.uint8)
    draw = frame_classes < len(palette_bgr)
    if skip_background:
        draw &= frame_classes != 0
    return np.where(draw[..., None], blended, frame_bgr)


def logit_threshold(threshold: float, output_kind: str) -> float:
    """The threshold to compare raw scores with: a probability threshold becomes a logit for logits outputs."""
    if output_kind == "probs":
        return float(threshold)
    t = min(max(float(threshold), 1e-7), 1 - 1e-7)
    return math.log(t / (1 - t))


# -- host build of the kernels' per-pixel code --------------------------------------------------------
class HostKernels:
    """The kernels' per-pixel code compiled for the CPU (g++/clang++), called through ctypes."""

    def __init__(self, directory: str | os.PathLike | None = None):
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
        if not cxx:
            raise RuntimeError("no C++ compiler found (g++ or clang++) to build the host kernels")
        digest = hashlib.sha256((kernel_source("preprocess.cu") + kernel_source("postprocess.cu")).encode()).hexdigest()[:16]
        out_dir = Path(directory or tempfile.gettempdir()) / f"edgeseg-host-kernels-{digest}"
        out_dir.mkdir(parents=True, exist_ok=True)
        self._libs = {}
        for name in SOURCES:
            lib = out_dir / (Path(name).stem + ".so")
            if not lib.exists():
                tmp = lib.with_suffix(f".{os.getpid()}.tmp")
                # -ffp-contract=off: no fused multiply-add, so the CPU rounds as NumPy does.
                subprocess.run([cxx, "-x", "c++", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(tmp),
                                str(SOURCE_DIR / name)], check=True, capture_output=True)
                os.replace(tmp, lib)
            self._libs[name] = ctypes.CDLL(str(lib))
        P, I, F, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_double
        fmt = {"P": P, "i": I, "f": F, "d": D}
        self.preprocess_fn = self._libs["preprocess.cu"].edgeseg_preprocess_host
        self.preprocess_fn.argtypes = [fmt[c] for c in PRE_ARGS]
        self.classify_fn = self._libs["postprocess.cu"].edgeseg_classify_host
        self.classify_fn.argtypes = [fmt[c] for c in CLASSIFY_ARGS]
        self.overlay_fn = self._libs["postprocess.cu"].edgeseg_overlay_host
        self.overlay_fn.argtypes = [fmt[c] for c in OVERLAY_ARGS]

    def preprocess(self, pre: Preprocess, frame: np.ndarray, source_format: str = "bgr") -> np.ndarray:
        if pre.dtype == "float16":
            raise ValueError("the host build writes float32 and uint8 only (float16 stores are GPU intrinsics)")
        h, w = _frame_hw(frame, source_format)
        a = PreArgs.make(pre, (h, w))
        frame = np.ascontiguousarray(frame)
        out = np.empty(pre.input_shape, np.uint8 if pre.dtype == "uint8" else np.float32)
        src, uv, pitch, uv_pitch = frame.ctypes.data, None, frame.strides[0], 0
        if source_format == "nv12":
            uv, uv_pitch = frame.ctypes.data + h * frame.strides[0], frame.strides[0]
        self.preprocess_fn(src, uv, w, h, pitch, uv_pitch, SRC_FORMATS[source_format], out.ctypes.data,
                           *a.scalars_after_dst())
        return out

    def classify(self, logits: np.ndarray, threshold: float = 0.0) -> np.ndarray:
        logits = np.ascontiguousarray(logits, np.float32)
        n, c, h, w = logits.shape
        out = np.empty((n, h, w), np.uint8)
        self.classify_fn(logits.ctypes.data, 0, 0, n, c, h, w, 1 if c == 1 else 0, float(threshold), out.ctypes.data)
        return out

    def overlay(self, classes: np.ndarray, pre: Preprocess, frame: np.ndarray, palette_bgr: np.ndarray,
                alpha: float = 0.5, skip_background: bool = True) -> tuple[np.ndarray, np.ndarray]:
        classes = np.ascontiguousarray(classes, np.uint8)
        frame = np.ascontiguousarray(frame)
        palette = np.ascontiguousarray(palette_bgr, np.uint8)
        fh, fw = frame.shape[:2]
        box = pre.letterbox((fh, fw))
        out = np.empty_like(frame)
        frame_classes = np.empty((fh, fw), np.uint8)
        self.overlay_fn(classes.ctypes.data, classes.shape[1], classes.shape[0], box.top, box.left, box.height, box.width,
                        frame.ctypes.data, fw, fh, frame.strides[0], palette.ctypes.data, len(palette), float(alpha),
                        int(skip_background), out.ctypes.data, out.strides[0], frame_classes.ctypes.data)
        return frame_classes, out


@functools.lru_cache(maxsize=1)
def host_library() -> HostKernels:
    return HostKernels()


# -- GPU --------------------------------------------------------------------------------------------
def _gpu(gpu_or_device):
    from runtime.engines.tensorrt import GpuContext, gpu_context

    return gpu_or_device if isinstance(gpu_or_device, GpuContext) else gpu_context(int(gpu_or_device or 0))


def load_module(gpu, name: str):
    """The compiled module for `name` in `gpu`'s context, compiled once per context (modules live in
    a context, so the cache sits on the context object; pycuda also caches the cubin on disk)."""
    mod = gpu.modules.get(name)
    if mod is None:
        try:
            from pycuda.compiler import SourceModule
        except ImportError as e:
            raise EngineError(f"pycuda is not installed ({e}); pip install 'edgeseg[tensorrt]' on the GPU machine") from None
        with gpu.active():
            try:
                # no_extern_c: the sources declare their entry points extern "C" themselves.
                mod = SourceModule(kernel_source(name), no_extern_c=True, options=["-O3"])
            except Exception as e:  # pycuda.driver.CompileError carries nvcc's output
                raise EngineError(f"compiling runtime/cuda/{name} failed (is nvcc on PATH?): {e}") from None
        gpu.modules[name] = mod
    return mod


def _function(gpu, module: str, name: str, fmt: str):
    f = load_module(gpu, module).get_function(name)
    f.prepare(fmt)
    return f


def _grid(w: int, h: int, z: int = 1) -> tuple[int, int, int]:
    return ((w + BLOCK[0] - 1) // BLOCK[0], (h + BLOCK[1] - 1) // BLOCK[1], z)


class GpuPreprocessor:
    """Launches the fused preprocessing kernel for a `Preprocess` spec into any device buffer."""

    def __init__(self, pre: Preprocess, gpu=0):
        self.pre = pre
        self.gpu = _gpu(gpu)
        self.fn = _function(self.gpu, "preprocess.cu", "edgeseg_preprocess", PRE_ARGS)
        self._args: dict[tuple[int, int], PreArgs] = {}

    @property
    def output_nbytes(self) -> int:
        return int(np.prod(self.pre.input_shape)) * np.dtype(self.pre.dtype).itemsize

    def launch(self, src_ptr: int, frame_hw: tuple[int, int], src_pitch: int, dst_ptr: int, stream,
               source_format: str = "bgr", uv_ptr: int = 0, uv_pitch: int = 0) -> None:
        """Enqueue on `stream`: frame at src_ptr (device) -> network input at dst_ptr (device)."""
        args = self._args.get(frame_hw)
        if args is None:
            args = self._args[frame_hw] = PreArgs.make(self.pre, frame_hw)
        h, w = frame_hw
        self.fn.prepared_async_call(
            _grid(args.dst_w, args.dst_h), BLOCK, stream, int(src_ptr), int(uv_ptr), w, h, int(src_pitch), int(uv_pitch),
            SRC_FORMATS[source_format], int(dst_ptr), *args.scalars_after_dst())

    def __call__(self, frame: np.ndarray, source_format: str = "bgr") -> np.ndarray:
        """Host convenience (tests, tools): upload, run, download, synchronously."""
        cuda = self.gpu.cuda
        h, w = _frame_hw(frame, source_format)
        frame = np.ascontiguousarray(frame)
        with self.gpu.active():
            stream = cuda.Stream()
            src = cuda.mem_alloc(frame.nbytes)
            dst = cuda.mem_alloc(self.output_nbytes)
            try:
                cuda.memcpy_htod_async(src, frame, stream)
                uv = int(src) + h * frame.strides[0] if source_format == "nv12" else 0
                self.launch(int(src), (h, w), frame.strides[0], int(dst), stream, source_format, uv, frame.strides[0] if uv else 0)
                out = np.empty(self.pre.input_shape, np.dtype(self.pre.dtype))
                cuda.memcpy_dtoh_async(out, dst, stream)
                stream.synchronize()
            finally:
                src.free()
                dst.free()
        return out


class GpuPostprocessor:
    """Launches the classify and overlay kernels."""

    def __init__(self, num_classes: int, palette_rgb, gpu=0, output_kind: str = "logits", threshold: float = 0.5):
        if output_kind not in ("logits", "probs"):
            raise EngineError(f"GPU postprocessing needs logits or probabilities, this graph outputs {output_kind!r}; "
                              "convert the model without --argmax")
        self.gpu = _gpu(gpu)
        self.num_classes = int(num_classes)
        self.output_kind = output_kind
        self.threshold = logit_threshold(threshold, output_kind)
        self.classify_fn = _function(self.gpu, "postprocess.cu", "edgeseg_classify", CLASSIFY_ARGS)
        self.overlay_fn = _function(self.gpu, "postprocess.cu", "edgeseg_overlay", OVERLAY_ARGS)
        palette_bgr = np.ascontiguousarray(np.asarray(palette_rgb, np.uint8)[:, ::-1])
        with self.gpu.active():
            self.palette = self.gpu.cuda.mem_alloc(max(palette_bgr.nbytes, 1))
            self.gpu.cuda.memcpy_htod(self.palette, palette_bgr)
        self.palette_len = len(palette_bgr)

    def classify(self, logits_ptr: int, shape: tuple[int, int, int, int], dtype, out_ptr: int, stream,
                 layout: str = "nchw") -> None:
        """(N, C, H, W) (or NHWC) float32/float16 scores at logits_ptr -> (N, H, W) uint8 at out_ptr."""
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float16):
            raise EngineError(f"classify takes float32/float16 scores, got {dt}")
        n, c, h, w = shape if layout == "nchw" else (shape[0], shape[3], shape[1], shape[2])
        self.classify_fn.prepared_async_call(
            _grid(w, h, n), BLOCK, stream, int(logits_ptr), 1 if dt == np.float16 else 0, LAYOUTS[layout],
            n, c, h, w, 1 if c == 1 else 0, float(self.threshold), int(out_ptr))

    def to_frame(self, classes_ptr: int, classes_hw: tuple[int, int], box, frame_hw: tuple[int, int], stream, *,
                 frame_classes_ptr: int = 0, frame_ptr: int = 0, frame_pitch: int = 0, out_ptr: int = 0,
                 out_pitch: int = 0, alpha: float = 0.5, skip_background: bool = True) -> None:
        """Frame-size class map and/or overlay from a network-size class map (letterbox removed)."""
        fh, fw = frame_hw
        self.overlay_fn.prepared_async_call(
            _grid(fw, fh), BLOCK, stream, int(classes_ptr), classes_hw[1], classes_hw[0], box.top, box.left, box.height,
            box.width, int(frame_ptr), fw, fh, int(frame_pitch), int(self.palette), self.palette_len, float(alpha),
            int(skip_background), int(out_ptr), int(out_pitch), int(frame_classes_ptr))

    def close(self) -> None:
        if self.palette is not None:
            with self.gpu.active():
                self.palette.free()
            self.palette = None


@dataclass
class GpuFrameResult:
    index: int
    class_map: np.ndarray  # (H, W) uint8 at frame size
    overlay: np.ndarray | None  # BGR frame with the classes blended in, when requested
    timings: dict[str, float] = field(default_factory=dict)  # GPU ms per stage (CUDA events), host ms


class _FlightSlot:
    """Buffers and events of one frame in flight."""

    def __init__(self, cuda, index: int, input_nbytes: int, classes_nbytes: int):
        self.index = index
        self.stream = cuda.Stream()
        self.events = {k: cuda.Event() for k in ("start", "uploaded", "preprocessed", "inferred", "classified", "done")}
        self.input = cuda.mem_alloc(input_nbytes)
        self.classes = cuda.mem_alloc(classes_nbytes)
        self.frame_shape: tuple[int, ...] | None = None
        self.frame_host = self.frame_dev = self.out_dev = self.map_dev = None
        self.map_host = self.overlay_host = None
        self.busy = False
        self.meta: dict = {}

    def ensure_frame(self, cuda, shape: tuple[int, ...], frame_hw: tuple[int, int], overlay: bool) -> None:
        if self.frame_shape == shape:
            return
        for a in (self.frame_dev, self.out_dev, self.map_dev):
            if a is not None:
                a.free()
        self.frame_host = cuda.pagelocked_empty(shape, np.uint8)
        self.frame_dev = cuda.mem_alloc(int(np.prod(shape)))
        h, w = frame_hw
        self.map_dev = cuda.mem_alloc(h * w)
        self.map_host = cuda.pagelocked_empty((h, w), np.uint8)
        self.out_dev = cuda.mem_alloc(int(np.prod(shape))) if overlay else None
        self.overlay_host = cuda.pagelocked_empty(shape, np.uint8) if overlay else None
        self.frame_shape = shape

    def free(self) -> None:
        for a in (self.input, self.classes, self.frame_dev, self.out_dev, self.map_dev):
            if a is not None:
                a.free()
        self.input = self.classes = self.frame_dev = self.out_dev = self.map_dev = None


class GpuPipeline:
    """Frames -> class maps (and overlays) entirely on the GPU, two frames in flight."""

    def __init__(self, engine, manifest, *, in_flight: int = 2, overlay: bool = False, alpha: float = 0.5,
                 threshold: float = 0.5, skip_background: bool = True, source_format: str = "bgr"):
        if getattr(engine, "backend", None) != "tensorrt":
            raise EngineError("GpuPipeline runs a TensorRTEngine; use the CPU pipeline for other backends")
        self.engine, self.pre = engine, manifest.preprocess
        self.gpu, self.cuda = engine.gpu, engine.gpu.cuda
        self.overlay, self.alpha, self.skip_background = overlay, alpha, skip_background
        if source_format not in SRC_FORMATS:
            raise EngineError(f"source_format must be one of {sorted(SRC_FORMATS)}, got {source_format!r}")
        if overlay and source_format != "bgr":
            raise EngineError("the GPU overlay blends into BGR frames; use source_format='bgr' or overlay=False")
        self.source_format = source_format
        self.num_classes = manifest.num_classes
        inp = engine.inputs[0]
        shape = tuple(self.pre.input_shape)
        engine.check_shape(inp, shape)
        if np.dtype(self.pre.dtype) != inp.dtype:
            raise EngineError(f"the engine's input {inp.name!r} is {inp.dtype}, preprocessing writes {self.pre.dtype}; "
                              "rebuild the engine from this bundle")
        self.input_name, self.input_shape = inp.name, shape
        self.pre_k = GpuPreprocessor(self.pre, self.gpu)
        self.post_k = GpuPostprocessor(manifest.num_classes, manifest.palette, self.gpu, manifest.output_kind, threshold)
        engine.ensure_slots(in_flight)
        H, W = self.pre.size
        with self.gpu.active():
            self.slots = [_FlightSlot(self.cuda, i, self.pre_k.output_nbytes, H * W) for i in range(in_flight)]
        self._next = 0
        self._count = 0

    def submit(self, frame: np.ndarray) -> _FlightSlot:
        """Enqueue one frame on the next free slot (waiting for that slot's previous frame first)."""
        fh, fw = _frame_hw(frame, self.source_format)
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        if slot.busy:
            raise EngineError("all frames in flight are pending; collect() one before submitting more")
        t0 = time.perf_counter()
        cuda, ev, s = self.cuda, slot.events, slot.stream
        with self.gpu.active():
            slot.ensure_frame(cuda, frame.shape, (fh, fw), self.overlay)
            np.copyto(slot.frame_host, frame)
            pitch = frame.shape[1] * (1 if self.source_format == "nv12" else 3)
            ev["start"].record(s)
            cuda.memcpy_htod_async(slot.frame_dev, slot.frame_host, s)
            ev["uploaded"].record(s)
            uv = int(slot.frame_dev) + fh * pitch if self.source_format == "nv12" else 0
            self.pre_k.launch(int(slot.frame_dev), (fh, fw), pitch, int(slot.input), s, self.source_format, uv, pitch if uv else 0)
            ev["preprocessed"].record(s)
            outs = self.engine.infer_device({self.input_name: int(slot.input)}, {self.input_name: self.input_shape},
                                            stream=s, slot=slot.index)
            ev["inferred"].record(s)
            logits = next(iter(outs.values()))
            self.post_k.classify(logits.ptr, logits.shape, logits.dtype, int(slot.classes), s, layout=self._logits_layout(logits.shape))
            ev["classified"].record(s)
            box = self.pre.letterbox((fh, fw))
            bgr_ptr = int(slot.frame_dev) if self.overlay and self.source_format == "bgr" else 0
            self.post_k.to_frame(int(slot.classes), self.pre.size, box, (fh, fw), s, frame_classes_ptr=int(slot.map_dev),
                                 frame_ptr=bgr_ptr, frame_pitch=pitch, out_ptr=int(slot.out_dev) if bgr_ptr else 0,
                                 out_pitch=pitch, alpha=self.alpha, skip_background=self.skip_background)
            cuda.memcpy_dtoh_async(slot.map_host, slot.map_dev, s)
            if bgr_ptr:
                cuda.memcpy_dtoh_async(slot.overlay_host, slot.out_dev, s)
            ev["done"].record(s)
        slot.busy = True
        slot.meta = {"index": self._count, "submit_ms": (time.perf_counter() - t0) * 1e3, "overlay": bool(bgr_ptr)}
        self._count += 1
        return slot

    def _logits_layout(self, shape: tuple[int, ...]) -> str:
        H, W = self.pre.size
        if len(shape) == 4 and tuple(shape[2:]) == (H, W):
            return "nchw"
        if len(shape) == 4 and tuple(shape[1:3]) == (H, W):
            return "nhwc"
        raise EngineError(f"the engine's output {shape} is not (N, C, {H}, {W}) scores at the input size; "
                          "GPU postprocessing needs full-resolution logits")

    def collect(self, slot: _FlightSlot) -> GpuFrameResult:
        """Wait for a submitted frame and return its results (copies out of the pinned buffers)."""
        ev = slot.events
        t0 = time.perf_counter()
        with self.gpu.active():
            ev["done"].synchronize()
            timings = {
                "upload_ms": ev["uploaded"].time_since(ev["start"]),
                "preprocess_ms": ev["preprocessed"].time_since(ev["uploaded"]),
                "infer_ms": ev["inferred"].time_since(ev["preprocessed"]),
                "postprocess_ms": ev["done"].time_since(ev["inferred"]),
                "gpu_total_ms": ev["done"].time_since(ev["start"]),
            }
        timings["submit_ms"] = slot.meta["submit_ms"]
        timings["wait_ms"] = (time.perf_counter() - t0) * 1e3
        result = GpuFrameResult(slot.meta["index"], slot.map_host.copy(),
                                slot.overlay_host.copy() if slot.meta["overlay"] else None, timings)
        slot.busy = False
        return result

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[GpuFrameResult]:
        """Results in frame order; frame k+1 is enqueued before frame k is waited for."""
        pending: deque[_FlightSlot] = deque()
        for frame in frames:
            if len(pending) == len(self.slots):
                yield self.collect(pending.popleft())
            pending.append(self.submit(frame))
        while pending:
            yield self.collect(pending.popleft())

    def close(self) -> None:
        with self.gpu.active():
            for s in self.slots:
                s.free()
        self.slots = []
        self.post_k.close()


__all__ = [
    "GpuPipeline", "GpuPreprocessor", "GpuPostprocessor", "GpuFrameResult", "HostKernels", "host_library",
    "PreArgs", "classify_reference", "overlay_reference", "logit_threshold", "load_module", "kernel_source",
]
