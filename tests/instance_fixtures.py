"""Outputs in the YOLO-seg layout built from known objects, so post-processing has an exact answer."""
from __future__ import annotations

import cv2
import numpy as np

from edgeseg.spec import Preprocess


def yolo_outputs(ann, pre: Preprocess, frame_hw, stride: int = 4, num_masks: int | None = None, num_classes: int = 4,
                 duplicates: bool = True, rng=None):
    """(predictions (1, 4+nc+nm, A), protos (1, nm, H/s, W/s)) whose decoding gives the objects of
    `ann` (InstanceAnnotations at frame size): prototype k is object k's mask as logits (+-8) at
    prototype resolution, object k's coefficients select it. With `duplicates`, each object also
    gets a shifted, lower-scored copy that NMS must remove, and background anchors score 0.01."""
    rng = rng or np.random.default_rng(0)
    H, W = pre.size
    lb = pre.letterbox(frame_hw)
    n = len(ann)
    nm = num_masks or max(n, 1)
    ph, pw = H // stride, W // stride
    protos = np.full((nm, ph, pw), -8.0, np.float32)
    rows = []
    for k in range(n):
        placed = np.zeros((H, W), np.float32)
        placed[lb.top:lb.top + lb.height, lb.left:lb.left + lb.width] = cv2.resize(
            ann.masks[k].astype(np.float32), (lb.width, lb.height), interpolation=cv2.INTER_LINEAR)
        small = cv2.resize(placed, (pw, ph), interpolation=cv2.INTER_AREA)
        protos[k] = 16.0 * (small - 0.5)
        x0, y0, x1, y1 = ann.xyxy[k]
        sx, sy = lb.width / frame_hw[1], lb.height / frame_hw[0]
        box = np.array([x0 * sx + lb.left, y0 * sy + lb.top, x1 * sx + lb.left, y1 * sy + lb.top])
        coef = np.zeros(nm, np.float32)
        coef[k] = 1.0
        score = 0.6 + 0.3 * rng.random()
        rows.append((box, int(ann.class_id[k]), score, coef))
        if duplicates:
            d = 0.05 * (box[2] - box[0])
            rows.append((box + d, int(ann.class_id[k]), score - 0.2, coef))
    for _ in range(20):  # background anchors below any sensible threshold
        c = rng.uniform(0, [W, H])
        rows.append((np.r_[c - 8, c + 8], 0, 0.01, np.zeros(nm, np.float32)))
    A = len(rows)
    pred = np.zeros((4 + num_classes + nm, A), np.float32)
    for a, (box, c, s, coef) in enumerate(rows):
        pred[0:4, a] = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]]
        pred[4 + c, a] = s
        pred[4 + num_classes:, a] = coef
    return pred[None], protos[None]
