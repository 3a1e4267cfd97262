"""Inference engines behind one small protocol (`runtime.engines.base.Engine`).

`open_engine(bundle, backend="auto")` picks TensorRT where it and a GPU are present, else
ONNX Runtime (CoreML on macOS when asked), and says which it chose.
"""
from runtime.engines.base import Engine, EngineError, TensorInfo, open_engine, resolve_backend

__all__ = ["Engine", "EngineError", "TensorInfo", "open_engine", "resolve_backend"]
