"""OpenVINO engine: runs a bundle's OpenVINO IR (`model.xml` + `model.bin`, written by
converters/openvino.py) on an Intel or AMD CPU, an Intel GPU or NPU, or wherever AUTO puts it.

    engine = OpenVINOEngine("bundle/model.int8.openvino/model.xml", device="CPU", threads=2)
    out = engine.infer(batch)          # the bundle's preprocessed batch -> {"logits": ...}

`device`: CPU, GPU, NPU or AUTO (also the forms OpenVINO accepts, such as GPU.1 or AUTO:GPU,CPU).
`threads`: CPU inference threads (`INFERENCE_NUM_THREADS`); it applies wherever the CPU runs the
model, AUTO included. The model is compiled for latency (one stream, one request at a time),
which is how the pipeline calls it.

Precision: FP32 and INT8 IRs run their float operations in f32 on the CPU. OpenVINO's CPU default
is bf16 on processors with AVX-512 BF16 or AMX, which would make "fp32" mean something else from
one machine to the next, and NNCF measures INT8 accuracy with f32 float parts: what is deployed is
what was measured. FP16 IRs keep the device's default (bf16 there, else f32; FP16 on GPUs and
NPUs), which is what they are for. `inference_precision` ("f32", "bf16", "f16") overrides it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from runtime.engines.base import EngineError, EngineIO, TensorInfo

log = logging.getLogger("edgeseg.runtime")

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PRECISIONS = ("f32", "bf16", "f16")
MODEL_FILE = "model.xml"  # inside the artifact folder, beside model.bin


def available() -> tuple[bool, str]:
    """(usable, why): the openvino package is installed (its CPU plugin runs on any x86 CPU)."""
    if importlib.util.find_spec("openvino") is None:
        return False, "OpenVINO is not installed (pip install 'edgeseg[openvino]')"
    return True, "OpenVINO on the CPU"


def check_device(device) -> str:
    """CPU | GPU | NPU | AUTO, optionally with OpenVINO's suffixes (GPU.1, AUTO:GPU,CPU)."""
    if not isinstance(device, str) or device.split(":")[0].split(".")[0].upper() not in DEVICES:
        raise EngineError(f"OpenVINO device must be one of {', '.join(DEVICES)} (or a form such as GPU.1, AUTO:GPU,CPU), got {device!r}")
    head, sep, rest = device.partition(":")
    return head.upper() + sep + rest.upper()


def check_threads(threads) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EngineError(f"threads must be a whole number >= 1, got {threads!r}")
    return threads


class OpenVINOEngine(EngineIO):
    backend = "openvino"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", device: str = "CPU",
                 threads: int | None = None, inference_precision: str | None = None):
        device, threads = check_device(device), check_threads(threads)
        if inference_precision is not None and inference_precision not in PRECISIONS:
            raise EngineError(f"inference_precision must be one of {', '.join(PRECISIONS)}, got {inference_precision!r}")
        ok, why = available()
        if not ok:
            raise EngineError(why)
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise EngineError(f"OpenVINO IR not found: {path} (and its .bin); re-create it with `edgeseg convert --to openvino`")
        core = ov.Core()
        wanted = device.split(":")[0].split(".")[0]
        present = core.available_devices
        if wanted != "AUTO" and not any(d.split(".")[0] == wanted for d in present):
            raise EngineError(f"OpenVINO finds no {wanted} device on this machine (it has: {', '.join(present) or 'none'}); "
                              "use device=CPU or AUTO")
        if inference_precision is None and precision in ("fp32", "int8"):
            inference_precision = "f32"
        cpu: dict = {}
        if threads:
            cpu[props.inference_num_threads()] = threads
        if inference_precision:
            cpu[hints.inference_precision()] = getattr(ov.Type, inference_precision)
        if cpu and "CPU" in core.available_devices:
            core.set_property("CPU", cpu)  # applies wherever the CPU plugin runs it, AUTO included
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, device, {hints.performance_mode(): hints.PerformanceMode.LATENCY})
        except Exception as e:  # OpenVINO raises RuntimeError with the plugin's message
            raise EngineError(f"OpenVINO cannot load {path} on {device}: {str(e).strip().splitlines()[0][:300] if str(e) else type(e).__name__}; "
                              "the IR is damaged or the device does not support it") from None
        self.request = self.compiled.create_infer_request()
        # computing on this CPU: the pipeline's other stages compete with it for the cores (runtime.pipeline.Tuner)
        self.on_cpu = all(d.startswith("CPU") for d in self.compiled.get_property("EXECUTION_DEVICES"))
        self.path, self.precision, self.device, self.threads = path, precision, device, threads
        self.inference_precision = inference_precision or "device default"
        self._inputs = [_info(p) for p in self.compiled.inputs]
        self._outputs = [_info(p) for p in self.compiled.outputs]

    @classmethod
    def from_bundle(cls, bundle, precision: str | None = None, **options):
        unknown = set(options) - {"device", "threads", "inference_precision"}
        if unknown:
            raise EngineError(f"the openvino backend takes device, threads and inference_precision; unknown: {', '.join(sorted(unknown))}")
        art = bundle.select("openvino", precision)
        bundle.verify_artifact(art)
        return cls(bundle.artifact_path(art), precision=art.precision, **options)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.request is None:
            raise EngineError("the engine is closed")
        inp = self._inputs[0]
        if batch.dtype != inp.dtype:
            raise EngineError(f"input {inp.name!r} expects {inp.dtype}, got {batch.dtype}; check the bundle's preprocess dtype")
        # share_inputs: no copy of the contiguous batch; outputs are copied (the next infer reuses them)
        result = self.request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True)
        return {o.name: result[i] for i, o in enumerate(self._outputs)}

    def close(self) -> None:
        self.request = self.compiled = None

    def __repr__(self):
        return f"OpenVINOEngine({str(self.path)!r}, {self.precision}, device={self.device}, threads={self.threads or 'default'})"


def _info(port) -> TensorInfo:
    shape = port.get_partial_shape()
    dims = tuple(d.get_length() if d.is_static else -1 for d in shape)
    name = port.get_any_name() if port.get_names() else str(port.get_node().get_friendly_name())
    return TensorInfo(name, dims, np.dtype(port.get_element_type().to_dtype()))
