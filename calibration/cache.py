"""Legacy TensorRT INT8 calibration cache (implicit quantization, TensorRT 8.x / 10.x).

TensorRT's `IInt8EntropyCalibrator2` reads and writes a text file:

    TRT-<version>-EntropyCalibration2
    input: 3c010a14
    /backbone/stem/Conv_output_0: 3d0b7086

one line per tensor: its name, then its scale (dynamic range / 127) as the 8 hex digits of the
IEEE-754 float32 bit pattern, most significant byte first. TensorRT rejects a cache whose header
version is not its own, so the version must be the one that builds the engine: 8.x writes
major*1000 + minor*100 + patch (8.6.1 -> 8601), 10.x major*10000 + minor*100 + patch (10.3.0 -> 100300).

TensorRT 11 dropped implicit quantization (Q/DQ graphs only); this file is for older deployments
that build `model.onnx` with `--int8 --calib=calibration.cache`. It is written from the same ranges
ONNX Runtime computed for the Q/DQ artifacts.
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np

from calibration.data import CalibrationError

ALGORITHM = "EntropyCalibration2"
DEFAULT_TRT_VERSION = "10.3.0"  # JetPack 6.x


def trt_version_code(version: str) -> int:
    """'8.6.1' -> 8601, '10.3.0' -> 100300 (TensorRT's NV_TENSORRT_VERSION for that release)."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", str(version))
    if not m:
        raise CalibrationError(f"TensorRT version {version!r} is not major.minor[.patch] (e.g. 8.6.1 or 10.3.0)")
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if major < 7:
        raise CalibrationError(f"TensorRT {version} is too old for this cache format (7.x or later)")
    if major >= 11:
        raise CalibrationError(
            f"TensorRT {version} has no implicit INT8 calibration; deploy the Q/DQ artifact (model.int8.tensorrt.onnx) instead"
        )
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def installed_trt_version() -> str | None:
    try:
        import tensorrt  # noqa: F401

        return str(tensorrt.__version__)
    except Exception:
        return None


def scale_hex(scale: float) -> str:
    """The cache's encoding of a scale: big-endian float32 bits as 8 lowercase hex digits."""
    return struct.pack(">f", float(scale)).hex()


def hex_scale(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text.strip().rjust(8, "0")))[0]


def scales_from_ranges(ranges, tensors: list[str] | None = None) -> dict[str, float]:
    """Per-tensor scale = max(|min|, |max|) / 127 from ONNX Runtime's TensorsData (symmetric int8)."""
    out = {}
    for name in tensors if tensors is not None else list(ranges.keys()):
        if name not in ranges:
            continue
        lo, hi = ranges[name].range_value
        amax = max(abs(float(np.asarray(lo).min())), abs(float(np.asarray(hi).max())))
        if not np.isfinite(amax):
            raise CalibrationError(f"tensor {name!r} has a non-finite range ({lo}, {hi}); the model produces inf/NaN on the calibration frames")
        # an all-zero tensor still needs a positive scale
        out[name] = max(amax, 1e-8) / 127.0
    return out


def write_trt_cache(path: str | os.PathLike, scales: dict[str, float], trt_version: str | None = None) -> dict:
    """Write the cache text (see the module doc) to `path`. Returns {header, tensors, trt_version}."""
    version = trt_version or installed_trt_version() or DEFAULT_TRT_VERSION
    header = f"TRT-{trt_version_code(version)}-{ALGORITHM}"
    lines = [header]
    for name, s in scales.items():
        if "\n" in name or not name.strip():
            raise CalibrationError(f"tensor name {name!r} cannot be written to a TensorRT cache")
        if not (np.isfinite(s) and s > 0):
            raise CalibrationError(f"tensor {name!r} has scale {s}; scales must be positive and finite")
        lines.append(f"{name}: {scale_hex(s)}")
    Path(path).write_text("\n".join(lines) + "\n")
    return {"header": header, "tensors": len(scales), "trt_version": version}


def read_trt_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """Parse a cache: (header, {tensor: scale}). Tensor names may contain ':' (the value follows the last one)."""
    text = Path(path).read_text()
    lines = [l for l in text.splitlines() if l.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise CalibrationError(f"{path} is not a TensorRT calibration cache (first line must be TRT-<version>-<algorithm>)")
    scales = {}
    for l in lines[1:]:
        name, sep, value = l.rpartition(":")
        if not sep:
            raise CalibrationError(f"{path}: malformed line {l!r}")
        scales[name.strip()] = hex_scale(value)
    return lines[0], scales


__all__ = ["ALGORITHM", "DEFAULT_TRT_VERSION", "trt_version_code", "scale_hex", "hex_scale", "scales_from_ranges",
           "write_trt_cache", "read_trt_cache", "installed_trt_version"]
