"""Deterministic augmentation that keeps masks aligned with their images.

    aug = Augment(hflip=0.5, scale=(0.5, 2.0), crop=(256, 256), brightness=0.2, contrast=0.2, saturation=0.2)
    img2, mask2 = aug(img, mask, rng)                       # rng: np.random.Generator
    train = AugmentedDataset(reader, aug, seed=0)           # sample i of epoch e is fixed by (seed, e, i)

Geometry is applied identically to image and mask: bilinear for the image, nearest for the mask
(class ids are never blended; OpenCV's half-pixel-centred nearest, INTER_NEAREST_EXACT, so the
mask samples the same points as the bilinear image); padding fills the mask with the ignore index so padded pixels are
not scored. Colour changes touch the image only. Images may be uint8 (BGR, as readers return)
or float32 0..255 (as `Preprocess.resize_image` returns); the dtype is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgeseg.data.base import IGNORE_INDEX


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.5           # probability of a horizontal flip
    vflip: float = 0.0           # probability of a vertical flip
    scale: tuple[float, float] = (1.0, 1.0)  # random resize factor range
    crop: tuple[int, int] | None = None      # output (h, w); None keeps the input size after scaling
    brightness: float = 0.0      # factor in [1 - b, 1 + b]
    contrast: float = 0.0        # blend with the mean grey level, factor in [1 - c, 1 + c]
    saturation: float = 0.0      # blend with the per-pixel grey, factor in [1 - s, 1 + s]
    ignore_index: int = IGNORE_INDEX
    pad_value: float = 0.0

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got {self.scale}")
        for name in ("hflip", "vflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
        dtype = image.dtype
        img = image.astype(np.float32)
        h, w = mask.shape[:2]
        out_h, out_w = self.crop or (h, w)
        # the order of rng draws is fixed, so a seed reproduces the same sample whatever is enabled
        s = rng.uniform(*self.scale)
        flip_h, flip_v = rng.random() < self.hflip, rng.random() < self.vflip
        jitter = rng.uniform(-1, 1, 3) * (self.brightness, self.contrast, self.saturation)
        oy, ox = rng.random(), rng.random()
        if s != 1.0:
            nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
            h, w = nh, nw
        if (h, w) != (out_h, out_w):
            ph, pw = max(0, out_h - h), max(0, out_w - w)
            if ph or pw:
                img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(self.pad_value,) * 3)
                mask = cv2.copyMakeBorder(mask, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=self.ignore_index)
                h, w = mask.shape[:2]
            y0, x0 = int(oy * (h - out_h + 1)), int(ox * (w - out_w + 1))
            y0, x0 = min(y0, h - out_h), min(x0, w - out_w)
            img, mask = img[y0:y0 + out_h, x0:x0 + out_w], mask[y0:y0 + out_h, x0:x0 + out_w]
        if flip_h:
            img, mask = img[:, ::-1], mask[:, ::-1]
        if flip_v:
            img, mask = img[::-1], mask[::-1]
        b, c, sat = 1 + jitter
        if b != 1:
            img = img * b
        if c != 1:
            img = (img - img.mean()) * c + img.mean()
        if sat != 1:
            grey = img.mean(2, keepdims=True)
            img = (img - grey) * sat + grey
        img = np.clip(img, 0, 255)
        if dtype == np.uint8:
            img = np.rint(img).astype(np.uint8)
        else:
            img = img.astype(dtype)
        return np.ascontiguousarray(img), np.ascontiguousarray(mask)


class AugmentedDataset:
    """A reader seen through `augment`; sample i of epoch e always draws from rng(seed, e, i), so
    runs reproduce whatever the order or the number of loader workers."""

    def __init__(self, dataset, augment: Augment, seed: int = 0):
        self.dataset, self.augment, self.seed, self.epoch = dataset, augment, int(seed), 0
        self.labels = dataset.labels
        self.palette = getattr(dataset, "palette", None)
        self.ignore_index = getattr(dataset, "ignore_index", IGNORE_INDEX)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, mask = self.dataset[i]
        return self.augment(img, mask, np.random.default_rng([self.seed, self.epoch, int(i)]))
