"""The one-call API: `edgeseg.convert(model, out, to=..., precision=...)` and `edgeseg.calibrate(...)`.

    import edgeseg
    edgeseg.convert("default", "bundle")                                   # ONNX, fp32
    edgeseg.convert(net, "bundle", precision="int8", calib="frames/")      # + INT8 Q/DQ graphs
    edgeseg.convert("default", "bundle", to="coreml", precision="palettize4")
    edgeseg.convert("default", "bundle", to="openvino", precision="int8", calib="synthetic:train")
    edgeseg.convert("default", "bundle", to="litert", precision="int8", calib="synthetic:train")
"""
from __future__ import annotations

import os

from edgeseg.bundle import Bundle
from edgeseg import progress
from edgeseg.errors import ConversionError, option

ONNX_PRECISIONS = ("fp32", "fp16", "int8")
COREML_PRECISIONS = ("fp16", "fp32", "int8-weights", "int4-weights", "palettize8", "palettize6", "palettize4",
                     "palettize4-grouped", "w8a8")
OPENVINO_PRECISIONS = LITERT_PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("onnx", "coreml", "openvino", "litert")


def convert(model, out: str | os.PathLike, *, to: str = "onnx", precision: str = "fp32", calib=None, eval_data=None,
            calib_method: str | None = None, calib_target: str = "both", max_miou_drop: float = 0.5, **kw) -> Bundle:
    """Convert a model into a bundle.

    to: "onnx" (ONNX Runtime / TensorRT input), "coreml", "openvino" or "litert". precision: for
    onnx fp32, fp16 (adds a float16 graph) or int8 (needs `calib`, frames or a dataset, for
    calibration, and measures its accuracy on `eval_data`, see `calibrate`); for coreml one of
    COREML_PRECISIONS; for openvino and litert fp32, fp16 or int8 (NNCF / the LiteRT quantizer, on
    `calib`, measured on `eval_data` likewise), added beside the bundle's `model.onnx`. Other
    keywords go to `converters.onnx.convert` (dynamic, fold_normalization, argmax, input_size, labels, opset
    ...) or `converters.coreml.convert_to_bundle`.
    """
    if to not in TARGETS:
        raise ConversionError(f"unknown target {to!r}; choose {', '.join(TARGETS)} (TensorRT engines: `edgeseg build BUNDLE`)")
    if to in ("openvino", "litert"):
        return _convert_cpu_engine(model, out, to, precision, calib, max_miou_drop, eval_data, kw)
    if to == "onnx":
        if precision not in ONNX_PRECISIONS:
            raise ConversionError(f"precision {precision!r} is not available for ONNX; choose one of {ONNX_PRECISIONS}")
        _check_int8(precision, calib, eval_data)
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
    raise AssertionError(to)


def _check_int8(precision: str, calib, eval_data) -> None:
    if precision == "int8" and calib is None:
        raise ConversionError(f"INT8 needs calibration frames: pass {option('calib')} with an image folder, a video or a dataset "
                              "(synthetic:train, voc:/path ...)")
    if eval_data is not None and precision != "int8":
        raise ConversionError(f"{option('eval_data')} measures INT8 accuracy; it needs {option('precision')} int8")


def _convert_cpu_engine(model, out, to: str, precision: str, calib, max_miou_drop: float, eval_data, kw: dict) -> Bundle:
    """ONNX first (the FP32 reference every artifact is measured against), then the IR or .tflite beside it."""
    if precision not in OPENVINO_PRECISIONS:
        raise ConversionError(f"precision {precision!r} is not available for {to}; choose one of {OPENVINO_PRECISIONS}")
    _check_int8(precision, calib, eval_data)
    from converters.onnx import convert as to_onnx
    from converters.onnx import load_source

    source_kw = {k: kw.pop(k) for k in ("labels", "preprocess", "input_size", "model_args") if k in kw}
    src = load_source(model, **source_kw)
    if to == "litert" and src.model is None:
        raise ConversionError("LiteRT conversion starts from the PyTorch network (litert-torch converts torch programs), "
                              "not an ONNX file: pass the checkpoint, 'default' or package.module:factory")
    bundle = to_onnx(src, out, **kw)
    int8 = dict(calib=calib, eval_data=eval_data, max_miou_drop=max_miou_drop)
    if to == "openvino":
        from converters.openvino import add_openvino

        add_openvino(bundle, precision, **int8)
    else:
        from converters.litert import add_litert

        add_litert(bundle, src.model, precision, fold_normalization=kw.get("fold_normalization", False),
                   argmax=kw.get("argmax", False), **int8)
    return Bundle.load(out)


def calibrate(bundle: str | os.PathLike, data, **kw) -> dict:
    """Quantize a bundle to INT8 with calibration data; see `calibration.calibrate_bundle`."""
    from calibration import calibrate_bundle

    return calibrate_bundle(bundle, data, **kw)
