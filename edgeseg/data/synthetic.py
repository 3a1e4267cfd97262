"""Synthetic scenes with exact masks: textured objects of several classes moving over textured
backgrounds. Trains the embedded default model, feeds `synthetic://` sources, and gives labelled
held-out data for accuracy checks. NumPy + OpenCV only (the runtime uses it without torch).

Each class has its own shape and a hue band (varied in saturation, brightness and texture);
backgrounds are low-saturation textures, so the classes are learnable by a small network in
minutes yet need shape and colour both near boundaries and under occlusion.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LABELS = ["background", "ball", "box", "triangle", "star"]
# RGB overlay colours per class, each far in hue from its objects so overlays stand out
PALETTE = [[0, 0, 0], [0, 220, 255], [255, 220, 0], [255, 0, 160], [60, 255, 60]]
# OpenCV hue bands (0..180) per object class
_HUES = {1: (0, 14), 2: (100, 124), 3: (45, 75), 4: (140, 166)}


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    small = rng.random((max(2, h // cells), max(2, w // cells))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A brightness modulation in roughly 0.6..1.2: flat, stripes, checker or blotches."""
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        t = np.ones((h, w), np.float32)
    elif kind == 1:
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        t = 0.5 + 0.5 * np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period)
    elif kind == 2:
        c = int(rng.integers(5, 20))
        t = (((xx // c) + (yy // c)) % 2).astype(np.float32)
    else:
        t = _smooth_noise(rng, h, w, int(rng.integers(6, 30)))
    return 0.65 + rng.uniform(0.2, 0.5) * t


def _hsv_fill(rng, h, w, hue_band, sat, val) -> np.ndarray:
    hue = rng.uniform(*hue_band)
    hsv = np.empty((h, w, 3), np.float32)
    hsv[..., 0] = hue
    hsv[..., 1] = sat * 255
    hsv[..., 2] = np.clip(val * 255 * _texture(rng, h, w), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A low-saturation textured background with a lighting gradient."""
    img = _hsv_fill(rng, h, w, (0, 180), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.85)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    grad = (xx * np.cos(a) + yy * np.sin(a)) / max(h, w)
    img *= (1.0 + rng.uniform(-0.25, 0.25) * grad)[..., None]
    # a few grey shapes so "has edges" never means "is an object"
    for _ in range(rng.integers(0, 4)):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        g = float(rng.uniform(40, 220))
        cv2.circle(img, c, int(rng.integers(5, max(6, min(h, w) // 6))), (g, g, g), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(cls: int, cx: float, cy: float, r: float, angle: float, aspect: float) -> list[np.ndarray]:
    """Outline(s) of one object; a ring would need a hole, so shapes are convex or star-shaped."""
    if cls == 1:  # ball: circle (slightly elliptical)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([r * np.cos(t), r * aspect * np.sin(t)], 1)
    elif cls == 2:  # box: rotated rectangle
        pts = np.array([[-r, -r * aspect], [r, -r * aspect], [r, r * aspect], [-r, r * aspect]], np.float64)
    elif cls == 3:  # triangle
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
        pts = np.stack([r * np.cos(t), r * np.sin(t) * aspect], 1)
    else:  # star, five points
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) + [cx, cy]
    return [np.round(pts * 16).astype(np.int32)]  # 4 fractional bits: sub-pixel motion


@dataclass
class SceneObject:
    cls: int
    x: float
    y: float
    r: float
    angle: float
    aspect: float
    vx: float
    vy: float
    spin: float
    patch: np.ndarray  # BGR texture covering the object's bounding square

    def raster(self, h: int, w: int) -> tuple[int, int, np.ndarray] | None:
        """(x0, y0, inside): the object's pixels as a bool array over its bounding box at (x0, y0)
        in an h x w frame (None when it lies outside). Only the box is rasterised: frame-sized
        work per object is slow."""
        poly = _polygon(self.cls, self.x, self.y, self.r, self.angle, self.aspect)[0]
        x0, y0 = np.maximum(poly.min(0) // 16 - 1, 0)
        x1, y1 = np.minimum(poly.max(0) // 16 + 2, [w, h])
        if x1 <= x0 or y1 <= y0:
            return None
        roi = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(roi, [poly - np.array([x0, y0], np.int32) * 16], 1, lineType=cv2.LINE_8, shift=4)
        return int(x0), int(y0), roi.astype(bool)

    def draw(self, img: np.ndarray, mask: np.ndarray) -> tuple[int, int, np.ndarray] | None:
        """Paint the object into `img` and its class into `mask`; returns `raster`'s result."""
        r = self.raster(*mask.shape)
        if r is None:
            return None
        x0, y0, inside = r
        y1, x1 = y0 + inside.shape[0], x0 + inside.shape[1]
        ph, pw = self.patch.shape[:2]
        # texture moves with the object
        rows = (np.arange(y0, y1) - int(self.y) + ph // 2) % ph
        cols = (np.arange(x0, x1) - int(self.x) + pw // 2) % pw
        np.copyto(img[y0:y1, x0:x1], self.patch[rows[:, None], cols[None, :]], where=inside[..., None])
        np.copyto(mask[y0:y1, x0:x1], np.uint8(self.cls), where=inside)
        return r

    def step(self, h: int, w: int) -> None:
        self.x += self.vx
        self.y += self.vy
        self.angle += self.spin
        if not (self.r <= self.x <= w - self.r):
            self.vx = -self.vx
        if not (self.r <= self.y <= h - self.r):
            self.vy = -self.vy


class SyntheticScenes:
    """Deterministic labelled scenes: `scenes[i] -> (bgr uint8 HxWx3, mask uint8 HxW)`.

    `split` offsets the seed so train / val / test never share a scene.
    """

    labels = LABELS
    palette = PALETTE
    _SPLITS = {"train": 0, "val": 1_000_003, "test": 2_000_029}

    def __init__(self, size=(256, 256), length: int = 1000, seed: int = 0, split: str = "train", max_objects: int = 5):
        if split not in self._SPLITS:
            raise ValueError(f"split must be one of {sorted(self._SPLITS)}, got {split!r}")
        self.size, self.length, self.max_objects = tuple(size), int(length), max_objects
        self.seed = seed + self._SPLITS[split]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        h, w = self.size
        img, mask = background(rng, h, w), np.zeros((h, w), np.uint8)
        for obj in random_objects(rng, h, w, int(rng.integers(1, self.max_objects + 1))):
            obj.draw(img, mask)
        return add_sensor_noise(rng, img), mask


def _patch(rng: np.random.Generator, cls: int, r: float) -> np.ndarray:
    size = int(2 * r + 4)
    return _hsv_fill(rng, size, size, _HUES[cls], rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))


def random_objects(rng: np.random.Generator, h: int, w: int, n: int, speed: float = 0.0) -> list[SceneObject]:
    objs = []
    scale = min(h, w)
    for _ in range(n):
        cls = int(rng.integers(1, len(LABELS)))
        r = float(rng.uniform(0.06, 0.2) * scale)
        patch = _patch(rng, cls, r)
        objs.append(SceneObject(
            cls, float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r)), r, float(rng.uniform(0, 2 * np.pi)),
            float(rng.uniform(0.6, 1.0)), float(rng.normal(0, speed)), float(rng.normal(0, speed)),
            float(rng.normal(0, 0.02 if speed else 0)), patch,
        ))
    return objs


class SyntheticInstances:
    """Labelled scenes for instance segmentation: `ds[i] -> (bgr uint8 HxWx3, InstanceAnnotations)`.

    A scene holds 1..max_objects objects of one or two classes, so several objects share a class,
    and most are placed against another one: touching, or overlapping it by up to half. Each
    annotation is the object's visible pixels, exact (drawn by the same rasteriser as the image);
    an object left with less than `min_visible` of its area is removed from the scene, image
    included, since no annotator could outline it. `labels` are the object classes (no
    background); class id c is `SyntheticScenes` class c + 1. `split` offsets the seed as there.
    """

    labels = LABELS[1:]
    palette = PALETTE[1:]
    has_splits = True

    def __init__(self, size=(256, 256), length: int = 1000, seed: int = 0, split: str = "train", max_objects: int = 6,
                 min_visible: float = 0.4):
        if split not in SyntheticScenes._SPLITS:
            raise ValueError(f"split must be one of {sorted(SyntheticScenes._SPLITS)}, got {split!r}")
        self.size, self.length, self.max_objects = tuple(size), int(length), int(max_objects)
        self.min_visible = float(min_visible)
        self.seed = seed + SyntheticScenes._SPLITS[split]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        img, ann, _ = self.scene(i)
        return img, ann

    def scene(self, i: int):
        """(image, InstanceAnnotations, the class mask drawn with the image: 0 background, c + 1)."""
        from edgeseg.data.instances import InstanceAnnotations

        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i, 1])  # a stream of its own: not the semantic scene i
        h, w = self.size
        img, mask = background(rng, h, w), np.zeros((h, w), np.uint8)
        objs = clustered_objects(rng, h, w, int(rng.integers(1, self.max_objects + 1)))
        objs, masks = visible_masks(objs, h, w, self.min_visible)
        for o in objs:
            o.draw(img, mask)
        ann = InstanceAnnotations(masks, [o.cls - 1 for o in objs], image_size=(h, w))
        return add_sensor_noise(rng, img), ann, mask


def clustered_objects(rng: np.random.Generator, h: int, w: int, n: int) -> list[SceneObject]:
    """n objects of one or two classes; after the first, most are placed against an earlier one
    (centre distance 0.5..1.0 of the two radii: overlapping by half up to just touching)."""
    scale = min(h, w)
    classes = rng.choice(np.arange(1, len(LABELS)), size=int(rng.integers(1, 3)), replace=False)
    objs: list[SceneObject] = []
    for _ in range(n):
        cls = int(rng.choice(classes))
        r = float(rng.uniform(0.07, 0.17) * scale)
        patch = _patch(rng, cls, r)
        if objs and rng.random() < 0.7:
            o = objs[int(rng.integers(len(objs)))]
            a, d = rng.uniform(0, 2 * np.pi), (o.r + r) * rng.uniform(0.5, 1.0)
            x, y = float(np.clip(o.x + d * np.cos(a), r, w - r)), float(np.clip(o.y + d * np.sin(a), r, h - r))
        else:
            x, y = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        objs.append(SceneObject(cls, x, y, r, float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.6, 1.0)),
                                0.0, 0.0, 0.0, patch))
    return objs


def visible_masks(objs: list[SceneObject], h: int, w: int, min_visible: float = 0.4, min_pixels: int = 24):
    """The objects that stay visible when drawn in order, and their visible pixels (N, h, w) bool.

    Objects showing less than `min_visible` of their area (or fewer than `min_pixels`) are dropped
    and the rest recomputed, since removing an occluder uncovers what lies below it."""
    full = np.zeros((len(objs), h, w), bool)
    for k, o in enumerate(objs):
        r = o.raster(h, w)
        if r is not None:
            x0, y0, inside = r
            full[k, y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]] = inside
    keep = list(range(len(objs)))
    while True:
        covered = np.zeros((h, w), bool)
        visible = {}
        for k in reversed(keep):  # the last drawn is on top
            visible[k] = full[k] & ~covered
            covered |= full[k]
        areas = {k: int(full[k].sum()) for k in keep}
        drop = [k for k in keep if visible[k].sum() < max(min_pixels, min_visible * areas[k])]
        if not drop:
            break
        keep = [k for k in keep if k not in drop]
    return [objs[k] for k in keep], np.stack([visible[k] for k in keep]) if keep else np.zeros((0, h, w), bool)


def add_sensor_noise(rng: np.random.Generator, img: np.ndarray, sigma: float | None = None) -> np.ndarray:
    sigma = rng.uniform(0, 6) if sigma is None else sigma
    if sigma <= 0:
        return img
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


class SyntheticClip:
    """A video of moving objects: iterate for (frame, mask); `static=True` freezes the objects
    (only sensor noise changes), which is how flicker is measured."""

    def __init__(self, size=(360, 640), frames: int | None = 300, seed: int = 7, objects: int = 5,
                 speed: float = 2.5, static: bool = False, noise: float = 3.0):
        self.size, self.frames, self.seed = tuple(size), frames, seed
        self.objects, self.speed, self.static, self.noise = objects, speed, static, noise

    def __len__(self) -> int:
        if self.frames is None:
            raise TypeError("an endless synthetic clip has no length")
        return self.frames

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        h, w = self.size
        bg = background(rng, h, w)
        objs = random_objects(rng, h, w, self.objects, speed=0.0 if self.static else self.speed * min(h, w) / 256)
        # a bank of sensor-noise frames drawn in turn at random: per-frame Gaussian noise at 720p
        # costs more than the network it feeds
        bank = [np.rint(rng.standard_normal((h, w, 3), dtype=np.float32) * self.noise).astype(np.int16)
                for _ in range(16 if self.noise > 0 else 0)]
        i = 0
        while self.frames is None or i < self.frames:
            img, mask = bg.copy(), np.zeros((h, w), np.uint8)
            for o in objs:
                o.draw(img, mask)
                if not self.static:
                    o.step(h, w)
            if bank:
                img = cv2.add(img, bank[int(rng.integers(len(bank)))], dtype=cv2.CV_8U)
            yield img, mask
            i += 1
