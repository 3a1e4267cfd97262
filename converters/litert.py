"""A PyTorch segmentation network -> LiteRT (`.tflite`) for Android, in a bundle.

    from converters.litert import add_litert
    add_litert(bundle, torch_model, "int8", calib="synthetic:train")

writes `model.fp32.tflite` (always: the quantizer's input, and the float reference on the phone)
and, for fp16 or int8, `model.fp16.tflite` / `model.int8.tflite`:

* fp32: `litert_torch.convert` of the network exactly as the ONNX graph has it (the same wrapper:
  normalisation folded in or not, ArgMax or not), with the signature `serving_default` taking the
  manifest's input name and returning its output name;
* fp16: FP16 weights (the LiteRT quantizer's float casting; the GPU delegate computes in FP16,
  XNNPACK on the CPU widens them back);
* int8: full-integer quantization with the LiteRT quantizer (`ai-edge-quantizer`, recipe
  `static_wi8_ai8`: int8 weights per channel, int8 activations, int8 input and output tensors),
  calibrated on the bundle's calibration frames through its one `Preprocess`.

Labels, palette, preprocessing and output kind are stored in the model's metadata (the flatbuffer's
`metadata` table, entry `edgeseg`, JSON), as well as the manifest. Every artifact is measured with
the engine that runs it (`runtime.engines.litert`): parity against the FP32 ONNX model, and for
INT8 mIoU per class and mask agreement on held-out frames. The LiteRT quantizer has no accuracy
search: an INT8 model over the budget is kept, marked `within_budget: false`, and the command
says so.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from edgeseg import progress
from edgeseg.bundle import Artifact, Bundle
from edgeseg.errors import ConversionError, option

log = logging.getLogger("edgeseg.convert")

PRECISIONS = ("fp32", "fp16", "int8")
SIGNATURE = "serving_default"
META_KEY = "edgeseg"  # the flatbuffer metadata entry with labels, palette and preprocessing


def artifact_name(precision: str) -> str:
    return f"model.{precision}.tflite"


def add_litert(bundle, model, precision: str = "fp32", *, fold_normalization: bool = False, argmax: bool = False,
               calib: Any = None, eval_data: Any = None, max_miou_drop: float = 0.5, max_images: int = 300,
               eval_max_images: int = 200, report: Callable[[str], None] | None = None) -> list[dict]:
    """Convert `model` (the torch network the bundle's ONNX graph came from) to `model.fp32.tflite`,
    then quantize it to `precision`; returns the manifest entries written."""
    if precision not in PRECISIONS:
        raise ConversionError(f"precision {precision!r} is not available for LiteRT; choose one of {', '.join(PRECISIONS)}")
    if model is None:
        raise ConversionError("LiteRT conversion starts from the PyTorch network (litert-torch converts torch programs), "
                              "not an ONNX file: pass the checkpoint, 'default' or package.module:factory")
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if precision == "int8" and calib is None:
        raise ConversionError(f"INT8 needs calibration frames: pass {option('calib')} with an image folder, a video or a dataset "
                              "(synthetic:train, voc:/path ...)")
    entries = [_convert_fp32(bundle, model, fold_normalization, argmax, report or log.info)]
    if precision != "fp32":
        entries.append(quantize_litert(bundle, precision, calib=calib, eval_data=eval_data, max_miou_drop=max_miou_drop,
                                       max_images=max_images, eval_max_images=eval_max_images, report=report))
    return entries


def _convert_fp32(bundle, model, fold_normalization: bool, argmax: bool, say) -> dict:
    litert_torch = _import("litert_torch", "litert-torch")
    import torch

    from converters.int8 import install, staging
    from converters.onnx import _export_wrapper, _sample_frame
    from converters.parity import check_parity

    man = bundle.manifest
    fp32 = bundle.select("onnxruntime", "fp32")
    bundle.verify_artifact(fp32)
    deployed = _Signature(_export_wrapper(model, man.preprocess, fold_normalization, argmax), man.output_name)
    sample = torch.from_numpy(man.preprocess.apply(_sample_frame(man.preprocess)))
    name = artifact_name("fp32")
    t0 = time.perf_counter()
    say(f"litert: converting the network with litert-torch {litert_torch.__version__}")
    litert_torch.config.show_progress = False
    with staging(bundle) as work:
        staged = work / name
        try:
            with progress.phase("litert: convert"), _quiet():
                litert_torch.convert(deployed.eval(), sample_kwargs={man.input_name: sample}).export(str(staged))
        except Exception as e:  # torch.export or the LiteRT lowering names what it cannot take
            raise ConversionError(f"litert-torch cannot convert the network: {type(e).__name__}: {_first_line(e)}") from None
        write_metadata(staged, _metadata(man))
        return _finish(bundle, staged, "fp32", fp32, {"source": "torch", "litert_torch": litert_torch.__version__}, {},
                       t0, check_parity, install, say, sources=[fp32])


def quantize_litert(bundle, precision: str = "int8", *, calib: Any = None, eval_data: Any = None, max_miou_drop: float = 0.5,
                    max_images: int = 300, eval_max_images: int = 200, float_ops: tuple[str, ...] = (),
                    report: Callable[[str], None] | None = None) -> dict:
    """Quantize the bundle's `model.fp32.tflite` to fp16 weights or full-integer int8 with the LiteRT quantizer.

    float_ops: LiteRT operator names (HARD_SWISH, ...) to leave in float in an int8 model. Measured
    here: XNNPACK runs an int8 HARD_SWISH so slowly that the full-integer default model is slower
    than FP32, and faster than FP32 with HARD_SWISH in float (benchmarks/int8_cpu.py). The
    default stays full-integer: what Android NPU and DSP delegates require."""
    from calibration.evaluate import engine_runner
    from converters.int8 import install, int8_inputs, staging
    from converters.parity import check_parity

    say = report or log.info
    if precision not in ("fp16", "int8"):
        raise ConversionError(f"the LiteRT quantizer writes fp16 or int8, not {precision!r}")
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    base = bundle.find("litert", "fp32")
    if not base:
        raise ConversionError(f"bundle {bundle.path} has no LiteRT FP32 model to quantize; "
                              "convert the network with `edgeseg convert MODEL --to litert` first")
    bundle.verify_artifact(base[0])
    float_path = bundle.artifact_path(base[0])
    fp32 = bundle.select("onnxruntime", "fp32")
    _import("ai_edge_quantizer", "ai-edge-quantizer")
    from ai_edge_quantizer import quantizer, recipe

    inputs = int8_inputs(bundle, calib, eval_data, max_miou_drop=max_miou_drop, max_images=max_images,
                         eval_max_images=eval_max_images) if precision == "int8" else None
    t0 = time.perf_counter()
    qt = quantizer.Quantizer(str(float_path))
    info: dict[str, Any] = {"source": base[0].path, "ai_edge_quantizer": _version("ai-edge-quantizer")}
    metrics: dict[str, Any] = {}
    if precision == "fp16":
        qt.add_weight_only_config(regex=".*", operation_name=quantizer.qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                  algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)
        info["recipe"] = "weight-only float16 (FLOAT_CASTING)"
        qsv = None
    else:
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        for op in float_ops:
            if op not in quantizer.qtyping.TFLOperationName.__members__:
                raise ConversionError(f"unknown LiteRT operator {op!r} in float_ops; e.g. HARD_SWISH, MEAN, RESIZE_BILINEAR")
            qt.update_quantization_recipe(regex=".*", operation_name=quantizer.qtyping.TFLOperationName[op],
                                          algorithm_key=quantizer.AlgorithmName.NO_QUANTIZE)
        info.update(recipe="static_wi8_ai8" + (f" with {', '.join(float_ops)} in float" if float_ops else ""),
                    float_ops=list(float_ops), calibration_frames=len(inputs.calib), calibration_data=inputs.calib.description)
        say(f"litert: calibrating the LiteRT quantizer on {len(inputs.calib)} frames of {inputs.calib.description}")
        with progress.phase("litert: calibrate"), _quiet():
            qsv = qt.calibrate({SIGNATURE: [{bundle.manifest.input_name: x} for x in inputs.calib.inputs]})
    name = artifact_name(precision)
    with staging(bundle) as work:
        staged = work / name
        with progress.phase(f"litert: quantize to {precision}"), _quiet():
            qt.quantize(qsv).export_model(str(staged))
        if META_KEY not in read_metadata_entries(staged):
            write_metadata(staged, _metadata(bundle.manifest))
        if inputs is not None and inputs.evaluator is not None:
            from runtime.engines.litert import LiteRTEngine

            engine = LiteRTEngine(staged, precision=precision)
            final = inputs.measure(engine_runner(engine))
            engine.close()
            metrics = inputs.metrics(final, final, [], "litert")
            ok = "" if metrics["within_budget"] else f" — OVER the {inputs.budget:.2f}-point budget (the LiteRT quantizer keeps every layer INT8)"
            say(f"litert: INT8 mIoU {final['miou']:.4f} vs FP32 {inputs.evaluator.reference['miou']:.4f} "
                f"(drop {final['miou_drop_points']:.2f} pts){ok}")
        elif inputs is not None:
            metrics = inputs.metrics(None, None, [], "litert")
        return _finish(bundle, staged, precision, fp32, info, metrics, t0, check_parity, install, say,
                       sources=[fp32, base[0]])


def _finish(bundle, staged: Path, precision: str, fp32, info: dict, metrics: dict, t0: float, check_parity, install, say,
            sources: list) -> dict:
    from runtime.engines.litert import LiteRTEngine

    man = bundle.manifest
    engine = LiteRTEngine(staged, precision=precision)
    io_names = {"signature": engine.signature, "input": engine.inputs[0].name, "outputs": [o.name for o in engine.outputs],
                "input_dtype": str(engine._in.dtype)}
    if engine._in.quantized:
        io_names["input_quantization"] = {"scale": float(engine._in.scale), "zero_point": int(engine._in.zero)}
    parity = check_parity(bundle.artifact_path(fp32), engine, man.preprocess, frames=8, output_kind=man.output_kind)
    engine.close()
    metrics["size_bytes"] = staged.stat().st_size
    info.update(io_names, seconds=round(time.perf_counter() - t0, 1))
    art = Artifact(staged.name, "litert", precision, parity=parity, metrics=metrics, info=info)
    install(bundle, staged, art, sources=sources)
    say(f"litert: wrote {art.path} (mask agreement with FP32 ONNX {100 * parity['mask_agreement']:.2f}%)")
    return {"artifact": art.path, "precision": precision, "parity": parity, "metrics": metrics, "info": info}


def _Signature(net, output_name: str):
    """The deployed network with the manifest's names: litert-torch names the signature's input
    after the keyword it is called with and its outputs after the keys of the returned dict."""
    import torch

    class Signature(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, **inputs):
            (x,) = inputs.values()
            return {output_name: self.net(x)}

    return Signature()


# -- metadata --------------------------------------------------------------------------------
def _metadata(man) -> dict:
    return {"labels": man.labels, "palette": man.palette, "preprocess": man.preprocess.to_dict(),
            "output_kind": man.output_kind, "input": man.input_name, "output": man.output_name}


def write_metadata(path: Path, meta: dict, key: str = META_KEY) -> None:
    """Store `meta` as JSON in the model's metadata table (name `key`), replacing an older entry."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    model.metadata = [m for m in (model.metadata or []) if _name(m.name) != key]
    buf = schema.BufferT()
    buf.data = json.dumps(meta).encode()
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = key, len(model.buffers) - 1
    model.metadata.append(entry)
    flatbuffer_utils.write_model(model, str(path))


def read_metadata_entries(path: Path) -> dict[str, bytes]:
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    out = {}
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        b = model.Buffers(m.Buffer())
        out[_name(m.Name())] = b.DataAsNumpy().tobytes() if b.DataLength() else b""
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """Labels, palette, preprocessing, output kind and tensor names from a model written here."""
    raw = read_metadata_entries(Path(path)).get(META_KEY)
    return json.loads(raw) if raw else {}


def _name(n) -> str:
    return n.decode() if isinstance(n, bytes) else str(n)


# -- helpers ---------------------------------------------------------------------------------
def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConversionError(f"LiteRT conversion needs {package}: pip install 'edgeseg[litert]'") from None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _quiet():
    """litert-torch and the quantizer print progress bars and reports on stdout."""
    return progress.quiet_third_party()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


__all__ = ["add_litert", "quantize_litert", "artifact_name", "read_metadata", "write_metadata", "PRECISIONS"]
