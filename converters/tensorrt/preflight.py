"""What TensorRT's ONNX parser accepts, checked on the CPU with `onnx` alone.

    problems = preflight("bundle/model.onnx")       # every op/attribute the parser will reject
    check_preflight(path)                           # raise listing the errors, return the warnings
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ConversionError

log = logging.getLogger("edgeseg.tensorrt")

# -- the ONNX parser's support table --------------------------------------------------------------
# From onnx-tensorrt docs/operators.md (TensorRT 10.x / 11.x: opsets 9..24). Ops marked "N" there are
# absent here; restrictions the parser enforces on supported ops are checked in `_check_node`.
OPSET_MIN, OPSET_MAX = 9, 24
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


RESIZE_MODES = ("nearest", "linear")


RESIZE_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")


RESIZE_NEAREST_MODES = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")


_QUANT_FIX = (
    "this op comes from ONNX Runtime's dynamic or QOperator quantization; quantize for TensorRT in the "
    "Q/DQ format instead (`edgeseg calibrate BUNDLE --target tensorrt`) and build from that graph"
)


_OP_FIXES = {
    "DynamicQuantizeLinear": _QUANT_FIX, "MatMulInteger": _QUANT_FIX, "ConvInteger": _QUANT_FIX,
    "QLinearConv": _QUANT_FIX, "QLinearMatMul": _QUANT_FIX, "QLinearAdd": _QUANT_FIX,
    "Unique": "compute unique values outside the network (data-dependent output sizes cannot be built)",
    "Compress": "replace boolean compression with Where/multiplication by a mask so shapes stay static",
    "MaxUnpool": "use Resize (nearest) or ConvTranspose for upsampling in the decoder",
    "Col2Im": "express the folding with Reshape/Transpose or ConvTranspose",
    "AffineGrid": "precompute the sampling grid and feed GridSample with it",
}


for _op in ("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
            "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement"):
    _OP_FIXES[_op] = "return tensors, not Python lists/Optionals, from forward(); TensorRT has no sequence types"


_GENERIC_FIX = (
    "TensorRT's ONNX parser has no importer for it: rewrite that part of the model with supported ops, "
    "or provide a TensorRT plugin for it"
)


@dataclass(frozen=True)
class Problem:
    """One thing TensorRT's ONNX parser will reject (error) or handle with a caveat (warning)."""

    node: str
    op: str
    message: str
    fix: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op})" if self.node else self.op
        return f"{self.severity}: {where}: {self.message}; fix: {self.fix}"


def load_onnx(model):
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ConversionError(f"ONNX model not found: {path}")
        try:
            return onnx.load(str(path))
        except Exception as e:  # protobuf decode errors carry no useful type
            raise ConversionError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0]}") from None
    if isinstance(model, onnx.ModelProto):
        return model
    raise ConversionError(f"expected an ONNX file path or onnx.ModelProto, got {type(model).__name__}")


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def preflight(onnx_path_or_model) -> list[Problem]:
    """Check a graph against what TensorRT's ONNX parser supports. Runs on CPU, needs only `onnx`.

    Returns every problem found (errors first); an empty list means nothing known stands in the way.
    """
    model = load_onnx(onnx_path_or_model)
    problems: list[Problem] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        problems.append(Problem("", "opset", "the model declares no default-domain opset", "re-export the model with opset 17"))
    elif opset < OPSET_MIN:
        problems.append(Problem("", "opset", f"opset {opset} is older than TensorRT supports ({OPSET_MIN}..{OPSET_MAX})",
                                "re-export with opset 17 (`edgeseg convert MODEL --opset 17`) or upgrade it with "
                                "onnx.version_converter.convert_version(model, 17)"))
    elif opset > OPSET_MAX:
        problems.append(Problem("", "opset", f"opset {opset} is newer than the parser's table ({OPSET_MIN}..{OPSET_MAX})",
                                "export with opset 17..20 unless your TensorRT release notes list this opset",
                                severity="warning"))
    initializers = {t.name: t for t in model.graph.initializer}
    constants = _constant_values(model.graph, initializers)
    for vi in list(model.graph.input) + list(model.graph.output):
        problems.extend(_check_io(vi))
    _walk(model.graph, constants, problems)
    problems.sort(key=lambda p: p.severity != "error")
    return problems


def _constant_values(graph, initializers) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {name: numpy_helper.to_array(t) for name, t in initializers.items()}
    for node in graph.node:
        if node.op_type == "Constant":
            a = _attrs(node)
            if "value" in a:
                values[node.output[0]] = numpy_helper.to_array(a["value"])
    return values


def _check_io(vi) -> list[Problem]:
    from onnx import TensorProto

    t = vi.type.tensor_type.elem_type
    if t in (TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return [Problem(vi.name, "graph I/O", f"type {TensorProto.DataType.Name(t)} is not a TensorRT type",
                        "feed and return numeric tensors (float32/float16/uint8)")]
    if t == TensorProto.DOUBLE:
        return [Problem(vi.name, "graph I/O", "float64 I/O is cast down to float32 by TensorRT",
                        "export with float32 inputs and outputs", severity="warning")]
    return []


def _walk(graph, constants, problems: list[Problem]) -> None:
    for node in graph.node:
        problems.extend(_check_node(node, constants))
        for a in node.attribute:  # If / Loop / Scan bodies
            if a.g is not None and a.g.node:
                _walk(a.g, constants, problems)
            for g in a.graphs:
                _walk(g, constants, problems)


def _check_node(node, constants) -> list[Problem]:
    name, op = node.name or (node.output[0] if node.output else "?"), node.op_type
    if node.domain not in ("", "ai.onnx"):
        fix = ("this is an ONNX Runtime contrib op, inserted by ONNX Runtime's optimiser or quantiser; build from the "
               "plain exported model.onnx" if node.domain == "com.microsoft"
               else "TensorRT needs a plugin registered for this custom op; replace it with standard ONNX ops")
        return [Problem(name, f"{node.domain}::{op}", f"custom-domain op {node.domain}::{op} is not parsed by TensorRT", fix)]
    if op not in SUPPORTED_OPS:
        return [Problem(name, op, f"{op} is not supported by TensorRT's ONNX parser", _OP_FIXES.get(op, _GENERIC_FIX))]
    a = _attrs(node)
    out: list[Problem] = []
    if op == "Resize":
        mode = _text(a.get("mode", "nearest"))
        coord = _text(a.get("coordinate_transformation_mode", "half_pixel"))
        nearest = _text(a.get("nearest_mode", "round_prefer_floor"))
        if mode not in RESIZE_MODES:
            out.append(Problem(name, op, f"Resize mode {mode!r} is not supported (only {', '.join(RESIZE_MODES)})",
                               "use bilinear or nearest upsampling (F.interpolate(mode='bilinear'))"))
        if coord not in RESIZE_COORDINATE_MODES:
            out.append(Problem(name, op, f"coordinate_transformation_mode {coord!r} is not supported "
                               f"(only {', '.join(RESIZE_COORDINATE_MODES)})",
                               "use F.interpolate(..., align_corners=False) (half_pixel) or align_corners=True; "
                               "crop-and-resize must be done outside the network"))
        if mode == "nearest" and nearest not in RESIZE_NEAREST_MODES:
            out.append(Problem(name, op, f"nearest_mode {nearest!r} is not supported", "use round_prefer_floor or floor"))
        if int(a.get("antialias", 0)):
            out.append(Problem(name, op, "antialiased Resize is not supported",
                               "pass antialias=False to F.interpolate (blur explicitly with a Conv if it matters)"))
        policy = _text(a.get("keep_aspect_ratio_policy", "stretch"))
        if policy != "stretch":
            out.append(Problem(name, op, f"keep_aspect_ratio_policy {policy!r} is not supported",
                               "compute explicit output sizes and resize with the default 'stretch' policy"))
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = constants.get(zp_name) if zp_name else None
        if zp_name and zp is None:
            out.append(Problem(name, op, "the zero point is computed at run time; TensorRT needs a constant zero",
                               "quantize with static, symmetric scales (`edgeseg calibrate --target tensorrt`)"))
        elif zp is not None and np.any(zp != 0):
            out.append(Problem(name, op, "the zero point is not zero (asymmetric quantization)",
                               "quantize symmetrically for TensorRT: `edgeseg calibrate BUNDLE --target tensorrt` "
                               "(ActivationSymmetric/WeightSymmetric)"))
        elif zp is not None and zp.dtype == np.uint8 and op == "QuantizeLinear":
            out.append(Problem(name, op, "uint8 quantization is not supported by TensorRT (int8 only)",
                               "quantize activations to int8: `edgeseg calibrate BUNDLE --target tensorrt`"))
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        ks = a.get("kernel_shape", [])
        if len(ks) not in (2, 3):
            out.append(Problem(name, op, f"{len(ks)}D pooling is not supported (2D or 3D only)",
                               "reshape to 4D (N, C, 1, L) and pool with a (1, k) kernel"))
        if any(d != 1 for d in a.get("dilations", [])):
            out.append(Problem(name, op, "dilated pooling is not supported", "use dilations of 1"))
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            out.append(Problem(name, op, "MaxPool's Indices output is not supported",
                               "do not use return_indices=True; upsample with Resize instead of MaxUnpool"))
    elif op == "TopK":
        k = constants.get(node.input[1]) if len(node.input) > 1 else None
        if k is not None and int(np.max(k)) >= 3840:
            out.append(Problem(name, op, f"K={int(np.max(k))} exceeds TensorRT's limit (< 3840)", "reduce K"))
        if not int(a.get("sorted", 1)):
            out.append(Problem(name, op, "unsorted TopK is not supported", "use sorted=True"))
    elif op == "RoiAlign":
        # onnx-tensorrt imports RoiAlign as a plugin layer, not a native one (onnxOpImporters.cpp)
        coord = _text(a.get("coordinate_transformation_mode", "half_pixel"))
        if coord not in ("half_pixel", "output_half_pixel"):
            out.append(Problem(name, op, f"coordinate_transformation_mode {coord!r} is not an ONNX RoiAlign mode",
                               "export RoiAlign with half_pixel (edgeseg.models.detection.roi_align does)"))
        out.append(Problem(name, op, "TensorRT builds RoiAlign from its ROIAlign_TRT plugin (version 2, in "
                           "libnvinfer_plugin; TensorRT 10 or newer), not from a native layer",
                           "nothing to change for edgeseg, which registers TensorRT's plugins before it builds or loads an "
                           "engine; an application loading the engine itself calls trt.init_libnvinfer_plugins(logger, '') "
                           "first, and a version-compatible engine needs the nvinfer_vc_plugin library beside it",
                           severity="warning"))
    elif op == "NonMaxSuppression":
        # the parser builds INonMaxSuppressionLayer with the box limit and both thresholds read as constants
        for i, what in ((2, "max_output_boxes_per_class"), (3, "iou_threshold"), (4, "score_threshold")):
            if len(node.input) > i and node.input[i] and node.input[i] not in constants:
                out.append(Problem(name, op, f"{what} is computed at run time; TensorRT takes it as a constant",
                                   "bake the value into the graph (edgeseg's --instance-tail does)"))
    elif op == "ScatterND" and _text(a.get("reduction", "none")) != "none":
        out.append(Problem(name, op, "ScatterND with a reduction is not supported", "scatter without reduction"))
    elif op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        out.append(Problem(name, op, "only LayerNormalization's first output is supported",
                           "do not use the Mean/InvStdDev outputs"))
    elif op == "Dropout" and len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
        out.append(Problem(name, op, "training_mode is not a constant", "export the model in eval() mode"))
    return out


def check_preflight(onnx_path_or_model, where: str = "") -> list[Problem]:
    """Run `preflight`; raise ConversionError listing every error, return the warnings (also logged)."""
    problems = preflight(onnx_path_or_model)
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        if p.severity != "error":
            log.warning("%s", p)
    if errors:
        lines = "\n  ".join(str(p) for p in errors)
        raise ConversionError(f"TensorRT cannot parse {where or 'this model'}:\n  {lines}")
    return [p for p in problems if p.severity != "error"]
