"""LiteRT engine: runs a bundle's `.tflite` (written by converters/litert.py) with the LiteRT
interpreter (`ai-edge-litert`), the runtime Android apps and MediaPipe use, on its XNNPACK CPU
kernels.

    engine = LiteRTEngine("bundle/model.int8.tflite", threads=2)
    out = engine.infer(batch)          # the bundle's preprocessed batch -> {"logits": float32}

Inputs and outputs go by the model's signature names (`serving_default`: `input` -> `logits`),
which converters/litert.py takes from the manifest. A full-integer model has int8 input and
output tensors; the engine quantizes the float batch with the input's scale and zero point and
dequantizes the outputs, so callers see the same float interface as every other engine (on
Android the app does the same, see the README).

`threads`: the interpreter's CPU threads (default: every core this process may use; LiteRT's own
default is one). `xnnpack=False` runs LiteRT's built-in kernels instead of the XNNPACK delegate
(for comparison; XNNPACK is the fast path).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from runtime.engines.base import EngineError, EngineIO, TensorInfo

log = logging.getLogger("edgeseg.runtime")

SIGNATURE = "serving_default"


def available() -> tuple[bool, str]:
    """(usable, why): the LiteRT interpreter is installed (it runs on any CPU)."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        return False, "the LiteRT interpreter is not installed (pip install 'edgeseg[litert]')"
    return True, "LiteRT interpreter with XNNPACK on the CPU"


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Tensor:
    """One signature tensor: its interpreter index and, for integer tensors, how to (de)quantize."""

    def __init__(self, name: str, details: dict):
        self.name, self.index = name, details["index"]
        self.dtype = np.dtype(details["dtype"])
        self.shape = tuple(int(d) for d in details["shape_signature"])
        scale, zero = details.get("quantization", (0.0, 0))
        self.quantized = self.dtype.kind in "iu" and scale != 0.0
        self.scale, self.zero = np.float32(scale), np.float32(zero)
        if self.quantized:
            info = np.iinfo(self.dtype)
            self.lo, self.hi = info.min, info.max
            params = details.get("quantization_parameters") or {}
            if len(params.get("scales", [])) > 1:
                raise EngineError(f"tensor {name!r} is quantized per channel; edgeseg models quantize their inputs and outputs per tensor")

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(x / self.scale + self.zero), self.lo, self.hi).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.float32) - self.zero) * self.scale


class LiteRTEngine(EngineIO):
    backend = "litert"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", threads: int | None = None, xnnpack: bool = True):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise EngineError(f"threads must be a whole number >= 1, got {threads!r}")
        ok, why = available()
        if not ok:
            raise EngineError(why)
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        path = Path(path)
        if not path.is_file():
            raise EngineError(f"LiteRT model not found: {path}; re-create it with `edgeseg convert --to litert`")
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.threads = threads or default_threads()
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=self.threads, experimental_op_resolver_type=resolver)
            self.interpreter.allocate_tensors()
            signatures = self.interpreter.get_signature_list()
            key = SIGNATURE if SIGNATURE in signatures else next(iter(signatures), None)
            if key is None:
                raise EngineError(f"{path} has no signature; re-create it with `edgeseg convert --to litert`")
            runner = self.interpreter.get_signature_runner(key)
            ins, outs = runner.get_input_details(), runner.get_output_details()
        except EngineError:
            raise
        except Exception as e:  # the interpreter raises ValueError/RuntimeError for unreadable files
            raise EngineError(f"LiteRT cannot load {path}: {str(e).strip().splitlines()[0][:300] if str(e) else type(e).__name__}; "
                              "the file is damaged or not a LiteRT model") from None
        if len(ins) != 1:
            raise EngineError(f"{path} takes {len(ins)} inputs ({', '.join(ins)}); edgeseg models take one image batch")
        self._in = _Tensor(*next(iter(ins.items())))
        self._outs = [_Tensor(n, d) for n, d in outs.items()]
        self.path, self.precision, self.xnnpack, self.signature = path, precision, xnnpack, key
        self.on_cpu = True  # XNNPACK or the built-in kernels: the pipeline's stages share these cores
        # the interface every engine offers: the float batch in, float outputs back
        float_in = np.dtype(np.float32) if self._in.quantized else self._in.dtype
        self._inputs = [TensorInfo(self._in.name, self._in.shape, float_in)]
        self._outputs = [TensorInfo(o.name, o.shape, np.dtype(np.float32) if o.quantized else o.dtype) for o in self._outs]

    @classmethod
    def from_bundle(cls, bundle, precision: str | None = None, **options):
        unknown = set(options) - {"threads", "xnnpack"}
        if unknown:
            raise EngineError(f"the litert backend takes threads and xnnpack; unknown: {', '.join(sorted(unknown))}")
        art = bundle.select("litert", precision)
        bundle.verify_artifact(art)
        return cls(bundle.artifact_path(art), precision=art.precision, **options)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.interpreter is None:
            raise EngineError("the engine is closed")
        want = self._inputs[0].dtype
        if batch.dtype != want:
            raise EngineError(f"input {self._in.name!r} expects {want}, got {batch.dtype}; check the bundle's preprocess dtype")
        x = self._in.quantize(batch) if self._in.quantized else np.ascontiguousarray(batch)
        self.interpreter.set_tensor(self._in.index, x)
        self.interpreter.invoke()  # releases the GIL
        out = {}
        for o in self._outs:
            y = self.interpreter.get_tensor(o.index)  # a copy: the next invoke reuses the buffer
            out[o.name] = o.dequantize(y) if o.quantized else y
        return out

    def close(self) -> None:
        self.interpreter = None

    def __repr__(self):
        return f"LiteRTEngine({str(self.path)!r}, {self.precision}, threads={self.threads}, xnnpack={self.xnnpack})"
