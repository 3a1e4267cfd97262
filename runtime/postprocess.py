"""From network output to results at frame size: class maps, scores, soft masks and overlays.

    result = segmenter.segment(frame)
    result.class_map                       # HxW uint8 class indices at frame size
    result.mask("ball")                    # HxW float32 soft mask (Fritz SDK clipping semantics)
    result.overlay(frame, alpha=0.5)       # BGR image with the classes drawn over the frame
    result.blur_background(frame)          # portrait-style compositing

The class map is the argmax of the *bilinearly upsampled logits* (never of upsampled colours or
of a nearest-upsampled low-resolution argmax, which gives blocky, shifted edges). Upsampling
every class channel to 720p costs more than the network itself, so `upsample_argmax` computes
the same map cheaply: a bilinear sample is a convex combination of its four neighbours, and if
all four share the same argmax class the combination does too; only output pixels whose four
neighbours disagree (a thin band along class edges) are interpolated, in full, over all classes.

`Postprocessor` holds per-stream state: an exponential moving average of class probabilities
(`smoothing`, 0 = off .. <1 = strongest) that removes the frame-to-frame flicker a network shows
on a noisy static scene.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import cv2
import numpy as np

from edgeseg.errors import EdgesegError
from edgeseg.spec import FrameError, Preprocess, check_frame, unletterbox

BACKGROUND_NAMES = ("background", "bg", "_background_", "__background__", "backdrop")
OVERLAY_MODES = ("blend", "fill", "contour")


class PostprocessError(EdgesegError, ValueError):
    """A network output or an option the postprocessing cannot use."""


# -- geometry ---------------------------------------------------------------------------------
def bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weights of i1 for each output position, as cv2.INTER_LINEAR
    computes them (half-pixel centres, clamped at the borders)."""
    scale = n_in / n_out
    f = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(f).astype(np.intp)
    w = f - i0
    low = i0 < 0
    i0[low], w[low] = 0, 0.0
    high = i0 >= n_in - 1
    i0[high], w[high] = n_in - 1, 0.0
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, w.astype(np.float32)


def channel_argmax(scores: np.ndarray) -> np.ndarray:
    """argmax over axis 0 of (C, h, w) scores -> (h, w) uint8 (first index wins ties, as numpy).

    numpy's argmax over the leading axis walks memory with a stride of h*w and is ~15x slower
    than this running maximum over contiguous planes in OpenCV."""
    C = scores.shape[0]
    best = np.array(scores[0], np.float32, copy=True)
    idx = np.zeros(scores.shape[1:], np.uint8)
    label = np.empty_like(idx)
    for c in range(1, C):
        plane = scores[c]
        if not plane.flags.c_contiguous or plane.dtype != np.float32:
            plane = np.ascontiguousarray(plane, np.float32)
        greater = cv2.compare(plane, best, cv2.CMP_GT)
        cv2.max(best, plane, dst=best)
        label.fill(c)
        cv2.copyTo(label, greater, idx)
    return idx


class Upsampler:
    """Cached geometry for mapping an (h, w) map onto an (H, W) frame with bilinear sampling."""

    def __init__(self, src_hw: tuple[int, int], dst_hw: tuple[int, int]):
        self.src_hw, self.dst_hw = tuple(src_hw), tuple(dst_hw)
        (h, w), (H, W) = self.src_hw, self.dst_hw
        self.y0, self.y1, self.wy = bilinear_axis(h, H)
        self.x0, self.x1, self.wx = bilinear_axis(w, W)
        # y0/x0 never decrease: the output rows sampling cell row i are [row_start[i], row_end[i])
        self.row_start = np.searchsorted(self.y0, np.arange(h), "left")
        self.row_count = np.searchsorted(self.y0, np.arange(h), "right") - self.row_start
        self.col_start = np.searchsorted(self.x0, np.arange(w), "left")
        self.col_count = np.searchsorted(self.x0, np.arange(w), "right") - self.col_start
        # the few grid shapes cells have (e.g. 2x5 and 3x5 from 256 to 720p), known up front
        self.cell_shapes = [(int(r), int(c)) for r in np.unique(self.row_count) if r for c in np.unique(self.col_count) if c]
        # when enlarging, OpenCV's nearest neighbour picks y0 or y0 + 1 (same for x): a pixel of
        # the same cell, so it is exact wherever the cell is uniform
        self.enlarging = H >= h and W >= w

    def argmax(self, scores: np.ndarray) -> np.ndarray:
        """argmax over classes of the bilinear upsampling of `scores` (C, h, w) -> (H, W) uint8.

        Equal to `cv2.resize(scores.transpose(1, 2, 0), (W, H), INTER_LINEAR).argmax(-1)` up to
        float rounding at exact ties, at a fraction of the cost."""
        C = scores.shape[0]
        if C > 255:
            raise PostprocessError(f"{C} classes do not fit a uint8 class map (at most 255)")
        low = channel_argmax(scores)
        if self.src_hw == self.dst_hw:
            return low
        H, W = self.dst_hw
        # cell (i, j) spans rows i, i+1 and columns j, j+1 (clamped): mixed unless all four agree
        p = cv2.copyMakeBorder(low, 0, 1, 0, 1, cv2.BORDER_REPLICATE)
        a = p[:-1, :-1]
        mixed = (a != p[:-1, 1:]) | (a != p[1:, :-1]) | (a != p[1:, 1:])
        if self.enlarging:
            out = cv2.resize(low, (W, H), interpolation=cv2.INTER_NEAREST)
        else:
            out = low[self.y0][:, self.x0]
        ci, cj = np.nonzero(mixed)
        if ci.size:
            self._mixed_cells(scores, ci, cj, out)
        return out

    def _mixed_cells(self, scores: np.ndarray, ci: np.ndarray, cj: np.ndarray, out: np.ndarray) -> None:
        """Interpolate every class over the output pixels of the mixed cells and write their argmax.

        Each cell covers a small grid of output pixels (e.g. 3x5 from 256 to 720p) with separable
        weights, so cells are grouped by grid shape: four corner values per class are gathered
        per cell (not per pixel), and the interpolation runs on contiguous blocks."""
        C = scores.shape[0]
        h, w = self.src_hw
        flat = scores.reshape(C, -1) if scores.flags.c_contiguous else np.ascontiguousarray(scores).reshape(C, -1)
        nr, nc = self.row_count[ci], self.col_count[cj]
        for rows, cols in self.cell_shapes:
            sel = np.nonzero((nr == rows) & (nc == cols))[0]
            if not sel.size:
                continue
            i, j = ci[sel], cj[sel]
            i1, j1 = np.minimum(i + 1, h - 1), np.minimum(j + 1, w - 1)
            corners = flat[:, np.concatenate([i * w + j, i * w + j1, i1 * w + j, i1 * w + j1])]
            corners = corners.reshape(C, 4, sel.size, 1, 1)
            ry = self.row_start[i][:, None] + np.arange(rows)  # (K, rows) output rows
            cx = self.col_start[j][:, None] + np.arange(cols)  # (K, cols) output columns
            wy = self.wy[ry][:, :, None]  # (K, rows, 1)
            wx = self.wx[cx][:, None, :]  # (K, 1, cols)
            top = corners[:, 0] + (corners[:, 1] - corners[:, 0]) * wx  # (C, K, 1, cols)
            bottom = corners[:, 2] + (corners[:, 3] - corners[:, 2]) * wx
            values = top + (bottom - top) * wy  # (C, K, rows, cols)
            label = channel_argmax(values.reshape(C, sel.size * rows, cols))
            out[ry[:, :, None], cx[:, None, :]] = label.reshape(sel.size, rows, cols)


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    x = logits.astype(np.float32, copy=True)
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def palette_lut(palette: Sequence[Sequence[int]], hidden: Iterable[int] = ()) -> np.ndarray:
    """A (256, 1, 3) BGR lookup table for cv2.LUT; hidden classes and unknown indices are black."""
    lut = np.zeros((256, 1, 3), np.uint8)
    for i, rgb in enumerate(palette[:256]):
        lut[i, 0] = (rgb[2], rgb[1], rgb[0])
    for i in hidden:
        if 0 <= i < 256:
            lut[i, 0] = 0
    return lut


def colorize(class_map: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """HxW class indices -> HxWx3 BGR colours (palette given in RGB, as in the manifest)."""
    cm = np.ascontiguousarray(class_map, np.uint8)
    return cv2.LUT(cv2.merge([cm, cm, cm]), palette_lut(palette))


def _resolve_classes(spec, labels: list[str], what: str) -> set[int]:
    if spec is None:
        return set()
    if isinstance(spec, (str, int, np.integer)):
        spec = [spec]
    out = set()
    for s in spec:
        out.add(_class_index(s, labels, what))
    return out


def _class_index(label, labels: list[str], what: str = "label") -> int:
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if not 0 <= int(label) < len(labels):
            raise PostprocessError(f"{what}: class index {label} out of range 0..{len(labels) - 1}")
        return int(label)
    if isinstance(label, str):
        if label in labels:
            return labels.index(label)
        raise PostprocessError(f"{what}: unknown label {label!r}; the bundle's labels are {labels}")
    raise PostprocessError(f"{what}: expected a label name or class index, got {type(label).__name__}")


def background_index(labels: Sequence[str]) -> int | None:
    """Index of the background class by name, or None when the model has none."""
    for i, name in enumerate(labels):
        if str(name).lower() in BACKGROUND_NAMES:
            return i
    return None


def clip_mask(p: np.ndarray, clip_above: float = 0.7, zero_below: float = 0.3) -> np.ndarray:
    """Fritz SDK soft-mask semantics: >= clip_above -> 1, < zero_below -> 0, the score in between."""
    if not 0.0 <= zero_below <= clip_above <= 1.0:
        raise PostprocessError(f"need 0 <= zero_below <= clip_above <= 1, got zero_below={zero_below}, clip_above={clip_above}")
    m = p.astype(np.float32, copy=True)
    m[m >= clip_above] = 1.0
    m[m < zero_below] = 0.0
    return m


def shown_lut(num_classes: int, background: int | None, hidden: Iterable[int] = ()) -> np.ndarray:
    """256 entries, 255 for each class an overlay draws (a known class, neither background nor
    hidden), 0 elsewhere; shared with the GPU overlay (runtime.cuda)."""
    lut = np.zeros(256, np.uint8)
    lut[:num_classes] = 255
    if background is not None:
        lut[background] = 0
    for c in hidden:
        lut[c] = 0
    return lut


def drawing_frame(own: np.ndarray | None, frame: np.ndarray | None, size) -> np.ndarray:
    """The frame a result draws on: the one given, else the one it was computed from; checked
    to be a BGR frame of the result's size."""
    frame = own if frame is None else frame
    if frame is None:
        raise FrameError("no frame to draw on: pass the frame the result was computed from")
    check_frame(frame)
    if frame.shape[:2] != tuple(size):
        raise FrameError(f"frame {frame.shape[:2]} does not match the result's size {tuple(size)}; pass the same frame")
    return frame


# -- results ----------------------------------------------------------------------------------
@dataclass(eq=False)
class SegmentationResult:
    """One frame's segmentation, at frame size.

    class_map: HxW uint8 class indices. scores: per-class probabilities (C, H, W) float32 when
    requested (`Segmenter(..., scores=True)`), else None. labels / palette (RGB) from the bundle.
    timings: stage -> milliseconds for this frame. frame: the BGR frame it was computed from.
    """

    class_map: np.ndarray
    labels: list[str]
    palette: list[list[int]]
    scores: np.ndarray | None = None
    frame: np.ndarray | None = field(default=None, repr=False)
    frame_index: int = 0
    timestamp: float | None = None
    frame_name: str | None = None  # the image file the frame came from, for sinks that keep names
    timings: dict = field(default_factory=dict)
    background: int | None = 0
    hidden: frozenset = frozenset()  # classes removed by keep/ignore (shown as background)
    # model-resolution scores (logits or probabilities) for soft masks, computed on demand
    _lowres: np.ndarray | None = field(default=None, repr=False)
    _lowres_is_logits: bool = field(default=False, repr=False)
    _postprocessor: "Postprocessor | None" = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    # -- data -------------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.class_map.shape[:2])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def class_index(self, label) -> int:
        return _class_index(label, self.labels)

    def class_mask(self, label) -> np.ndarray:
        """Boolean HxW mask of the pixels assigned to `label`."""
        return self.class_map == self.class_index(label)

    def probability(self, label) -> np.ndarray:
        """Probability of `label` at frame size (HxW float32, bilinear from the model's resolution)."""
        c = self.class_index(label)
        if c in self.hidden:
            return np.zeros(self.size, np.float32)
        if self.scores is not None:
            return self.scores[c]
        if c not in self._cache:
            if self._lowres is None or self._postprocessor is None:
                # a mask output: the only probability is the class map itself
                self._cache[c] = self.class_mask(c).astype(np.float32)
            else:
                if self._lowres_is_logits:
                    self._lowres, self._lowres_is_logits = softmax(self._lowres), False
                p = np.ascontiguousarray(self._lowres[c])
                self._cache[c] = np.ascontiguousarray(self._postprocessor.unletterbox(p, self.size, cv2.INTER_LINEAR), np.float32)
        return self._cache[c]

    def mask(self, label, clip_above: float = 0.7, zero_below: float = 0.3) -> np.ndarray:
        """Soft HxW float32 mask of one class in 0..1: probabilities >= clip_above become 1, those
        below zero_below become 0, the rest keep their probability (smooth edges for compositing)."""
        return clip_mask(self.probability(label), clip_above, zero_below)

    def foreground(self, clip_above: float = 0.7, zero_below: float = 0.3) -> np.ndarray:
        """Soft mask of every shown class except background (HxW float32, 0..1)."""
        shown = [c for c in range(self.num_classes) if c != self.background and c not in self.hidden]
        if not shown:
            return np.zeros(self.size, np.float32)
        if self.background is not None and not self.hidden:
            p = 1.0 - self.probability(self.background)
        else:
            p = sum(self.probability(c) for c in shown)
        return clip_mask(np.clip(p, 0.0, 1.0), clip_above, zero_below)

    def areas(self) -> dict[str, float]:
        """Share of the frame covered by each class present."""
        counts = np.bincount(self.class_map.ravel(), minlength=self.num_classes)
        total = self.class_map.size
        return {self.labels[i]: float(n) / total for i, n in enumerate(counts[: self.num_classes]) if n}

    # -- drawing ----------------------------------------------------------------------------
    def _frame(self, frame) -> np.ndarray:
        return drawing_frame(self.frame, frame, self.size)

    def _shown_mask(self) -> np.ndarray:
        return cv2.LUT(self.class_map, shown_lut(self.num_classes, self.background, self.hidden))

    def colorized(self) -> np.ndarray:
        """HxWx3 BGR image of the class colours (hidden classes and background black)."""
        hidden = set(self.hidden) | ({self.background} if self.background is not None else set())
        cm = self.class_map
        return cv2.LUT(cv2.merge([cm, cm, cm]), palette_lut(self.palette, hidden))

    def overlay(self, frame: np.ndarray | None = None, alpha: float = 0.5, mode: str = "blend", thickness: int = 2) -> np.ndarray:
        """The frame with classes drawn over it: `blend` (colours mixed in with `alpha`), `fill`
        (solid colours) or `contour` (class outlines, `thickness` px). Background stays untouched."""
        frame = self._frame(frame)
        if mode not in OVERLAY_MODES:
            raise PostprocessError(f"overlay mode must be one of {OVERLAY_MODES}, got {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise PostprocessError(f"alpha must be in 0..1, got {alpha}")
        out = frame.copy()
        if mode == "contour":
            lut = palette_lut(self.palette)
            for c in np.unique(self.class_map):
                if c >= self.num_classes or c == self.background or c in self.hidden:
                    continue
                contours, _ = cv2.findContours((self.class_map == c).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(out, contours, -1, tuple(int(v) for v in lut[c, 0]), thickness)
            return out
        shown = self._shown_mask()
        colours = self.colorized()
        if mode == "blend":
            colours = cv2.addWeighted(frame, 1.0 - alpha, colours, alpha, 0.0)
        cv2.copyTo(colours, shown, out)
        return out

    def _composite(self, frame, other, clip_above, zero_below) -> np.ndarray:
        fg = self.foreground(clip_above, zero_below)
        return cv2.blendLinear(frame, other, fg, 1.0 - fg)

    def blur_background(self, frame: np.ndarray | None = None, strength: float = 15.0,
                        clip_above: float = 0.7, zero_below: float = 0.3) -> np.ndarray:
        """Keep the foreground sharp and blur the background (Gaussian sigma `strength` px)."""
        frame = self._frame(frame)
        H, W = self.size
        # blur at quarter size: same look, ~16x less work
        f = 4 if min(H, W) >= 64 else 1
        small = cv2.resize(frame, (max(1, W // f), max(1, H // f)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), max(0.5, strength / f))
        blurred = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
        return self._composite(frame, blurred, clip_above, zero_below)

    def replace_background(self, frame: np.ndarray | None = None, background=(0, 255, 0),
                           clip_above: float = 0.7, zero_below: float = 0.3) -> np.ndarray:
        """Put the foreground over `background`: a BGR image (resized to the frame) or a BGR colour."""
        frame = self._frame(frame)
        H, W = self.size
        if isinstance(background, np.ndarray):
            check_frame(background)
            bg = background if background.shape[:2] == (H, W) else cv2.resize(background, (W, H), interpolation=cv2.INTER_LINEAR)
        else:
            try:
                colour = [int(v) for v in background]
            except TypeError:
                raise PostprocessError(f"background must be a BGR image or a (b, g, r) colour, got {background!r}") from None
            if len(colour) != 3:
                raise PostprocessError(f"background colour needs 3 values (b, g, r), got {background!r}")
            bg = np.empty_like(frame)
            bg[:] = colour
        return self._composite(frame, bg, clip_above, zero_below)

    def cutout(self, frame: np.ndarray | None = None, clip_above: float = 0.7, zero_below: float = 0.3) -> np.ndarray:
        """BGRA image: the frame with alpha = the soft foreground mask (save as PNG)."""
        frame = self._frame(frame)
        alpha = np.clip(self.foreground(clip_above, zero_below) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        b, g, r = cv2.split(frame)
        return cv2.merge([b, g, r, alpha])

    def __repr__(self) -> str:
        present = ", ".join(f"{k}:{v:.1%}" for k, v in self.areas().items())
        t = ", ".join(f"{k}={v:.1f}ms" for k, v in self.timings.items())
        return f"SegmentationResult(frame={self.frame_index}, size={self.size}, classes=[{present}], timings=[{t}])"


# -- the postprocessor ------------------------------------------------------------------------
class Postprocessor:
    """Network output -> SegmentationResult, with the options users set once per stream.

    smoothing: EMA strength over class probabilities between frames (0 off, 0.5..0.8 typical;
    higher is steadier but lags moving edges). keep / ignore: labels or indices to show / hide
    (hidden classes become `fill`). threshold: pixels whose top probability is below it become
    `fill`. fill: the class index given to hidden and unsure pixels (default: background, else 0).
    scores: also return per-class probabilities at frame size (costs C upsampled planes).
    """

    def __init__(self, labels: Sequence[str], palette: Sequence[Sequence[int]], preprocess: Preprocess,
                 output_kind: str = "logits", smoothing: float = 0.0, keep=None, ignore=None,
                 threshold: float | None = None, scores: bool = False, fill: int | None = None):
        self.labels = list(labels)
        self.palette = [list(map(int, c)) for c in palette]
        self.preprocess = preprocess
        if output_kind not in ("logits", "probs", "mask"):
            raise PostprocessError(f"output kind must be logits, probs or mask, got {output_kind!r}")
        self.output_kind = output_kind
        if not 0.0 <= float(smoothing) < 1.0:
            raise PostprocessError(f"smoothing must be in 0..1 (0 off, e.g. 0.7 strong; 1 would freeze the mask), got {smoothing}")
        self.smoothing = float(smoothing)
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise PostprocessError(f"threshold is a probability in 0..1, got {threshold}")
        self.threshold = None if threshold is None else float(threshold)
        self.want_scores = bool(scores)
        self.background = background_index(self.labels)
        keep_set = _resolve_classes(keep, self.labels, "keep")
        ignore_set = _resolve_classes(ignore, self.labels, "ignore")
        hidden = set(ignore_set)
        if keep_set:
            hidden |= set(range(len(self.labels))) - keep_set
        if self.background is not None:
            hidden.discard(self.background)
        self.hidden = frozenset(hidden)
        default_fill = self.background if self.background is not None else 0
        self.fill = default_fill if fill is None else int(fill)
        if not 0 <= self.fill <= 255:
            raise PostprocessError(f"fill must be a class index 0..255, got {fill}")
        self._lut = np.arange(256, dtype=np.uint8)
        for c in self.hidden:
            self._lut[c] = self.fill
        self._upsamplers: dict = {}
        self._ema: np.ndarray | None = None
        self._ema_key = None

    @classmethod
    def from_manifest(cls, manifest, **options) -> "Postprocessor":
        return cls(manifest.labels, manifest.palette, manifest.preprocess, manifest.output_kind, **options)

    def reset(self) -> None:
        """Forget the smoothing state (call between unrelated clips)."""
        self._ema, self._ema_key = None, None

    def _upsampler(self, src_hw, dst_hw) -> Upsampler:
        key = (tuple(src_hw), tuple(dst_hw))
        up = self._upsamplers.get(key)
        if up is None:
            if len(self._upsamplers) > 8:  # frame sizes rarely change; keep the cache bounded
                self._upsamplers.clear()
            up = self._upsamplers[key] = Upsampler(*key)
        return up

    def _as_chw(self, output: np.ndarray) -> np.ndarray:
        """(1, C, h, w) / (C, h, w) / (1, h, w, C) -> (C, h, w) float32."""
        C = len(self.labels)
        a = np.asarray(output)
        if a.ndim == 4:
            if a.shape[0] != 1:
                raise PostprocessError(f"expected a batch of one, got output shape {a.shape}")
            a = a[0]
        if a.ndim != 3:
            raise PostprocessError(f"expected a (1, C, H, W) {self.output_kind} output, got shape {np.shape(output)}")
        if a.shape[0] != C and a.shape[-1] == C:
            a = a.transpose(2, 0, 1)
        if a.shape[0] != C:
            raise PostprocessError(f"output has shape {np.shape(output)} but the bundle has {C} labels; the manifest does not match the model")
        return a if a.dtype == np.float32 else a.astype(np.float32)

    def _as_mask(self, output: np.ndarray) -> np.ndarray:
        a = np.asarray(output)
        while a.ndim > 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 2:
            raise PostprocessError(f"expected a (1, H, W) mask output, got shape {np.shape(output)}")
        return a

    def _model_hw(self, shape) -> tuple[int, int]:
        return tuple(shape[-2:])

    def _box(self, map_hw, frame_hw):
        """The letterbox placement in a map of size map_hw (the network output may be smaller
        than its input, e.g. stride-8 heads): Preprocess.letterbox scaled to the map."""
        box = self.preprocess.letterbox(frame_hw)
        H, W = self.preprocess.size
        h, w = map_hw
        if (h, w) == (H, W):
            return box.top, box.left, box.height, box.width
        top, left = int(round(box.top * h / H)), int(round(box.left * w / W))
        bh = max(1, min(h - top, int(round(box.height * h / H))))
        bw = max(1, min(w - left, int(round(box.width * w / W))))
        return top, left, bh, bw

    def unletterbox(self, array: np.ndarray, frame_hw, interpolation=cv2.INTER_LINEAR) -> np.ndarray:
        """A model-resolution map (h, w[, C]) at frame size, letterbox padding removed."""
        if tuple(array.shape[:2]) == self.preprocess.size:
            return unletterbox(array, self.preprocess, frame_hw, interpolation=interpolation)
        top, left, bh, bw = self._box(array.shape[:2], frame_hw)
        crop = array[top : top + bh, left : left + bw]
        return cv2.resize(crop, (frame_hw[1], frame_hw[0]), interpolation=interpolation)

    def __call__(self, output: np.ndarray, frame_hw: tuple[int, int], frame: np.ndarray | None = None,
                 frame_index: int = 0, timestamp: float | None = None) -> SegmentationResult:
        t0 = time.perf_counter()
        frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        C = len(self.labels)
        probs = logits = mask = None  # model-resolution maps
        if self.output_kind == "mask":
            mask = self._as_mask(output)
            if self.smoothing or self.want_scores or self.threshold is not None:
                # one-hot "probabilities": smoothing a mask output becomes a per-pixel vote
                probs = np.zeros((C, *mask.shape), np.float32)
                np.put_along_axis(probs, np.clip(mask, 0, C - 1).astype(np.intp)[None], 1.0, axis=0)
        else:
            chw = self._as_chw(output)
            if self.output_kind == "probs":
                probs = chw
            elif self.smoothing or self.want_scores or self.threshold is not None:
                probs = softmax(chw)
            else:
                logits = chw  # argmax of logits == argmax of probabilities: skip the softmax

        if self.smoothing and probs is not None:
            key = (probs.shape, frame_hw)
            if self._ema is None or self._ema_key != key:
                self._ema, self._ema_key = probs.copy(), key
            else:
                # ema <- s * ema + (1 - s) * p, in place (no per-frame allocation)
                self._ema *= self.smoothing
                self._ema += (1.0 - self.smoothing) * probs
            probs = self._ema.copy()

        decision = probs if probs is not None else logits
        if decision is None:  # mask output without smoothing: nearest, a mask cannot be interpolated
            class_map = np.ascontiguousarray(self.unletterbox(mask.astype(np.uint8), frame_hw, cv2.INTER_NEAREST))
        else:
            top, left, bh, bw = self._box(decision.shape[1:], frame_hw)
            crop = decision[:, top : top + bh, left : left + bw]
            class_map = self._upsampler(crop.shape[1:], frame_hw).argmax(crop)

        if self.threshold is not None:
            conf = self.unletterbox(probs.max(axis=0), frame_hw, cv2.INTER_LINEAR)
            class_map[conf < self.threshold] = self.fill
        if self.hidden:
            class_map = cv2.LUT(class_map, self._lut)

        scores = None
        if self.want_scores:
            up = self.unletterbox(np.ascontiguousarray(probs.transpose(1, 2, 0)), frame_hw, cv2.INTER_LINEAR)
            if up.ndim == 2:
                up = up[..., None]
            scores = np.ascontiguousarray(up.transpose(2, 0, 1))
            for c in self.hidden:
                scores[c] = 0.0

        result = SegmentationResult(
            class_map=class_map, labels=self.labels, palette=self.palette, scores=scores, frame=frame,
            frame_index=frame_index, timestamp=timestamp, background=self.background, hidden=self.hidden,
            _lowres=probs if probs is not None else logits, _lowres_is_logits=probs is None,
            _postprocessor=self,
        )
        result.timings["postprocess"] = (time.perf_counter() - t0) * 1000.0
        return result


__all__ = [
    "SegmentationResult", "Postprocessor", "PostprocessError", "Upsampler", "bilinear_axis", "channel_argmax", "softmax",
    "colorize", "palette_lut", "shown_lut", "clip_mask", "background_index", "OVERLAY_MODES",
]
