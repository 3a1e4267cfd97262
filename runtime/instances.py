"""Instance segmentation results as data: one row per object, drawing left to `runtime.annotators`.

    r = segmenter.segment(frame)             # an instance bundle gives an InstanceResult
    r.xyxy, r.confidence, r.class_id         # (N, 4) frame pixels, (N,), (N,): every array starts with N
    r = r[r.confidence > 0.5]                # rows select like NumPy arrays: a new result
    r.mask(0), r.masks(), r.class_map()      # pasted at frame size only when asked for
    r.polygons(0), r.areas, r.names          # outlines (cv2.findContours), pixel counts, label per row
    r.overlay()                              # one colour per instance (per track when tracked), captions

Each object's mask is kept as a bool crop of the frame covering its box (`mask_crops[i]` at
`mask_rects[i]` = x0, y0, x1, y1 in frame pixels), so what a result costs follows the objects'
area, not the frame's. `tracker_id` is set by `runtime.tracking.IoUTracker` (None untracked).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import cv2
import numpy as np

from edgeseg.errors import EdgesegError


class InstanceError(EdgesegError, ValueError):
    """An instance result or option that cannot be used."""


@dataclass(eq=False)
class InstanceResult:
    xyxy: np.ndarray  # (N, 4) float32 boxes at frame size, x2/y2 exclusive
    confidence: np.ndarray  # (N,) float32
    class_id: np.ndarray  # (N,) int64, index into labels
    mask_rects: np.ndarray  # (N, 4) int32: where each crop lies in the frame (x0, y0, x1, y1)
    mask_crops: list  # N bool arrays, mask_crops[i].shape == (y1 - y0, x1 - x0)
    frame_size: tuple[int, int]  # (H, W)
    labels: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)  # RGB per class
    tracker_id: np.ndarray | None = None  # (N,) int64
    frame: np.ndarray | None = field(default=None, repr=False)
    frame_index: int = 0
    timestamp: float | None = None
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.mask_crops)
        self.xyxy = np.asarray(self.xyxy, np.float32).reshape(-1, 4)
        self.confidence = np.asarray(self.confidence, np.float32).reshape(-1)
        self.class_id = np.asarray(self.class_id, np.int64).reshape(-1)
        self.mask_rects = np.asarray(self.mask_rects, np.int32).reshape(-1, 4)
        if self.tracker_id is not None:
            self.tracker_id = np.asarray(self.tracker_id, np.int64).reshape(-1)
        for name in ("xyxy", "confidence", "class_id", "mask_rects") + (("tracker_id",) if self.tracker_id is not None else ()):
            if len(getattr(self, name)) != n:
                raise InstanceError(f"InstanceResult.{name} has {len(getattr(self, name))} rows for {n} masks")
        self.frame_size = (int(self.frame_size[0]), int(self.frame_size[1]))

    @classmethod
    def empty(cls, frame_size, **kw) -> "InstanceResult":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                   np.zeros((0, 4), np.int32), [], frame_size, **kw)

    # -- rows -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.mask_crops)

    def __getitem__(self, index) -> "InstanceResult":
        """Rows by int, slice, int array or bool array (`r[r.class_id == 2]`): a new result."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        rows = np.arange(len(self))[index]
        return replace(self, xyxy=self.xyxy[rows], confidence=self.confidence[rows], class_id=self.class_id[rows],
                       mask_rects=self.mask_rects[rows], mask_crops=[self.mask_crops[i] for i in rows],
                       tracker_id=None if self.tracker_id is None else self.tracker_id[rows], timings=dict(self.timings))

    @property
    def size(self) -> tuple[int, int]:
        return self.frame_size

    @property
    def names(self) -> list[str]:
        """The label of each row (class_<id> where the bundle has no name for it)."""
        return [self.labels[c] if 0 <= c < len(self.labels) else f"class_{c}" for c in self.class_id.tolist()]

    @property
    def areas(self) -> np.ndarray:
        """(N,) mask pixel counts."""
        return np.array([int(np.count_nonzero(m)) for m in self.mask_crops], np.int64)

    # -- masks at frame size, on demand -----------------------------------------------------
    def mask(self, i: int) -> np.ndarray:
        """Object i's mask at frame size (HxW bool)."""
        out = np.zeros(self.frame_size, bool)
        x0, y0, x1, y1 = self.mask_rects[i]
        out[y0:y1, x0:x1] = self.mask_crops[i]
        return out

    def masks(self) -> np.ndarray:
        """Every mask at frame size, (N, H, W) bool."""
        out = np.zeros((len(self), *self.frame_size), bool)
        for i, (x0, y0, x1, y1) in enumerate(self.mask_rects):
            out[i, y0:y1, x0:x1] = self.mask_crops[i]
        return out

    def class_map(self) -> np.ndarray:
        """HxW uint8: 0 background, class c at c + 1 (the semantic layout); where masks overlap,
        the more confident object wins."""
        if len(self.labels) > 254 or (len(self) and self.class_id.max() > 253):
            raise InstanceError("more than 254 classes do not fit a uint8 class map")
        out = np.zeros(self.frame_size, np.uint8)
        for i in np.argsort(self.confidence, kind="stable"):
            x0, y0, x1, y1 = self.mask_rects[i]
            out[y0:y1, x0:x1][self.mask_crops[i]] = self.class_id[i] + 1
        return out

    def polygons(self, i: int, approx: bool = True) -> list[np.ndarray]:
        """Outer outlines of object i as (K, 2) int32 frame coordinates (several when the mask is
        split, e.g. by an occluder)."""
        x0, y0 = int(self.mask_rects[i][0]), int(self.mask_rects[i][1])
        crop = self.mask_crops[i]
        if not crop.size:
            return []
        mode = cv2.CHAIN_APPROX_SIMPLE if approx else cv2.CHAIN_APPROX_NONE
        contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, mode, offset=(x0, y0))
        return [c.reshape(-1, 2) for c in contours]

    # -- drawing (runtime.annotators does it) -----------------------------------------------
    def overlay(self, frame: np.ndarray | None = None, alpha: float = 0.5, captions: bool = True,
                boxes: bool = False, outline: int = 1) -> np.ndarray:
        """A copy of the frame with every object's mask blended in its own colour (its track's when
        tracked), an outline and a caption (label, score, #track)."""
        from runtime.annotators import BoxAnnotator, LabelAnnotator, MaskAnnotator
        from runtime.postprocess import drawing_frame

        scene = drawing_frame(self.frame, frame, self.frame_size).copy()
        MaskAnnotator(opacity=alpha, outline=outline).annotate(scene, self)
        if boxes:
            BoxAnnotator().annotate(scene, self)
        if captions:
            LabelAnnotator().annotate(scene, self)
        return scene

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for n in self.names:
            counts[n] = counts.get(n, 0) + 1
        objs = ", ".join(f"{k}:{v}" for k, v in counts.items())
        t = ", ".join(f"{k}={v:.1f}ms" for k, v in self.timings.items())
        return f"InstanceResult(frame={self.frame_index}, size={self.frame_size}, objects={len(self)} [{objs}], timings=[{t}])"


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def mask_iou(a: InstanceResult, i: int, b: InstanceResult, j: int) -> float:
    """IoU of two objects' masks, computed over the union of their rects only."""
    ra, rb = a.mask_rects[i], b.mask_rects[j]
    x0, y0 = min(ra[0], rb[0]), min(ra[1], rb[1])
    x1, y1 = max(ra[2], rb[2]), max(ra[3], rb[3])
    ma, mb = np.zeros((y1 - y0, x1 - x0), bool), np.zeros((y1 - y0, x1 - x0), bool)
    ma[ra[1] - y0 : ra[3] - y0, ra[0] - x0 : ra[2] - x0] = a.mask_crops[i]
    mb[rb[1] - y0 : rb[3] - y0, rb[0] - x0 : rb[2] - x0] = b.mask_crops[j]
    union = np.count_nonzero(ma | mb)
    return float(np.count_nonzero(ma & mb) / union) if union else 1.0


def match(a: InstanceResult, b: InstanceResult, iou: float = 0.5) -> list[tuple[int, int]]:
    """Pairs (i, j) of same-class objects with box IoU >= iou, matched one to one (Hungarian)."""
    if not len(a) or not len(b):
        return []
    from scipy.optimize import linear_sum_assignment

    cost = 1.0 - box_iou(a.xyxy, b.xyxy)
    cost[a.class_id[:, None] != b.class_id[None, :]] = 2.0
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if cost[r, c] <= 1.0 - iou]


__all__ = ["InstanceResult", "InstanceError", "box_iou", "mask_iou", "match"]
