"""The one definition of preprocessing.

Calibration, evaluation, the CPU runtime and the CUDA kernel all follow `Preprocess`.
`Preprocess.apply` is the NumPy/OpenCV reference; the CUDA kernel is tested against it.

Resizing is bilinear with half-pixel centres computed in float32 (OpenCV's INTER_LINEAR on a
float image), not OpenCV's fixed-point uint8 path: a GPU kernel can reproduce float bilinear
exactly, it cannot reproduce OpenCV's 11-bit rounding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from edgeseg import schema
from edgeseg.errors import EdgesegError

# the manifest schema defines these vocabularies (edgeseg/schema/manifest.schema.json)
RESIZE_MODES = schema.enum("resize")
COLOR_ORDERS = schema.enum("color")
LAYOUTS = schema.enum("layout")
DTYPES = schema.enum("dtype")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrameError(EdgesegError, ValueError):
    """A frame that is not an HxWx3 uint8 BGR image."""


MAX_FRAME_PIXELS = 64_000_000  # 64 megapixels: a frame past this is a mistake or a decompression bomb
MIN_FRAME_SIDE = 2  # a frame needs 2 pixels a side to be resized


def frame_size_problem(height: int, width: int, max_pixels: int | None = MAX_FRAME_PIXELS,
                       min_side: int = MIN_FRAME_SIDE) -> str | None:
    """Why a height x width frame is refused (too small or too large), or None."""
    if min(height, width) < min_side:
        return f"{width}x{height} pixels is too small (at least {min_side} a side)"
    if max_pixels and height * width > max_pixels:
        return (f"{width}x{height} = {height * width:,} pixels is too large (at most {max_pixels:,}); "
                "resize it first, or raise the limit (max_pixels=, --max-megapixels)")
    return None


def check_frame(frame: Any) -> np.ndarray:
    """Return `frame` if it is an HxWx3 uint8 array, else raise a FrameError that says what to pass."""
    if not isinstance(frame, np.ndarray):
        raise FrameError(
            f"expected a frame as a numpy array (H, W, 3) uint8 BGR, got {type(frame).__name__}; "
            "read images with cv2.imread or convert PIL images with np.asarray(img)[..., ::-1]"
        )
    if frame.ndim == 2:
        raise FrameError(
            f"expected a colour frame (H, W, 3), got a single-channel array {frame.shape}; "
            "convert it with cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)"
        )
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise FrameError(f"expected a frame of shape (H, W, 3), got {frame.shape}")
    if frame.shape[2] == 4:
        raise FrameError(
            f"expected 3 channels (BGR), got 4 {frame.shape}; drop alpha with cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)"
        )
    if frame.dtype != np.uint8:
        raise FrameError(
            f"expected uint8 pixels (0..255), got {frame.dtype}; "
            "scale float images with (img * 255).clip(0, 255).astype(np.uint8)"
        )
    if frame.shape[0] < MIN_FRAME_SIDE or frame.shape[1] < MIN_FRAME_SIDE:
        raise FrameError(f"frame too small: {frame.shape}")
    return frame


def check_nv12(frame: Any) -> np.ndarray:
    """Return `frame` if it is an NV12 image ((H * 3 / 2, W) uint8: the Y plane, then interleaved UV at
    half resolution, with even H and W), else raise a FrameError that says what to pass."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 2 or frame.dtype != np.uint8 or frame.shape[0] % 3 \
            or frame.shape[1] % 2 or frame.shape[0] < 3:
        raise FrameError(
            f"an NV12 frame is a (H * 3 / 2, W) uint8 array with even H and W, got "
            f"{getattr(frame, 'shape', type(frame).__name__)} {getattr(frame, 'dtype', '')}; pass BGR frames with "
            "pixel_format='bgr'"
        )
    return frame


@dataclass(frozen=True)
class Letterbox:
    """Where the resized frame sits inside the network input (top, left, height, width)."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Preprocess:
    """How a BGR uint8 camera frame becomes the network input.

    size: network input (height, width). mean/std: per channel in the model's colour order, on
    0..1 pixel values. dtype "uint8" means the normalisation lives inside the graph and the input
    is the resized image itself.
    """

    size: tuple[int, int] = (256, 256)
    resize: str = "stretch"
    color: str = "rgb"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = "nchw"
    dtype: str = "float32"
    pad_value: int = 0

    def __post_init__(self):
        size = tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Preprocess.size must be (height, width) with positive values, got {self.size}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        for name, value, allowed in (
            ("resize", self.resize, RESIZE_MODES),
            ("color", self.color, COLOR_ORDERS),
            ("layout", self.layout, LAYOUTS),
            ("dtype", self.dtype, DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"Preprocess.{name} must be one of {allowed}, got {value!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Preprocess mean/std need 3 values and std > 0, got {self.mean} / {self.std}")

    # -- geometry ---------------------------------------------------------------------------
    def letterbox(self, frame_hw: tuple[int, int]) -> Letterbox:
        """Placement of a frame of size frame_hw inside the input (the whole input when stretching)."""
        H, W = self.size
        if self.resize == "stretch":
            return Letterbox(0, 0, H, W)
        h, w = frame_hw
        scale = min(H / h, W / w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        return Letterbox((H - nh) // 2, (W - nw) // 2, nh, nw)

    # -- the reference ----------------------------------------------------------------------
    def resize_image(self, frame_bgr: np.ndarray) -> np.ndarray:
        """Resized HxWx3 float32 image, 0..255, in the model's colour order (padding included)."""
        check_frame(frame_bgr)
        H, W = self.size
        box = self.letterbox(frame_bgr.shape[:2])
        # Channels resize independently, so the colour swap happens on the small image: swapping
        # a full-size frame first costs more than the network at 720p.
        resized = cv2.resize(frame_bgr.astype(np.float32), (box.width, box.height), interpolation=cv2.INTER_LINEAR)
        if self.color == "rgb":
            resized = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
        if (box.height, box.width) == (H, W):
            return resized
        out = np.full((H, W, 3), float(self.pad_value), np.float32)
        out[box.top : box.top + box.height, box.left : box.left + box.width] = resized
        return out

    def normalize(self, img: np.ndarray, channel_axis: int = -1) -> np.ndarray:
        """0..255 float image -> normalised float32 (rounded uint8 for graphs that normalise inside)."""
        if self.dtype == "uint8":
            return np.clip(np.rint(img), 0, 255).astype(np.uint8)
        shape = [1] * img.ndim
        shape[channel_axis] = 3
        scale, mean, inv_std = self._normalization()
        return (img * scale - mean.reshape(shape)) * inv_std.reshape(shape)

    def _normalization(self) -> tuple[np.float32, np.ndarray, np.ndarray]:
        """float32 scale, mean and 1/std of `(x * scale - mean) * inv_std`, shared by both paths."""
        return np.float32(1.0 / 255.0), np.asarray(self.mean, np.float32), (1.0 / np.asarray(self.std, np.float32)).astype(np.float32)

    def apply(self, frame_bgr: np.ndarray) -> np.ndarray:
        """BGR uint8 frame -> network input batch of one, (1, 3, H, W) or (1, H, W, 3)."""
        if self.layout == "nhwc" or self.dtype == "uint8":
            x = self.resize_image(frame_bgr)
            if self.layout == "nchw":
                x = x.transpose(2, 0, 1)
            x = np.ascontiguousarray(self.normalize(x, channel_axis=0 if self.layout == "nchw" else -1)[None])
        else:
            x = self._apply_planar(frame_bgr)
        if self.dtype == "float16":
            x = x.astype(np.float16)
        return x

    def _apply_planar(self, frame_bgr: np.ndarray) -> np.ndarray:
        """The float NCHW case of `apply`, the same float32 operations in the same order written
        plane by plane into the output: the colour swap becomes a choice of source channel and the
        layout change a strided read, instead of a transposed, normalised and copied image
        (3.4x less time for a 720p frame to 512x512)."""
        check_frame(frame_bgr)
        H, W = self.size
        box = self.letterbox(frame_bgr.shape[:2])
        resized = cv2.resize(frame_bgr.astype(np.float32), (box.width, box.height), interpolation=cv2.INTER_LINEAR)
        scale, mean, inv_std = self._normalization()
        padded = (box.height, box.width) != (H, W)
        out = np.empty((1, 3, H, W), np.float32)
        for c, src in enumerate((2, 1, 0) if self.color == "rgb" else (0, 1, 2)):
            plane = out[0, c]
            if padded:
                plane.fill((np.float32(self.pad_value) * scale - mean[c]) * inv_std[c])
                plane = plane[box.top : box.top + box.height, box.left : box.left + box.width]
            np.multiply(resized[..., src], scale, out=plane)
            np.subtract(plane, mean[c], out=plane)
            np.multiply(plane, inv_std[c], out=plane)
        return out

    def apply_batch(self, frames: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.apply(f) for f in frames], axis=0)

    # -- bookkeeping ------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        H, W = self.size
        return (1, 3, H, W) if self.layout == "nchw" else (1, H, W, 3)

    def replace(self, **changes) -> "Preprocess":
        d = self.to_dict()
        d.update(changes)
        return Preprocess.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocess fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for k in ("size", "mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def unletterbox(array_hw: np.ndarray, pre: Preprocess, frame_hw: tuple[int, int], interpolation=cv2.INTER_NEAREST):
    """Map an input-resolution map (H, W[, C]) back to frame size, dropping letterbox padding."""
    box = pre.letterbox(frame_hw)
    crop = array_hw[box.top : box.top + box.height, box.left : box.left + box.width]
    h, w = frame_hw
    if crop.shape[:2] == (h, w):
        return crop
    return cv2.resize(crop, (w, h), interpolation=interpolation)


__all__ = ["Preprocess", "Letterbox", "FrameError", "check_frame", "check_nv12", "frame_size_problem", "MAX_FRAME_PIXELS",
           "MIN_FRAME_SIDE", "unletterbox", "IMAGENET_MEAN", "IMAGENET_STD"]
