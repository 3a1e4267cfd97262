"""Core ML engine (macOS only): runs a bundle's .mlpackage with the Core ML framework.

The package takes an image (see converters/coreml/): raw 0..255 pixels at the model size, with
the normalisation inside the graph. Two ways in:

- `infer_image(frame_bgr)`: the frame already resized to the model input size (H x W x 3 uint8
  BGR, as OpenCV gives it); no normalisation on the host. `wants = "image"` tells a pipeline it
  can take this path and skip the float preprocessing.
- `infer(batch)`: the runtime's preprocessed batch, laid out as the bundle's `Preprocess` says
  (NCHW or NHWC, normalised float or uint8). The engine undoes the normalisation
  (x * std + mean) * 255 and rounds to whole pixel values, which is what the image input takes;
  the float reference resize is at most half a grey level away from that.

`compute_units` picks where Core ML may run the model: "all" (default: Neural Engine, GPU, CPU),
"cpu_only", "cpu_and_gpu" or "cpu_and_ne". This module never imports torch itself; note that
coremltools imports torch at import time when torch is installed on the Mac.
"""
from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import numpy as np

from edgeseg.spec import Preprocess
from runtime.engines.base import EngineError, EngineIO, TensorInfo

log = logging.getLogger("edgeseg.runtime")

COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}


def check_compute_units(compute_units: str) -> str:
    if compute_units not in COMPUTE_UNITS:
        raise EngineError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
    return compute_units


def available() -> tuple[bool, str]:
    """(usable, reason): Core ML prediction needs macOS and coremltools."""
    if platform.system() != "Darwin":
        return False, (
            f"Core ML runs only on macOS (this is {platform.system()}); run the bundle's ONNX model with "
            "--backend onnxruntime here, or copy the .mlpackage to a Mac or an iOS app"
        )
    import importlib.util

    if importlib.util.find_spec("coremltools") is None:
        return False, "coremltools is not installed (pip install coremltools)"
    return True, "macOS with coremltools"


coreml_available = available  # the older name


def batch_to_images(batch: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Undo `pre.normalize` and the layout: a preprocessed batch -> (N, H, W, 3) uint8 images in the
    preprocessing's colour order."""
    x = np.asarray(batch)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise EngineError(f"expected a batch (N, 3, H, W) or (N, H, W, 3), got shape {x.shape}")
    if pre.layout == "nchw":
        if x.shape[1] != 3:
            raise EngineError(f"expected NCHW input with 3 channels, got shape {x.shape}")
        x = x.transpose(0, 2, 3, 1)
    elif x.shape[-1] != 3:
        raise EngineError(f"expected NHWC input with 3 channels, got shape {x.shape}")
    if pre.dtype == "uint8" or x.dtype == np.uint8:
        return np.ascontiguousarray(x.astype(np.uint8))
    x = x.astype(np.float32)
    img = (x * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)) * np.float32(255.0)
    return np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


class CoreMLEngine(EngineIO):
    backend = "coreml"
    wants = "image"

    def __init__(self, path: str | os.PathLike, *, preprocess: Preprocess, output_name: str, output_kind: str = "logits",
                 output_shape: tuple = (), input_sizes: list | None = None, color: str | None = None,
                 precision: str = "fp16", compute_units: str = "all"):
        check_compute_units(compute_units)
        ok, why = available()
        if not ok:
            raise EngineError(why)
        path = Path(path)
        if not path.exists():
            raise EngineError(f"Core ML package not found: {path}")
        import coremltools as ct

        try:
            self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))
        except Exception as e:  # Core ML raises RuntimeError/ValueError variants for unreadable packages
            raise EngineError(f"Core ML cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                              "the package is damaged or needs a newer macOS (see its minimum deployment target)") from None
        self.path, self.precision, self.compute_units = path, precision, compute_units
        self.preprocess = preprocess
        self.color = color or preprocess.color
        self.output_name, self.output_kind = output_name, output_kind
        self.input_sizes = [tuple(s) for s in (input_sizes or [preprocess.size])]
        out_dtype = np.int32 if output_kind == "mask" else np.float32
        self._inputs = [TensorInfo("image", tuple(preprocess.input_shape), np.dtype(preprocess.dtype))]
        self._outputs = [TensorInfo(output_name, tuple(output_shape), np.dtype(out_dtype))]

    @classmethod
    def from_bundle(cls, bundle, precision: str | None = None, compute_units: str | None = None, **options):
        threads = options.pop("threads", None)
        if options:
            raise EngineError(f"the coreml backend takes compute_units only; unknown options: {', '.join(sorted(options))}")
        if threads:
            log.info("coreml: threads=%s ignored (Core ML schedules its own work)", threads)
        if compute_units is not None:
            check_compute_units(compute_units)
        ok, why = available()
        if not ok:
            raise EngineError(why)
        art = bundle.select("coreml", precision)
        bundle.verify_artifact(art)
        info = art.info or {}
        m = bundle.manifest
        return cls(
            bundle.artifact_path(art), preprocess=m.preprocess,
            output_name=info.get("output_name", m.output_name), output_kind=info.get("output_kind", m.output_kind),
            output_shape=tuple(info.get("output_shape", m.output_shape)), input_sizes=info.get("input_sizes"),
            color=info.get("color") or None, precision=art.precision,
            compute_units=compute_units or info.get("compute_units", "all"),
        )

    def _predict(self, image: np.ndarray) -> np.ndarray:
        """One image (H, W, 3) uint8 in the preprocessing's colour order -> the output array."""
        try:
            from PIL import Image  # coremltools takes image inputs as PIL images
        except ImportError:
            raise EngineError("the coreml backend needs Pillow to pass images to Core ML: pip install pillow") from None

        if tuple(image.shape[:2]) not in self.input_sizes:
            sizes = ", ".join(f"{h}x{w}" for h, w in self.input_sizes)
            raise EngineError(f"image of size {image.shape[0]}x{image.shape[1]} does not fit the package (sizes: {sizes}); resize it first")
        # PIL images are RGB; Core ML converts to the package's declared colour layout itself
        rgb = image if self.preprocess.color == "rgb" else image[..., ::-1]
        out = self.model.predict({"image": Image.fromarray(np.ascontiguousarray(rgb))})
        if self.output_name not in out:
            raise EngineError(f"the package returned {sorted(out)}, not {self.output_name!r}; re-create it with `edgeseg convert --to coreml`")
        return np.asarray(out[self.output_name])

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.model is None:
            raise EngineError("the engine is closed")
        images = batch_to_images(batch, self.preprocess)
        return {self.output_name: np.concatenate([self._predict(im) for im in images], axis=0)}

    def infer_image(self, frame_bgr: np.ndarray) -> dict[str, np.ndarray]:
        """One BGR uint8 frame already resized to the model input size."""
        if self.model is None:
            raise EngineError("the engine is closed")
        frame = np.asarray(frame_bgr)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise EngineError(f"infer_image expects an (H, W, 3) uint8 BGR frame, got {frame.dtype} {frame.shape}")
        img = frame[..., ::-1] if self.preprocess.color == "rgb" else frame
        return {self.output_name: self._predict(img)}

    def close(self) -> None:
        self.model = None

    def __repr__(self):
        return f"CoreMLEngine({str(self.path)!r}, {self.precision}, compute_units={self.compute_units})"
