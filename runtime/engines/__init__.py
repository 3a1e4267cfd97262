"""Inference engines behind one small protocol (`runtime.engines.base.Engine`), one module per
backend, found through the table in `runtime.engines.registry`.

`open_engine(bundle, backend="auto")` picks the first backend in the registry's `auto` order that
this machine and the bundle allow (TensorRT with a GPU and an engine built for it, CoreML on
macOS, OpenVINO on x86 for an OpenVINO IR, else ONNX Runtime) and says which it chose and why.
"""
from runtime.engines.base import Engine, EngineError, TensorInfo, check_engine_io, open_engine, resolve_backend
from runtime.engines.registry import BACKENDS, backend_choices, backend_names, get_backend

__all__ = ["Engine", "EngineError", "TensorInfo", "check_engine_io", "open_engine", "resolve_backend", "BACKENDS",
           "backend_choices", "backend_names", "get_backend"]
