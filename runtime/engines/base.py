"""The engine protocol and backend selection."""
from __future__ import annotations

import importlib.util
import logging
import platform
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgeseg.errors import EdgesegError

log = logging.getLogger("edgeseg.runtime")


class EngineError(EdgesegError, RuntimeError):
    """An engine that cannot be created or run; the message says what is missing and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # ints; -1 or a string for dynamic axes
    dtype: np.dtype


@runtime_checkable
class Engine(Protocol):
    """What every backend offers. GPU engines also accept device buffers (see their docs)."""

    backend: str
    precision: str

    @property
    def inputs(self) -> list[TensorInfo]: ...

    @property
    def outputs(self) -> list[TensorInfo]: ...

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class EngineIO:
    """`inputs` and `outputs` of an engine, from the `_inputs` / `_outputs` it reads when it loads."""

    _inputs: list[TensorInfo]
    _outputs: list[TensorInfo]

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._outputs


def tensorrt_available() -> tuple[bool, str]:
    """(usable, reason): TensorRT bindings, pycuda and a CUDA device all present."""
    for mod in ("tensorrt", "pycuda"):
        if importlib.util.find_spec(mod) is None:
            return False, f"the {mod} package is not installed (pip install 'edgeseg[tensorrt]')"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return False, "no CUDA device found"
    except Exception as e:  # driver missing, no device, ...
        return False, f"CUDA is not usable: {e}"
    return True, "TensorRT and a CUDA device are present"


def resolve_backend(backend: str, bundle) -> tuple[str, str]:
    """Map 'auto' to a concrete backend; returns (backend, why)."""
    if backend != "auto":
        return backend, "requested"
    has = {a.backend for a in bundle.manifest.artifacts}
    ok, why = tensorrt_available()
    if ok and ("tensorrt" in has or "onnxruntime" in has):
        return "tensorrt", why
    if platform.system() == "Darwin" and "coreml" in has and "onnxruntime" not in has:
        return "coreml", "macOS with a CoreML package"
    if "onnxruntime" in has:
        return "onnxruntime", f"TensorRT not used: {why}" if not ok else why
    if "coreml" in has:
        return "coreml", "the bundle has only a CoreML package"
    raise EngineError(f"bundle {bundle.path} has no artifact a runtime can run; add one with `edgeseg convert`")


def open_engine(bundle, backend: str = "auto", precision: str | None = None, **options: Any) -> Engine:
    """Create the engine for a bundle artifact. `options` go to the backend (threads, compute_units, ...)."""
    chosen, why = resolve_backend(backend, bundle)
    log.info("backend %s (%s)", chosen, why)
    if chosen == "onnxruntime":
        from runtime.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine.from_bundle(bundle, precision=precision, **options)
    if chosen == "tensorrt":
        from runtime.engines.tensorrt import TensorRTEngine

        return TensorRTEngine.from_bundle(bundle, precision=precision, **options)
    if chosen == "coreml":
        from runtime.engines.coreml import CoreMLEngine

        return CoreMLEngine.from_bundle(bundle, precision=precision, **options)
    raise EngineError(f"unknown backend {backend!r}; choose auto, onnxruntime, tensorrt or coreml")
