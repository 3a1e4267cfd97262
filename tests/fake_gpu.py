"""The lowest layer of the GPU path, emulated on the CPU for the wiring tests: `pycuda` and `tensorrt`
stand-ins that record every call, and run it on host memory.

- "Device memory" is host memory: `mem_alloc` returns a buffer whose address is the device pointer,
  so the kernels' host build (runtime.cuda.kernels.HostKernels, the same per-pixel code as the .cu
  files) runs every `prepared_async_call` on the real bytes; copies are memmoves.
- The checks the real libraries make (or leave undefined) are made loudly: every CUDA call needs a
  current context on the calling thread, async copies need page-locked host buffers, contexts are
  pushed and popped in balance, a primary context is never detached, TensorRT's plugins are
  registered before an engine is deserialised.
- The "TensorRT engine" is ONNX Runtime on the bundle's ONNX model, reading its input binding and
  writing its output binding at the addresses the execution context was given.

Nothing here is used outside the tests: the runtime has no knowledge of it.
"""
from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import itertools
import json
import threading
import time
import types

import numpy as np

FAKE_TRT_VERSION = "10.3.0.30"
FAKE_CC = (8, 9)
FAKE_GPU = "Fake GPU (host memory)"


class PinnedArray(np.ndarray):
    """What `pagelocked_empty` returns; async copies accept nothing else."""


class FakeCudaError(RuntimeError):
    pass


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        self.stacks: dict[int, list] = {}  # thread id -> pushed contexts
        self.retained = 0
        self.detached = 0
        self.allocs: dict[int, "DeviceAllocation"] = {}
        self.plugins_ready = False
        self.threads: set[str] = set()

    def add(self, *call):
        with self.lock:
            self.calls.append(call)
            self.threads.add(threading.current_thread().name)

    def need_context(self, what: str):
        if not self.stacks.get(threading.get_ident()):
            raise FakeCudaError(f"{what} on thread {threading.current_thread().name} with no current CUDA context")

    def of(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


def install(monkeypatch, onnx_path: str) -> Recorder:
    """Put the stand-ins in sys.modules (and forget the runtime's per-process CUDA state); returns the recorder."""
    from runtime.cuda.kernels import host_library
    import runtime.engines.tensorrt as rt

    rec = Recorder()
    host = host_library()
    driver, compiler = _driver(rec), _compiler(rec, host)
    pycuda = _module("pycuda")
    pycuda.driver, pycuda.compiler = driver, compiler
    for name, mod in (("pycuda", pycuda), ("pycuda.driver", driver), ("pycuda.compiler", compiler),
                      ("tensorrt", _tensorrt(rec, onnx_path))):
        monkeypatch.setitem(__import__("sys").modules, name, mod)
    monkeypatch.setattr(rt, "_CONTEXTS", {})
    monkeypatch.setattr(rt, "_PLUGINS_READY", False)
    return rec


def _module(name: str) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return m


# -- pycuda.driver ------------------------------------------------------------------------------------
class DeviceAllocation:
    def __init__(self, rec: Recorder, nbytes: int):
        self.rec = rec
        self.buf = np.zeros(max(1, nbytes), np.uint8)
        self.nbytes = nbytes
        self.ptr = self.buf.ctypes.data
        rec.allocs[self.ptr] = self

    def __int__(self):
        return self.ptr

    __index__ = __int__

    def free(self):
        self.rec.need_context("DeviceAllocation.free")
        self.rec.allocs.pop(self.ptr, None)


def _host_bytes(arr: np.ndarray) -> int:
    if not arr.flags.c_contiguous:
        raise FakeCudaError("host buffer is not contiguous")
    return arr.ctypes.data


def _check_device(rec: Recorder, ptr: int, nbytes: int, what: str):
    for base, alloc in rec.allocs.items():
        if base <= ptr and ptr + nbytes <= base + alloc.buf.nbytes:
            return
    raise FakeCudaError(f"{what}: {nbytes} bytes at {ptr:#x} are not inside one device allocation")


def _driver(rec: Recorder) -> types.ModuleType:
    d = _module("pycuda.driver")
    d.Error = FakeCudaError
    stream_ids = itertools.count(1)

    class Context:
        def push(self):
            rec.stacks.setdefault(threading.get_ident(), []).append(self)
            rec.add("push", threading.current_thread().name)

        @staticmethod
        def pop():
            stack = rec.stacks.get(threading.get_ident())
            if not stack:
                raise FakeCudaError("cannot pop non-current context")
            stack.pop()
            rec.add("pop", threading.current_thread().name)

        def detach(self):
            rec.detached += 1
            raise FakeCudaError("a primary context is never detached mid-process")

    class Device:
        def __init__(self, n):
            if n != 0:
                raise FakeCudaError(f"invalid device ordinal {n}")

        @staticmethod
        def count():
            return 1

        def compute_capability(self):
            return FAKE_CC

        def name(self):
            return FAKE_GPU

        def retain_primary_context(self):
            rec.retained += 1
            rec.add("retain_primary_context")
            return Context()

        def get_attribute(self, attr):
            raise FakeCudaError("not reported")

    class Stream:
        def __init__(self):
            rec.need_context("Stream()")
            self.handle = next(stream_ids)

        def synchronize(self):
            rec.need_context("Stream.synchronize")

    class Event:
        def __init__(self):
            self.t = None

        def record(self, stream):
            rec.need_context("Event.record")
            self.t = time.perf_counter()
            rec.add("event", stream.handle)

        def synchronize(self):
            rec.need_context("Event.synchronize")
            if self.t is None:
                raise FakeCudaError("event was never recorded")

        def time_since(self, other):
            return (self.t - other.t) * 1e3

    def mem_alloc(nbytes):
        rec.need_context("mem_alloc")
        return DeviceAllocation(rec, int(nbytes))

    def pagelocked_empty(shape, dtype):
        rec.need_context("pagelocked_empty")
        return np.empty(shape, dtype).view(PinnedArray)

    def _pinned(arr, what):
        if not isinstance(arr, PinnedArray):
            raise FakeCudaError(f"{what}: the host buffer is not page-locked (pagelocked_empty)")

    def memcpy_htod_async(dst, src, stream=None):
        rec.need_context("memcpy_htod_async")
        _pinned(src, "memcpy_htod_async")
        _check_device(rec, int(dst), src.nbytes, "memcpy_htod_async")
        ctypes.memmove(int(dst), _host_bytes(src), src.nbytes)
        rec.add("htod_async", int(dst), src.nbytes, stream.handle if stream else 0)

    def memcpy_dtoh_async(dst, src, stream=None):
        rec.need_context("memcpy_dtoh_async")
        _pinned(dst, "memcpy_dtoh_async")
        _check_device(rec, int(src), dst.nbytes, "memcpy_dtoh_async")
        ctypes.memmove(_host_bytes(dst), int(src), dst.nbytes)
        rec.add("dtoh_async", int(src), dst.nbytes, stream.handle if stream else 0)

    def memcpy_htod(dst, src):
        rec.need_context("memcpy_htod")
        src = np.ascontiguousarray(src)
        _check_device(rec, int(dst), src.nbytes, "memcpy_htod")
        ctypes.memmove(int(dst), _host_bytes(src), src.nbytes)
        rec.add("htod", int(dst), src.nbytes)

    d.init = lambda: None
    d.Context, d.Device, d.Stream, d.Event = Context, Device, Stream, Event
    d.mem_alloc, d.pagelocked_empty = mem_alloc, pagelocked_empty
    d.memcpy_htod_async, d.memcpy_dtoh_async, d.memcpy_htod = memcpy_htod_async, memcpy_dtoh_async, memcpy_htod
    return d


# -- pycuda.compiler ----------------------------------------------------------------------------------
def _compiler(rec: Recorder, host) -> types.ModuleType:
    c = _module("pycuda.compiler")

    class Function:
        def __init__(self, name):
            self.name, self.fmt = name, None

        def prepare(self, fmt):
            self.fmt = fmt

        def prepared_async_call(self, grid, block, stream, *args):
            rec.need_context(f"launching {self.name}")
            if self.fmt is None or len(args) != len(self.fmt):
                raise FakeCudaError(f"{self.name}: {len(args)} arguments for format {self.fmt!r}")
            rec.add("launch", self.name, stream.handle, args)
            host.functions[self.name](*args)  # the same per-pixel code, over the whole grid

    class SourceModule:
        def __init__(self, source, no_extern_c=False, options=()):
            rec.need_context("SourceModule")
            rec.add("compile", source.splitlines()[0][:60])
            self.source = source

        def get_function(self, name):
            if f'extern "C" __global__ void {name}(' not in self.source:
                raise FakeCudaError(f"no kernel {name} in the module")
            return Function(name)

    c.SourceModule = SourceModule
    return c


# -- tensorrt -----------------------------------------------------------------------------------------
def fake_engine_bytes(onnx_path: str) -> bytes:
    """A 'serialized engine' for the stand-in: which ONNX model it runs."""
    return json.dumps({"fake_engine_for": str(onnx_path)}).encode()


def _tensorrt(rec: Recorder, onnx_path: str) -> types.ModuleType:
    import onnxruntime as ort

    t = _module("tensorrt")
    t.__version__ = FAKE_TRT_VERSION
    t.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
    t.DataType = enum.Enum("DataType", ["FLOAT", "HALF"])
    t.nptype = lambda dt: {t.DataType.FLOAT: np.float32, t.DataType.HALF: np.float16}[dt]

    class ILogger:
        Severity = enum.IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

        def __init__(self):
            pass

    def init_libnvinfer_plugins(logger, namespace):
        assert isinstance(logger, ILogger) and namespace == ""
        rec.plugins_ready = True
        rec.add("init_libnvinfer_plugins")
        return True

    class Engine:
        def __init__(self, path):
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.io = [(i.name, tuple(i.shape), t.TensorIOMode.INPUT) for i in self.session.get_inputs()] + \
                      [(o.name, tuple(o.shape), t.TensorIOMode.OUTPUT) for o in self.session.get_outputs()]

        @property
        def num_io_tensors(self):
            return len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def _get(self, name):
            return next(x for x in self.io if x[0] == name)

        def get_tensor_dtype(self, name):
            return t.DataType.FLOAT

        def get_tensor_shape(self, name):
            return self._get(name)[1]

        def get_tensor_mode(self, name):
            return self._get(name)[2]

        def create_execution_context(self):
            rec.need_context("create_execution_context")
            return ExecutionContext(self)

    class ExecutionContext:
        def __init__(self, engine):
            self.engine, self.addresses = engine, {}

        def set_input_shape(self, name, shape):
            return tuple(shape) == self.engine.get_tensor_shape(name)

        def infer_shapes(self):
            return []

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)
            return True

        def get_tensor_shape(self, name):
            return self.engine.get_tensor_shape(name)

        def execute_async_v3(self, stream_handle):
            rec.need_context("execute_async_v3")
            feeds = {}
            for name, shape, mode in self.engine.io:
                n = int(np.prod(shape)) * 4
                _check_device(rec, self.addresses[name], n, f"binding {name}")
                if mode == t.TensorIOMode.INPUT:
                    feeds[name] = np.frombuffer((ctypes.c_char * n).from_address(self.addresses[name]), np.float32).reshape(shape).copy()
            outs = self.engine.session.run(None, feeds)
            for (name, shape, mode), out in zip([x for x in self.engine.io if x[2] == t.TensorIOMode.OUTPUT], outs):
                out = np.ascontiguousarray(out, np.float32)
                ctypes.memmove(self.addresses[name], out.ctypes.data, out.nbytes)
            rec.add("execute", stream_handle, dict(self.addresses))
            return True

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            rec.need_context("deserialize_cuda_engine")
            if not rec.plugins_ready:
                raise FakeCudaError("deserialising before init_libnvinfer_plugins")
            rec.add("deserialize")
            try:
                path = json.loads(bytes(data))["fake_engine_for"]
            except Exception:
                return None  # what TensorRT returns for a plan it cannot read
            return Engine(path)

    t.ILogger, t.Runtime, t.init_libnvinfer_plugins = ILogger, Runtime, init_libnvinfer_plugins
    return t


def add_fake_engine(bundle, precision: str = "fp32"):
    """Write a stand-in engine into `bundle` with the header a real build on the fake GPU would record."""
    from edgeseg.bundle import Artifact, sha256_file
    from edgeseg.engine_cache import BuildOptions, EngineHeader, Target, engine_key

    onnx_path = bundle.artifact_path(bundle.select("onnxruntime", "fp32"))
    name = f"model.sm{FAKE_CC[0]}{FAKE_CC[1]}.trt10.3.{precision}.engine"
    (bundle.path / name).write_bytes(fake_engine_bytes(str(onnx_path)))
    target, options = Target(FAKE_TRT_VERSION, FAKE_CC, FAKE_GPU), BuildOptions(precision)
    model_sha = sha256_file(onnx_path)
    header = EngineHeader(key=engine_key(model_sha, target, options), model_sha256=model_sha, trt_version=FAKE_TRT_VERSION,
                          compute_capability=list(FAKE_CC), gpu_name=FAKE_GPU, precision=precision, shapes={},
                          options=options.key_fields(), engine_sha256=sha256_file(bundle.path / name))
    bundle.add_artifact(Artifact(name, "tensorrt", precision, target=header.key, info=header.to_dict()))
    bundle.save()
    return name
