"""TensorRT engine on the GPU, through pycuda.

    from runtime.engines.tensorrt import TensorRTEngine
    eng = TensorRTEngine.from_bundle(bundle, precision="fp16")   # builds and caches an engine if needed
    out = eng.infer(batch)                                       # host numpy in, host numpy out
    outs = eng.infer_device({"input": dev_ptr}, stream=stream)   # device pointers in, device buffers out

All CUDA work runs in the device's primary context (retained, pushed around each call): TensorRT's
runtime API uses the primary context, so buffers allocated through pycuda are valid inside TensorRT
and the CUDA preprocessing kernel can write straight into the engine's input buffer.

Engines are checked before they are deserialized: an engine built for another TensorRT release or GPU
(its header in the bundle manifest says which) is rebuilt into the engine cache instead of loaded.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.engines.base import EngineError, EngineIO, TensorInfo

log = logging.getLogger("edgeseg.runtime")

_INSTALL = "pip install 'edgeseg[tensorrt]' (TensorRT and pycuda) on a machine with an NVIDIA GPU and driver"


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


class GpuContext:
    """The primary context of one device, retained for the owner's lifetime and pushed while in use."""

    def __init__(self, device: int = 0):
        cuda = _import_cuda()
        if not 0 <= device < cuda.Device.count():
            raise EngineError(f"no CUDA device {device}: found {cuda.Device.count()}")
        self.cuda = cuda
        self.device = cuda.Device(device)
        self.index = device
        self.context = self.device.retain_primary_context()
        self.modules: dict[str, object] = {}  # compiled kernel modules live in this context

    @contextlib.contextmanager
    def active(self):
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

    def release(self) -> None:
        if self.context is not None:
            self.modules.clear()
            self.context.detach()
            self.context = None


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
        self.host: dict[str, np.ndarray] = {}  # pinned staging buffers
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
        missing = self.context.infer_shapes() if hasattr(self.context, "infer_shapes") else []
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


def _make_logger(trt):
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            level = logging.ERROR if severity <= trt.ILogger.Severity.ERROR else (
                logging.WARNING if severity == trt.ILogger.Severity.WARNING else logging.DEBUG)
            log.log(level, "TensorRT: %s", msg)

    return Logger()


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
        self.gpu = GpuContext(device)
        self.cuda = self.gpu.cuda
        self._slots: list[_Slot] = []
        self.engine = None
        try:
            with self.gpu.active():
                self._logger = _make_logger(trt)
                self._runtime = trt.Runtime(self._logger)
                if (self.header.get("options") or {}).get("version_compatible"):
                    # Version-compatible plans carry the lean runtime that runs them as host code.
                    self._runtime.engine_host_code_allowed = True
                self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
                if self.engine is None:
                    raise EngineError(
                        f"TensorRT {trt.__version__} could not deserialize {path}: it was built by another TensorRT "
                        "version or for another GPU, or the file is damaged; rebuild it with `edgeseg build`"
                    )
                self._inputs, self._outputs = self._discover_io()
                self.stream = self.cuda.Stream()
                for _ in range(max(1, slots)):
                    self._slots.append(_Slot(self))
        except BaseException:
            self.close()
            raise

    # -- construction from a bundle ----------------------------------------------------------------
    BUILD_OPTIONS = ("shapes", "workspace_mb", "version_compatible", "hardware_compatible", "optimization_level",
                     "strongly_typed", "timing_cache")

    @classmethod
    def from_bundle(cls, bundle, precision: str | None = None, *, device: int = 0, build: bool = True,
                    slots: int = 1, **options) -> "TensorRTEngine":
        """The bundle's engine for this GPU and TensorRT; when it has none that fits, build one into the
        engine cache (from the bundle's ONNX graphs) unless build=False. `options` may carry build
        options (BUILD_OPTIONS); options meant for other backends (threads, ...) are ignored."""
        from converters.tensorrt import EngineHeader, Target, stale_reasons

        build_options = {k: v for k, v in options.items() if k in cls.BUILD_OPTIONS}
        ignored = sorted(set(options) - set(build_options))
        if ignored:
            log.debug("TensorRT engine ignores options %s", ignored)

        trt = _import_tensorrt()
        gpu = GpuContext(device)
        try:
            target = Target(trt.__version__, gpu.compute_capability, gpu.name)
        finally:
            gpu.release()
        order = ["fp32", "fp16", "int8"]
        arts = sorted(bundle.find("tensorrt", precision), key=lambda a: order.index(a.precision) if a.precision in order else 9)
        for art in arts:
            try:
                header = EngineHeader.from_dict(art.info)
            except Exception as e:
                log.warning("ignoring %s: its manifest entry has no valid engine header (%s)", art.path, e)
                continue
            reasons = stale_reasons(header, target)
            if reasons:
                log.warning("not loading %s: %s", art.path, "; ".join(reasons))
                continue
            bundle.verify_artifact(art)
            return cls(bundle.artifact_path(art), precision=art.precision, device=device, header=header.to_dict(), slots=slots)
        if not build:
            have = ", ".join(a.path for a in arts) or "none"
            raise EngineError(f"bundle {bundle.path} has no TensorRT engine for this machine ({target.sm}, TensorRT "
                              f"{target.trt_version}; engines: {have}); run `edgeseg build {bundle.path}`")
        return cls.build_cached(bundle, precision or "fp16", device=device, slots=slots, target=target, **build_options)

    @classmethod
    def build_cached(cls, bundle, precision: str, *, device: int = 0, slots: int = 1, target=None,
                     **build_options) -> "TensorRTEngine":
        """Build (or reuse) an engine in the user's engine cache without modifying the bundle."""
        from converters.tensorrt import BuildOptions, bundle_engine_source, cached_engine, default_shapes, import_tensorrt
        from edgeseg.errors import ConversionError

        try:
            trt = import_tensorrt()
            source = bundle_engine_source(bundle, precision, trt, build_options.get("strongly_typed"))
            shapes = build_options.pop("shapes", None) or default_shapes(bundle, source)
            options = BuildOptions(precision=precision, shapes=shapes, device=device, **build_options)
            log.info("building a TensorRT %s engine for %s into the engine cache (first run only)", precision, bundle.path)
            path, header = cached_engine(source, options, target=target)
        except ConversionError as e:
            raise EngineError(str(e)) from None
        return cls(path, precision=precision, device=device, header=header.to_dict(), slots=slots)

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
        gpu = getattr(self, "gpu", None)
        if gpu is None or gpu.context is None:
            return
        with gpu.active():
            for s in self._slots:
                s.free()
            self._slots = []
            self.engine = None
            self._runtime = None
            self.stream = None
        gpu.release()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"TensorRTEngine({str(self.path)!r}, {self.precision})"


__all__ = ["TensorRTEngine", "DeviceTensor", "GpuContext"]
