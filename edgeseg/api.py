"""The one-call API: `edgeseg.convert(model, out, to=..., precision=...)` and `edgeseg.calibrate(...)`.

    import edgeseg
    edgeseg.convert("default", "bundle")                                   # ONNX, fp32
    edgeseg.convert(net, "bundle", precision="int8", calib="frames/")      # + INT8 Q/DQ graphs
    edgeseg.convert("default", "bundle", to="coreml", precision="palettize4")
"""
from __future__ import annotations

import os

from edgeseg.bundle import Bundle
from edgeseg import progress
from edgeseg.errors import ConversionError, option

ONNX_PRECISIONS = ("fp32", "fp16", "int8")
COREML_PRECISIONS = ("fp16", "fp32", "int8-weights", "int4-weights", "palettize8", "palettize6", "palettize4",
                     "palettize4-grouped", "w8a8")


def convert(model, out: str | os.PathLike, *, to: str = "onnx", precision: str = "fp32", calib=None, eval_data=None,
            calib_method: str = "entropy", calib_target: str = "both", max_miou_drop: float = 0.5, **kw) -> Bundle:
    """Convert a model into a bundle.

    to: "onnx" (ONNX Runtime / TensorRT input) or "coreml". precision: for onnx fp32, fp16 (adds a
    float16 graph) or int8 (needs `calib`, frames or a dataset, for calibration, and measures its
    accuracy on `eval_data`, see `calibrate`); for coreml one of COREML_PRECISIONS. Other keywords
    go to `converters.onnx.convert` (dynamic, fold_normalization, argmax, input_size, labels, opset
    ...) or `converters.coreml.convert_to_bundle`.
    """
    if to == "onnx":
        if precision not in ONNX_PRECISIONS:
            raise ConversionError(f"precision {precision!r} is not available for ONNX; choose one of {ONNX_PRECISIONS}")
        if precision == "int8" and calib is None:
            raise ConversionError(f"INT8 needs calibration frames: pass {option('calib')} with an image folder, a video or a dataset "
                                  "(synthetic:train, voc:/path ...)")
        if eval_data is not None and precision != "int8":
            raise ConversionError(f"{option('eval_data')} measures INT8 accuracy; it needs {option('precision')} int8")
        from converters.onnx import convert as to_onnx

        bundle = to_onnx(model, out, **kw)
        if precision == "fp16":
            from converters.tensorrt import add_fp16_artifact

            with progress.phase("float16 graph"):
                add_fp16_artifact(bundle.path)
        elif precision == "int8":
            calibrate(bundle.path, calib, method=calib_method, target=calib_target, max_miou_drop=max_miou_drop,
                      eval_data=eval_data)
        return Bundle.load(out)
    if to == "coreml":
        if precision not in COREML_PRECISIONS:
            raise ConversionError(f"precision {precision!r} is not available for CoreML; choose one of {COREML_PRECISIONS}")
        from converters.coreml import check_target, convert_to_bundle
        from converters.onnx import load_source

        check_target(precision, kw.get("minimum_deployment_target") or "iOS17")  # before the model loads
        coreml_keys = {"output", "minimum_deployment_target", "input_sizes", "compute_units"}
        source_kw = {k: v for k, v in kw.items() if k in ("labels", "preprocess", "input_size", "model_args")}
        src = load_source(model, **source_kw)
        return convert_to_bundle(src, out, precision=precision, calibration=calib,
                                 **{k: v for k, v in kw.items() if k in coreml_keys})
    raise ConversionError(f"unknown target {to!r}; choose onnx or coreml (TensorRT engines: `edgeseg build BUNDLE`)")


def calibrate(bundle: str | os.PathLike, data, **kw) -> dict:
    """Quantize a bundle to INT8 with calibration data; see `calibration.calibrate_bundle`."""
    from calibration import calibrate_bundle

    return calibrate_bundle(bundle, data, **kw)
