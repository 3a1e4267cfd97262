"""Ground truth of instance segmentation: one exact mask per object.

    img, ann = ds[i]                 # an instance reader: (BGR uint8 HxWx3, InstanceAnnotations)
    ann.masks                        # (N, H, W) bool, one per object (overlaps already resolved)
    ann.xyxy, ann.class_id           # (N, 4) float32 boxes (x2, y2 exclusive), (N,) int64
    ann[ann.class_id == 0]           # a new InstanceAnnotations with those rows

Class ids index the reader's `labels`, which name object classes only (no background), as COCO
categories and YOLO-seg models do. `semantic()` gives the class map of the same scene with 0 =
background and class c at c + 1, the layout of the semantic readers' masks.
NumPy only: the runtime and the metrics use this without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeseg.data.base import IGNORE_INDEX, DatasetError


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float32 xyxy of each mask's pixels (x2, y2 exclusive; zeros when empty)."""
    masks = np.asarray(masks, bool)
    out = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if rows.size:
            out[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return out


@dataclass(eq=False)
class InstanceAnnotations:
    """The objects of one image. Every array starts with N, one row per object."""

    masks: np.ndarray  # (N, H, W) bool
    class_id: np.ndarray  # (N,) int64
    xyxy: np.ndarray | None = None  # (N, 4) float32; computed from the masks when None
    iscrowd: np.ndarray | None = None  # (N,) bool; crowd regions are matched but never counted as misses
    image_size: tuple[int, int] = field(default=(0, 0))  # (H, W), needed when N == 0

    def __post_init__(self):
        self.masks = np.asarray(self.masks, bool)
        if self.masks.ndim != 3:
            raise DatasetError(f"instance masks must be (N, H, W), got shape {self.masks.shape}")
        n = len(self.masks)
        if self.masks.shape[1] and self.masks.shape[2]:
            self.image_size = tuple(int(v) for v in self.masks.shape[1:])
        elif n == 0 and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise DatasetError("empty InstanceAnnotations need image_size=(H, W)")
        if n == 0 and self.masks.shape[1:] != tuple(self.image_size):
            self.masks = np.zeros((0, *self.image_size), bool)
        self.class_id = np.asarray(self.class_id, np.int64).reshape(-1)
        self.xyxy = boxes_from_masks(self.masks) if self.xyxy is None else np.asarray(self.xyxy, np.float32).reshape(-1, 4)
        self.iscrowd = np.zeros(n, bool) if self.iscrowd is None else np.asarray(self.iscrowd, bool).reshape(-1)
        for name in ("class_id", "xyxy", "iscrowd"):
            if len(getattr(self, name)) != n:
                raise DatasetError(f"InstanceAnnotations.{name} has {len(getattr(self, name))} rows for {n} masks")
        if n and self.class_id.min() < 0:
            raise DatasetError(f"class ids must be >= 0, got {self.class_id.min()}")

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index) -> "InstanceAnnotations":
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return InstanceAnnotations(self.masks[index], self.class_id[index], self.xyxy[index], self.iscrowd[index], self.image_size)

    @property
    def areas(self) -> np.ndarray:
        return self.masks.sum((1, 2))

    def semantic(self, ignore_crowd: bool = True) -> np.ndarray:
        """HxW uint8 class map: 0 background, class c -> c + 1, crowd regions 255 (or their class);
        where objects overlap the smaller one wins (painted last)."""
        out = np.zeros(self.image_size, np.uint8)
        for i in np.argsort(-self.areas, kind="stable"):
            out[self.masks[i]] = IGNORE_INDEX if ignore_crowd and self.iscrowd[i] else self.class_id[i] + 1
        return out


__all__ = ["InstanceAnnotations", "boxes_from_masks"]
