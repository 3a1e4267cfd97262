"""A bundle's ONNX graph -> OpenVINO IR, for Intel and AMD CPUs, Intel GPUs and NPUs.

    from converters.openvino import add_openvino
    add_openvino("bundle/", "int8", calib="synthetic:train", max_miou_drop=0.5)

writes `model.<precision>.openvino/` (`model.xml` + `model.bin`) into the bundle:

* fp32: `openvino.convert_model` of `model.onnx`, saved uncompressed;
* fp16: the same with FP16 weights (`save_model(compress_to_fp16=True)`): half the size; CPUs
  decompress them, GPUs and NPUs compute in FP16;
* int8: NNCF post-training quantization (`nncf.quantize`) with the bundle's calibration frames
  (`calibration.CalibrationSet`, through its one `Preprocess`). When the held-out mIoU drops by
  more than `max_miou_drop` points, `nncf.quantize_with_accuracy_control` takes over with
  edgeseg's own mIoU as its validation function: NNCF ranks the quantized layers and returns them
  to float until the budget holds.

Labels, palette and preprocessing go into the IR's `rt_info` (section `edgeseg`) as well as the
manifest. Every artifact is measured with the engine that runs it (`runtime.engines.openvino`):
parity against the FP32 ONNX model, and for INT8 mIoU per class and mask agreement on held-out
frames.
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
from edgeseg.errors import ConversionError

log = logging.getLogger("edgeseg.convert")

PRECISIONS = ("fp32", "fp16", "int8")
META_SECTION = "edgeseg"  # rt_info section with labels, palette and preprocessing


def artifact_name(precision: str) -> str:
    return f"model.{precision}.openvino"


def add_openvino(bundle, precision: str = "fp32", *, calib: Any = None, eval_data: Any = None,
                 max_miou_drop: float = 0.5, max_images: int = 300, eval_max_images: int = 200,
                 report: Callable[[str], None] | None = None) -> dict:
    """Add an OpenVINO IR of `precision` to a bundle with an FP32 ONNX model; returns its manifest entry."""
    from converters.int8 import install, int8_inputs, staging
    from converters.parity import check_parity

    say = report or log.info
    if precision not in PRECISIONS:
        raise ConversionError(f"precision {precision!r} is not available for OpenVINO; choose one of {', '.join(PRECISIONS)}")
    ov, nncf = _import(precision)
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    man = bundle.manifest
    fp32 = bundle.select("onnxruntime", "fp32")
    bundle.verify_artifact(fp32)
    onnx_path = bundle.artifact_path(fp32)
    inputs = int8_inputs(bundle, calib, eval_data, max_miou_drop=max_miou_drop, max_images=max_images,
                         eval_max_images=eval_max_images) if precision == "int8" else None
    t0 = time.perf_counter()
    say(f"openvino: converting {fp32.path}")
    try:
        with progress.phase("openvino: convert"), progress.quiet_third_party():
            model = ov.convert_model(str(onnx_path))
    except Exception as e:  # OpenVINO's frontend names the unsupported operator
        raise ConversionError(f"OpenVINO cannot convert {onnx_path}: {_first_line(e)}") from None
    _set_metadata(model, man)
    name = artifact_name(precision)
    with staging(bundle) as work:
        info: dict[str, Any] = {"openvino": ov.__version__, "source": fp32.path}
        metrics: dict[str, Any] = {}
        if precision == "int8":
            model, info_q, metrics = _quantize(ov, nncf, model, inputs, work, say)
            info.update(info_q)
        staged = _save(ov, model, work / name, compress_to_fp16=precision == "fp16")
        engine = _engine(staged, precision)
        parity = check_parity(onnx_path, engine, man.preprocess, frames=8, output_kind=man.output_kind)
        engine.close()
        metrics["size_bytes"] = sum(p.stat().st_size for p in staged.iterdir())
        info.update(inference_precision=engine.inference_precision, seconds=round(time.perf_counter() - t0, 1))
        art = Artifact(name, "openvino", precision, parity=parity, metrics=metrics, info=info)
        install(bundle, staged, art, sources=[fp32])
    say(f"openvino: wrote {name} (mask agreement with FP32 ONNX {100 * parity['mask_agreement']:.2f}%)")
    return {"artifact": name, "precision": precision, "parity": parity, "metrics": metrics, "info": info}


def _quantize(ov, nncf, model, inputs, work: Path, say) -> tuple[Any, dict, dict]:
    """NNCF PTQ; accuracy-controlled PTQ when plain INT8 misses the budget. Returns (model, info, metrics)."""
    from calibration.evaluate import engine_runner

    calib = inputs.calib
    dataset = nncf.Dataset(calib.inputs)
    say(f"openvino: NNCF post-training quantization on {len(calib)} frames of {calib.description}")
    with progress.phase("openvino: NNCF quantize"), progress.quiet_third_party():
        quantized = nncf.quantize(model, dataset, subset_size=len(calib))
    full = None
    info: dict[str, Any] = {"method": "nncf.quantize", "calibration_frames": len(calib), "calibration_data": calib.description,
                            "nncf": nncf.__version__}
    if inputs.evaluator is not None:
        engine = _engine(_save(ov, quantized, work / "full-int8"), "int8")
        full = inputs.measure(engine_runner(engine))
        engine.close()
        ref = inputs.evaluator.reference["miou"]
        say(f"openvino: all layers INT8: mIoU {full['miou']:.4f} vs FP32 {ref:.4f} "
            f"(drop {full['miou_drop_points']:.2f} pts, budget {inputs.budget:.2f})")
    float_layers: list[str] = []
    if full is not None and full["miou_drop_points"] > inputs.budget:
        say("openvino: over budget: NNCF quantize_with_accuracy_control returns the layers that cost most to float")
        with progress.phase("openvino: NNCF accuracy control"), progress.quiet_third_party():
            restored = nncf.quantize_with_accuracy_control(
                model, dataset, _validation_dataset(nncf, inputs.evaluator), _validation_fn(inputs.evaluator),
                max_drop=inputs.budget / 100.0, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib))
        float_layers = sorted(set(_quantizers(quantized)) - set(_quantizers(restored)))
        quantized = restored
        info["method"] = "nncf.quantize_with_accuracy_control"
    info["quantizers"] = len(_quantizers(quantized))
    final = full
    if float_layers:
        engine = _engine(_save(ov, quantized, work / "restored"), "int8")
        final = inputs.measure(engine_runner(engine))
        engine.close()
        say(f"openvino: {len(float_layers)} quantizer(s) removed -> mIoU {final['miou']:.4f} (drop {final['miou_drop_points']:.2f} pts)")
    return quantized, info, inputs.metrics(full, final, float_layers, "openvino")


def _validation_dataset(nncf, evaluator):
    """Held-out frames by index: NNCF hands the indices to the validation function and the
    preprocessed frames to the model when it ranks layers by their outputs."""
    evalset = evaluator.evalset
    return nncf.Dataset(list(range(len(evalset))), lambda i: evalset.inputs[i])


def _validation_fn(evaluator):
    """edgeseg's mIoU (against the labels, or the FP32 class maps where there are none) of a compiled
    model on some of the held-out frames; higher is better, as NNCF expects."""
    from calibration.evaluate import class_map, pseudo_score, score
    from edgeseg.spec import unletterbox

    evalset, pre, labels, kind = evaluator.evalset, evaluator.pre, evaluator.labels, evaluator.output_kind

    def validate(compiled, indices) -> float:
        indices = list(indices)
        maps = [unletterbox(class_map(compiled(evalset.inputs[i])[0], kind), pre, evalset.frame_shapes[i]) for i in indices]
        if evalset.labelled:
            sub = evalset.__class__([evalset.inputs[i] for i in indices], [evalset.masks[i] for i in indices],
                                    [evalset.frame_shapes[i] for i in indices], [evalset.names[i] for i in indices],
                                    evalset.description, ignore_index=evalset.ignore_index)
            return float(score(maps, sub, labels)["miou"])
        return float(pseudo_score(maps, [evaluator.fp32_maps[i] for i in indices], labels)["miou"])

    return validate


def _quantizers(model) -> list[str]:
    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]


def _save(ov, model, folder: Path, compress_to_fp16: bool = False) -> Path:
    folder.mkdir(parents=True)
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=compress_to_fp16)
    return folder


def _engine(folder: Path, precision: str):
    from runtime.engines.openvino import OpenVINOEngine

    return OpenVINOEngine(folder, precision=precision, device="CPU")


def _set_metadata(model, man) -> None:
    meta = {"labels": man.labels, "palette": man.palette, "preprocess": man.preprocess.to_dict(),
            "output_kind": man.output_kind}
    for key, value in meta.items():
        model.set_rt_info(json.dumps(value), [META_SECTION, key])


def read_metadata(xml: str | os.PathLike) -> dict:
    """Labels, palette, preprocessing and output kind from an IR written here."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    out = {}
    for key in ("labels", "palette", "preprocess", "output_kind"):
        if model.has_rt_info([META_SECTION, key]):
            out[key] = json.loads(model.get_rt_info([META_SECTION, key]).astype(str))
    return out


def _import(precision: str):
    try:
        import openvino as ov
    except ImportError:
        raise ConversionError("OpenVINO is not installed: pip install 'edgeseg[openvino]'") from None
    nncf = None
    if precision == "int8":
        try:
            import nncf
        except ImportError:
            raise ConversionError("INT8 for OpenVINO needs NNCF: pip install 'edgeseg[openvino]'") from None
    return ov, nncf


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


__all__ = ["add_openvino", "artifact_name", "read_metadata", "PRECISIONS"]
