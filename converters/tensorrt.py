"""ONNX -> TensorRT: operator preflight, FP16 graphs, and cached engine builds.

    from converters.tensorrt import preflight, to_fp16_onnx, build_bundle_engine
    problems = preflight("bundle/model.onnx")          # CPU: what TensorRT's ONNX parser will reject
    to_fp16_onnx("bundle/model.onnx", "model.fp16.onnx")  # CPU: float16 graph, sensitive ops kept float32
    art = build_bundle_engine("bundle/", precision="fp16")  # GPU + TensorRT: engine added to the bundle

TensorRT 10 takes precision as builder flags (FP16/INT8, weakly typed networks). TensorRT 11 removed
those flags: every network is strongly typed, so FP16 has to be a float16 ONNX graph and INT8 has to
be Q/DQ nodes in the graph (`model.int8.tensorrt.onnx`, written by the calibration step). Both are
supported; which path is taken is decided from the installed bindings, not from version strings.

Engines are specific to the TensorRT version and the GPU they were built on. Each engine built here
has a JSON header beside it recording the key it was built for (model hash, TensorRT version, compute
capability, precision, shapes, options); an engine whose header does not match the current machine
is rebuilt, never loaded blindly. Everything that touches TensorRT imports it lazily, so preflight and
FP16 conversion run on machines without a GPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from edgeseg.bundle import Artifact, Bundle, BundleError, atomic_path, sha256_file, write_text_atomic
from edgeseg.errors import ConversionError

log = logging.getLogger("edgeseg.tensorrt")

PRECISIONS = ("fp32", "fp16", "int8")
INT8_GRAPH = "model.int8.tensorrt.onnx"  # the Q/DQ graph the calibration step writes for TensorRT
FP16_GRAPH = "model.fp16.onnx"
HEADER_VERSION = 1
INSTALL_HINT = (
    "install TensorRT with its builder and pycuda on the GPU machine (pip install 'edgeseg[tensorrt]'), "
    "or copy the bundle there and run `edgeseg build` there"
)

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


def _load_onnx(model):
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
    model = _load_onnx(onnx_path_or_model)
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


# -- FP16 graphs -------------------------------------------------------------------------------------
# Ops whose float16 range or accumulation loses accuracy (exp overflow, long reductions, variance):
# they stay float32, with casts around them. The converter's own block list (ops lacking float16
# kernels in ONNX Runtime, Resize among them) is always added.
DEFAULT_FP32_OPS = (
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "LayerNormalization", "InstanceNormalization", "GroupNormalization", "Exp", "Log", "Pow", "Sqrt",
)


def _require_float16_converter():
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ConversionError(
            "FP16 graph conversion needs the onnxconverter-common package: pip install onnxconverter-common"
        ) from None
    return float16


def to_fp16_onnx(src, dst: str | os.PathLike, keep_float32_ops: Iterable[str] = DEFAULT_FP32_OPS,
                 keep_io_types: bool = True) -> Path:
    """Write a float16 copy of an ONNX graph (weights and activations), keeping `keep_float32_ops` in
    float32. With keep_io_types the graph still takes and returns float32, so preprocessing and
    postprocessing do not change. Returns `dst`."""
    import onnx
    from onnx import TensorProto

    float16 = _require_float16_converter()
    model = onnx.ModelProto()
    model.CopyFrom(_load_onnx(src))  # never modify a caller's ModelProto
    _name_nodes(model.graph)
    fp32_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_float32_ops))
    import warnings

    with warnings.catch_warnings():
        # The converter warns once per weight it clamps to float16's range; the count is logged instead.
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=block)
    if keep_io_types:
        _restore_float32_outputs(converted, fp32_outputs)
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as e:
        raise ConversionError(f"the float16 graph is invalid: {str(e).splitlines()[0]}") from None
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(converted, str(tmp))
    n16 = sum(1 for t in converted.graph.initializer if t.data_type == TensorProto.FLOAT16)
    log.info("wrote float16 graph %s (%d float16 weights; float32 kept for %s)", dst, n16, ", ".join(block))
    return dst


def _name_nodes(graph) -> None:
    """Give unnamed nodes unique names: the converter names its Cast nodes after the node they serve,
    and unnamed nodes would produce clashing casts."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _restore_float32_outputs(model, fp32_outputs: set[str]) -> None:
    """keep_io_types leaves an output float16 when its producer is a blocked (float32) op: the converter
    appends a Cast to float16 there. Make such outputs float32 again."""
    from onnx import TensorProto, helper

    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if out.name not in fp32_outputs or tt.elem_type == TensorProto.FLOAT:
            continue
        node = producers.get(out.name)
        if node is not None and node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    a.i = TensorProto.FLOAT
        else:
            half = out.name + "_fp16"
            if node is not None:
                node.output[list(node.output).index(out.name)] = half
            model.graph.node.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT,
                                                     name=f"{out.name}_to_float32"))
        tt.elem_type = TensorProto.FLOAT


def fp16_parity(fp32_onnx, fp16_onnx, preprocess, frames: int | list = 4, output_kind: str = "logits") -> dict:
    """Parity of a float16 graph with its float32 source, both run in ONNX Runtime on the same frames."""
    from converters.parity import check_parity

    return check_parity(str(fp32_onnx), str(fp16_onnx), preprocess, frames=frames, output_kind=output_kind)


def prepare_fp16(bundle: Bundle | str | os.PathLike, keep_float32_ops: Iterable[str] = DEFAULT_FP32_OPS,
                 frames: int = 4, save: bool = True) -> Artifact:
    """Add `model.fp16.onnx` (float16 graph, float32 I/O) to a bundle with its parity against FP32 in
    ONNX Runtime. TensorRT 11 builds FP16 engines from this graph."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    src = _fp32_artifact(bundle)
    dst = bundle.path / FP16_GRAPH
    to_fp16_onnx(bundle.artifact_path(src), dst, keep_float32_ops=keep_float32_ops)
    parity = fp16_parity(bundle.artifact_path(src), dst, bundle.manifest.preprocess, frames=frames,
                         output_kind=bundle.manifest.output_kind)
    log.info("float16 graph parity vs float32 (ONNX Runtime): %s", parity)
    art = Artifact(FP16_GRAPH, "onnxruntime", "fp16", parity=parity,
                   info={"source": src.path, "float32_ops": sorted(keep_float32_ops), "io": "float32"})
    bundle.add_artifact(art)
    if save:
        bundle.save()
    return art


add_fp16_artifact = prepare_fp16  # the name edgeseg.api uses


def _fp32_artifact(bundle: Bundle) -> Artifact:
    try:
        art = bundle.select("onnxruntime", "fp32")
    except BundleError:
        raise ConversionError(f"bundle {bundle.path} has no float32 ONNX model; re-create it with `edgeseg convert`") from None
    bundle.verify_artifact(art)
    return art


# -- engine cache --------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where engines are cached: $EDGESEG_CACHE/engines, else $XDG_CACHE_HOME (~/.cache)/edgeseg/engines."""
    root = os.environ.get("EDGESEG_CACHE")
    if root:
        return Path(root).expanduser() / "engines"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "edgeseg" / "engines"


@dataclass(frozen=True)
class Target:
    """What an engine is specific to: the TensorRT release and the GPU."""

    trt_version: str
    compute_capability: tuple[int, int]
    gpu_name: str = ""

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def normalize_shapes(shapes: Mapping[str, Any] | None) -> dict[str, list[list[int]]]:
    """Normalise {input: shape or (min, opt, max)} into {input: [min, opt, max]} of int lists."""
    out: dict[str, list[list[int]]] = {}
    for name, spec in (shapes or {}).items():
        spec = list(spec)
        if spec and all(isinstance(d, (int, np.integer)) for d in spec):
            spec = [spec, spec, spec]
        if len(spec) != 3:
            raise ConversionError(f"shapes for input {name!r} must be one shape or (min, opt, max), got {spec}")
        mn, opt, mx = ([int(d) for d in s] for s in spec)
        if not (len(mn) == len(opt) == len(mx)) or any(not (a <= b <= c) for a, b, c in zip(mn, opt, mx)) or min(mn) < 1:
            raise ConversionError(f"shapes for input {name!r} must satisfy 1 <= min <= opt <= max per axis, got {mn}, {opt}, {mx}")
        out[name] = [mn, opt, mx]
    return dict(sorted(out.items()))


@dataclass
class BuildOptions:
    """How an engine is built. Everything here except `timing_cache` and `device` is part of the cache key."""

    precision: str = "fp16"
    shapes: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max]
    workspace_mb: int | None = None
    version_compatible: bool = False
    hardware_compatible: bool = False
    optimization_level: int | None = None
    # TensorRT 10: None/False build weakly typed with FP16/INT8 flags, True opts in to strong typing
    # (precision from the graph, NVIDIA's recommendation since 10.12). TensorRT 11 is always strongly typed.
    strongly_typed: bool | None = None
    timing_cache: str | None = None
    device: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConversionError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.shapes = normalize_shapes(self.shapes)
        if self.workspace_mb is not None and int(self.workspace_mb) < 1:
            raise ConversionError(f"workspace must be a positive number of MB, got {self.workspace_mb}")
        if self.optimization_level is not None and not 0 <= int(self.optimization_level) <= 5:
            raise ConversionError(f"optimization level must be 0..5, got {self.optimization_level}")

    def key_fields(self) -> dict:
        return {"precision": self.precision, "shapes": self.shapes, "workspace_mb": self.workspace_mb,
                "version_compatible": self.version_compatible, "hardware_compatible": self.hardware_compatible,
                "optimization_level": self.optimization_level, "strongly_typed": bool(self.strongly_typed)}


def engine_key(model_sha256: str, target: Target, options: BuildOptions) -> str:
    """Cache key of an engine: a hash over everything the serialized engine depends on."""
    fields = {
        "model_sha256": model_sha256,
        "trt_version": target.trt_version,
        # Hardware-compatible engines run on any Ampere+ GPU: key them on that, not the exact GPU.
        "gpu": "ampere_plus" if options.hardware_compatible else target.sm,
        **options.key_fields(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class EngineHeader:
    """The JSON written beside every engine: what it was built from and for."""

    key: str
    model_sha256: str
    trt_version: str
    compute_capability: list[int]
    gpu_name: str
    precision: str
    shapes: dict[str, list[list[int]]]
    options: dict[str, Any]
    engine_sha256: str = ""
    strongly_typed: bool = False
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    created: str = ""
    header_version: int = HEADER_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "EngineHeader":
        if not isinstance(d, Mapping) or d.get("header_version") != HEADER_VERSION:
            raise ConversionError(f"unknown engine header version {d.get('header_version') if isinstance(d, Mapping) else d!r}")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise ConversionError(f"engine header is incomplete: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EngineHeader":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConversionError(f"cannot read engine header {path}: {e}") from None


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def stale_reasons(header: EngineHeader, target: Target, *, model_sha256: str | None = None,
                  options: BuildOptions | None = None) -> list[str]:
    """Why an engine with this header must not run on `target` (empty: it may)."""
    reasons = []
    opts = header.options or {}
    if opts.get("version_compatible"):
        # Version-compatible engines run on the same or a later TensorRT (they embed a lean runtime).
        if _version_tuple(target.trt_version) < _version_tuple(header.trt_version):
            reasons.append(f"built with TensorRT {header.trt_version}, newer than the installed {target.trt_version}")
    elif header.trt_version != target.trt_version:
        reasons.append(f"built with TensorRT {header.trt_version}, this machine has {target.trt_version}")
    built_cc = tuple(header.compute_capability)
    if opts.get("hardware_compatible"):
        if target.compute_capability < (8, 0):
            reasons.append(f"hardware-compatible engines need an Ampere or newer GPU, this one is {target.sm}")
    elif built_cc != tuple(target.compute_capability):
        reasons.append(f"built for compute capability {built_cc[0]}.{built_cc[1]} ({header.gpu_name or 'unknown GPU'}), "
                       f"this GPU is {target.compute_capability[0]}.{target.compute_capability[1]} ({target.gpu_name})")
    if model_sha256 is not None and header.model_sha256 != model_sha256:
        reasons.append("built from a different ONNX model")
    if options is not None:
        if header.precision != options.precision:
            reasons.append(f"built for {header.precision}, {options.precision} requested")
        if normalize_shapes(header.shapes) != options.shapes:
            reasons.append(f"built for shapes {header.shapes}, {options.shapes or 'static shapes'} requested")
        wanted = options.key_fields()
        differ = sorted(k for k in wanted if k not in ("precision", "shapes") and opts.get(k) != wanted[k])
        if differ:
            reasons.append("built with different options: " + ", ".join(f"{k}={opts.get(k)!r} (want {wanted[k]!r})" for k in differ))
    return reasons


# -- TensorRT ----------------------------------------------------------------------------------------
def import_tensorrt():
    """The `tensorrt` module with its builder, or ConversionError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ConversionError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        raise ConversionError(
            f"the installed TensorRT {getattr(trt, '__version__', '?')} has no builder/ONNX parser (a lean or "
            f"dispatch runtime); {INSTALL_HINT}"
        )
    return trt


def current_target(device: int = 0, trt=None) -> Target:
    """TensorRT version and GPU of this machine; ConversionError when either is missing."""
    trt = trt or import_tensorrt()
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise ConversionError(f"pycuda is not installed, so the GPU cannot be queried; {INSTALL_HINT}") from None
    try:
        cuda.init()
        if cuda.Device.count() <= device:
            raise ConversionError(f"no CUDA device {device} (found {cuda.Device.count()}); TensorRT engines need an NVIDIA GPU")
        dev = cuda.Device(device)
        return Target(trt.__version__, tuple(dev.compute_capability()), dev.name())
    except ConversionError:
        raise
    except Exception as e:  # cuda.Error subclasses: driver missing or broken
        raise ConversionError(f"CUDA is not usable ({e}); TensorRT engines need an NVIDIA GPU and driver") from None


def has_precision_flags(trt) -> bool:
    """TensorRT 10 takes FP16/INT8 as builder flags; TensorRT 11 removed them (strong typing only)."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "INT8")


def uses_strong_typing(trt, strongly_typed: bool | None = None) -> bool:
    return not has_precision_flags(trt) or bool(strongly_typed)


def _network_flags(trt, strongly_typed: bool) -> int:
    # EXPLICIT_BATCH is deprecated and ignored since TensorRT 10. STRONGLY_TYPED is an opt-in on 10.x and
    # implied (the flag deprecated, ignored) on 11.x, so it is only passed where precision flags still exist.
    if strongly_typed and has_precision_flags(trt):
        flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
        if flag is None:
            raise ConversionError(f"TensorRT {trt.__version__} has no strongly typed networks; drop --strongly-typed")
        return 1 << int(flag)
    return 0


def _make_logger(trt):
    severities = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR, trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING, trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = severities.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(msg)
            log.log(level, "TensorRT: %s", msg)

    return Logger()


def _make_progress(trt):
    """IProgressMonitor (TensorRT >= 10) that logs phases; None where the bindings lack it."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._started: dict[str, tuple[float, int]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._started[phase_name] = (time.monotonic(), num_steps)
            depth = 1 if parent_phase else 0
            log.info("build: %s%s (%d steps)", "  " * depth, phase_name, num_steps)

        def step_complete(self, phase_name, step):
            t0, n = self._started.get(phase_name, (time.monotonic(), 0))
            if n >= 10 and (step + 1) % max(1, n // 10) == 0:
                log.info("build: %s %d/%d (%.0f s)", phase_name, step + 1, n, time.monotonic() - t0)
            return True  # never cancel

        def phase_finish(self, phase_name):
            t0, _ = self._started.pop(phase_name, (time.monotonic(), 0))
            log.info("build: %s done in %.1f s", phase_name, time.monotonic() - t0)

    return Progress()


def _io_names(model) -> str:
    ins = ", ".join(f"{i.name}{_dims(i)}" for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    outs = ", ".join(f"{o.name}{_dims(o)}" for o in model.graph.output)
    return f"inputs: {ins}; outputs: {outs}"


def _dims(vi) -> str:
    return "(" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in vi.type.tensor_type.shape.dim) + ")"


def _parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = getattr(e, "node_name", lambda: "")() or f"#{e.node()}"
        op = getattr(e, "node_operator", lambda: "")()
        out.append(f"node {node}{f' ({op})' if op else ''}: {e.desc()}")
    return out


def _network_io(trt, network) -> tuple[list[dict], list[dict]]:
    def desc(t):
        return {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": str(t.dtype).split(".")[-1]}

    return ([desc(network.get_input(i)) for i in range(network.num_inputs)],
            [desc(network.get_output(i)) for i in range(network.num_outputs)])


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, options: BuildOptions,
                 target: Target | None = None) -> EngineHeader:
    """Build a serialized engine from an ONNX file and write it (atomically) with its header beside it
    (`<engine>.json`). Needs TensorRT with its builder and a GPU."""
    trt = import_tensorrt()
    target = target or current_target(options.device, trt)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = _load_onnx(onnx_path)
    check_preflight(model, where=str(onnx_path))
    model_sha = sha256_file(onnx_path)
    strongly_typed = uses_strong_typing(trt, options.strongly_typed)
    flags_api = not strongly_typed  # weakly typed: precision comes from builder flags
    if options.precision == "fp16" and strongly_typed and not _is_float16_graph(model):
        raise ConversionError(
            f"a strongly typed TensorRT {trt.__version__} network takes FP16 only from a float16 graph, and "
            f"{onnx_path.name} is float32; "
            "make one with converters.tensorrt.to_fp16_onnx (`edgeseg build --precision fp16` does this)"
        )
    if options.precision == "int8" and not _has_qdq(model):
        raise ConversionError(
            f"{onnx_path.name} has no QuantizeLinear/DequantizeLinear nodes; INT8 engines are built from the Q/DQ graph "
            f"of `edgeseg calibrate BUNDLE --target tensorrt` ({INT8_GRAPH})"
        )
    if options.hardware_compatible and target.compute_capability < (8, 0):
        raise ConversionError(f"hardware-compatible engines need an Ampere or newer GPU; this one is {target.sm} ({target.gpu_name})")

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser) or logger.errors or ["(the parser gave no details)"]
        raise ConversionError(f"TensorRT's ONNX parser rejected {onnx_path} ({_io_names(model)}):\n  " + "\n  ".join(errors))
    inputs, outputs = _network_io(trt, network)

    config = builder.create_builder_config()
    shapes = _profile_shapes(inputs, options)
    if any(-1 in i["shape"] for i in inputs):
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in shapes.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    if flags_api and options.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 Q/DQ graphs: layers left unquantized may run in FP16
    if flags_api and options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    progress = _make_progress(trt)
    if progress is not None:
        config.progress_monitor = progress
    cache = _load_timing_cache(config, options.timing_cache)

    log.info("building TensorRT %s %s engine for %s on %s (%s)%s", trt.__version__, options.precision, onnx_path.name,
             target.gpu_name, target.sm, f", profile {shapes}" if shapes else "")
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConversionError(
            f"TensorRT could not build an engine for {onnx_path} ({_io_names(model)}):\n  "
            + "\n  ".join(logger.errors or ["see the TensorRT messages above (run with -v)"])
        )
    log.info("engine built in %.1f s", time.monotonic() - t0)
    if options.timing_cache and cache is not None:
        _save_timing_cache(config, options.timing_cache)
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(serialized)
            fh.flush()
            os.fsync(fh.fileno())
    header = EngineHeader(
        key=engine_key(model_sha, target, options), model_sha256=model_sha, trt_version=target.trt_version,
        compute_capability=list(target.compute_capability), gpu_name=target.gpu_name, precision=options.precision,
        shapes=options.shapes, options=options.key_fields(), engine_sha256=sha256_file(engine_path),
        strongly_typed=strongly_typed, inputs=inputs, outputs=outputs,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    header.save(header_path(engine_path))
    return header


def header_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


def _is_float16_graph(model) -> bool:
    from onnx import TensorProto

    return any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)


def _has_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _profile_shapes(inputs: list[dict], options: BuildOptions) -> dict[str, list[list[int]]]:
    """min/opt/max per input; dynamic inputs need them, static inputs must match them."""
    known = {i["name"] for i in inputs}
    unknown = set(options.shapes) - known
    if unknown:
        raise ConversionError(f"shapes given for {sorted(unknown)}, but the model's inputs are {sorted(known)}")
    out = {}
    for i in inputs:
        name, shape = i["name"], i["shape"]
        spec = options.shapes.get(name)
        if -1 not in shape:
            if spec and any(s != shape for s in spec):
                raise ConversionError(
                    f"input {name!r} is static {tuple(shape)}, so it cannot take shapes {spec}; "
                    "re-export the model with dynamic axes (`edgeseg convert MODEL --dynamic`)"
                )
            continue
        if spec is None:
            raise ConversionError(
                f"input {name!r} has dynamic axes {tuple(shape)}; give its min/opt/max shapes "
                f"(`edgeseg build --dynamic N,C,H,W:N,C,H,W:N,C,H,W`)"
            )
        for s in spec:
            if len(s) != len(shape) or any(d != -1 and d != v for d, v in zip(shape, s)):
                raise ConversionError(f"shape {s} does not fit input {name!r} {tuple(shape)} (-1 marks dynamic axes)")
        out[name] = spec
    return out


def _load_timing_cache(config, path: str | None):
    data = b""
    if path and Path(path).is_file():
        data = Path(path).read_bytes()
        log.info("reusing timing cache %s (%d bytes)", path, len(data))
    cache = config.create_timing_cache(data)
    if cache is None and data:
        log.warning("timing cache %s is unreadable (another TensorRT version?); starting an empty one", path)
        cache = config.create_timing_cache(b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT is rejected instead of misleading tactic choice.
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False) is False:
        log.warning("timing cache %s does not match this GPU/TensorRT; building without it", path)
        return None
    return cache


def _save_timing_cache(config, path: str) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(cache.serialize())
    log.info("saved timing cache %s", path)


def cached_engine(onnx_path: str | os.PathLike, options: BuildOptions, *, rebuild: bool = False,
                  target: Target | None = None, directory: str | os.PathLike | None = None) -> tuple[Path, EngineHeader]:
    """The engine for `onnx_path` built with `options` on this machine, from the cache or freshly built.

    A cached engine is used only when its header matches the model hash, TensorRT version, GPU and
    options, and the engine file still has the checksum the header recorded; otherwise it is rebuilt.
    """
    target = target or current_target(options.device)
    model_sha = sha256_file(onnx_path)
    key = engine_key(model_sha, target, options)
    directory = Path(directory) if directory else cache_dir()
    path = directory / f"{model_sha[:12]}-{key}.engine"
    if not rebuild:
        reason = cache_entry_problem(path, target, model_sha, options)
        if reason is None:
            log.info("using cached engine %s", path)
            return path, EngineHeader.load(header_path(path))
        if path.exists() or header_path(path).exists():
            log.warning("rebuilding cached engine %s: %s", path, reason)
    header = build_engine(onnx_path, path, options, target=target)
    return path, header


def cache_entry_problem(path: Path, target: Target, model_sha256: str, options: BuildOptions) -> str | None:
    """None when the engine at `path` can be loaded on `target`, else why not."""
    hp = header_path(path)
    if not path.is_file():
        return "no engine"
    if not hp.is_file():
        return "the engine has no header, so what it was built for is unknown"
    try:
        header = EngineHeader.load(hp)
    except ConversionError as e:
        return str(e)
    reasons = stale_reasons(header, target, model_sha256=model_sha256, options=options)
    if reasons:
        return "; ".join(reasons)
    if header.engine_sha256 and sha256_file(path) != header.engine_sha256:
        return "the engine file does not match its header's checksum (damaged or replaced)"
    return None


# -- bundles -------------------------------------------------------------------------------------------
def engine_filename(target: Target, options: BuildOptions) -> str:
    """model.<gpu>.<trt>.<precision>.engine, e.g. model.sm89.trt10.8.fp16.engine"""
    gpu = "ampere_plus" if options.hardware_compatible else target.sm
    major_minor = ".".join(str(v) for v in _version_tuple(target.trt_version)[:2])
    trt_tag = f"trt{major_minor}" + ("vc" if options.version_compatible else "")
    return f"model.{gpu}.{trt_tag}.{options.precision}.engine"


def bundle_engine_source(bundle: Bundle, precision: str, trt=None, strongly_typed: bool | None = None) -> Path:
    """The ONNX graph an engine of `precision` is built from (making the float16 graph if needed)."""
    if precision == "int8":
        found = [a for a in bundle.find(precision="int8", target="tensorrt") if a.path.endswith(".onnx")]
        path = bundle.artifact_path(found[0]) if found else bundle.path / INT8_GRAPH
        if not path.is_file():
            raise ConversionError(
                f"bundle {bundle.path} has no TensorRT INT8 graph ({INT8_GRAPH}); quantize it first with "
                f"`edgeseg calibrate {bundle.path} --target tensorrt`"
            )
        if found:
            bundle.verify_artifact(found[0])
        return path
    src = _fp32_artifact(bundle)
    if precision == "fp16" and trt is not None and uses_strong_typing(trt, strongly_typed):
        fp16 = bundle.find("onnxruntime", "fp16")
        if fp16 and bundle.artifact_path(fp16[0]).is_file():
            bundle.verify_artifact(fp16[0])
            return bundle.artifact_path(fp16[0])
        return bundle.artifact_path(prepare_fp16(bundle))
    return bundle.artifact_path(src)


def default_shapes(bundle: Bundle, onnx_path: Path) -> dict[str, list[list[int]]]:
    """A single-shape profile from the bundle's preprocessing for dynamic inputs (batch 1, input size)."""
    model = _load_onnx(onnx_path)
    init = {t.name for t in model.graph.initializer}
    out = {}
    pre = bundle.manifest.preprocess
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            continue
        shape = list(pre.input_shape)
        if len(dims) != len(shape):
            raise ConversionError(f"input {vi.name!r} has rank {len(dims)}; give its shapes explicitly")
        out[vi.name] = [shape, shape, shape]
    return out


def build_bundle_engine(bundle_path: str | os.PathLike | Bundle, precision: str = "fp16", *,
                        workspace_mb: int | None = None, shapes: Mapping[str, Any] | None = None,
                        timing_cache: str | os.PathLike | None = None, version_compatible: bool = False,
                        hardware_compatible: bool = False, optimization_level: int | None = None,
                        strongly_typed: bool | None = None, device: int = 0, rebuild: bool = False,
                        parity_frames: int = 4) -> Artifact:
    """Build (or take from the cache) the TensorRT engine of a bundle, copy it into the bundle as
    `model.<gpu>.<trt>.<precision>.engine`, measure its parity against the FP32 ONNX model, and record it."""
    bundle = bundle_path if isinstance(bundle_path, Bundle) else Bundle.load(bundle_path)
    trt = import_tensorrt()
    target = current_target(device, trt)
    source = bundle_engine_source(bundle, precision, trt, strongly_typed)
    check_preflight(source, where=str(source))
    options = BuildOptions(
        precision=precision, shapes=dict(shapes) if shapes else default_shapes(bundle, source),
        workspace_mb=workspace_mb, version_compatible=version_compatible, hardware_compatible=hardware_compatible,
        optimization_level=optimization_level, strongly_typed=strongly_typed,
        timing_cache=str(timing_cache) if timing_cache else None, device=device,
    )
    cached, header = cached_engine(source, options, rebuild=rebuild, target=target)
    name = engine_filename(target, options)
    dest = bundle.path / name
    with atomic_path(dest) as tmp:
        shutil.copyfile(cached, tmp)
    parity = {}
    if parity_frames:
        from runtime.engines.tensorrt import TensorRTEngine

        engine = TensorRTEngine(dest, precision=precision, device=device, header=header.to_dict())
        try:
            from converters.parity import check_parity

            parity = check_parity(str(bundle.artifact_path(_fp32_artifact(bundle))), engine, bundle.manifest.preprocess,
                                  frames=parity_frames, output_kind=bundle.manifest.output_kind)
        finally:
            engine.close()
        log.info("engine parity vs FP32 ONNX: %s", parity)
    art = Artifact(name, "tensorrt", precision, parity=parity, target=header.key,
                   info={**header.to_dict(), "source": source.name})
    bundle.add_artifact(art)
    bundle.save()
    return art


__all__ = [
    "Problem", "preflight", "normalize_shapes", "check_preflight", "SUPPORTED_OPS", "DEFAULT_FP32_OPS", "to_fp16_onnx", "fp16_parity",
    "prepare_fp16", "add_fp16_artifact", "cache_dir", "Target", "BuildOptions", "EngineHeader", "engine_key", "stale_reasons",
    "import_tensorrt", "current_target", "has_precision_flags", "uses_strong_typing", "build_engine", "cached_engine",
    "cache_entry_problem", "engine_filename", "bundle_engine_source", "build_bundle_engine", "header_path",
]
