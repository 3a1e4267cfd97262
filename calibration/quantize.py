"""Ranges and Q/DQ graphs per target, through `onnxruntime.quantization`.

    ranges = compute_ranges("model.onnx", calib, "entropy", "work/ranges.json")
    quantize_model("model.onnx", "model.int8.tensorrt.onnx", "work/ranges.json", "entropy", "tensorrt")
    assert not validate_tensorrt_qdq("model.int8.tensorrt.onnx")

Ranges are computed once (ONNX Runtime's calibrators, fed chunk by chunk so memory stays bounded)
and stored in ONNX Runtime's calibration cache; every quantization of the same model (each target,
each mixed-precision candidate) reuses them through `quantize_static(calibration_cache_path=...)`.

Presets:
- `tensorrt`: QDQ, int8 activations with zero point 0, int8 weights per output channel (axis 0 for
  Conv), float bias (no INT32 bias DequantizeLinear), constant scales, opset >= 13: what TensorRT's
  explicit-quantization (strongly typed) networks accept.
- `cpu`: QDQ, asymmetric uint8 activations with int8 per-channel weights (U8S8), which ONNX Runtime's
  x86 kernels run with VNNI; QDQ rather than QOperator because ONNX Runtime's CPU kernels are tuned
  for QDQ (measured here: benchmarks/int8_cpu.py prints both).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from calibration.data import CalibrationError
from edgeseg import progress

log = logging.getLogger("edgeseg.calibration")

METHODS = ("minmax", "percentile", "entropy")
TARGETS = ("tensorrt", "cpu")
MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Histogram settings. ONNX Runtime's entropy histogram spans [-t, t], so 256 quantized bins are int8's
# 256 levels (its default of 128 models 7 bits). Its default of 128 bins leaves one candidate threshold
# (= min-max); 512 bins let the KL search clip down to half the largest value. Measured on the default
# model (200 held-out frames): 512 bins lose 0.4-0.5 mIoU points, 1024 bins clip harder and lose 2.4-2.8.
DEFAULT_BINS = {"entropy": 512, "percentile": 2048}
QUANTIZED_BINS = 256
DEFAULT_PERCENTILE = 99.99
CHUNK = 16  # most frames per collection pass
CHUNK_BYTES = 1 << 30  # ONNX Runtime holds every intermediate tensor of a pass: keep a pass under ~1 GiB


@dataclass(frozen=True)
class QuantPreset:
    """How one deployment target wants its Q/DQ graph."""

    target: str
    description: str
    activation_type: str  # int8 | uint8
    activation_symmetric: bool
    per_channel: bool
    quantize_bias: bool
    reduce_range: bool = False

    def quantize_kwargs(self) -> dict:
        from onnxruntime.quantization import QuantFormat, QuantType

        return {
            "quant_format": QuantFormat.QDQ,
            "activation_type": QuantType.QInt8 if self.activation_type == "int8" else QuantType.QUInt8,
            "weight_type": QuantType.QInt8,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "extra_options": {
                "ActivationSymmetric": self.activation_symmetric,
                "WeightSymmetric": True,
                "QuantizeBias": self.quantize_bias,
            },
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(format="QDQ", weight_type="int8", weight_symmetric=True)
        return d


PRESETS = {
    "tensorrt": QuantPreset(
        "tensorrt", "TensorRT explicit quantization: symmetric int8 activations, per-channel int8 weights, float bias",
        activation_type="int8", activation_symmetric=True, per_channel=True, quantize_bias=False,
    ),
    "cpu": QuantPreset(
        "cpu", "ONNX Runtime on x86: asymmetric uint8 activations, per-channel int8 weights (U8S8), int32 bias",
        activation_type="uint8", activation_symmetric=False, per_channel=True, quantize_bias=True,
    ),
}


def calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    if name not in table:
        raise CalibrationError(f"unknown calibration method {name!r}; use one of {', '.join(METHODS)}")
    return table[name]


def preset(target: str) -> QuantPreset:
    if target not in PRESETS:
        raise CalibrationError(f"unknown quantization target {target!r}; use one of {', '.join(TARGETS)}")
    return PRESETS[target]


@contextlib.contextmanager
def quiet_ort():
    """ONNX Runtime's quantization tools print progress, advise pre-processing (onnxsim already did
    it at export) and note that 1-D BatchNormalization scales are quantized per tensor; keep that
    out of the user's output."""
    noise = ("pre-process", "Please consider", "is out-of-range for weight")

    class _Drop(logging.Filter):
        def filter(self, record):
            return not any(n in record.getMessage() for n in noise)

    flt, root = _Drop(), logging.getLogger()
    root.addFilter(flt)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(flt)


# -- model facts ----------------------------------------------------------------------------
def _load(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def opset_of(model) -> int:
    m = _load(model)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def weighted_layers(model) -> list[str]:
    """Names of the nodes INT8 computes with: Conv, ConvTranspose, Gemm, MatMul."""
    return [n.name for n in _load(model).graph.node if n.op_type in WEIGHTED_OPS]


def check_quantizable(model, where: str = "the model") -> list[str]:
    layers = weighted_layers(model)
    if not layers:
        ops = sorted({n.op_type for n in _load(model).graph.node})
        raise CalibrationError(
            f"{where} has no layer INT8 can compute ({', '.join(WEIGHTED_OPS)}); it holds only {', '.join(ops) or 'no ops'}, "
            "so quantizing would only add conversions. Deploy it in FP32/FP16"
        )
    unnamed = [i for i, n in enumerate(_load(model).graph.node) if not n.name]
    if unnamed:
        raise CalibrationError(f"{where} has {len(unnamed)} unnamed node(s); re-export it with `edgeseg convert` "
                               "(layers must be named to be kept in float)")
    return layers


def ensure_opset(src: Path, dst: Path, minimum: int = MIN_OPSET) -> Path:
    """`src` if its opset is high enough, else a converted copy at `dst`."""
    m = onnx.load(str(src))
    have = opset_of(m)
    if have >= minimum:
        return src
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(m, minimum)
        onnx.checker.check_model(converted)
    except Exception as e:  # the converter fails per op in many ways
        raise CalibrationError(
            f"{src} uses opset {have}; Q/DQ per channel needs opset >= {minimum} and the automatic upgrade failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); re-export with `edgeseg convert --opset 17`"
        ) from None
    onnx.save(converted, str(dst))
    return dst


# -- ranges -----------------------------------------------------------------------------------
def activation_bytes(model_path: str | os.PathLike) -> int | None:
    """Bytes of all float tensors one frame produces (None when shapes are not static)."""
    try:
        m = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    except Exception:  # shape inference is best effort here
        return None
    total = 0
    for vi in list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if not dims or min(dims) <= 0:
            return None
        total += int(np.prod(dims)) * (4 if t.elem_type == onnx.TensorProto.FLOAT else 2)
    return total


def chunk_size(model_path: str | os.PathLike) -> int:
    per_frame = activation_bytes(model_path)
    if not per_frame:
        return 4
    return int(max(1, min(CHUNK, CHUNK_BYTES // per_frame)))


def compute_ranges(model_path: str | os.PathLike, calib, method: str, cache_path: str | os.PathLike, *,
                   num_bins: int | None = None, percentile: float | None = None, chunk: int | None = None,
                   workdir: str | os.PathLike | None = None):
    """Activation ranges of every float tensor over `calib` (a CalibrationSet), saved as ONNX
    Runtime's calibration cache at `cache_path`. Returns ONNX Runtime's `TensorsData`.

    Ranges are asymmetric (min/max or thresholds); each preset's quantizer makes them symmetric
    where its target needs it, so one pass serves every target.
    """
    import tempfile

    from onnxruntime.quantization import create_calibrator, save_tensors_data

    cal_method = calibration_method(method)
    opts: dict[str, Any] = {"symmetric": False}
    if method in DEFAULT_BINS:
        opts["num_bins"] = int(num_bins or DEFAULT_BINS[method])
    if method == "percentile":
        opts["percentile"] = float(percentile or DEFAULT_PERCENTILE)
    if method == "entropy":
        opts["num_quantized_bins"] = QUANTIZED_BINS
    chunk = int(chunk or chunk_size(model_path))
    with tempfile.TemporaryDirectory(prefix="calib-", dir=workdir) as tmp, quiet_ort():
        try:
            calibrator = create_calibrator(Path(model_path), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=cal_method, extra_options=opts)
        except Exception as e:
            raise CalibrationError(f"ONNX Runtime cannot prepare {model_path} for calibration: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}") from None
        try:
            with progress.bar(f"{method} ranges", total=len(calib), unit="frames") as bar:
                for start in range(0, len(calib), chunk):
                    calib.set_range(start, start + chunk)
                    calibrator.collect_data(_Counted(calib, bar))
            with progress.phase(f"{method} thresholds"):
                ranges = calibrator.compute_data()
        finally:
            calib.rewind()
    save_tensors_data(ranges, cache_path)
    return ranges


class _Counted:
    """A calibration reader that counts the frames ONNX Runtime takes on a progress bar."""

    def __init__(self, reader, bar):
        self.reader, self.bar = reader, bar

    def get_next(self):
        item = self.reader.get_next()
        if item is not None:
            self.bar.update()
        return item

    def __getattr__(self, name):
        return getattr(self.reader, name)


def load_ranges(cache_path: str | os.PathLike):
    from onnxruntime.quantization import load_tensors_data

    return load_tensors_data(cache_path)


def range_of(ranges, name: str) -> tuple[float, float]:
    lo, hi = ranges[name].range_value
    return float(np.asarray(lo).min()), float(np.asarray(hi).max())


# -- quantization -------------------------------------------------------------------------------
def quantize_model(model_path: str | os.PathLike, out_path: str | os.PathLike, ranges_path: str | os.PathLike,
                   method: str, target: str, *, nodes_to_exclude: Iterable[str] = (),
                   nodes_to_quantize: Sequence[str] | None = None) -> Path:
    """Write the `target` Q/DQ graph of `model_path` from cached ranges. Nodes in
    `nodes_to_exclude` stay in float (mixed precision)."""
    from onnxruntime.quantization import quantize_static

    p = preset(target)
    with quiet_ort():
        quantize_static(
            str(model_path), str(out_path), None, calibrate_method=calibration_method(method),
            calibration_cache_path=str(ranges_path), nodes_to_exclude=list(nodes_to_exclude),
            nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None, **p.quantize_kwargs(),
        )
    return Path(out_path)


def quantizable_op_types() -> set[str]:
    """Op types `quantize_static` quantizes by default (its QDQ and QOperator registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def quantized_nodes(model) -> list[str]:
    """Names of the nodes the quantizer made INT8: of a quantizable type and reading a DequantizeLinear
    output. (Float ops such as HardSwish also read dequantized tensors; excluding them changes nothing.)"""
    m = _load(model)
    types = quantizable_op_types()
    dq_outputs = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in m.graph.node if n.op_type in types and any(i in dq_outputs for i in n.input)]


# -- the TensorRT rules -------------------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    """One place where a Q/DQ graph breaks a TensorRT rule."""

    node: str
    op_type: str
    rule: str  # opset | domain | dtype | uint8 | zero_point | dynamic_scale | scale_value | per_tensor_weight | weight_axis | int32_bias
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.message}"


_INT8 = onnx.TensorProto.INT8
_UINT8 = onnx.TensorProto.UINT8
_INT32 = onnx.TensorProto.INT32


def validate_tensorrt_qdq(model) -> list[Violation]:
    """Check a Q/DQ graph against what TensorRT's explicit INT8 quantization accepts.

    Rules: opset >= 13; standard-domain Q/DQ; int8 data (no uint8) with zero point 0; scales that
    are positive constants (no dynamic scales); weights of Conv/ConvTranspose/Gemm/MatMul quantized
    per output channel on the right axis; no INT32 bias DequantizeLinear. Returns one Violation
    per broken rule per node (empty list: the graph passes).
    """
    m = _load(model)
    g = m.graph
    out: list[Violation] = []
    opset = opset_of(m)
    if opset < MIN_OPSET:
        out.append(Violation("<model>", "", "opset", f"opset {opset} < {MIN_OPSET}: per-channel Q/DQ needs opset 13 or later"))
    inits = {t.name: t for t in g.initializer}
    consts = dict(inits)
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, k))

    def const_array(name):
        t = consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    for idx, n in enumerate(g.node):
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = n.name or f"{n.op_type}_{idx}"
        v = lambda rule, msg: out.append(Violation(label, n.op_type, rule, msg))  # noqa: E731
        if n.domain not in ("", "ai.onnx"):
            v("domain", f"{n.domain} {n.op_type} is a contrib op; TensorRT parses only standard-domain Q/DQ")
        scale = const_array(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            v("dynamic_scale", f"scale {n.input[1] if len(n.input) > 1 else '?'!r} is computed at run time; TensorRT needs constant scales")
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            v("scale_value", "scale holds zero, negative or non-finite values; TensorRT needs positive finite scales")
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        zp_tensor = consts.get(zp_name) if zp_name else None
        if zp_name and zp_tensor is None:
            v("dynamic_scale", f"zero point {zp_name!r} is computed at run time; TensorRT needs constant zero points (0)")
        # the quantized data type: the zero point's, else the DQ input's, else Q's default (uint8)
        if zp_tensor is not None:
            qtype = zp_tensor.data_type
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            qtype = inits[n.input[0]].data_type
        elif n.op_type == "QuantizeLinear":
            qtype = next((a.i for a in n.attribute if a.name == "output_dtype" and a.i), _UINT8)
        else:
            qtype = None
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == _INT32:
            v("int32_bias", "INT32 DequantizeLinear (a quantized bias); TensorRT wants the bias in float: quantize with QuantizeBias=False")
        elif qtype == _UINT8:
            v("uint8", "uint8 quantization; TensorRT INT8 is signed: use symmetric int8 activations and weights")
        elif qtype is not None and qtype != _INT8 and qtype != _INT32:
            v("dtype", f"quantized type {onnx.TensorProto.DataType.Name(qtype)}; the TensorRT INT8 preset needs int8")
        if zp_tensor is not None:
            zp = numpy_helper.to_array(zp_tensor)
            if np.any(zp != 0):
                v("zero_point", f"zero point {zp.ravel()[:4].tolist()}{' ...' if zp.size > 4 else ''} is not 0; TensorRT quantization is symmetric")
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            _check_weight_dq(n, inits[n.input[0]], scale, consumers.get(n.output[0], []), v)
    return out


def _check_weight_dq(dq, weight: onnx.TensorProto, scale, users, v) -> None:
    """Weights feeding a weighted layer must be quantized per output channel."""
    dims = list(weight.dims)
    axis_attr = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    for user, k in users:
        if user.op_type not in WEIGHTED_OPS or k != 1 or len(dims) < 2:
            continue
        if user.op_type == "Conv":
            want = 0
        elif user.op_type == "ConvTranspose":
            want = 1
        elif user.op_type == "Gemm":
            want = 0 if next((a.i for a in user.attribute if a.name == "transB"), 0) else 1
        else:  # MatMul: B is (..., K, N); channels on the last axis
            want = len(dims) - 1
        channels = dims[want]
        if channels <= 1 or scale is None:
            continue
        if scale.size == 1:
            v("per_tensor_weight", f"weight {weight.name!r} of {user.op_type} {user.name!r} is quantized per tensor; "
                                   f"TensorRT needs per-channel weights (axis {want}, {channels} scales)")
        elif (axis_attr % len(dims)) != want or scale.size != channels:
            v("weight_axis", f"weight {weight.name!r} of {user.op_type} {user.name!r} is quantized along axis {axis_attr} "
                             f"({scale.size} scales); TensorRT needs axis {want} ({channels} scales)")


__all__ = [
    "METHODS", "TARGETS", "PRESETS", "QuantPreset", "Violation", "preset", "calibration_method", "compute_ranges",
    "load_ranges", "range_of", "quantize_model", "quantized_nodes", "quantizable_op_types", "weighted_layers", "check_quantizable",
    "ensure_opset", "opset_of", "validate_tensorrt_qdq", "quiet_ort",
]
