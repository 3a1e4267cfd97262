"""PASCAL VOC 2012 segmentation (Everingham et al.).

Layout (the official tarball, `VOCdevkit/VOC2012`):

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette PNGs: pixel value = class id, 255 = boundary/ignore
    ImageSets/Segmentation/<split>.txt  one <id> per line (train, val, trainval)

`mask_dir="SegmentationClassAug"` reads the augmented (SBD) single-channel masks instead, with
the split file of your choice (e.g. `split="train_aug"`, as ImageSets/Segmentation/train_aug.txt).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeseg.bundle import default_palette
from edgeseg.data.base import DatasetError, SegmentationDataset, colors_to_ids, read_mask_raw, require_dir

LABELS = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def voc_colormap(n: int = 256) -> list[list[int]]:
    """The VOC palette: the bits of the class id spread over the high bits of R, G and B (the
    bundle's default palette is this same table)."""
    return default_palette(n)


_CMAP = voc_colormap()
PALETTE = _CMAP[: len(LABELS)]
IGNORE_COLOR = _CMAP[255]  # (224, 224, 192): object boundaries and difficult regions


def read_palette_indices(path: Path) -> np.ndarray | None:
    """The index plane of a palette PNG (PIL reads it; OpenCV expands palettes to colour).
    None when PIL is missing or the file is not a palette image."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with Image.open(path) as im:
            if im.mode != "P":
                return None
            return np.array(im, dtype=np.uint8)
    except Exception:
        return None  # the OpenCV path reports the error with the file name


class VOCSegmentation(SegmentationDataset):
    labels = LABELS
    palette = PALETTE

    def __init__(self, root: str | Path, split: str = "train", mask_dir: str = "SegmentationClass"):
        super().__init__()
        self.root, self.split = Path(root), split
        hint = "point at VOCdevkit/VOC2012 (with JPEGImages, SegmentationClass and ImageSets/Segmentation)"
        images = require_dir(self.root / "JPEGImages", "VOC JPEGImages folder", hint)
        masks = require_dir(self.root / mask_dir, f"VOC {mask_dir} folder", hint)
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            have = sorted(p.stem for p in split_file.parent.glob("*.txt")) if split_file.parent.is_dir() else []
            raise DatasetError(f"VOC split file not found: {split_file}; splits here: {', '.join(have) or 'none'}")
        ids = [line.strip().split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(f"VOC split file {split_file} lists no images")
        self.samples = [(images / f"{i}.jpg", masks / f"{i}.png") for i in ids]

    def load_mask(self, path: Path) -> np.ndarray:
        m = read_mask_raw(path)  # raises, naming the file, when missing or corrupt
        if m.ndim == 2:
            return m
        idx = read_palette_indices(path)
        if idx is not None:
            return idx
        return colors_to_ids(m, PALETTE, path, ignore_colors=[IGNORE_COLOR])
