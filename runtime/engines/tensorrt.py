"""TensorRT engine on the GPU, through pycuda.

    from runtime.engines.tensorrt import TensorRTEngine
    eng = TensorRTEngine.from_bundle(bundle, precision="fp16")   # the bundle's engine built for this GPU
    out = eng.infer(batch)                                       # host numpy in, host numpy out
    outs = eng.infer_device({"input": dev_ptr}, stream=stream)   # device pointers in, device buffers out

The runtime only opens engines a bundle already has. Whether one fits this machine is decided from
its header in the manifest (edgeseg.engine_cache: TensorRT version, GPU, options) before anything
is deserialised; building one is the job of `edgeseg build` or `edgeseg.Segmenter(...,
build_missing=True)` (converters.tensorrt), never of this module.

All CUDA work runs in the device's primary context (`gpu_context(n)`): TensorRT's runtime API works
in it, so buffers allocated through pycuda are valid inside TensorRT, and the CUDA preprocessing
kernel writes straight into the buffer bound as the engine's input.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgeseg.engine_cache import EngineHeader, Target, stale_reasons
from runtime.engines.base import EngineError, EngineIO, TensorInfo

log = logging.getLogger("edgeseg.runtime")

_INSTALL = "pip install 'edgeseg[tensorrt]' (TensorRT and pycuda) on a machine with an NVIDIA GPU and driver"
PRECISION_ORDER = ("fp32", "fp16", "int8")  # without a requested precision: the most accurate engine first


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(f"TensorRT is not installed ({e}); {_INSTALL}, or use --backend onnxruntime") from None
    return trt


def _import_cuda():
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise EngineError(f"pycuda is not installed ({e}); {_INSTALL}, or use --backend onnxruntime") from None
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as e:  # pycuda.driver.Error: no driver, driver too old, ...
        raise EngineError(f"CUDA is not usable ({e}); check the NVIDIA driver, or use --backend onnxruntime") from None
    if count == 0:
        raise EngineError("no CUDA device found; TensorRT needs an NVIDIA GPU (use --backend onnxruntime)")
    return cuda


def _device(cuda, index: int):
    if not 0 <= index < cuda.Device.count():
        raise EngineError(f"no CUDA device {index}: found {cuda.Device.count()}")
    return cuda.Device(index)


def available() -> tuple[bool, str]:
    """(usable, reason): TensorRT bindings, pycuda and a CUDA device all present (the registry's probe)."""
    for mod in ("tensorrt", "pycuda"):
        if importlib.util.find_spec(mod) is None:
            return False, f"the {mod} package is not installed ({_INSTALL})"
    try:
        _import_cuda()
    except EngineError as e:
        return False, str(e)
    return True, "TensorRT and a CUDA device are present"


def device_target(device: int = 0) -> Target:
    """TensorRT version and GPU of this machine, read from `cuda.Device(n)` (no context is created)."""
    trt = _import_tensorrt()
    dev = _device(_import_cuda(), device)
    return Target(trt.__version__, tuple(dev.compute_capability()), dev.name())


# -- the primary context ----------------------------------------------------------------------------
class GpuContext:
    """The primary context of one device, retained once for the whole process and pushed only while
    in use, by whichever thread uses it (`with gpu.active(): ...`).

    Get it with `gpu_context(n)`, never construct it twice: pycuda's `retain_primary_context` does
    not make the context current, and its `detach` of a primary context that is not current pushes it
    and releases it without popping it (an entry left on the thread's context stack each time); the
    last release also resets the primary context, freeing everything allocated in it. So it is
    retained once and never released while the process runs."""

    def __init__(self, cuda, device: int):
        self.cuda = cuda
        self.index = device
        self.device = _device(cuda, device)
        self.context = self.device.retain_primary_context()
        self.modules: dict[str, object] = {}  # compiled kernel modules, which live in this context
        self.lock = threading.Lock()  # guards `modules`

    @contextlib.contextmanager
    def active(self):
        """Make the context current on this thread for the block (nested use is fine: CUDA keeps a stack)."""
        self.context.push()
        try:
            yield self
        finally:
            self.cuda.Context.pop()

    @property
    def compute_capability(self) -> tuple[int, int]:
        return tuple(self.device.compute_capability())

    @property
    def name(self) -> str:
        return self.device.name()

    def __repr__(self):
        return f"GpuContext(device {self.index}: {self.name}, sm{''.join(map(str, self.compute_capability))})"


_CONTEXTS: dict[int, GpuContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def gpu_context(device: int = 0) -> GpuContext:
    """The process's one GpuContext for CUDA device `device`."""
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(device)
        if ctx is None:
            ctx = _CONTEXTS[device] = GpuContext(_import_cuda(), int(device))
        return ctx


@atexit.register
def _forget_modules() -> None:
    # Compiled modules belong to their context; drop them before pycuda tears the driver down.
    for ctx in _CONTEXTS.values():
        ctx.modules.clear()


# -- engines ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in GPU memory owned by the engine (valid until the next call on the same slot)."""

    name: str
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class _Slot:
    """One execution context with its device and pinned buffers. Frames in flight use one slot each,
    since an execution context must not run two inferences at once."""

    def __init__(self, engine: "TensorRTEngine"):
        self.engine = engine
        self.context = engine.engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
        self.device: dict[str, Any] = {}  # name -> DeviceAllocation
        self.capacity: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}  # page-locked staging buffers of the async copies
        self.shapes: dict[str, tuple[int, ...]] = {}

    def buffer(self, name: str, nbytes: int) -> int:
        if self.capacity.get(name, -1) < nbytes:
            old = self.device.pop(name, None)
            if old is not None:
                old.free()
            self.device[name] = self.engine.cuda.mem_alloc(max(nbytes, 1))
            self.capacity[name] = nbytes
        return int(self.device[name])

    def pinned(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        arr = self.host.get(name)
        if arr is None or arr.shape != shape or arr.dtype != dtype:
            arr = self.engine.cuda.pagelocked_empty(shape, dtype)
            self.host[name] = arr
        return arr

    def set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for info in self.engine.inputs:
            shape = tuple(int(d) for d in shapes[info.name])
            if self.shapes.get(info.name) == shape:
                continue
            self.engine.check_shape(info, shape)
            if not self.context.set_input_shape(info.name, shape):
                raise EngineError(f"TensorRT rejected shape {shape} for input {info.name!r} (outside the engine's profile?)")
            self.shapes[info.name] = shape
        missing = self.context.infer_shapes()
        if missing:
            raise EngineError(f"TensorRT needs shapes for {missing}")

    def run(self, inputs: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]], stream) -> dict[str, DeviceTensor]:
        self.set_shapes(shapes)
        for info in self.engine.inputs:
            if not self.context.set_tensor_address(info.name, int(inputs[info.name])):
                raise EngineError(f"TensorRT rejected the address of input {info.name!r}")
        outs = {}
        for info in self.engine.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"output {info.name!r} has an unresolved shape {shape}")
            nbytes = int(np.prod(shape)) * info.dtype.itemsize
            ptr = self.buffer(info.name, nbytes)
            self.context.set_tensor_address(info.name, ptr)
            outs[info.name] = DeviceTensor(info.name, ptr, shape, info.dtype)
        if not self.context.execute_async_v3(stream.handle):
            raise EngineError("TensorRT failed to enqueue the inference (see the TensorRT log)")
        return outs

    def free(self) -> None:
        for alloc in self.device.values():
            alloc.free()
        self.device.clear()
        self.host.clear()
        self.context = None


def make_logger(trt):
    """A trt.ILogger that forwards to Python logging and keeps the error messages (`.errors`) for
    the error a failed call raises; shared with the builder (converters.tensorrt)."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR, trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING, trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(msg)
            log.log(level, "TensorRT: %s", msg)

    return Logger()


_PLUGINS_LOCK = threading.Lock()
_PLUGINS_READY = False


def init_plugins(trt, logger) -> None:
    """Register TensorRT's own plugins once per process, before the first network is parsed or engine
    deserialised: the ONNX parser builds some ops from them (RoiAlign: ROIAlign_TRT), and an engine
    that uses one fails to load otherwise."""
    global _PLUGINS_READY
    with _PLUGINS_LOCK:
        if not _PLUGINS_READY:
            if not trt.init_libnvinfer_plugins(logger, ""):
                log.warning("TensorRT could not register its plugins; engines that use one will not load")
            _PLUGINS_READY = True


def fitting_artifact(bundle, precision: str | None = None, device: int = 0):
    """(the bundle's TensorRT artifact that runs on this GPU and TensorRT, or None; why each other one
    does not). Decided from the headers in the manifest: nothing is deserialised."""
    target = device_target(device)
    arts = sorted(bundle.find("tensorrt", precision),
                  key=lambda a: PRECISION_ORDER.index(a.precision) if a.precision in PRECISION_ORDER else len(PRECISION_ORDER))
    reasons = []
    for art in arts:
        try:
            header = EngineHeader.from_dict(art.info)
        except Exception as e:  # ConversionError, or a manifest whose info is not a mapping
            reasons.append(f"{art.path}: its manifest entry has no valid engine header ({e})")
            continue
        stale = stale_reasons(header, target)
        if stale:
            reasons.append(f"{art.path}: " + "; ".join(stale))
            continue
        return art, reasons
    if not arts:
        reasons.append(f"the bundle has no TensorRT {precision + ' ' if precision else ''}engine")
    return None, reasons


def bundle_problem(bundle, precision: str | None = None) -> str | None:
    """The registry's check for `auto`: why no engine of the bundle runs here (None: one does)."""
    try:
        art, reasons = fitting_artifact(bundle, precision)
    except EngineError as e:
        return str(e)
    if art is not None:
        return None
    return "; ".join(reasons) + f" (build one with `edgeseg build {bundle.path}`)"


class TensorRTEngine(EngineIO):
    """A deserialized TensorRT engine. `infer` takes and returns host arrays; `infer_device` takes
    device pointers (e.g. the CUDA preprocessing output) and leaves outputs on the GPU."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", *, device: int = 0,
                 header: Mapping[str, Any] | None = None, slots: int = 1):
        trt = _import_tensorrt()
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"TensorRT engine not found: {path}")
        self.trt, self.path, self.precision = trt, path, precision
        self.header = dict(header or {})
        self.gpu = gpu_context(device)
        self.cuda = self.gpu.cuda
        self._slots: list[_Slot] = []
        self.engine = self._runtime = self.stream = None
        self._closed = False
        try:
            with self.gpu.active():
                self._logger = make_logger(trt)
                init_plugins(trt, self._logger)
                self._runtime = trt.Runtime(self._logger)
                if (self.header.get("options") or {}).get("version_compatible"):
                    # Version-compatible plans carry the lean runtime that runs them as host code.
                    self._runtime.engine_host_code_allowed = True
                self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
                if self.engine is None:
                    detail = "; ".join(self._logger.errors[-3:])
                    raise EngineError(
                        f"TensorRT {trt.__version__} could not deserialize {path}: it was built by another TensorRT "
                        "version or for another GPU, or the file is damaged; rebuild it with `edgeseg build`"
                        + (f" ({detail})" if detail else "")
                    )
                self._inputs, self._outputs = self._discover_io()
                self.stream = self.cuda.Stream()
                for _ in range(max(1, slots)):
                    self._slots.append(_Slot(self))
        except BaseException:
            self.close()
            raise

    BUILD_OPTIONS = ("shapes", "workspace_mb", "version_compatible", "hardware_compatible", "optimization_level",
                     "strongly_typed", "tf32", "timing_cache")

    @classmethod
    def from_bundle(cls, bundle, precision: str | None = None, *, device: int = 0, slots: int = 1,
                    **options) -> "TensorRTEngine":
        """The bundle's engine for this GPU and TensorRT (its manifest header says which fits).
        Options meant for other backends (threads, ...) are ignored."""
        if options:
            log.debug("TensorRT engine ignores options %s", sorted(options))
        _import_tensorrt()
        art, reasons = fitting_artifact(bundle, precision, device)
        if art is None:
            target = device_target(device)
            raise EngineError(
                f"bundle {bundle.path} has no TensorRT engine for this machine ({target.gpu_name}, {target.sm}, TensorRT "
                f"{target.trt_version}): {'; '.join(reasons)}. Build one with `edgeseg build {bundle.path}`, or open it with "
                "edgeseg.Segmenter(bundle, build_missing=True)")
        for why in reasons:
            log.warning("not loading %s", why)
        bundle.verify_artifact(art)
        return cls(bundle.artifact_path(art), precision=art.precision, device=device, header=art.info, slots=slots)

    # -- I/O ---------------------------------------------------------------------------------------
    def _discover_io(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        trt, eng = self.trt, self.engine
        inputs, outputs = [], []
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            try:
                dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(name)))
            except TypeError:
                raise EngineError(f"tensor {name!r} has type {eng.get_tensor_dtype(name)}, which has no NumPy equivalent; "
                                  "export the model with float32/float16 I/O") from None
            info = TensorInfo(name, tuple(int(d) for d in eng.get_tensor_shape(name)), dtype)
            (inputs if eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(info)
        if not inputs or not outputs:
            raise EngineError(f"engine {self.path} has {len(inputs)} inputs and {len(outputs)} outputs")
        return inputs, outputs

    def profile_shapes(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
        """(min, opt, max) of a dynamic input in profile 0, None for static inputs."""
        info = next(i for i in self._inputs if i.name == name)
        if -1 not in info.shape:
            return None
        mn, opt, mx = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(mn), tuple(opt), tuple(mx)

    def check_shape(self, info: TensorInfo, shape: tuple[int, ...]) -> None:
        if len(shape) != len(info.shape) or any(d != -1 and d != s for d, s in zip(info.shape, shape)):
            raise EngineError(f"input {info.name!r} expects shape {info.shape} (-1: dynamic), got {shape}")
        prof = self.profile_shapes(info.name)
        if prof and any(not (a <= s <= b) for a, s, b in zip(prof[0], shape, prof[2])):
            raise EngineError(f"input {info.name!r} shape {shape} is outside the engine's profile {prof[0]}..{prof[2]}; "
                              "rebuild with a wider --dynamic range")

    # -- inference -----------------------------------------------------------------------------------
    def slot_count(self) -> int:
        return len(self._slots)

    def ensure_slots(self, n: int) -> None:
        with self.gpu.active():
            while len(self._slots) < n:
                self._slots.append(_Slot(self))

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Host batch in, host outputs out (synchronous)."""
        if len(self._inputs) != 1:
            raise EngineError(f"engine has {len(self._inputs)} inputs; use infer_many")
        return self.infer_many({self._inputs[0].name: batch})

    def infer_many(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        slot = self._slots[0]
        with self.gpu.active():
            ptrs, shapes = {}, {}
            for info in self._inputs:
                if info.name not in feeds:
                    raise EngineError(f"missing input {info.name!r}; the engine's inputs are {[i.name for i in self._inputs]}")
                x = np.asarray(feeds[info.name])
                if x.dtype != info.dtype:
                    raise EngineError(f"input {info.name!r} expects {info.dtype}, got {x.dtype}; check the bundle's preprocess dtype")
                self.check_shape(info, x.shape)
                host = slot.pinned(info.name, x.shape, x.dtype)
                np.copyto(host, x)
                ptrs[info.name] = slot.buffer("in:" + info.name, host.nbytes)
                self.cuda.memcpy_htod_async(ptrs[info.name], host, self.stream)
                shapes[info.name] = x.shape
            outs = slot.run(ptrs, shapes, self.stream)
            result = {}
            for name, t in outs.items():
                host = slot.pinned("out:" + name, t.shape, t.dtype)
                self.cuda.memcpy_dtoh_async(host, t.ptr, self.stream)
                result[name] = host
            self.stream.synchronize()
            return {k: v.copy() for k, v in result.items()}

    def infer_device(self, inputs: Mapping[str, int] | int, shapes: Mapping[str, tuple[int, ...]] | None = None,
                     stream=None, slot: int = 0) -> dict[str, DeviceTensor]:
        """Enqueue inference on device inputs (pointers: ints or DeviceAllocations) without synchronizing.

        Outputs stay in the slot's device buffers, valid until that slot runs again; synchronize `stream`
        (default: the engine's) before reading them. Inputs keep their static shape unless `shapes` says.
        """
        if not isinstance(inputs, Mapping):
            inputs = {self._inputs[0].name: inputs}
        shapes = dict(shapes or {})
        for info in self._inputs:
            if info.name not in inputs:
                raise EngineError(f"missing input {info.name!r}")
            if info.name not in shapes:
                if -1 in info.shape:
                    raise EngineError(f"input {info.name!r} is dynamic {info.shape}; pass its shape")
                shapes[info.name] = info.shape
        if not 0 <= slot < len(self._slots):
            raise EngineError(f"slot {slot} does not exist (engine has {len(self._slots)}; call ensure_slots)")
        with self.gpu.active():
            return self._slots[slot].run({k: int(v) for k, v in inputs.items()}, shapes, stream or self.stream)

    def close(self) -> None:
        """Free the engine's GPU memory (the primary context stays: other engines and kernels use it)."""
        if getattr(self, "_closed", True) or getattr(self, "gpu", None) is None:
            return
        self._closed = True
        with self.gpu.active():
            for s in self._slots:
                s.free()
            self._slots = []
            self.engine = self._runtime = self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"TensorRTEngine({str(self.path)!r}, {self.precision})"


__all__ = ["TensorRTEngine", "DeviceTensor", "GpuContext", "gpu_context", "available", "bundle_problem", "device_target",
           "fitting_artifact", "make_logger"]
