"""Drawing instance results: each annotator keeps its settings and draws with `annotate(scene, result)`.

    scene = frame.copy()
    MaskAnnotator(opacity=0.5).annotate(scene, result)    # masks blended, one colour per instance
    BoxAnnotator().annotate(scene, result)
    LabelAnnotator().annotate(scene, result)              # "ball 0.93 #4"

Colours follow the track (`tracker_id`) when the result is tracked, so an object keeps its colour
from frame to frame, else the row. Every annotator draws inside the objects' rects only: the
cost follows the objects' area, not the frame's. `scene` is drawn on in place and returned.
"""
from __future__ import annotations

import cv2
import numpy as np

# BGR, distinct in hue and far from the synthetic scenes' grey backgrounds
COLORS = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
          (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
          (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203),
          (200, 149, 255), (199, 55, 255)]


def instance_colors(result, palette=COLORS) -> list[tuple[int, int, int]]:
    """One BGR colour per row: by track id when tracked, else by row."""
    keys = result.tracker_id if result.tracker_id is not None else np.arange(len(result))
    return [tuple(int(v) for v in palette[int(k) % len(palette)]) for k in keys]


def _order_large_first(result) -> np.ndarray:
    return np.argsort(-result.areas, kind="stable")  # small objects drawn last stay visible


class MaskAnnotator:
    """Masks blended into the scene with `opacity`, outlined `outline` px (0: none)."""

    def __init__(self, opacity: float = 0.5, outline: int = 1, palette=COLORS):
        if not 0.0 <= float(opacity) <= 1.0:
            from runtime.instances import InstanceError

            raise InstanceError(f"opacity must be in 0..1, got {opacity}")
        self.opacity, self.outline, self.palette = float(opacity), int(outline), palette

    def annotate(self, scene: np.ndarray, result) -> np.ndarray:
        colors = instance_colors(result, self.palette)
        for i in _order_large_first(result):
            x0, y0, x1, y1 = (int(v) for v in result.mask_rects[i])
            crop = np.ascontiguousarray(result.mask_crops[i], bool).view(np.uint8)
            if not crop.any():
                continue
            roi = scene[y0:y1, x0:x1]
            solid = np.empty_like(roi)
            solid[:] = colors[i]
            blended = cv2.addWeighted(roi, 1.0 - self.opacity, solid, self.opacity, 0.0)
            cv2.copyTo(blended, crop, roi)
            if self.outline > 0:
                contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(roi, contours, -1, colors[i], self.outline, lineType=cv2.LINE_AA)
        return scene


class BoxAnnotator:
    """Boxes, `thickness` px, in each instance's colour."""

    def __init__(self, thickness: int = 2, palette=COLORS):
        self.thickness, self.palette = int(thickness), palette

    def annotate(self, scene: np.ndarray, result) -> np.ndarray:
        for (x0, y0, x1, y1), c in zip(np.round(result.xyxy).astype(int), instance_colors(result, self.palette)):
            cv2.rectangle(scene, (x0, y0), (x1 - 1, y1 - 1), c, self.thickness)
        return scene


class LabelAnnotator:
    """A caption per object at its box's top-left corner: label, score and #track when tracked."""

    def __init__(self, text_scale: float = 0.45, thickness: int = 1, padding: int = 3, palette=COLORS,
                 text_color=(255, 255, 255)):
        self.scale, self.thickness, self.padding = float(text_scale), int(thickness), int(padding)
        self.palette, self.text_color = palette, tuple(text_color)

    def captions(self, result) -> list[str]:
        tids = result.tracker_id.tolist() if result.tracker_id is not None else [None] * len(result)
        return [f"{n} {s:.2f}" + (f" #{t}" if t is not None else "")
                for n, s, t in zip(result.names, result.confidence.tolist(), tids)]

    def annotate(self, scene: np.ndarray, result) -> np.ndarray:
        H, W = scene.shape[:2]
        font, p = cv2.FONT_HERSHEY_SIMPLEX, self.padding
        for text, (x0, y0, _, _), c in zip(self.captions(result), np.round(result.xyxy).astype(int),
                                           instance_colors(result, self.palette)):
            (tw, th), base = cv2.getTextSize(text, font, self.scale, self.thickness)
            bw, bh = tw + 2 * p, th + base + 2 * p
            x = int(np.clip(x0, 0, max(0, W - bw)))
            y = y0 - bh if y0 - bh >= 0 else int(np.clip(y0, 0, max(0, H - bh)))  # above the box, else inside
            cv2.rectangle(scene, (x, y), (x + bw - 1, y + bh - 1), c, -1)
            cv2.putText(scene, text, (x + p, y + p + th), font, self.scale, self.text_color, self.thickness, cv2.LINE_AA)
        return scene


__all__ = ["MaskAnnotator", "BoxAnnotator", "LabelAnnotator", "instance_colors", "COLORS"]
