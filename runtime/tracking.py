"""Stable instance ids across video frames: a stage of its own after post-processing.

    tracker = IoUTracker(iou_threshold=0.3, max_age=30)
    for r in results:
        r = tracker.update(r)        # the same rows with tracker_id set
    tracker.reset()                  # between unrelated clips

Each frame, the tracks' boxes (moved on by their last velocity) are matched one to one to the new
detections of the same class by IoU, with the Hungarian method
(`scipy.optimize.linear_sum_assignment`); pairs below `iou_threshold` do not match. A matched
detection takes the track's id, an unmatched one starts a new track, and a track unmatched for
more than `max_age` frames is forgotten - so an object keeps its id (and its overlay colour)
through short misses and occlusions, and counting objects means counting ids.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from runtime.instances import InstanceError, InstanceResult, box_iou


class IoUTracker:
    def __init__(self, iou_threshold: float = 0.3, max_age: int = 30, class_aware: bool = True):
        if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) or not 0.0 < iou_threshold <= 1.0:
            raise InstanceError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
        if isinstance(max_age, bool) or not isinstance(max_age, (int, np.integer)) or max_age < 0:
            raise InstanceError(f"max_age must be a whole number of frames >= 0, got {max_age!r}")
        from scipy.optimize import linear_sum_assignment  # noqa: F401  (fail at construction, not mid-stream)

        self.iou_threshold, self.max_age, self.class_aware = float(iou_threshold), int(max_age), bool(class_aware)
        self.reset()

    def reset(self) -> None:
        """Forget every track; ids start again from 1."""
        self._boxes = np.zeros((0, 4), np.float64)  # where each track was last seen
        self._velocity = np.zeros((0, 4), np.float64)
        self._class = np.zeros(0, np.int64)
        self._ids = np.zeros(0, np.int64)
        self._missed = np.zeros(0, np.int64)
        self._next_id = 1

    @property
    def active(self) -> int:
        """Tracks alive now (seen within max_age frames)."""
        return len(self._ids)

    def update(self, result: InstanceResult) -> InstanceResult:
        """Match `result`'s rows to the tracks; returns the result with `tracker_id` set."""
        from scipy.optimize import linear_sum_assignment

        boxes = np.asarray(result.xyxy, np.float64)
        n = len(result)
        ids = np.zeros(n, np.int64)
        matched_det = np.zeros(n, bool)
        matched_track = np.zeros(len(self._ids), bool)
        if n and len(self._ids):
            predicted = self._boxes + self._velocity * (self._missed[:, None] + 1)
            iou = box_iou(predicted, boxes)
            if self.class_aware:
                iou[self._class[:, None] != result.class_id[None, :]] = 0.0
            rows, cols = linear_sum_assignment(-iou)
            good = iou[rows, cols] >= self.iou_threshold
            rows, cols = rows[good], cols[good]
            ids[cols] = self._ids[rows]
            # velocity: smoothed change of the box between sightings (per frame missed)
            step = (boxes[cols] - self._boxes[rows]) / (self._missed[rows, None] + 1)
            self._velocity[rows] = 0.5 * self._velocity[rows] + 0.5 * step
            self._boxes[rows] = boxes[cols]
            self._missed[rows] = 0
            matched_det[cols], matched_track[rows] = True, True
        # unmatched tracks age and expire (their last box stays, the prediction moves on)
        self._missed[~matched_track] += 1
        alive = self._missed <= self.max_age
        self._boxes, self._velocity = self._boxes[alive], self._velocity[alive]
        self._class, self._ids, self._missed = self._class[alive], self._ids[alive], self._missed[alive]
        # unmatched detections start tracks
        new = np.flatnonzero(~matched_det)
        if new.size:
            new_ids = np.arange(self._next_id, self._next_id + new.size, dtype=np.int64)
            self._next_id += new.size
            ids[new] = new_ids
            self._boxes = np.concatenate([self._boxes, boxes[new]])
            self._velocity = np.concatenate([self._velocity, np.zeros((new.size, 4))])
            self._class = np.concatenate([self._class, result.class_id[new]])
            self._ids = np.concatenate([self._ids, new_ids])
            self._missed = np.concatenate([self._missed, np.zeros(new.size, np.int64)])
        return replace(result, tracker_id=ids)


__all__ = ["IoUTracker"]
