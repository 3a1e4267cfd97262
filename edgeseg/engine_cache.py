"""What a TensorRT engine is, for the side that builds it and the side that runs it.

An engine is specific to the TensorRT release and the GPU that built it. Each one has a header (the
JSON beside it in the cache, and the artifact's `info` in a bundle) recording what it was built
from and for: model hash, TensorRT version, compute capability, precision, shapes and options.
`converters.tensorrt` writes headers and keys its cache on them; `runtime.engines.tensorrt` reads
them to decide, before deserialising anything, whether an engine can run on this machine
(`stale_reasons`). Both import this module, which needs neither TensorRT nor onnx nor torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgeseg.bundle import write_text_atomic
from edgeseg.errors import ConversionError

PRECISIONS = ("fp32", "fp16", "int8")
HEADER_VERSION = 1

# Version-compatible plans (BuilderFlag.VERSION_COMPATIBLE, TensorRT >= 8.6) run on the same or a later
# release of the same major version, and across these major steps only: TensorRT 10's guide ("engines built
# with TensorRT 8 work with TensorRT 9 and TensorRT 10 runtimes") and TensorRT 11's ("engines built with
# TensorRT 10 work with TensorRT 11"). Never on an older runtime.
VERSION_COMPATIBLE_SINCE = (8, 6)
VERSION_COMPATIBLE_STEPS = frozenset({(8, 9), (8, 10), (10, 11)})


def cache_dir() -> Path:
    """Where engines are cached: $EDGESEG_CACHE/engines, else $XDG_CACHE_HOME (~/.cache)/edgeseg/engines."""
    root = os.environ.get("EDGESEG_CACHE")
    if root:
        return Path(root).expanduser() / "engines"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "edgeseg" / "engines"


def header_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


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
    # TF32 for float32 convolutions and matrix products (TensorRT enables it by default). None: off for fp32
    # engines, so that they compute in float32 as their name says; on for fp16/int8, whose float32 layers
    # are the few kept out of reduced precision anyway.
    tf32: bool | None = None
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
        if self.tf32 is None:
            self.tf32 = self.precision != "fp32"

    def key_fields(self) -> dict:
        return {"precision": self.precision, "shapes": self.shapes, "workspace_mb": self.workspace_mb,
                "version_compatible": self.version_compatible, "hardware_compatible": self.hardware_compatible,
                "optimization_level": self.optimization_level, "strongly_typed": bool(self.strongly_typed),
                "tf32": bool(self.tf32)}


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
            header = cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise ConversionError(f"engine header is incomplete: {e}") from None
        cc = header.compute_capability
        if (not isinstance(header.trt_version, str) or not _version_tuple(header.trt_version)
                or not isinstance(cc, (list, tuple)) or len(cc) != 2 or not all(isinstance(v, int) for v in cc)):
            raise ConversionError(f"engine header names no valid TensorRT version and compute capability "
                                  f"({header.trt_version!r}, {cc!r})")
        return header

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EngineHeader":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConversionError(f"cannot read engine header {path}: {e}") from None


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def version_compatible_problem(built: str, runtime: str) -> str | None:
    """Why a version-compatible plan built by TensorRT `built` cannot run on TensorRT `runtime`; None when it can."""
    b, r = _version_tuple(built), _version_tuple(runtime)
    if b[:2] < VERSION_COMPATIBLE_SINCE:
        return f"built with TensorRT {built}; version compatibility starts with {'.'.join(map(str, VERSION_COMPATIBLE_SINCE))}"
    if r < b:
        return f"built with TensorRT {built}, newer than the installed {runtime}"
    if r[0] != b[0] and (b[0], r[0]) not in VERSION_COMPATIBLE_STEPS:
        steps = ", ".join(f"{x}->{y}" for x, y in sorted(VERSION_COMPATIBLE_STEPS))
        return (f"built with TensorRT {built}; TensorRT {r[0]} does not run version-compatible plans of TensorRT {b[0]} "
                f"(only the same major version and {steps})")
    return None


def stale_reasons(header: EngineHeader, target: Target, *, model_sha256: str | None = None,
                  options: BuildOptions | None = None) -> list[str]:
    """Why an engine with this header must not run on `target` (empty: it may)."""
    reasons = []
    opts = header.options or {}
    if opts.get("version_compatible"):
        problem = version_compatible_problem(header.trt_version, target.trt_version)
        if problem:
            reasons.append(problem)
    elif header.trt_version != target.trt_version:
        reasons.append(f"built with TensorRT {header.trt_version}, this machine has {target.trt_version}")
    built_cc = tuple(header.compute_capability)
    if opts.get("hardware_compatible"):
        if tuple(target.compute_capability) < (8, 0):
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


__all__ = [
    "PRECISIONS", "HEADER_VERSION", "cache_dir", "header_path", "Target", "normalize_shapes", "BuildOptions", "engine_key",
    "EngineHeader", "version_compatible_problem", "stale_reasons",
]
