"""Torch segmentation network -> Core ML ML Program (.mlpackage) an iOS or macOS app calls on a frame.

    from converters.coreml import convert_coreml, convert_to_bundle, validate_package
    res = convert_coreml(model, "seg.mlpackage", preprocess=pre, labels=labels, palette=palette,
                         precision="palettize4", output="mask", input_sizes=[(256, 256), (384, 512)])
    report = validate_package(res.path, torch_model=model)

The package's input is an image (`ct.ImageType`, RGB or BGR as the network expects) with
scale 1 and bias 0: Core ML hands the graph raw 0..255 pixel values and the graph itself computes
(x / 255 - mean) / std per channel. The normalisation is folded into the model instead of the
ImageType's scale/bias because ImageType has one scale for all channels, so a per-channel std
cannot be expressed there. An app passes a CVPixelBuffer and needs nothing else: labels, palette
and the preprocessing description travel in the package's metadata.

Conversion goes through `torch.export` (decomposed to ATen) first: coremltools 9 cannot convert
TorchScript graphs that read sizes from tensors (`F.interpolate(size=x.shape[-2:])`), the export
path can. `torch.jit.trace` is the fallback for models `torch.export` cannot capture.

Precisions (weights are FP16 unless compressed; activations FP16 except for fp32):

    fp32, fp16              compute precision FLOAT32 / FLOAT16
    int8-weights            linear symmetric INT8 per output channel (iOS16+)
    int4-weights            linear symmetric INT4 per output channel (iOS18+)
    palettize8/6/4          one k-means look-up table per weight tensor (iOS16+)
    palettize4-grouped      4-bit LUT per group of 8 output channels (iOS18+)
    w8a8                    INT8 weights and INT8 activations (iOS17+), see below

W8A8: coremltools' own activation quantization (`linear_quantize_activations`) runs the model
through Core ML to calibrate, which needs macOS. Here the activations are calibrated on the torch
side instead, with `coremltools.optimize.torch.quantization.LinearQuantizer` (observers only, no
training: batch norm frozen, fake quantization on, a few hundred frames at most), finalized into
quantize/dequantize pairs and converted with `torch.jit.trace` (quantized tensors cannot be
captured by `torch.export`). The package then has `quantize`/`dequantize` ops around each layer
and INT8 weights.

Palettization builds its look-up tables with a weighted 1-D k-means (Lloyd's algorithm on the
unique FP16 weight values, quantile-initialised) through coremltools' `mode="custom"`, so
coremltools' scikit-learn dependency for `mode="kmeans"` is not needed; every weight maps to its
nearest table entry, which `validate_package` checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgeseg.bundle import Artifact, Bundle, BundleError, Manifest, MANIFEST, atomic_path
from edgeseg.errors import ConversionError
from edgeseg.spec import Preprocess

log = logging.getLogger("edgeseg.coreml")

INPUT_NAME = "image"
OUTPUTS = ("logits", "probs", "mask")
COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
# Weights with more elements than this are compressed; smaller ones (biases, tiny 1x1 convs) stay
# FP16, where compressing would save bytes only in the noise.
WEIGHT_THRESHOLD = 512
MAX_ENUMERATED_SHAPES = 128  # Core ML's limit for EnumeratedShapes
DEFAULT_CALIBRATION_FRAMES = 32


# -- errors -------------------------------------------------------------------------------------
class CoreMLConversionError(ConversionError):
    """A model or option that Core ML conversion cannot take; the message names what and the fix."""


class UnsupportedOpError(CoreMLConversionError):
    """An operator coremltools has no converter for; names the op and the layer that uses it."""

    def __init__(self, message: str, op: str = "", layer: str = ""):
        super().__init__(message)
        self.op, self.layer = op, layer


class DynamicShapeError(CoreMLConversionError):
    """A shape Core ML cannot take (several input sizes through a size-dependent layer, sizes
    that are not a multiple of the network's stride, ...)."""

    def __init__(self, message: str, layer: str = ""):
        super().__init__(message)
        self.layer = layer


class DeploymentTargetError(CoreMLConversionError):
    """A deployment target too old for the requested format or compression."""


class PackageValidationError(CoreMLConversionError):
    """A package that does not pass `validate_package`; the message lists the failed checks."""


# -- precisions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    name: str
    compute: str  # fp16 | fp32
    kind: str  # none | linear | lut | w8a8
    nbits: int = 16
    granularity: str = ""
    block_size: int = 0
    group_size: int = 0
    min_ios: int = 15
    why: str = "ML Programs need iOS15/macOS12 or newer"

    def describe(self) -> dict:
        d = {"scheme": self.name, "compute_precision": self.compute, "kind": self.kind}
        if self.kind == "linear":
            d.update(dtype=f"int{self.nbits}", mode="linear_symmetric", granularity=self.granularity,
                     tool="coremltools.optimize.coreml.linear_quantize_weights", weight_threshold=WEIGHT_THRESHOLD)
            if self.block_size:
                d["block_size"] = self.block_size
        elif self.kind == "lut":
            d.update(nbits=self.nbits, granularity=self.granularity, lut="weighted 1-D k-means",
                     tool="coremltools.optimize.coreml.palettize_weights", weight_threshold=WEIGHT_THRESHOLD)
            if self.group_size:
                d["group_size"] = self.group_size
        elif self.kind == "w8a8":
            d.update(weights="int8 symmetric per output channel", activations="uint8/int8 per tensor, calibrated",
                     tool="coremltools.optimize.torch.quantization.LinearQuantizer (calibration only) + torch.jit.trace")
        return d


SCHEMES: dict[str, Scheme] = {
    "fp32": Scheme("fp32", "fp32", "none"),
    "fp16": Scheme("fp16", "fp16", "none"),
    "int8-weights": Scheme("int8-weights", "fp16", "linear", 8, "per_channel", min_ios=16,
                           why="compressed weights (constexpr ops) need iOS16/macOS13 or newer"),
    # per output channel: blocks along the input channels would skip every depthwise and
    # odd-width layer (the input axis must divide into blocks)
    "int4-weights": Scheme("int4-weights", "fp16", "linear", 4, "per_channel", min_ios=18,
                           why="4-bit weight quantization needs iOS18/macOS15 or newer"),
    "palettize8": Scheme("palettize8", "fp16", "lut", 8, "per_tensor", min_ios=16,
                         why="palettized weights (constexpr_lut_to_dense) need iOS16/macOS13 or newer"),
    "palettize6": Scheme("palettize6", "fp16", "lut", 6, "per_tensor", min_ios=16,
                         why="palettized weights (constexpr_lut_to_dense) need iOS16/macOS13 or newer"),
    "palettize4": Scheme("palettize4", "fp16", "lut", 4, "per_tensor", min_ios=16,
                         why="palettized weights (constexpr_lut_to_dense) need iOS16/macOS13 or newer"),
    "palettize4-grouped": Scheme("palettize4-grouped", "fp16", "lut", 4, "per_grouped_channel", group_size=8,
                                 min_ios=18, why="per-grouped-channel palettization needs iOS18/macOS15 or newer"),
    "w8a8": Scheme("w8a8", "fp16", "w8a8", 8, "per_channel", min_ios=17,
                   why="activation quantize/dequantize ops need iOS17/macOS14 or newer"),
}
PRECISIONS = tuple(SCHEMES)


def _ct():
    """Import coremltools quietly (it prints version warnings for torch and scikit-learn)."""
    # on its first import coremltools warns about untested torch versions and, off macOS, about
    # its missing native prediction library; neither matters for conversion
    with warnings.catch_warnings(), _quiet_logger("coremltools", logging.ERROR):
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


@contextlib.contextmanager
def _quiet_logger(name: str, level: int):
    lg = logging.getLogger(name)
    old = lg.level
    lg.setLevel(level)
    try:
        yield
    finally:
        lg.setLevel(old)


def scheme_for(precision: str) -> Scheme:
    if precision not in SCHEMES:
        raise CoreMLConversionError(f"unknown Core ML precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return SCHEMES[precision]


def resolve_target(name: str):
    """'iOS17' / 'macOS14' / 'tvOS17' / 'watchOS10' -> (ct.target value, iOS-equivalent major)."""
    ct = _ct()
    target = getattr(ct.target, str(name), None) if isinstance(name, str) else None
    if target is None:
        known = sorted({t.name for t in ct.target})
        raise DeploymentTargetError(
            f"unknown minimum_deployment_target {name!r}; use a name like 'iOS17' or 'macOS14' (known iOS names: {', '.join(known)})"
        )
    ios = {int(getattr(ct.target, f"iOS{v}")): v for v in (13, 14, 15, 16, 17, 18) if hasattr(ct.target, f"iOS{v}")}
    if hasattr(ct.target, "iOS26"):
        ios[int(ct.target.iOS26)] = 26
    return target, ios.get(int(target), 0)


def check_target(precision: str, target_name: str) -> tuple[Any, int]:
    """Fail before any work when the deployment target is too old for the precision."""
    scheme = scheme_for(precision)
    target, ios = resolve_target(target_name)
    if ios < scheme.min_ios:
        mac = {15: 12, 16: 13, 17: 14, 18: 15}.get(scheme.min_ios)
        raise DeploymentTargetError(
            f"precision {precision!r} cannot target {target_name}: {scheme.why}; "
            f"pass minimum_deployment_target='iOS{scheme.min_ios}'" + (f" (or 'macOS{mac}')" if mac else "")
            + " or a newer one, or choose a precision the older target supports"
            + (" (fp16 or fp32)" if scheme.min_ios > 15 else "")
        )
    return target, ios


# -- result -------------------------------------------------------------------------------------
@dataclass
class CoreMLResult:
    path: Path
    precision: str
    output: str
    input_name: str
    output_name: str
    input_sizes: list[tuple[int, int]]
    output_shape: list[int]
    minimum_deployment_target: str
    size_bytes: int
    weights_bytes: int  # weights/weight.bin: what compression shrinks (the rest is the program text)
    frontend: str  # torch.export | torch.jit.trace
    compression: dict
    validation: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["input_sizes"] = [list(s) for s in self.input_sizes]
        return d


def package_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a .mlpackage folder (or a file); 0 if it does not exist."""
    p = Path(path)
    if not p.exists():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# -- the graph that is converted ----------------------------------------------------------------
def _primary_output(y):
    """The logits tensor of a model that returns a tensor, a dict ('out' first) or a tuple."""
    import torch

    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        if "out" in y:
            return y["out"]
        for v in y.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(y, (tuple, list)) and y:
        return _primary_output(y[0])
    raise CoreMLConversionError(
        f"the model returns {type(y).__name__}; expected logits (N, C, H, W) as a tensor, a dict with 'out', or a tuple whose first item is the logits"
    )


def _image_model(model, preprocess: Preprocess, output: str, color: str):
    """Wrap `model` so it takes raw 0..255 pixels (N, 3, H, W) in the package's colour order."""
    import torch
    from torch import nn

    class ImageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            std = torch.tensor(preprocess.std, dtype=torch.float32)
            mean = torch.tensor(preprocess.mean, dtype=torch.float32)
            # (x / 255 - mean) / std as one multiply-add per channel
            self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
            self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1))
            self.flip = color != preprocess.color
            self.output = output

        def forward(self, image):
            x = torch.flip(image, dims=[1]) if self.flip else image
            y = _primary_output(self.model(x * self.scale + self.shift))
            if self.output == "probs":
                return torch.softmax(y, dim=1)
            if self.output == "mask":
                return torch.argmax(y, dim=1).to(torch.int32)
            return y

    return ImageModel().eval()


def _check_sizes(model, sizes: list[tuple[int, int]]) -> int:
    """Validate the input sizes; returns the stride every size must be a multiple of."""
    if not sizes:
        raise DynamicShapeError("input_sizes is empty; pass at least one (height, width)")
    if len(sizes) > MAX_ENUMERATED_SHAPES:
        raise DynamicShapeError(f"{len(sizes)} input sizes given; Core ML takes at most {MAX_ENUMERATED_SHAPES} enumerated shapes")
    for s in sizes:
        if len(s) != 2 or min(s) < 1:
            raise DynamicShapeError(f"input size {s} is not a (height, width) pair of positive integers")
    multiple = int(getattr(model, "input_multiple", 1) or 1)
    bad = [s for s in sizes if s[0] % multiple or s[1] % multiple]
    if bad:
        fix = ", ".join(f"{math.ceil(h / multiple) * multiple}x{math.ceil(w / multiple) * multiple}" for h, w in bad)
        raise DynamicShapeError(
            f"input size(s) {', '.join(f'{h}x{w}' for h, w in bad)} are not multiples of {multiple}, "
            f"which {type(model).__name__} needs (its input_multiple); use e.g. {fix}"
        )
    return multiple


def _dims(values: list[int], multiple: int, name: str):
    """A torch.export dimension covering `values` (all multiples of `multiple`), or None if static."""
    from torch.export import Dim

    vals = sorted(set(values))
    if len(vals) == 1:
        return None
    step = multiple if multiple > 1 else math.gcd(*vals)
    base = Dim(f"{name}_blocks", min=vals[0] // step, max=vals[-1] // step)
    return base * step if step > 1 else base


class _LogTap(logging.Handler):
    """Collects coremltools' 'converting <op> op (located at: <where>)' error lines."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.where: list[tuple[str, str]] = []

    def emit(self, record):
        m = re.search(r"converting '([^']+)' op \(located at: '([^']*)'\)", record.getMessage())
        if m:
            self.where.append((m.group(1), m.group(2)))


def _layer_of(program, node_name: str) -> str:
    """'backbone.stem (Conv2d)' for an exported-graph node name, from its nn_module_stack."""
    if program is None or not node_name:
        return ""
    for node in program.graph.nodes:
        if node.name == node_name:
            stack = node.meta.get("nn_module_stack") or {}
            if not stack:
                return ""
            path, typ = list(stack.values())[-1]
            typ = typ.__name__ if isinstance(typ, type) else str(typ).rsplit(".", 1)[-1]
            path = re.sub(r"^L\['self'\]\.?", "", str(path))
            path = re.sub(r"^model\.?", "", path) or "(the model itself)"
            return f"{path} ({typ})"
    return ""


def _symbolic_resizes(program) -> list[str]:
    """Layers of an exported graph that resize to a size that depends on the input size."""
    import torch

    out = []
    if program is None:
        return out
    for node in program.graph.nodes:
        if node.op != "call_function" or "upsample" not in str(node.target):
            continue
        sizes = [a for a in node.args[1:2] if isinstance(a, (list, tuple))]
        if any(isinstance(v, (torch.SymInt, torch.fx.Node)) for s in sizes for v in s):
            layer = _layer_of(program, node.name) or node.name
            if layer not in out:
                out.append(layer)
    return out


def _scope_layer(where: str) -> str:
    """A TorchScript scope 'model/backbone/stem' -> 'backbone.stem'."""
    parts = [p for p in where.split("/") if p]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts[:-1]) if len(parts) > 1 else ".".join(parts)


_DYNAMIC_PATTERNS = (
    "only supported when input tensor size is known",
    "only 0-dimensional arrays can be converted",
    "symbolic",
    "dynamic",
    "specialized",
    "Constraints violated",
    "guard",
)


class _Frontend:
    """torch model -> MIL program (export first, trace fallback), converted per compute precision."""

    def __init__(self, wrapper, sizes, default_size, multiple, color, output, target, input_name=INPUT_NAME):
        self.wrapper, self.sizes, self.default = wrapper, sizes, default_size
        self.multiple, self.color, self.output, self.target = multiple, color, output, target
        self.input_name = input_name
        self._cache: dict[str, Any] = {}
        self.frontend = ""
        self.notes: list[str] = []
        self._exported = None
        self._export_error: Exception | None = None
        self._traced = None

    # the input/output types coremltools sees
    def _inputs(self):
        ct = _ct()
        layout = ct.colorlayout.RGB if self.color == "rgb" else ct.colorlayout.BGR
        if len(self.sizes) == 1:
            shape = (1, 3, *self.sizes[0])
        else:
            shape = ct.EnumeratedShapes(shapes=[(1, 3, h, w) for h, w in self.sizes], default=(1, 3, *self.default))
        # scale 1, bias 0: the graph receives raw pixel values and normalises them itself
        return [ct.ImageType(name=self.input_name, shape=shape, scale=1.0, bias=[0.0, 0.0, 0.0], color_layout=layout)]

    def _outputs(self):
        ct = _ct()
        dtype = np.int32 if self.output == "mask" else np.float32
        return [ct.TensorType(name=self.output, dtype=dtype)]

    def _example(self):
        import torch

        g = torch.Generator().manual_seed(0)
        h = max(s[0] for s in self.sizes)
        w = max(s[1] for s in self.sizes)
        return torch.rand(1, 3, h, w, generator=g) * 255.0

    def _export(self):
        import torch

        if self._exported is not None or self._export_error is not None:
            return self._exported
        x = self._example()
        hdim = _dims([s[0] for s in self.sizes], self.multiple, "height")
        wdim = _dims([s[1] for s in self.sizes], self.multiple, "width")
        dyn = None
        if hdim is not None or wdim is not None:
            spec = {}
            if hdim is not None:
                spec[2] = hdim
            if wdim is not None:
                spec[3] = wdim
            dyn = (spec,)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(self.wrapper, (x,), dynamic_shapes=dyn, strict=False)
                self._exported = ep.run_decompositions({})
        except Exception as e:  # torch.export raises many types (Unsupported, UserError, ...)
            self._export_error = e
            self.notes.append(f"torch.export failed ({type(e).__name__}: {_first_line(e)}); used torch.jit.trace")
        return self._exported

    def _trace(self):
        import torch

        if self._traced is None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                self._traced = torch.jit.trace(self.wrapper, self._example(), check_trace=False, strict=False)
        return self._traced

    def _convert(self, source, compute: str):
        ct = _ct()
        precision = ct.precision.FLOAT16 if compute == "fp16" else ct.precision.FLOAT32
        tap = _LogTap()
        lg = logging.getLogger("coremltools")
        lg.addHandler(tap)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlmodel = ct.convert(
                    source,
                    source="pytorch",
                    convert_to="mlprogram",
                    inputs=self._inputs(),
                    outputs=self._outputs(),
                    minimum_deployment_target=self.target,
                    compute_precision=precision,
                    skip_model_load=True,  # loading compiles the model: macOS only, and not needed here
                )
            return mlmodel, tap.where
        except Exception as e:
            e.__dict__.setdefault("_edgeseg_where", list(tap.where))
            raise
        finally:
            lg.removeHandler(tap)

    def convert(self, compute: str):
        """The converted (uncompressed) MLModel for a compute precision; cached."""
        if compute in self._cache:
            return self._cache[compute]
        failures: list[tuple[str, Exception, Any]] = []
        if self.frontend in ("", "torch.export"):
            program = self._export()
            if program is not None and len(self.sizes) > 1:
                self._check_size_dependent_layers(program)
            if program is not None:
                try:
                    mlmodel, _ = self._convert(program, compute)
                    self.frontend = "torch.export"
                    self._cache[compute] = mlmodel
                    return mlmodel
                except Exception as e:
                    failures.append(("torch.export", e, program))
                    if len(self.sizes) > 1 and _is_shape_failure(e):
                        # tracing bakes in the same size-dependent ops: it cannot do better here
                        raise self._explain(failures) from None
                    self.notes.append(f"converting the exported program failed ({type(e).__name__}: {_first_line(e)}); tried torch.jit.trace")
            else:
                failures.append(("torch.export", self._export_error, None))
        try:
            traced = self._trace()
            mlmodel, _ = self._convert(traced, compute)
            self.frontend = "torch.jit.trace"
            self._cache[compute] = mlmodel
            return mlmodel
        except Exception as e:
            failures.append(("torch.jit.trace", e, None))
        raise self._explain(failures)

    def _check_size_dependent_layers(self, program) -> None:
        """Adaptive pooling to anything but 1x1 needs a known input size in Core ML (coremltools
        issue 976); say so before spending a conversion on it."""
        bad = []
        for node in program.graph.nodes:
            if node.op == "call_function" and "adaptive_" in str(node.target) and "pool" in str(node.target):
                out = node.args[1] if len(node.args) > 1 else None
                if out is not None and any(int(v) != 1 for v in (out if isinstance(out, (list, tuple)) else [out])):
                    layer = _layer_of(program, node.name) or node.name
                    if layer not in bad:
                        bad.append(layer)
        if bad:
            sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
            raise DynamicShapeError(
                f"layer(s) {', '.join(bad)} pool to a fixed grid (adaptive pooling to more than 1x1), which Core ML "
                f"supports only for a known input size, so one package cannot take the sizes {sizes}; convert one "
                f"package per size (input_sizes=[{self.default}]) or pool to (1, 1)",
                layer=bad[0],
            )

    def _explain(self, failures) -> CoreMLConversionError:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        several = len(self.sizes) > 1
        # 1) an operator coremltools has no converter for, on any path
        for path, e, program in failures:
            msg = str(e)
            m = re.search(r"Unsupported fx node (\S+?),", msg) or re.search(r"convert function for op '([^']+)' not implemented", msg)
            if m:
                op = m.group(1)
                where = getattr(e, "_edgeseg_where", [])
                layer = _layer_of(program, op) if program is not None else ""
                if not layer and where:
                    layer = _layer_of(program, where[-1][1]) if program is not None else _scope_layer(where[-1][1])
                at = f" in layer {layer}" if layer else ""
                return UnsupportedOpError(
                    f"coremltools cannot convert operator '{op}'{at} (tried torch.export and torch.jit.trace); "
                    "replace it with supported operations in the model, or register a converter with "
                    "coremltools.converters.mil.frontend.torch.register_torch_op before converting",
                    op=op, layer=layer,
                )
        # 2) resizes to sizes read from tensors, with several input sizes: coremltools cannot turn
        # a symbolic output size into an upsampling factor
        for path, e, program in failures:
            if "Unable to map torch_upsample" in str(e) and several:
                layers = _symbolic_resizes(program if program is not None else self._exported)
                at = f"layer(s) {', '.join(layers)}" if layers else "a resize"
                return DynamicShapeError(
                    f"{at} resize to a size read from a tensor (F.interpolate(size=...)), which coremltools cannot keep "
                    f"symbolic, so one package cannot take the sizes {sizes}; convert one package per size "
                    f"(input_sizes=[{self.default}]) or resize by fixed factors (scale_factor=...)",
                    layer=layers[0] if layers else "",
                )
        # 3) a layer that needs a size CoreML cannot make symbolic
        for path, e, program in failures:
            msg = str(e)
            if any(p.lower() in msg.lower() for p in _DYNAMIC_PATTERNS) or type(e).__name__ in ("ConstraintViolationError", "UserError"):
                where = getattr(e, "_edgeseg_where", [])
                layer = ""
                if where:
                    op, loc = where[-1]
                    layer = (_layer_of(program, loc) if program is not None else _scope_layer(loc)) or op
                at = f"layer {layer}" if layer else "a layer of the model"
                if several:
                    return DynamicShapeError(
                        f"{at} needs a fixed input size, so one package cannot take the sizes {sizes} "
                        f"({path}: {_first_line(e)}); convert with one input size (input_sizes=[{self.default}]) "
                        "and make one package per size, or change the layer so its output size does not depend on the input "
                        "(e.g. adaptive pooling to (1, 1), or sizes that divide the feature map)",
                        layer=layer,
                    )
                return DynamicShapeError(
                    f"{at} uses a shape Core ML cannot take ({path}: {_first_line(e)}); "
                    "make the model's shapes depend only on the input size (no data-dependent shapes)",
                    layer=layer,
                )
        details = "; ".join(f"{p}: {type(e).__name__}: {_first_line(e)}" for p, e, _ in failures)
        return CoreMLConversionError(f"Core ML conversion failed ({details})")


def _is_shape_failure(e: BaseException) -> bool:
    msg = str(e).lower()
    return "unable to map torch_upsample" in msg or any(p.lower() in msg for p in _DYNAMIC_PATTERNS)


def _first_line(e: BaseException | None, limit: int = 300) -> str:
    if e is None:
        return ""
    s = str(e).strip().splitlines()
    s = s[0] if s else type(e).__name__
    return s if len(s) <= limit else s[:limit] + "..."


# -- compression --------------------------------------------------------------------------------
def kmeans_lut(weight: np.ndarray, nbits: int, iterations: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means look-up table for one weight tensor: (lut (2**nbits,), indices uint8).

    Runs Lloyd's algorithm on the unique values (weighted by their counts), so an FP16 tensor of
    any size costs at most 65536 points per iteration. Indices point at the nearest entry of the
    stored (rounded) table.
    """
    k = 1 << nbits
    flat = np.asarray(weight).reshape(-1)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    v = values.astype(np.float64)
    w = counts.astype(np.float64)
    if len(v) <= k:
        centroids = np.concatenate([v, np.full(k - len(v), v[-1])])
    else:
        cdf = np.cumsum(w)
        q = (np.arange(k) + 0.5) / k * cdf[-1]
        centroids = v[np.minimum(np.searchsorted(cdf, q), len(v) - 1)]
        span = float(v[-1] - v[0]) or 1.0
        for _ in range(iterations):
            bounds = (centroids[1:] + centroids[:-1]) / 2
            assign = np.searchsorted(bounds, v)
            mass = np.bincount(assign, weights=w, minlength=k)
            sums = np.bincount(assign, weights=w * v, minlength=k)
            new = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centroids)
            new.sort()
            moved = float(np.max(np.abs(new - centroids)))
            centroids = new
            if moved <= 1e-6 * span:
                break
    lut = centroids.astype(flat.dtype)
    lut64 = np.sort(lut.astype(np.float64))
    lut = lut64.astype(flat.dtype)
    bounds = (lut64[1:] + lut64[:-1]) / 2
    idx = np.searchsorted(bounds, v)
    # ties and rounding: pick the truly nearest of the two neighbours
    lo = np.clip(idx - 1, 0, k - 1)
    closer = np.abs(lut64[lo] - v) < np.abs(lut64[idx] - v)
    idx = np.where(closer, lo, idx)
    return lut, idx[inverse].astype(np.uint8)


def _lut_function(nbits: int):
    def fn(weight):
        return kmeans_lut(weight, nbits)

    return fn


def _apply_compression_pass(mlmodel, pass_name: str, config):
    """Run one coremltools compression pass on a converted model and serialise the result.

    The public `linear_quantize_weights` / `palettize_weights` re-run coremltools' whole default
    optimisation pipeline on the already optimised program after the pass (4-5x the time of the
    pass itself here); this runs the same registered pass and only the ML Program backend passes,
    which include the dead-code elimination that drops the replaced FP16 weights.
    """
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    graph_pass = PASS_REGISTRY[pass_name]
    graph_pass.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    prog = _apply_graph_pass(mlmodel, graph_pass, return_pymil_prog=True)
    spec = mlmodel.get_spec()
    return mil_convert(
        prog, convert_to="mlprogram", convert_from="milinternal",
        specification_version=max(spec.specificationVersion, 7),  # compressed weights: iOS16 spec or newer
        compute_units=mlmodel.compute_unit, model_description=spec.description,
        skip_model_load=True, pass_pipeline=ct.PassPipeline.EMPTY,
    )


def compress(mlmodel, precision: str):
    """Apply the weight compression of `precision` to a converted FP16 MLModel."""
    scheme = scheme_for(precision)
    if scheme.kind in ("none", "w8a8"):
        return mlmodel
    _ct()
    import coremltools.optimize.coreml as cto

    if scheme.kind == "linear":
        kw = dict(mode="linear_symmetric", dtype=f"int{scheme.nbits}", granularity=scheme.granularity,
                  weight_threshold=WEIGHT_THRESHOLD)
        if scheme.block_size:
            kw["block_size"] = scheme.block_size
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(**kw))
        public, pass_name = cto.linear_quantize_weights, "compression::linear_quantize_weights"
    else:
        kw = dict(mode="custom", lut_function=_lut_function(scheme.nbits), granularity=scheme.granularity,
                  weight_threshold=WEIGHT_THRESHOLD)
        if scheme.group_size:
            kw["group_size"] = scheme.group_size
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(**kw))
        public, pass_name = cto.palettize_weights, "compression::palettize_weights"
    try:
        # coremltools' compression passes warn on the root logger for each weight they skip
        # (too small, or not divisible into blocks); the validation report lists those weights
        with warnings.catch_warnings(), _quiet_logger("", logging.ERROR):
            warnings.simplefilter("ignore")
            try:
                return _apply_compression_pass(mlmodel, pass_name, config)
            except (ImportError, AttributeError, KeyError, TypeError) as e:
                # coremltools moved an internal: take the public (slower) entry point
                log.debug("fast compression path unavailable (%s); using %s", e, public.__name__)
                return public(mlmodel, config=config)
    except ValueError as e:
        if "iOS1" in str(e):
            raise DeploymentTargetError(f"{precision}: {_first_line(e)}") from None
        raise CoreMLConversionError(f"{precision} compression failed: {_first_line(e)}") from None


# -- W8A8 ---------------------------------------------------------------------------------------
def _calibration_inputs(calibration, preprocess: Preprocess, limit: int) -> list[np.ndarray]:
    """Normalised (1, 3, H, W) float32 batches from frames, a folder of images, or 'synthetic'."""
    import cv2

    frames: Iterable
    if calibration is None:
        raise CoreMLConversionError(
            "w8a8 needs calibration frames to measure activation ranges: pass calibration= a list of BGR frames, "
            "a folder of images, or 'synthetic' (the synthetic scenes the default model was trained on)"
        )
    if isinstance(calibration, str) and calibration in ("synthetic", "synthetic://"):
        from edgeseg.data.synthetic import SyntheticScenes

        H, W = preprocess.size
        scenes = SyntheticScenes(size=(H, W), length=limit, seed=1, split="val")
        frames = (scenes[i][0] for i in range(len(scenes)))
    elif isinstance(calibration, (str, os.PathLike)):
        folder = Path(calibration)
        if not folder.is_dir():
            raise CoreMLConversionError(f"calibration folder not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
        if not files:
            raise CoreMLConversionError(f"no images (.jpg/.png/.bmp/.webp) in calibration folder {folder}")
        frames = (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in files)
    else:
        frames = calibration
    pre = preprocess.replace(layout="nchw", dtype="float32")
    out = []
    for f in frames:
        if f is None:
            continue
        out.append(pre.apply(f))
        if len(out) >= limit:
            break
    if not out:
        raise CoreMLConversionError("the calibration source gave no frames")
    return out


def _w8a8_model(model, preprocess: Preprocess, calibration, limit: int):
    """The torch model with calibrated INT8 fake quantization, finalized for conversion."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig

    batches = _calibration_inputs(calibration, preprocess, limit)
    # Observers and fake quantization on from the first step; no training happens, so no milestones.
    config = LinearQuantizerConfig.from_dict({"global_config": {"quantization_scheme": "symmetric"}})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer = LinearQuantizer(model, config)
            prepared = quantizer.prepare(example_inputs=(torch.from_numpy(batches[0]),), inplace=False)
            prepared.eval()  # batch norm uses its running statistics while observers record ranges
            with torch.no_grad():
                for b in batches:
                    prepared(torch.from_numpy(b))
            return quantizer.finalize(inplace=False).eval(), len(batches)
    except Exception as e:
        raise CoreMLConversionError(
            f"w8a8: torch-side quantization failed ({type(e).__name__}: {_first_line(e)}); it needs a model that "
            "torch.fx can trace symbolically (no data-dependent Python control flow); int8-weights works for any model"
        ) from None


# -- metadata -----------------------------------------------------------------------------------
def _set_metadata(mlmodel, *, labels, palette, preprocess: Preprocess, precision, output, color, sizes, scheme: Scheme,
                  target_name: str, metadata: dict | None, output_shape):
    from edgeseg import __version__

    md = dict(metadata or {})
    mlmodel.author = str(md.pop("author", "edgeseg"))
    mlmodel.license = str(md.pop("license", ""))
    mlmodel.version = str(md.pop("version", __version__))
    desc = md.pop("description", None) or md.pop("short_description", None)
    mlmodel.short_description = str(
        desc or f"Semantic segmentation, {len(labels)} classes ({', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''}); "
        f"output '{output}'; labels, palette and preprocessing in the metadata"
    )
    H, W = preprocess.size
    mlmodel.input_description[INPUT_NAME] = (
        f"{color.upper()} image, {W}x{H} (width x height)"
        + (f" or one of {', '.join(f'{w}x{h}' for h, w in sizes)}" if len(sizes) > 1 else "")
        + f"; resize mode '{preprocess.resize}'. Raw 0-255 pixels: normalisation is inside the model"
    )
    out_desc = {
        "logits": f"class scores (1, {len(labels)}, H, W); argmax over axis 1 gives the class map",
        "probs": f"class probabilities (1, {len(labels)}, H, W), softmax over axis 1",
        "mask": "class index per pixel (1, H, W), int32; see the 'labels' metadata",
    }[output]
    mlmodel.output_description[output] = out_desc
    ud = mlmodel.user_defined_metadata
    ud["labels"] = json.dumps(list(labels))
    ud["palette"] = json.dumps([list(map(int, c)) for c in palette])
    ud["preprocess"] = json.dumps(preprocess.to_dict())
    ud["output"] = output
    ud["output_shape"] = json.dumps(list(output_shape))
    ud["precision"] = precision
    ud["color"] = color
    ud["input_sizes"] = json.dumps([list(s) for s in sizes])
    ud["compression"] = json.dumps(scheme.describe())
    ud["minimum_deployment_target"] = target_name
    ud["edgeseg_version"] = __version__
    for k, v in md.items():
        ud[str(k)] = v if isinstance(v, str) else json.dumps(v)


# -- conversion ---------------------------------------------------------------------------------
def _normalise_sizes(preprocess: Preprocess, input_sizes) -> list[tuple[int, int]]:
    sizes = [tuple(int(v) for v in s) for s in (input_sizes or [preprocess.size])]
    if tuple(preprocess.size) not in sizes:
        sizes.insert(0, tuple(preprocess.size))
    seen, out = set(), []
    for s in sizes:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _check_args(preprocess, labels, palette, output, color):
    if not isinstance(preprocess, Preprocess):
        raise CoreMLConversionError(f"preprocess must be an edgeseg.spec.Preprocess, got {type(preprocess).__name__}")
    if preprocess.layout != "nchw":
        raise CoreMLConversionError("Core ML conversion needs a model with NCHW input (preprocess.layout='nchw')")
    if output not in OUTPUTS:
        raise CoreMLConversionError(f"output must be one of {OUTPUTS}, got {output!r}")
    if color not in ("rgb", "bgr"):
        raise CoreMLConversionError(f"color must be 'rgb' or 'bgr', got {color!r}")
    if not labels:
        raise CoreMLConversionError("labels are required (one name per class)")
    if len(palette) != len(labels):
        raise CoreMLConversionError(f"palette has {len(palette)} colours for {len(labels)} labels")


class CoreMLConverter:
    """One model, several packages: exports once, converts once per compute precision, then
    compresses per variant. `convert_coreml` is the one-package form."""

    def __init__(self, model, *, preprocess: Preprocess, labels: list[str], palette: list[list[int]],
                 output: str = "logits", minimum_deployment_target: str = "iOS17",
                 input_sizes: list[tuple[int, int]] | None = None, color: str | None = None,
                 metadata: dict | None = None, calibration=None, calibration_frames: int = DEFAULT_CALIBRATION_FRAMES):
        import torch

        if not isinstance(model, torch.nn.Module):
            raise CoreMLConversionError(f"Core ML conversion needs a torch.nn.Module, got {type(model).__name__}")
        if color is None and isinstance(preprocess, Preprocess):
            color = preprocess.color
        _check_args(preprocess, labels, palette, output, color)
        self.model, self.preprocess, self.labels, self.palette = model, preprocess, list(labels), [list(c) for c in palette]
        self.output, self.target_name, self.color, self.metadata = output, str(minimum_deployment_target), color, metadata
        self.calibration, self.calibration_frames = calibration, calibration_frames
        self.target, self.ios = resolve_target(self.target_name)
        if self.ios < 15:
            raise DeploymentTargetError(
                f"minimum_deployment_target {self.target_name} is too old: ML Programs need iOS15/macOS12 or newer; pass 'iOS17'"
            )
        self.sizes = _normalise_sizes(preprocess, input_sizes)
        self.multiple = _check_sizes(model, self.sizes)
        self.wrapper = _image_model(model, preprocess, output, color)
        self.front = _Frontend(self.wrapper, self.sizes, tuple(preprocess.size), self.multiple, color, output, self.target)
        self._output_shape: list[int] | None = None

    @property
    def output_shape(self) -> list[int]:
        """The output shape at the default input size (from one torch forward pass)."""
        import torch

        if self._output_shape is None:
            H, W = self.preprocess.size
            with torch.no_grad():
                y = self.wrapper(torch.full((1, 3, H, W), 128.0))
            self._output_shape = list(y.shape)
        return self._output_shape

    def build(self, precision: str):
        """The MLModel for `precision` (not saved), and how it was made."""
        scheme = scheme_for(precision)
        check_target(precision, self.target_name)
        if scheme.kind == "w8a8":
            qmodel, n = _w8a8_model(self.model, self.preprocess, self.calibration, self.calibration_frames)
            wrapper = _image_model(qmodel, self.preprocess, self.output, self.color)
            front = _Frontend(wrapper, self.sizes, tuple(self.preprocess.size), self.multiple, self.color, self.output, self.target)
            front.frontend = "torch.jit.trace"  # quantized tensors cannot be captured by torch.export
            mlmodel = front.convert("fp16")
            return mlmodel, {"frontend": front.frontend, "notes": front.notes + [f"activations calibrated on {n} frames"]}
        mlmodel = self.front.convert(scheme.compute)
        mlmodel = compress(mlmodel, precision)
        return mlmodel, {"frontend": self.front.frontend, "notes": list(self.front.notes)}

    def save(self, precision: str, out_path: str | os.PathLike, *, validate: bool = True) -> CoreMLResult:
        out_path = Path(out_path)
        if out_path.suffix != ".mlpackage":
            raise CoreMLConversionError(f"the output path must end in .mlpackage, got {out_path.name}")
        t0 = time.time()
        mlmodel, how = self.build(precision)
        scheme = scheme_for(precision)
        _set_metadata(mlmodel, labels=self.labels, palette=self.palette, preprocess=self.preprocess, precision=precision,
                      output=self.output, color=self.color, sizes=self.sizes, scheme=scheme, target_name=self.target_name,
                      metadata=self.metadata, output_shape=self.output_shape)
        with atomic_path(out_path) as tmp:
            mlmodel.save(str(tmp))
            # coremltools adds an ExecuTorch debug map (about 100 KB) for torch.export sources; it is
            # not part of the Core ML package (Manifest.json does not list it) and no app reads it
            (tmp / "executorch_debug_handle_mapping.json").unlink(missing_ok=True)
            report = validate_package(tmp, torch_model=self.model, precision=precision) if validate else {}
            if validate and not report["ok"]:
                raise PackageValidationError(
                    f"the converted {precision} package failed validation: " + "; ".join(report["problems"])
                )
        return CoreMLResult(
            path=out_path, precision=precision, output=self.output, input_name=INPUT_NAME, output_name=self.output,
            input_sizes=list(self.sizes), output_shape=self.output_shape, minimum_deployment_target=self.target_name,
            size_bytes=package_size(out_path), weights_bytes=package_size(out_path / "Data" / "com.apple.CoreML" / "weights"),
            frontend=how["frontend"], compression=scheme.describe(),
            validation=report, seconds=round(time.time() - t0, 2), notes=how["notes"],
        )


def convert_coreml(model, out_path: str | os.PathLike, *, preprocess: Preprocess, labels: list[str],
                   palette: list[list[int]], precision: str = "fp16", output: str = "logits",
                   minimum_deployment_target: str = "iOS17", input_sizes: list[tuple[int, int]] | None = None,
                   color: str | None = None, metadata: dict | None = None, calibration=None,
                   validate: bool = True) -> CoreMLResult:
    """Convert a torch segmentation model to one .mlpackage (written atomically, then validated).

    input_sizes: (height, width) sizes the package accepts (Core ML enumerated shapes); the
    preprocessing size is always among them and is the default. color: the image channel order the
    package declares (default: the model's, preprocess.color); if it differs from the model's, the
    graph swaps the channels. calibration: frames for w8a8 (BGR arrays, an image folder, or
    'synthetic').
    """
    scheme_for(precision)
    check_target(precision, minimum_deployment_target)
    conv = CoreMLConverter(model, preprocess=preprocess, labels=labels, palette=palette, output=output,
                           minimum_deployment_target=minimum_deployment_target, input_sizes=input_sizes, color=color,
                           metadata=metadata, calibration=calibration)
    return conv.save(precision, out_path, validate=validate)


def convert_variants(model, out_dir: str | os.PathLike, precisions: Iterable[str] = ("fp16", "int8-weights", "palettize4"),
                     **kwargs) -> dict[str, CoreMLResult]:
    """Several precisions from one export: `model.<precision>.mlpackage` in out_dir."""
    precisions = list(precisions)
    for p in precisions:
        check_target(p, kwargs.get("minimum_deployment_target", "iOS17"))
    validate = kwargs.pop("validate", True)
    conv = CoreMLConverter(model, **kwargs)
    out_dir = Path(out_dir)
    return {p: conv.save(p, out_dir / f"model.{p}.mlpackage", validate=validate) for p in precisions}


# -- bundles ------------------------------------------------------------------------------------
def _same_preprocess(a: Preprocess, b: Preprocess) -> bool:
    keys = ("size", "resize", "color", "pad_value")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and np.allclose(a.mean, b.mean) and np.allclose(a.std, b.std)


def convert_to_bundle(source, out: str | os.PathLike, *, precision: str = "fp16", output: str = "logits",
                      minimum_deployment_target: str = "iOS17", input_sizes: list[tuple[int, int]] | None = None,
                      compute_units: str = "all", calibration=None, metadata: dict | None = None) -> Bundle:
    """Add `model.<precision>.mlpackage` to the bundle at `out` (created if it has no manifest).

    `source` is a converters.onnx.SourceModel (or anything with .model, .labels, .palette,
    .preprocess, .name, .sha256). `compute_units` is recorded as the runtime's default. For w8a8
    the default model calibrates on its synthetic scenes when no `calibration` is given.
    """
    output = output or "logits"
    minimum_deployment_target = minimum_deployment_target or "iOS17"
    compute_units = compute_units or "all"
    scheme_for(precision)
    if compute_units not in COMPUTE_UNITS:
        raise CoreMLConversionError(f"compute_units must be one of {COMPUTE_UNITS}, got {compute_units!r}")
    check_target(precision, minimum_deployment_target)
    if output not in OUTPUTS:
        raise CoreMLConversionError(f"output must be one of {OUTPUTS}, got {output!r}")
    model = getattr(source, "model", None)
    if model is None:
        onnx_path = getattr(source, "onnx_path", None)
        raise CoreMLConversionError(
            f"Core ML conversion needs the torch model, but {getattr(source, 'name', 'the source')!r} is an ONNX file"
            + (f" ({onnx_path})" if onnx_path else "")
            + "; convert from the PyTorch model or checkpoint instead (coremltools has no ONNX frontend)"
        )
    out = Path(out)
    pre: Preprocess = source.preprocess
    bundle = None
    if (out / MANIFEST).is_file():
        bundle = Bundle.load(out)
        m = bundle.manifest
        if list(m.labels) != list(source.labels):
            raise BundleError(f"bundle {out} has labels {m.labels}, the model has {list(source.labels)}; use a new --out folder")
        if m.output_kind != output:
            raise BundleError(
                f"bundle {out} gives '{m.output_kind}' outputs and the runtime reads every artifact that way; "
                f"convert with output='{m.output_kind}' (--output {m.output_kind}) or into a new --out folder"
            )
        if not _same_preprocess(m.preprocess, pre):
            raise BundleError(
                f"bundle {out} was made for other preprocessing ({m.preprocess.to_dict()}) than this model's "
                f"({pre.to_dict()}); use a new --out folder"
            )
    elif out.exists() and out.is_dir() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not a bundle; choose an empty or new folder for --out")

    if calibration is None and precision == "w8a8" and getattr(source, "name", "") == "default":
        calibration = "synthetic"
    md = {"author": "edgeseg", "license": "Apache-2.0" if getattr(source, "name", "") == "default" else ""}
    info = getattr(source, "info", {}) or {}
    for k in ("author", "license", "version", "description"):
        if info.get(k):
            md[k] = info[k]
    md.update(metadata or {})
    md.setdefault("source_name", getattr(source, "name", ""))
    if getattr(source, "sha256", ""):
        md.setdefault("source_sha256", source.sha256)

    conv = CoreMLConverter(model, preprocess=pre, labels=list(source.labels), palette=list(source.palette), output=output,
                           minimum_deployment_target=minimum_deployment_target, input_sizes=input_sizes,
                           metadata=md, calibration=calibration)
    rel = f"model.{precision}.mlpackage"
    if bundle is None:
        H, W = pre.size
        manifest = Manifest(
            labels=list(source.labels), palette=[list(c) for c in source.palette], preprocess=pre,
            input_name=INPUT_NAME, output_name=output, output_kind=output, input_shape=[1, 3, H, W],
            output_shape=conv.output_shape,
            model={"name": getattr(source, "name", ""), "source_sha256": getattr(source, "sha256", ""), **info},
        )
        # a new bundle appears whole or not at all
        with atomic_path(out) as tmp:
            tmp.mkdir()
            res = conv.save(precision, tmp / rel)
            bundle = Bundle.create(tmp, manifest)
            bundle.add_artifact(_artifact(res, rel, compute_units))
            bundle.save()
        return Bundle.load(out)
    res = conv.save(precision, out / rel)  # atomic on its own
    bundle.add_artifact(_artifact(res, rel, compute_units))
    bundle.save()
    return Bundle.load(out)


def _artifact(res: CoreMLResult, rel: str, compute_units: str) -> Artifact:
    v = res.validation or {}
    return Artifact(
        path=rel, backend="coreml", precision=res.precision, target=res.minimum_deployment_target,
        parity={"measured": False, "reason": "Core ML prediction needs macOS; run the macos-marked tests there"},
        metrics={"size_bytes": res.size_bytes, "weights_bytes": res.weights_bytes, "weight_dtypes": v.get("weight_dtypes", {}),
                 "max_weight_rel_rms": v.get("weights", {}).get("max_rel_rms")},
        info={
            "input_name": res.input_name, "input_type": "image", "color": v.get("color", ""),
            "input_sizes": [list(s) for s in res.input_sizes], "output_name": res.output_name,
            "output_kind": res.output, "output_shape": res.output_shape, "frontend": res.frontend,
            "compression": res.compression, "compute_units": compute_units, "seconds": res.seconds,
            "validation": {"ok": v.get("ok"), "checks": len(v.get("checks", [])), "problems": v.get("problems", [])},
        },
    )


# -- validation (Linux: spec and weights, no prediction) ----------------------------------------
def _load_program(path: Path):
    ct = _ct()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        return mlmodel, spec, None
    prog = milproto_load(spec, spec.specificationVersion, mlmodel.weights_dir)
    return mlmodel, spec, prog


_WEIGHT_CONSUMERS = {"conv": "weight", "conv_transpose": "weight", "linear": "weight"}


def _weights(func) -> list[dict]:
    """Every weight tensor feeding a conv / conv_transpose / linear, with how it is stored."""
    out = []
    for op in func.operations:
        slot = _WEIGHT_CONSUMERS.get(op.op_type)
        if slot is None or slot not in op.inputs:
            continue
        var = op.inputs[slot]
        src = var.op
        entry = {"consumer": op.name, "op_type": op.op_type, "name": var.name, "shape": tuple(var.shape)}
        if src is None:
            continue
        if src.op_type == "const":
            val = np.asarray(src.outputs[0].val)
            entry.update(storage=str(val.dtype).replace("float", "fp"), kind="float", value=val)
        elif src.op_type == "constexpr_affine_dequantize":
            q = np.asarray(src.inputs["quantized_data"].val)
            scale = np.asarray(src.inputs["scale"].val, np.float64)
            axis = int(src.inputs["axis"].val)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            entry.update(storage=str(q.dtype), kind="affine", value=src.materialized_val_inference(),
                         step=np.broadcast_to(np.abs(scale).reshape(shape), q.shape))
        elif src.op_type == "constexpr_blockwise_shift_scale":
            data_var = src.inputs["data"]
            scale = np.asarray(src.inputs["scale"].val, np.float64)
            data = data_var.val if data_var.val is not None else data_var.op.materialized_val_inference()
            from coremltools.converters.mil.mil import types as mtypes

            bits = mtypes.builtin_to_string(data_var.dtype) if hasattr(data_var, "dtype") else str(np.asarray(data).dtype)
            step = scale
            for ax, (d, s) in enumerate(zip(np.shape(data), scale.shape)):
                if d // s > 1:
                    step = np.repeat(step, d // s, ax)
            entry.update(storage=bits, kind="affine", value=src.materialized_val_inference(), step=np.abs(step))
        elif src.op_type == "constexpr_lut_to_dense":
            lut = np.asarray(src.inputs["lut"].val)
            k = lut.shape[0] if lut.ndim == 1 else lut.shape[-2]
            entry.update(storage=f"lut{int(round(math.log2(k)))}", kind="lut", value=src.materialized_val_inference(), lut=lut)
        else:
            entry.update(storage=src.op_type, kind="other", value=None)
        out.append(entry)
    return out


def _eligible(w: dict, scheme: Scheme) -> bool:
    """Whether coremltools compresses this weight under `scheme`: more than WEIGHT_THRESHOLD
    elements, and for block / channel-group schemes a channel count the block or group divides."""
    shape = w["shape"]
    if int(np.prod(shape)) <= WEIGHT_THRESHOLD:
        return False
    out_axis, in_axis = (1, 0) if w["op_type"] == "conv_transpose" else (0, 1)
    if scheme.block_size and len(shape) > in_axis and shape[in_axis] % scheme.block_size:
        return False
    if scheme.group_size and shape[out_axis] % scheme.group_size:
        return False
    return True


def _torch_weights(model) -> list[tuple[str, np.ndarray, int, np.ndarray | None]]:
    """(name, weight, output-channel axis, batch-norm factor or None) of every conv / linear.

    The factor gamma / sqrt(running_var + eps) is what Core ML multiplies a convolution's weights
    by when it folds the batch norm that follows it (found as the next sibling module)."""
    from torch import nn

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    bns = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    factor: dict[int, np.ndarray] = {}
    for parent in model.modules():
        kids = list(parent.children())
        for a, b in zip(kids, kids[1:]):
            if isinstance(a, convs + transposed) and isinstance(b, bns) and b.track_running_stats:
                out_c = a.out_channels if hasattr(a, "out_channels") else a.out_features
                if b.num_features == out_c and b.running_var is not None:
                    f = 1.0 / np.sqrt(b.running_var.detach().cpu().double().numpy() + b.eps)
                    if b.weight is not None:
                        f = f * b.weight.detach().cpu().double().numpy()
                    factor[id(a)] = f
    refs, seen = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, convs + transposed):
            axis = 1 if isinstance(mod, transposed) else 0
            refs.append((f"{name}.weight", mod.weight.detach().cpu().double().numpy(), axis, factor.get(id(mod))))
            seen.add(id(mod.weight))
    # tensors used functionally (F.conv2d(x, self.kernel)): fixed filters kept as buffers, ...
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen and t.is_floating_point() and t.dim() >= 2:
            refs.append((name, t.detach().cpu().double().numpy(), 0, None))
    return refs


def _lut_violation(value: np.ndarray, ref: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(excess, spacing): how much farther each stored value is from the reference than the
    nearest table entry (0 when the nearest entry was chosen), and the local table spacing."""
    lut = np.asarray(lut, np.float64)
    if lut.ndim == 1:
        groups = [(slice(None),) * value.ndim]
        tables = [lut]
    else:
        # iOS18 layout: lut[g0, g1, ..., K, cluster_dim]; the group grid tiles the weight
        grid = lut.shape[:-2]
        blocks = [d // g for d, g in zip(value.shape, grid)]
        groups, tables = [], []
        for gi in np.ndindex(*grid):
            groups.append(tuple(slice(i * b, (i + 1) * b) for i, b in zip(gi, blocks)))
            tables.append(lut[gi][:, 0])
    excess = np.zeros(value.shape, np.float64)
    spacing = np.ones(value.shape, np.float64)
    for sl, table in zip(groups, tables):
        t = np.unique(table)
        r = ref[sl]
        if len(t) == 1:
            continue
        i = np.clip(np.searchsorted(t, r), 1, len(t) - 1)
        lo, hi = t[i - 1], t[i]
        excess[sl] = np.abs(value[sl] - r) - np.minimum(np.abs(r - lo), np.abs(r - hi))
        spacing[sl] = hi - lo
    return excess, spacing


def _compare(entry: dict, ref: np.ndarray, axis: int, bn: np.ndarray | None, steps: float = 0.5) -> dict:
    """Compare a stored weight with a torch weight: as is, with the following batch norm folded in
    (what Core ML does), or, for layers whose batch norm could not be paired, up to a fitted
    per-output-channel factor (allowed 1.5x the error, as the fit itself absorbs some noise).
    `steps`: allowed quantization error in steps (0.5 for one rounding; W8A8 weights are rounded
    twice, by the torch fake quantizer and onto the stored grid, so 1.0).
    Returns the error relative to the allowed one (<= 1 passes) and the relative RMS error."""
    value = np.asarray(entry["value"], np.float64)
    fp16 = 2.0**-10  # FP16 storage of the weight before compression (half an ulp is 2**-11)
    shape = [1] * ref.ndim
    shape[axis] = -1

    def score(r, slack=1.0):
        err = np.abs(value - r)
        if entry["kind"] == "affine":
            # half a step, plus FP16 rounding of the weight, of the stored scale (times |q|) and
            # of the dequantized value: three half-ulps of |w|
            allowed = steps * entry["step"] * (1 + 2.0**-10) + 3 * 2.0**-11 * np.abs(r) + 1e-7
            ratio = float(np.max(err / allowed))
        elif entry["kind"] == "lut":
            # the nearest entry to the FP16-rounded weight: within 10% of the local spacing plus
            # the rounding of the nearest entry itself
            excess, spacing = _lut_violation(value, r, entry["lut"])
            allowed = 0.1 * spacing + 2 * fp16 * np.abs(r) + 1e-7
            ratio = max(float(np.max(excess / allowed)), 0.0) if excess.size else 0.0
        else:
            rel = 2.0**-23 if entry["storage"] == "fp32" else fp16
            allowed = rel * np.abs(r) * 2 + 1e-6 * (np.abs(r).max() + 1e-12)
            ratio = float(np.max(err / allowed))
        rms = float(np.sqrt(np.mean((value - r) ** 2)) / max(np.sqrt(np.mean(r**2)), 1e-12))
        return {"ratio": ratio / slack, "rel_rms": rms}

    tried = [dict(score(ref), folded="none")]
    if bn is not None and bn.shape[0] == ref.shape[axis]:
        tried.append(dict(score(ref * bn.reshape(shape)), folded="batch norm"))
    if min(t["ratio"] for t in tried) > 1.0:
        moved = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1)
        vmoved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
        denom = np.sum(moved * moved, axis=1)
        s = np.where(denom > 0, np.sum(moved * vmoved, axis=1) / np.maximum(denom, 1e-300), 1.0)
        tried.append(dict(score(ref * s.reshape(shape), slack=1.5), folded="fitted"))
    return min(tried, key=lambda t: t["ratio"])


def _input_affine(func, input_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Follow the element-wise ops after the image input: per-channel (a, b, source channel) such
    that the first layer sees a * image[perm] + b."""
    var = func.inputs.get(input_name)
    if var is None:
        return None
    a, b, perm = np.ones(3), np.zeros(3), np.arange(3)

    def channel_vec(c):
        c = np.asarray(c, np.float64)
        if c.ndim == 0:
            return np.full(3, float(c))
        c = c.reshape(-1) if c.size in (1, 3) else None
        if c is None:
            return None
        return np.broadcast_to(c, (3,)).astype(np.float64)

    for _ in range(16):
        children = list(var.child_ops)
        if len(children) != 1:
            break
        op = children[0]
        t = op.op_type
        if t == "cast":
            var = op.outputs[0]
            continue
        if t in ("mul", "add", "sub", "real_div"):
            x, y = op.inputs["x"], op.inputs["y"]
            other = y if x is var else x
            c = channel_vec(other.val) if other.val is not None else None
            if c is None:
                break
            if t == "mul":
                a, b = a * c, b * c
            elif t == "add":
                b = b + c
            elif t == "sub":
                if x is var:
                    b = b - c
                else:
                    a, b = -a, c - b
            elif t == "real_div":
                if x is not var:
                    break
                a, b = a / c, b / c
            var = op.outputs[0]
            continue
        if t == "batch_norm":
            vals = {k: channel_vec(op.inputs[k].val) if op.inputs.get(k) is not None else None
                    for k in ("mean", "variance", "gamma", "beta")}
            eps = float(op.inputs["epsilon"].val) if op.inputs.get("epsilon") is not None else 1e-5
            mean = vals["mean"] if vals["mean"] is not None else np.zeros(3)
            var_ = vals["variance"] if vals["variance"] is not None else np.ones(3)
            g = vals["gamma"] if vals["gamma"] is not None else np.ones(3)
            beta = vals["beta"] if vals["beta"] is not None else np.zeros(3)
            k = g / np.sqrt(var_ + eps)
            a, b = a * k, (b - mean) * k + beta
            var = op.outputs[0]
            continue
        if t == "reverse" and list(np.atleast_1d(op.inputs["axes"].val)) in ([1], [-3]):
            a, b, perm = a[::-1], b[::-1], perm[::-1]
            var = op.outputs[0]
            continue
        break
    return a, b, perm


def validate_package(path: str | os.PathLike, torch_model=None, precision: str | None = None) -> dict:
    """Check a package without running it (works on Linux).

    Checks: ML Program; one image input named 'image' with the declared colour order and sizes;
    the output's name, type and shape; labels/palette/preprocess metadata; the normalisation ops
    after the input against the preprocessing (the effective image scale and bias); that the
    weights are stored as the precision says (counting dtypes and constexpr ops); and, given the
    torch model, that each stored weight matches a torch weight within the scheme's error:
    INT8/INT4 within half a quantization step, palettized weights at their nearest table entry,
    FP16 within rounding, allowing a per-output-channel factor where batch norm was folded.
    Returns {'ok', 'problems', 'checks', 'weight_dtypes', 'ops', 'weights', ...}.
    """
    path = Path(path)
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str = ""):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    if not path.exists():
        raise CoreMLConversionError(f"package not found: {path}")
    ct = _ct()
    mlmodel, spec, prog = _load_program(path)
    report: dict[str, Any] = {"path": str(path), "checks": checks}
    check("model type is ML Program", prog is not None, spec.WhichOneof("Type"))
    ud = dict(spec.description.metadata.userDefined)
    precision = precision or ud.get("precision")
    report["precision"] = precision
    scheme = SCHEMES.get(precision or "")
    check("precision is known", scheme is not None, str(precision))

    # metadata
    labels = palette = pre = None
    try:
        labels = json.loads(ud["labels"])
        palette = json.loads(ud["palette"])
        pre = Preprocess.from_dict(json.loads(ud["preprocess"]))
        check("metadata: labels, palette, preprocess", len(labels) > 0 and len(palette) == len(labels),
              f"{len(labels)} labels, {len(palette)} colours")
    except (KeyError, ValueError, TypeError) as e:
        check("metadata: labels, palette, preprocess", False, f"missing or unreadable: {e}")
    meta = spec.description.metadata
    check("metadata: author, licence, version", bool(meta.author) and bool(meta.versionString),
          f"author={meta.author!r} license={meta.license!r} version={meta.versionString!r}")
    output = ud.get("output", "")
    color = ud.get("color", pre.color if pre else "rgb")
    report.update(labels=labels, output=output, color=color)

    # input
    inputs = list(spec.description.input)
    ok = check("one input named 'image'", len(inputs) == 1 and inputs[0].name == INPUT_NAME, ", ".join(i.name for i in inputs))
    if ok:
        itype = inputs[0].type
        is_image = itype.WhichOneof("Type") == "imageType"
        check("input is an image", is_image, itype.WhichOneof("Type"))
        if is_image:
            im = itype.imageType
            space = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(im.colorSpace)
            check("input colour order", space == color.upper(), f"{space} (expected {color.upper()})")
            sizes_meta = [tuple(s) for s in json.loads(ud.get("input_sizes", "[]"))]
            enum = [(s.height, s.width) for s in im.enumeratedSizes.sizes]
            declared = enum or [(im.height, im.width)]
            report["input_sizes"] = declared
            if pre is not None:
                check("default input size is the preprocessing size", (im.height, im.width) == tuple(pre.size),
                      f"{im.height}x{im.width} vs {pre.size[0]}x{pre.size[1]}")
            if sizes_meta:
                check("input sizes match the metadata", sorted(declared) == sorted(sizes_meta),
                      f"{declared} vs {sizes_meta}")

    # output
    outputs = list(spec.description.output)
    ok = check("one output named after its kind", len(outputs) == 1 and outputs[0].name == output and output in OUTPUTS,
               ", ".join(o.name for o in outputs) + f" (kind {output!r})")
    if ok:
        arr = outputs[0].type.multiArrayType
        dt = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
        want = "INT32" if output == "mask" else "FLOAT32"
        check("output data type", dt == want, f"{dt} (expected {want})")
        shape = list(arr.shape)
        meta_shape = json.loads(ud.get("output_shape", "[]"))
        if shape and meta_shape:
            check("output shape", shape == meta_shape, f"{shape} vs metadata {meta_shape}")
        if labels and meta_shape and output != "mask":
            check("output has one channel per label", len(meta_shape) == 4 and meta_shape[1] == len(labels),
                  f"{meta_shape} for {len(labels)} labels")
        report["output_shape"] = shape or meta_shape

    if prog is None:
        report["problems"] = [f"{c['check']}: {c['detail']}" for c in checks if not c["ok"]]
        report["ok"] = not report["problems"]
        return report

    func = prog.functions["main"]
    ops: dict[str, int] = {}
    for op in func.operations:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
    report["ops"] = dict(sorted(ops.items()))
    report["opset"] = spec.mlProgram.functions["main"].opset  # CoreML7 = iOS17, CoreML8 = iOS18

    # the image input's effective scale and bias (ImageType scale/bias plus the folded normalisation)
    if pre is not None:
        aff = _input_affine(func, INPUT_NAME)
        if aff is None:
            check("image scale/bias", False, "the image input is not in the program")
        else:
            a, b, perm = aff
            flip = color != pre.color
            std, mean = np.asarray(pre.std), np.asarray(pre.mean)
            want_a, want_b = 1.0 / (255.0 * std), -mean / std
            want_perm = np.arange(3)[::-1] if flip else np.arange(3)
            ok = (np.allclose(a, want_a, rtol=2e-3, atol=0) and np.allclose(b, want_b, rtol=0, atol=2e-3 * max(1, np.abs(want_b).max()))
                  and list(perm) == list(want_perm))
            report["image_scale"] = [round(float(v), 7) for v in a]
            report["image_bias"] = [round(float(v), 5) for v in b]
            check("image scale/bias equal the preprocessing's (x/255 - mean)/std", ok,
                  f"scale {report['image_scale']} bias {report['image_bias']} (expected {np.round(want_a, 7).tolist()} / {np.round(want_b, 5).tolist()})")
        # ML Programs keep no preprocessing fields in the spec: coremltools inserts an ImageType's
        # scale and bias as ops named '<input>__scaled__' / '<input>__biased__'
        scale, bias = 1.0, [0.0, 0.0, 0.0]
        for op in func.operations:
            if op.op_type not in ("mul", "add") or not op.outputs:
                continue
            out = op.outputs[0].name
            consts = [v.val for v in op.inputs.values() if v.val is not None]
            if not consts:
                continue
            if out.startswith(f"{INPUT_NAME}__scaled__"):
                scale = np.asarray(consts[0], np.float64).reshape(-1).tolist()
            elif out.startswith(f"{INPUT_NAME}__biased__"):
                bias = np.asarray(consts[0], np.float64).reshape(-1).tolist()
        report["image_type_scale"], report["image_type_bias"] = scale, bias
        check("image input: scale 1, bias 0 (normalisation folded into the graph)",
              np.allclose(scale, 1.0) and np.allclose(bias, 0.0), f"scale {scale}, bias {bias}")

    # weights
    weights = _weights(func)
    dtypes: dict[str, int] = {}
    for w in weights:
        dtypes[w["storage"]] = dtypes.get(w["storage"], 0) + 1
    report["weight_dtypes"] = dict(sorted(dtypes.items()))
    if scheme is not None:
        big = [w for w in weights if _eligible(w, scheme)]
        if scheme.kind == "none":
            want = scheme.compute
            bad = [w["name"] for w in weights if w["kind"] != "float" or w["storage"] != want]
            check(f"all weights stored {want}", not bad and bool(weights), f"{report['weight_dtypes']}" + (f"; not {want}: {bad[:4]}" if bad else ""))
        elif scheme.kind == "linear":
            want = f"int{scheme.nbits}"
            bad = [w["name"] for w in big if w["kind"] != "affine" or w["storage"] not in (want, f"u{want}")]
            check(f"weights over {WEIGHT_THRESHOLD} elements are {want}", not bad and bool(big),
                  f"{report['weight_dtypes']}" + (f"; not {want}: {bad[:4]}" if bad else ""))
        elif scheme.kind == "lut":
            want = f"lut{scheme.nbits}"
            bad = [w["name"] for w in big if w["storage"] != want]
            check(f"weights over {WEIGHT_THRESHOLD} elements are palettized to {scheme.nbits} bits", not bad and bool(big),
                  f"{report['weight_dtypes']}" + (f"; not {want}: {bad[:4]}" if bad else ""))
            if scheme.granularity == "per_grouped_channel":
                def groups(w):
                    lut = np.asarray(w["lut"]) if w.get("lut") is not None else np.zeros(1)
                    return int(np.prod(lut.shape[:-2])) if lut.ndim > 2 else 1

                axis = lambda w: 1 if w["op_type"] == "conv_transpose" else 0  # noqa: E731
                grouped = [w for w in big if groups(w) == w["shape"][axis(w)] // scheme.group_size]
                check(f"one look-up table per {scheme.group_size} output channels", len(grouped) == len(big),
                      f"{len(grouped)} of {len(big)} weights")
        elif scheme.kind == "w8a8":
            bad = [w["name"] for w in big if w["kind"] != "affine" or "int8" not in w["storage"]]
            check("weights are int8", not bad and bool(big), f"{report['weight_dtypes']}" + (f"; not int8: {bad[:4]}" if bad else ""))
            nq, ndq = ops.get("quantize", 0), ops.get("dequantize", 0)
            check("activations are quantized (quantize/dequantize ops)", nq > 0 and ndq > 0, f"{nq} quantize, {ndq} dequantize")
        if scheme.kind in ("none", "linear", "lut"):
            check("no activation quantization ops", ops.get("quantize", 0) == 0, f"{ops.get('quantize', 0)} quantize ops")

    # weights against the torch model
    if torch_model is not None:
        refs = _torch_weights(torch_model)
        by_shape: dict[tuple, list] = {}
        for name, arr, axis, bn in refs:
            by_shape.setdefault(tuple(arr.shape), []).append((name, arr, axis, bn))
        matched, unmatched, worst, max_rms, folded = 0, [], 0.0, 0.0, 0
        failures = []
        for w in weights:
            if w.get("value") is None:
                continue
            cands = by_shape.get(tuple(w["shape"]), [])
            if not cands:
                unmatched.append(w["name"])
                continue
            steps = 1.0 if scheme is not None and scheme.kind == "w8a8" else 0.5
            best = min((dict(_compare(w, arr, axis, bn, steps), ref=name) for name, arr, axis, bn in cands),
                       key=lambda r: r["ratio"])
            if best["ratio"] <= 1.0:
                matched += 1
                folded += best["folded"] != "none"
                worst = max(worst, best["ratio"])
                max_rms = max(max_rms, best["rel_rms"])
            else:
                failures.append(f"{w['name']} {w['shape']} ({w['storage']}): {best['ratio']:.2f}x the allowed error vs {best['ref']}")
        report["weights"] = {"compared": matched, "unmatched": len(unmatched), "bn_folded": folded,
                             "worst_error_vs_allowed": round(worst, 3), "max_rel_rms": round(max_rms, 5)}
        check("stored weights match the torch weights within the scheme's error", not failures and matched > 0,
              f"{matched} matched, {len(unmatched)} without a same-shaped torch weight" + (f"; {'; '.join(failures[:3])}" if failures else ""))

    report["problems"] = [f"{c['check']}: {c['detail']}" for c in checks if not c["ok"]]
    report["ok"] = not report["problems"]
    return report


__all__ = [
    "CoreMLConversionError", "UnsupportedOpError", "DynamicShapeError", "DeploymentTargetError", "PackageValidationError",
    "CoreMLResult", "CoreMLConverter", "PRECISIONS", "OUTPUTS", "COMPUTE_UNITS", "SCHEMES", "WEIGHT_THRESHOLD",
    "convert_coreml", "convert_variants", "convert_to_bundle", "validate_package", "compress", "kmeans_lut",
    "check_target", "resolve_target", "package_size",
]
