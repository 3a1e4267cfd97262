"""ONNX Runtime engine (CPU by default; CUDA/TensorRT execution providers when installed)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from runtime.engines.base import EngineError, EngineIO, TensorInfo

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def available() -> tuple[bool, str]:
    """(usable, why): ONNX Runtime runs on any CPU once installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False, "onnxruntime is not installed (pip install onnxruntime)"
    return True, "ONNX Runtime on the CPU"


class OnnxRuntimeEngine(EngineIO):
    backend = "onnxruntime"
    thread_safe = True  # InferenceSession.run may be called from several threads at once (ONNX Runtime API docs)

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", threads: int | None = None,
                 providers: list[str] | None = None, spinning: bool = True):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise EngineError(f"ONNX model not found: {path}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        if not spinning:  # let pipeline stages beside the engine have the cores between runs
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:
            raise EngineError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}; the file is damaged or not ONNX") from None
        self.path, self.precision = path, precision
        # computing on this CPU: the pipeline's other stages compete with it for the cores (runtime.pipeline.Tuner)
        self.on_cpu = all(p == "CPUExecutionProvider" for p in self.session.get_providers())
        self._inputs = [TensorInfo(i.name, tuple(i.shape), np.dtype(_ORT_TYPES.get(i.type, np.float32))) for i in self.session.get_inputs()]
        self._outputs = [TensorInfo(o.name, tuple(o.shape), np.dtype(_ORT_TYPES.get(o.type, np.float32))) for o in self.session.get_outputs()]

    @classmethod
    def from_bundle(cls, bundle, precision: str | None = None, **options):
        art = bundle.select("onnxruntime", precision)
        bundle.verify_artifact(art)
        return cls(bundle.artifact_path(art), precision=art.precision, **options)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        inp = self._inputs[0]
        if batch.dtype != inp.dtype:
            raise EngineError(f"input {inp.name!r} expects {inp.dtype}, got {batch.dtype}; check the bundle's preprocess dtype")
        names = [o.name for o in self._outputs]
        return dict(zip(names, self.session.run(names, {inp.name: batch})))

    def close(self) -> None:
        self.session = None

    def __repr__(self):
        return f"OnnxRuntimeEngine({str(self.path)!r}, {self.precision})"
