"""The CUDA kernels of the GPU frame path, launched through pycuda, and their host build.

    pre = GpuPreprocessor(preprocess, gpu)              # frame (device) -> network input (device)
    post = GpuPostprocessor(tables, gpu)                # scores (device) -> class map, overlay (device)

`preprocess.cu` holds the fused preprocessing (resize, letterbox, colour order, normalisation,
layout, dtype, BGR or NV12 input), `postprocess.cu` the classification at frame size (bilinear
upsampling of the scores as runtime.postprocess does, letterbox removed, argmax or one-channel
threshold, hidden classes) and the overlay blend. They are compiled once per device context with
pycuda's SourceModule (pycuda also caches the cubin on disk). Every launch makes the context
current itself, so any thread may call it.

`HostKernels` compiles the same per-pixel code for the CPU with the system C++ compiler; the
tests check it against `edgeseg.spec.Preprocess.apply` and the CPU postprocessing where no GPU
exists, and the CPU-side wiring test runs the whole GPU frame path on it.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.spec import FrameError, Preprocess, check_frame, check_nv12
from runtime.engines.base import EngineError

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("preprocess.cu", "postprocess.cu")
SRC_FORMATS = {"bgr": 0, "rgb": 1, "nv12": 2}
OUT_DTYPES = {"float32": 0, "float16": 1, "uint8": 2}
LAYOUTS = {"nchw": 0, "nhwc": 1}
SCORE_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
BLOCK = (32, 8, 1)
# Kernel argument formats for pycuda's prepared calls (struct codes: P pointer, i int32, f float32, d float64);
# the host build's entry points take the same arguments.
PRE_ARGS = "PPiiiiiPiiiiiiiiddifffffffi"
CLASSIFY_ARGS = "PiiiiiiiiiiiifPP"
OVERLAY_ARGS = "PiiPiPPfPi"
KERNELS = {  # entry point -> (source, argument format)
    "edgeseg_preprocess": ("preprocess.cu", PRE_ARGS),
    "edgeseg_classify": ("postprocess.cu", CLASSIFY_ARGS),
    "edgeseg_overlay": ("postprocess.cu", OVERLAY_ARGS),
}


def kernel_source(name: str) -> str:
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; have {SOURCES}")
    return (SOURCE_DIR / name).read_text()


# -- arguments shared by GPU and host launches ------------------------------------------------------
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
        _, mean, inv_std = pre._normalization()  # the float32 constants Preprocess.apply uses
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


def frame_hw(frame: np.ndarray, source_format: str) -> tuple[int, int]:
    """(height, width) of a BGR/RGB frame, or of an NV12 one ((H * 3 / 2, W) uint8: Y plane, then UV)."""
    if source_format == "nv12":
        check_nv12(frame)
        return frame.shape[0] * 2 // 3, frame.shape[1]
    if source_format not in SRC_FORMATS:
        raise FrameError(f"pixel format must be one of {', '.join(SRC_FORMATS)}, got {source_format!r}")
    check_frame(frame)
    return frame.shape[:2]


@dataclass(frozen=True)
class ClassifyArgs:
    """The scalar arguments of `edgeseg_classify`: the score map, where the frame sits in it, the frame size."""

    dtype: int
    layout: int
    c: int
    h: int
    w: int
    box: tuple[int, int, int, int]  # top, left, height, width in the score map
    frame_w: int
    frame_h: int
    mode: int  # 0 argmax, 1 threshold (one score channel)
    threshold: float

    @classmethod
    def make(cls, shape: tuple[int, ...], dtype, layout: str, box: tuple[int, int, int, int],
             frame_hw: tuple[int, int], threshold: float) -> "ClassifyArgs":
        dt = np.dtype(dtype)
        if dt not in SCORE_DTYPES:
            raise EngineError(f"GPU postprocessing takes float32/float16 scores, the engine outputs {dt}")
        if len(shape) != 4 or shape[0] != 1:
            raise EngineError(f"GPU postprocessing takes a batch of one (1, C, H, W) score map, got {tuple(shape)}")
        _, c, h, w = shape if layout == "nchw" else (shape[0], shape[3], shape[1], shape[2])
        if c > 255:
            raise EngineError(f"{c} classes do not fit a uint8 class map (at most 255)")
        return cls(SCORE_DTYPES[dt], LAYOUTS[layout], int(c), int(h), int(w), tuple(int(v) for v in box),
                   int(frame_hw[1]), int(frame_hw[0]), 1 if c == 1 else 0, float(threshold))

    def scalars(self) -> tuple:
        return (self.dtype, self.layout, self.c, self.h, self.w, *self.box, self.frame_w, self.frame_h, self.mode,
                self.threshold)


def logit_threshold(threshold: float, output_kind: str) -> float:
    """The threshold to compare raw scores with: a probability threshold becomes a logit for logits outputs."""
    if output_kind == "probs":
        return float(threshold)
    t = min(max(float(threshold), 1e-7), 1 - 1e-7)
    return math.log(t / (1 - t))


def overlay_reference(frame_bgr: np.ndarray, frame_classes: np.ndarray, palette_bgr: np.ndarray, alpha: float,
                      draw: np.ndarray) -> np.ndarray:
    """round(frame * (1 - alpha) + colour * alpha) in float32 where draw[class], the frame elsewhere
    (NumPy, the arithmetic the overlay kernel must match bit for bit)."""
    a = np.float32(alpha)
    keep = np.float32(1.0) - a
    colour = np.asarray(palette_bgr, np.uint8)[frame_classes].astype(np.float32)
    blended = np.clip(np.rint(frame_bgr.astype(np.float32) * keep + colour * a), 0, 255).astype(np.uint8)
    return np.where(np.asarray(draw)[frame_classes][..., None] != 0, blended, frame_bgr)


# -- host build of the kernels' per-pixel code --------------------------------------------------------
class HostKernels:
    """The kernels' per-pixel code compiled for the CPU (g++/clang++), called through ctypes.
    `functions[name]` has the kernel's own signature (pointers as addresses)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
        if not cxx:
            raise RuntimeError("no C++ compiler found (g++ or clang++) to build the host kernels")
        digest = hashlib.sha256("".join(kernel_source(n) for n in SOURCES).encode()).hexdigest()[:16]
        out_dir = Path(directory or tempfile.gettempdir()) / f"edgeseg-host-kernels-{digest}"
        out_dir.mkdir(parents=True, exist_ok=True)
        libs = {}
        for name in SOURCES:
            lib = out_dir / (Path(name).stem + ".so")
            if not lib.exists():
                tmp = lib.with_suffix(f".{os.getpid()}.tmp")
                # -ffp-contract=off: no fused multiply-add, so the CPU rounds as NumPy does.
                subprocess.run([cxx, "-x", "c++", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(tmp),
                                str(SOURCE_DIR / name)], check=True, capture_output=True)
                os.replace(tmp, lib)
            libs[name] = ctypes.CDLL(str(lib))
        types = {"P": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float, "d": ctypes.c_double}
        self.functions = {}
        for entry, (source, fmt) in KERNELS.items():
            fn = getattr(libs[source], entry + "_host")
            fn.argtypes = [types[c] for c in fmt]
            self.functions[entry] = fn

    def preprocess(self, pre: Preprocess, frame: np.ndarray, source_format: str = "bgr") -> np.ndarray:
        if pre.dtype == "float16":
            raise ValueError("the host build writes float32 and uint8 only (float16 stores are GPU intrinsics)")
        h, w = frame_hw(frame, source_format)
        a = PreArgs.make(pre, (h, w))
        frame = np.ascontiguousarray(frame)
        out = np.empty(pre.input_shape, np.uint8 if pre.dtype == "uint8" else np.float32)
        src, uv, pitch, uv_pitch = frame.ctypes.data, None, frame.strides[0], 0
        if source_format == "nv12":
            uv, uv_pitch = frame.ctypes.data + h * frame.strides[0], frame.strides[0]
        self.functions["edgeseg_preprocess"](src, uv, w, h, pitch, uv_pitch, SRC_FORMATS[source_format], out.ctypes.data,
                                             *a.scalars_after_dst())
        return out

    def classify(self, scores: np.ndarray, box: tuple[int, int, int, int], frame_size: tuple[int, int],
                 threshold: float = 0.0, lut: np.ndarray | None = None, layout: str = "nchw") -> np.ndarray:
        """(1, C, h, w) float32 scores -> (H, W) uint8 classes at frame size."""
        scores = np.ascontiguousarray(scores, np.float32)
        a = ClassifyArgs.make(scores.shape, scores.dtype, layout, box, frame_size, threshold)
        out = np.empty(frame_size, np.uint8)
        lut = None if lut is None else np.ascontiguousarray(lut, np.uint8)
        self.functions["edgeseg_classify"](scores.ctypes.data, *a.scalars(), None if lut is None else lut.ctypes.data,
                                           out.ctypes.data)
        return out

    def overlay(self, classes: np.ndarray, frame: np.ndarray, palette_bgr: np.ndarray, draw: np.ndarray,
                alpha: float = 0.5) -> np.ndarray:
        classes, frame = np.ascontiguousarray(classes, np.uint8), np.ascontiguousarray(frame)
        palette, draw = _table(palette_bgr, (256, 3)), _table(draw, (256,))
        out = np.empty_like(frame)
        fh, fw = frame.shape[:2]
        self.functions["edgeseg_overlay"](classes.ctypes.data, fw, fh, frame.ctypes.data, frame.strides[0],
                                          palette.ctypes.data, draw.ctypes.data, float(alpha), out.ctypes.data,
                                          out.strides[0])
        return out


def _table(values, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 lookup table of `shape`, zero-filled past the values given (classes the model lacks)."""
    out = np.zeros(shape, np.uint8)
    values = np.asarray(values, np.uint8)
    out[: len(values)] = values[: shape[0]]
    return out


@functools.lru_cache(maxsize=1)
def host_library() -> HostKernels:
    return HostKernels()


# -- GPU --------------------------------------------------------------------------------------------
def _gpu(gpu_or_device):
    from runtime.engines.tensorrt import GpuContext, gpu_context

    return gpu_or_device if isinstance(gpu_or_device, GpuContext) else gpu_context(int(gpu_or_device or 0))


def load_function(gpu, entry: str):
    """A prepared kernel of `gpu`'s context, its module compiled once per context (modules live in a
    context, so the cache sits on the context object; pycuda also caches the cubin on disk)."""
    source, fmt = KERNELS[entry]
    with gpu.lock:
        mod = gpu.modules.get(source)
        if mod is None:
            try:
                from pycuda.compiler import SourceModule
            except ImportError as e:
                raise EngineError(f"pycuda is not installed ({e}); pip install 'edgeseg[tensorrt]' on the GPU machine") from None
            with gpu.active():
                try:
                    # no_extern_c: the sources declare their entry points extern "C" themselves.
                    mod = SourceModule(kernel_source(source), no_extern_c=True, options=["-O3"])
                except Exception as e:  # pycuda.driver.CompileError carries nvcc's output
                    raise EngineError(f"compiling runtime/cuda/{source} failed (is nvcc on PATH?): {e}") from None
            gpu.modules[source] = mod
    fn = mod.get_function(entry)
    fn.prepare(fmt)
    return fn


def _grid(w: int, h: int) -> tuple[int, int, int]:
    return ((w + BLOCK[0] - 1) // BLOCK[0], (h + BLOCK[1] - 1) // BLOCK[1], 1)


class GpuPreprocessor:
    """Launches the fused preprocessing kernel for a `Preprocess` spec into any device buffer."""

    def __init__(self, pre: Preprocess, gpu=0):
        self.pre = pre
        self.gpu = _gpu(gpu)
        self.fn = load_function(self.gpu, "edgeseg_preprocess")
        self._args: dict[tuple[int, int], PreArgs] = {}

    @property
    def output_nbytes(self) -> int:
        return int(np.prod(self.pre.input_shape)) * np.dtype(self.pre.dtype).itemsize

    def launch(self, src_ptr: int, size: tuple[int, int], src_pitch: int, dst_ptr: int, stream,
               source_format: str = "bgr", uv_ptr: int = 0, uv_pitch: int = 0) -> None:
        """Enqueue on `stream`: frame of `size` (h, w) at src_ptr (device) -> network input at dst_ptr (device)."""
        args = self._args.get(size)
        if args is None:
            args = self._args[size] = PreArgs.make(self.pre, size)
        h, w = size
        with self.gpu.active():
            self.fn.prepared_async_call(
                _grid(args.dst_w, args.dst_h), BLOCK, stream, int(src_ptr), int(uv_ptr), w, h, int(src_pitch),
                int(uv_pitch), SRC_FORMATS[source_format], int(dst_ptr), *args.scalars_after_dst())

    def __call__(self, frame: np.ndarray, source_format: str = "bgr") -> np.ndarray:
        """Host convenience (tests, tools): upload, run, download, synchronously, through pinned buffers."""
        cuda = self.gpu.cuda
        h, w = frame_hw(frame, source_format)
        with self.gpu.active():
            host_in = cuda.pagelocked_empty(frame.shape, np.uint8)
            np.copyto(host_in, frame)
            host_out = cuda.pagelocked_empty(self.pre.input_shape, np.dtype(self.pre.dtype))
            stream = cuda.Stream()
            src, dst = cuda.mem_alloc(host_in.nbytes), cuda.mem_alloc(self.output_nbytes)
            try:
                cuda.memcpy_htod_async(src, host_in, stream)
                pitch = host_in.strides[0]
                uv = int(src) + h * pitch if source_format == "nv12" else 0
                self.launch(int(src), (h, w), pitch, int(dst), stream, source_format, uv, pitch if uv else 0)
                cuda.memcpy_dtoh_async(host_out, dst, stream)
                stream.synchronize()
            finally:
                src.free()
                dst.free()
            return np.array(host_out)


@dataclass(frozen=True)
class PostTables:
    """What the postprocessing kernels look up per class: the class map's lookup table (hidden
    classes -> fill), the BGR palette and which classes the overlay draws, 256 entries each."""

    lut: np.ndarray | None  # (256,) uint8, None: classes as the scores give them
    palette_bgr: np.ndarray  # (256, 3) uint8
    draw: np.ndarray  # (256,) uint8, nonzero: blend this class's colour in

    @classmethod
    def from_postprocessor(cls, post) -> "PostTables":
        """The tables of a runtime.postprocess.Postprocessor (its labels, palette, keep/ignore/fill)."""
        from runtime.postprocess import shown_lut

        palette = np.asarray(post.palette, np.uint8).reshape(-1, 3)[:, ::-1]
        return cls(lut=np.asarray(post._lut, np.uint8) if post.hidden else None,
                   palette_bgr=_table(palette, (256, 3)),
                   draw=shown_lut(len(post.labels), post.background, post.hidden))


class GpuPostprocessor:
    """Launches the classification and overlay kernels; its lookup tables live on the device."""

    def __init__(self, tables: PostTables, gpu=0, threshold: float = 0.0):
        self.gpu = _gpu(gpu)
        self.threshold = float(threshold)  # for one-channel scores: class 1 where score > threshold
        self.classify_fn = load_function(self.gpu, "edgeseg_classify")
        self.overlay_fn = load_function(self.gpu, "edgeseg_overlay")
        cuda = self.gpu.cuda
        self._tables = {}
        with self.gpu.active():
            for name, table in (("lut", tables.lut), ("palette", tables.palette_bgr), ("draw", tables.draw)):
                if table is not None:
                    self._tables[name] = cuda.mem_alloc(table.nbytes)
                    cuda.memcpy_htod(self._tables[name], np.ascontiguousarray(table, np.uint8))

    def classify(self, scores_ptr: int, shape: tuple[int, ...], dtype, box: tuple[int, int, int, int],
                 size: tuple[int, int], out_ptr: int, stream, layout: str = "nchw") -> None:
        """Enqueue: (1, C, h, w) (or NHWC) scores at scores_ptr -> (H, W) uint8 classes at frame size `size`
        at out_ptr, the frame placed at `box` (top, left, height, width) of the score map."""
        args = ClassifyArgs.make(shape, dtype, layout, box, size, self.threshold)
        lut = self._tables.get("lut")
        with self.gpu.active():
            self.classify_fn.prepared_async_call(_grid(args.frame_w, args.frame_h), BLOCK, stream, int(scores_ptr),
                                                 *args.scalars(), int(lut) if lut is not None else 0, int(out_ptr))

    def overlay(self, classes_ptr: int, size: tuple[int, int], frame_ptr: int, frame_pitch: int, out_ptr: int,
                out_pitch: int, stream, alpha: float = 0.5) -> None:
        """Enqueue: frame-size classes + BGR frame -> overlay (out_ptr may equal frame_ptr)."""
        h, w = size
        with self.gpu.active():
            self.overlay_fn.prepared_async_call(_grid(w, h), BLOCK, stream, int(classes_ptr), w, h, int(frame_ptr),
                                                int(frame_pitch), int(self._tables["palette"]), int(self._tables["draw"]),
                                                float(alpha), int(out_ptr), int(out_pitch))

    def close(self) -> None:
        if self._tables:
            with self.gpu.active():
                for alloc in self._tables.values():
                    alloc.free()
            self._tables = {}


__all__ = [
    "GpuPreprocessor", "GpuPostprocessor", "PostTables", "HostKernels", "host_library", "PreArgs", "ClassifyArgs",
    "frame_hw", "overlay_reference", "logit_threshold", "load_function", "kernel_source", "KERNELS",
]
