"""Segmentation metrics on class maps (NumPy only: usable in the runtime, calibration and tests).

`ConfusionMatrix` accumulates over a dataset; every score derives from it, as in the Cityscapes
and PASCAL VOC benchmarks (IoU = TP / (TP + FP + FN) per class, mean over classes present).
"""
from __future__ import annotations

import cv2
import numpy as np


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction. Pixels labelled `ignore_index` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> "ConfusionMatrix":
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
        valid = np.ones(target.shape, bool) if self.ignore_index is None else target != self.ignore_index
        t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
        if t.size and (t.max() >= self.num_classes or t.min() < 0):
            raise ValueError(f"target has class {t.max()} outside 0..{self.num_classes - 1}")
        p = np.clip(p, 0, self.num_classes - 1)
        self.matrix += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(self.matrix.shape)
        return self

    def __iadd__(self, other: "ConfusionMatrix"):
        self.matrix += other.matrix
        return self

    @property
    def present(self) -> np.ndarray:
        """Classes that occur in the ground truth or the prediction."""
        return (self.matrix.sum(0) + self.matrix.sum(1)) > 0

    def iou(self) -> np.ndarray:
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    def dice(self) -> np.ndarray:
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * tp / denom, np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def mean_accuracy(self) -> float:
        rows = self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.nanmean(np.where(rows > 0, np.diag(self.matrix) / rows, np.nan)))

    def summary(self, labels: list[str] | None = None) -> dict:
        labels = labels or [str(i) for i in range(self.num_classes)]
        iou = self.iou()
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "mean_accuracy": self.mean_accuracy(),
            "per_class_iou": {labels[i]: (None if np.isnan(v) else float(v)) for i, v in enumerate(iou)},
        }


def miou(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = 255) -> float:
    return ConfusionMatrix(num_classes, ignore_index).update(pred, target).miou()


def mask_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels on which two class maps agree."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"class maps differ in shape: {a.shape} vs {b.shape}")
    return float(np.mean(a == b))


def _boundary(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    return (cv2.dilate(m, k) != cv2.erode(m, k))


def boundary_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 2) -> float:
    """Boundary F1 (Csurka et al., 2013): precision/recall of boundary pixels within `tolerance` px."""
    pb, tb = _boundary(pred), _boundary(target)
    if not pb.any() and not tb.any():
        return 1.0
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near_t = cv2.dilate(tb.astype(np.uint8), k).astype(bool)
    near_p = cv2.dilate(pb.astype(np.uint8), k).astype(bool)
    precision = (pb & near_t).sum() / max(pb.sum(), 1)
    recall = (tb & near_p).sum() / max(tb.sum(), 1)
    return float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0


def flicker(class_maps) -> float:
    """Share of pixels whose class changes between consecutive frames (mean over frame pairs)."""
    maps = list(class_maps)
    if len(maps) < 2:
        raise ValueError("flicker needs at least two frames")
    return float(np.mean([np.mean(a != b) for a, b in zip(maps[:-1], maps[1:])]))
