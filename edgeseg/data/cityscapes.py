"""Cityscapes fine annotations (Cordts et al., 2016), evaluated on the 19 training classes.

Layout (as downloaded: leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip):

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

labelIds (0..33) map to trainIds (0..18, 255 = ignore) with the official table of
cityscapesScripts (`labels.py`). Masks already converted to `*_gtFine_labelTrainIds.png` are read
with `target="trainIds"`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeseg.data.base import DatasetError, SegmentationDataset, check_mask, read_mask_raw, require_dir

# (name, id, trainId, RGB colour) from cityscapesScripts/helpers/labels.py
TABLE = [
    ("unlabeled", 0, 255, (0, 0, 0)), ("ego vehicle", 1, 255, (0, 0, 0)), ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)), ("static", 4, 255, (0, 0, 0)), ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)), ("road", 7, 0, (128, 64, 128)), ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)), ("rail track", 10, 255, (230, 150, 140)), ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)), ("fence", 13, 4, (190, 153, 153)), ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)), ("tunnel", 16, 255, (150, 120, 90)), ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)), ("traffic light", 19, 6, (250, 170, 30)), ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)), ("terrain", 22, 9, (152, 251, 152)), ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)), ("rider", 25, 12, (255, 0, 0)), ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)), ("bus", 28, 15, (0, 60, 100)), ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)), ("train", 31, 16, (0, 80, 100)), ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
]
NUM_LABEL_IDS = 34
ID_TO_TRAINID = np.full(256, 255, np.uint8)
for _name, _id, _train, _ in TABLE:
    ID_TO_TRAINID[_id] = _train
_train_rows = sorted((t, n, c) for n, _, t, c in TABLE if t != 255)
LABELS = [n for _, n, _ in _train_rows]
PALETTE = [list(c) for _, _, c in _train_rows]


class Cityscapes(SegmentationDataset):
    labels = LABELS
    palette = PALETTE

    def __init__(self, root: str | Path, split: str = "train", target: str = "labelIds"):
        super().__init__()
        if target not in ("labelIds", "trainIds"):
            raise DatasetError(f"Cityscapes target must be 'labelIds' or 'trainIds', got {target!r}")
        self.root, self.split, self.target = Path(root), split, target
        hint = "point at the folder holding leftImg8bit/ and gtFine/"
        img_root = require_dir(self.root / "leftImg8bit" / split, f"Cityscapes leftImg8bit/{split}", hint)
        gt_root = require_dir(self.root / "gtFine" / split, f"Cityscapes gtFine/{split}", hint)
        suffix = "_gtFine_labelIds.png" if target == "labelIds" else "_gtFine_labelTrainIds.png"
        for img in sorted(img_root.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            self.samples.append((img, gt_root / img.parent.name / f"{stem}{suffix}"))
        if not self.samples:
            raise DatasetError(f"no *_leftImg8bit.png images under {img_root}/<city>/")

    def load_mask(self, path: Path) -> np.ndarray:
        m = read_mask_raw(path)
        if m.ndim != 2:
            raise DatasetError(f"Cityscapes mask {path} is a colour image; read *_gtFine_labelIds.png, not *_color.png")
        if self.target == "trainIds":
            return m
        # labelIds beyond the table (> 33) are mislabelled; -1 (license plate) is stored as 255 in files
        check_mask(m, NUM_LABEL_IDS, path)
        return ID_TO_TRAINID[m]
