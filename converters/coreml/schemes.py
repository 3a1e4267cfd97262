"""The package's fixed names, the precisions (how weights and activations are stored), the
deployment targets each needs, and the quiet coremltools import every other module uses.

Precisions (weights are FP16 unless compressed; activations FP16 except for fp32):

    fp32, fp16              compute precision FLOAT32 / FLOAT16
    int8-weights            linear symmetric INT8 per output channel (iOS16+)
    int4-weights            linear symmetric INT4 per output channel (iOS18+)
    palettize8/6/4          one k-means look-up table per weight tensor (iOS16+)
    palettize4-grouped      4-bit LUT per group of 8 output channels (iOS18+)
    w8a8                    INT8 weights and INT8 activations (iOS17+), see compression.py
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any

from converters.coreml.errors import CoreMLConversionError, DeploymentTargetError
from edgeseg.errors import option

INPUT_NAME = "image"
OUTPUTS = ("logits", "probs", "mask")
COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")
# Weights with more elements than this are compressed; smaller ones (biases, tiny 1x1 convs) stay
# FP16, where compressing would save bytes only in the noise.
WEIGHT_THRESHOLD = 512
MAX_ENUMERATED_SHAPES = 128  # Core ML's limit for EnumeratedShapes
DEFAULT_CALIBRATION_FRAMES = 32


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


def import_ct():
    """Import coremltools quietly (it prints version warnings for torch and scikit-learn)."""
    # on its first import coremltools warns about untested torch versions and, off macOS, about
    # its missing native prediction library; neither matters for conversion
    with warnings.catch_warnings(), quiet_logger("coremltools", logging.ERROR):
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


@contextlib.contextmanager
def quiet_logger(name: str, level: int):
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
    ct = import_ct()
    target = getattr(ct.target, str(name), None) if isinstance(name, str) else None
    if target is None:
        known = sorted({t.name for t in ct.target})
        raise DeploymentTargetError(
            f"unknown {option('minimum_deployment_target', '--deployment-target')} {name!r}; use a name like 'iOS17' or 'macOS14' "
            f"(known names: {', '.join(known)})"
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
            f"pass {option('minimum_deployment_target', '--deployment-target', f'iOS{scheme.min_ios}')}" + (f" (or macOS{mac})" if mac else "")
            + " or a newer one, or choose a precision the older target supports"
            + (" (fp16 or fp32)" if scheme.min_ios > 15 else "")
        )
    return target, ios
