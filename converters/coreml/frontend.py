"""The graph that is converted: the network wrapped to take raw image pixels, exported with
`torch.export` (decomposed to ATen) or, failing that, traced, and handed to `ct.convert`.

coremltools 9 cannot convert TorchScript graphs that read sizes from tensors
(`F.interpolate(size=x.shape[-2:])`); the export path can, so `torch.jit.trace` is only the
fallback for models `torch.export` cannot capture. Failures are explained by the layer that
caused them (an unsupported operator, a size-dependent layer with several input sizes).
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from typing import Any

import numpy as np

from converters.coreml.detection_ops import register as register_detection_ops
from converters.coreml.errors import CoreMLConversionError, DynamicShapeError, UnsupportedOpError, first_line
from converters.coreml.schemes import INPUT_NAME, MAX_ENUMERATED_SHAPES, import_ct
from edgeseg.spec import Preprocess


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


def image_model(model, preprocess: Preprocess, output: str, color: str):
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


def check_sizes(model, sizes: list[tuple[int, int]]) -> int:
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


class Frontend:
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
        ct = import_ct()
        layout = ct.colorlayout.RGB if self.color == "rgb" else ct.colorlayout.BGR
        if len(self.sizes) == 1:
            shape = (1, 3, *self.sizes[0])
        else:
            shape = ct.EnumeratedShapes(shapes=[(1, 3, h, w) for h, w in self.sizes], default=(1, 3, *self.default))
        # scale 1, bias 0: the graph receives raw pixel values and normalises them itself
        return [ct.ImageType(name=self.input_name, shape=shape, scale=1.0, bias=[0.0, 0.0, 0.0], color_layout=layout)]

    def _outputs(self):
        ct = import_ct()
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
            self.notes.append(f"torch.export failed ({type(e).__name__}: {first_line(e)}); used torch.jit.trace")
        return self._exported

    def _trace(self):
        import torch

        if self._traced is None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                self._traced = torch.jit.trace(self.wrapper, self._example(), check_trace=False, strict=False)
        return self._traced

    def _convert(self, source, compute: str):
        ct = import_ct()
        register_detection_ops()
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
                    self.notes.append(f"converting the exported program failed ({type(e).__name__}: {first_line(e)}); tried torch.jit.trace")
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
                        f"({path}: {first_line(e)}); convert with one input size (input_sizes=[{self.default}]) "
                        "and make one package per size, or change the layer so its output size does not depend on the input "
                        "(e.g. adaptive pooling to (1, 1), or sizes that divide the feature map)",
                        layer=layer,
                    )
                return DynamicShapeError(
                    f"{at} uses a shape Core ML cannot take ({path}: {first_line(e)}); "
                    "make the model's shapes depend only on the input size (no data-dependent shapes)",
                    layer=layer,
                )
        details = "; ".join(f"{p}: {type(e).__name__}: {first_line(e)}" for p, e, _ in failures)
        return CoreMLConversionError(f"Core ML conversion failed ({details})")


def _is_shape_failure(e: BaseException) -> bool:
    msg = str(e).lower()
    return "unable to map torch_upsample" in msg or any(p.lower() in msg for p in _DYNAMIC_PATTERNS)
