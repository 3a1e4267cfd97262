"""One model, several packages: `CoreMLConverter` exports once, converts once per compute
precision, compresses per variant, writes each package atomically and validates it."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from converters.coreml.compression import compress, w8a8_model
from converters.coreml.errors import CoreMLConversionError, DeploymentTargetError, PackageValidationError
from converters.coreml.frontend import Frontend, check_sizes, image_model
from converters.coreml.metadata import set_metadata
from converters.coreml.schemes import (DEFAULT_CALIBRATION_FRAMES, INPUT_NAME, OUTPUTS, check_target, resolve_target,
                                       scheme_for)
from converters.coreml.validation import validate_package
from edgeseg import progress
from edgeseg.bundle import atomic_path
from edgeseg.spec import Preprocess


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
        self.multiple = check_sizes(model, self.sizes)
        self.wrapper = image_model(model, preprocess, output, color)
        self.front = Frontend(self.wrapper, self.sizes, tuple(preprocess.size), self.multiple, color, output, self.target)
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
            qmodel, n = w8a8_model(self.model, self.preprocess, self.calibration, self.calibration_frames)
            wrapper = image_model(qmodel, self.preprocess, self.output, self.color)
            front = Frontend(wrapper, self.sizes, tuple(self.preprocess.size), self.multiple, self.color, self.output, self.target)
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
        # coremltools draws a bar per pass and prints notices of its own: shown with --verbose only
        with progress.phase(f"Core ML {precision} conversion"), progress.quiet_third_party():
            mlmodel, how = self.build(precision)
        scheme = scheme_for(precision)
        set_metadata(mlmodel, labels=self.labels, palette=self.palette, preprocess=self.preprocess, precision=precision,
                      output=self.output, color=self.color, sizes=self.sizes, scheme=scheme, target_name=self.target_name,
                      metadata=self.metadata, output_shape=self.output_shape)
        with atomic_path(out_path) as tmp, progress.phase("save and validate the package"), progress.quiet_third_party():
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
