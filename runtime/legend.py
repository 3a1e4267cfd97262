"""A legend of the classes present in a frame, drawn onto the overlay (video, window, browser view).

    legend = Legend()                        # settings once per stream
    image = legend.annotate(result.overlay(), result)

Each class shown in the frame gets a swatch of its palette colour, its label and the share of the
frame's pixels it covers (`SegmentationResult.areas()`), largest first; background and hidden
classes are left out. OpenCV's Hershey fonts draw ASCII only, so other characters of a label
show as '?' (the browser view lists the exact labels).
"""
from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
MAX_LABEL = 24  # characters of a label drawn; longer ones end in '~'


def present_classes(result) -> list[tuple[int, str, tuple[int, int, int], float]]:
    """(index, label, RGB colour, pixel share) of each shown class in the frame, largest first;
    for an instance result (runtime.instances), the number of objects of each class instead."""
    if hasattr(result, "class_id"):
        ids, n = np.unique(result.class_id, return_counts=True)
        rows = [(int(i), str(result.labels[i]) if i < len(result.labels) else f"class_{i}",
                 tuple(int(v) for v in result.palette[i]) if i < len(result.palette) else (255, 255, 255), float(c))
                for i, c in zip(ids.tolist(), n.tolist())]
        return sorted(rows, key=lambda r: -r[3])
    counts = np.bincount(result.class_map.ravel(), minlength=result.num_classes)[: result.num_classes]
    total = max(1, result.class_map.size)
    skip = set(result.hidden) | ({result.background} if result.background is not None else set())
    rows = []
    for i in np.flatnonzero(counts):
        i = int(i)
        if i in skip:
            continue
        rgb = tuple(int(v) for v in result.palette[i]) if i < len(result.palette) else (255, 255, 255)
        rows.append((i, str(result.labels[i]), rgb, float(counts[i]) / total))
    return sorted(rows, key=lambda r: -r[3])


def _ascii(label: str) -> str:
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in label)
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "~"


class Legend:
    """Draws the legend in a corner of the image (`corner`: top-left, top-right, bottom-left,
    bottom-right), scaled to the image height, on a translucent dark box so it reads on any scene."""

    CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")

    def __init__(self, corner: str = "top-left", shares: bool = True, max_rows: int = 12):
        if corner not in self.CORNERS:
            raise ValueError(f"legend corner must be one of {self.CORNERS}, got {corner!r}")
        self.corner, self.shares, self.max_rows = corner, bool(shares), int(max_rows)

    def annotate(self, image: np.ndarray, result) -> np.ndarray:
        """Draw onto `image` (BGR, modified in place and returned)."""
        rows = present_classes(result)[: self.max_rows]
        if not rows:
            return image
        h, w = image.shape[:2]
        scale = max(0.4, min(1.2, h / 720.0 * 0.6))
        thick = 1 if scale < 0.8 else 2
        if hasattr(result, "class_id"):  # objects per class
            texts = [f"{_ascii(label)}  x{int(n)}" for _, label, _, n in rows]
        else:
            texts = [_ascii(label) + (f"  {100 * share:.1f}%" if self.shares else "") for _, label, _, share in rows]
        sizes = [cv2.getTextSize(t, FONT, scale, thick)[0] for t in texts]
        line = max(s[1] for s in sizes) + int(10 * scale) + 4
        swatch = line - 6
        pad = int(8 * scale) + 2
        box_w = min(w, pad * 3 + swatch + max(s[0] for s in sizes))
        box_h = min(h, pad * 2 + line * len(rows))
        x0 = pad if self.corner.endswith("left") else max(0, w - box_w - pad)
        y0 = pad if self.corner.startswith("top") else max(0, h - box_h - pad)
        x1, y1 = min(w, x0 + box_w), min(h, y0 + box_h)
        roi = image[y0:y1, x0:x1]
        roi[:] = (roi * 0.35).astype(np.uint8)  # translucent dark panel
        for k, ((_, _, rgb, _), text) in enumerate(zip(rows, texts)):
            top = y0 + pad + k * line
            bgr = (rgb[2], rgb[1], rgb[0])
            cv2.rectangle(image, (x0 + pad, top + 3), (x0 + pad + swatch, top + 3 + swatch), bgr, -1)
            cv2.rectangle(image, (x0 + pad, top + 3), (x0 + pad + swatch, top + 3 + swatch), (255, 255, 255), 1)
            baseline = top + 3 + swatch - max(1, int(3 * scale))
            cv2.putText(image, text, (x0 + 2 * pad + swatch, baseline), FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
        return image


__all__ = ["Legend", "present_classes"]
