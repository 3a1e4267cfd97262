"""Image/mask folders: the simplest way to bring your own data.

    <root>/images/<stem>.<jpg|png|...>
    <root>/masks/<stem>.png           single-channel class ids (255 = ignore), or colours of the palette
    <root>/labels.txt                 optional: one class per line, "name" or "name R G B"

Images and masks pair by file stem (`mask_suffix` allows e.g. "cat.jpg" <-> "cat_mask.png").
Splits are subfolders when present: <root>/<split>/images and <root>/<split>/masks, with
labels.txt in <root> or in the split folder. Without a labels file the classes are named
class_0..class_{K-1}, K = 1 + the largest id found in the masks (or `num_classes`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeseg.data.base import (
    IGNORE_INDEX, IMAGE_EXTENSIONS, DatasetError, SegmentationDataset, colors_to_ids, list_images, read_mask_raw, require_dir,
)


def read_labels_file(path: str | Path) -> tuple[list[str], list[list[int]] | None]:
    """labels.txt: one class per line, "name" or "name R G B" (commas allowed); '#' starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"labels file not found: {path}")
    names, colours = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        parts = line.split()
        rgb = parts[-3:] if len(parts) >= 4 and all(p.isdigit() for p in parts[-3:]) else None
        if rgb:
            if any(int(v) > 255 for v in rgb):
                raise DatasetError(f"{path}:{n}: colour values must be 0..255, got {rgb}")
            names.append(" ".join(parts[:-3]))
            colours.append([int(v) for v in rgb])
        else:
            names.append(" ".join(parts))
    if not names:
        raise DatasetError(f"labels file {path} names no class")
    if colours and len(colours) != len(names):
        raise DatasetError(f"labels file {path}: give a colour for every class or for none")
    if len(names) > IGNORE_INDEX:
        raise DatasetError(f"labels file {path} names {len(names)} classes; at most {IGNORE_INDEX} fit 8-bit masks")
    return names, (colours or None)


class FolderDataset(SegmentationDataset):
    def __init__(self, root: str | Path, split: str | None = None, labels=None, num_classes: int | None = None,
                 images: str = "images", masks: str = "masks", mask_suffix: str = ""):
        super().__init__()
        self.root = Path(root)
        base = self.root
        self.has_splits = bool(split) and (self.root / split / images).is_dir()
        if self.has_splits:
            base = self.root / split
        self.split = split if self.has_splits else None
        hint = f"expected {self.root}/{images}/ and {self.root}/{masks}/ (or <split>/{images}, <split>/{masks})"
        img_dir = require_dir(base / images, "images folder", hint)
        mask_dir = require_dir(base / masks, "masks folder", hint)
        mask_files = {}
        for p in mask_dir.iterdir():
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                stem = p.stem[: -len(mask_suffix)] if mask_suffix and p.stem.endswith(mask_suffix) else p.stem
                if not mask_suffix or p.stem.endswith(mask_suffix):
                    mask_files.setdefault(stem, p)
        missing = []
        for img in list_images(img_dir):
            if img.stem in mask_files:
                self.samples.append((img, mask_files[img.stem]))
            else:
                missing.append(img.name)
        if missing:
            raise DatasetError(f"{len(missing)} image(s) in {img_dir} have no mask in {mask_dir} "
                               f"(e.g. {missing[0]} -> {Path(missing[0]).stem}{mask_suffix}.png)")
        if not self.samples:
            raise DatasetError(f"no images in {img_dir}")
        self.labels, self.palette = self._labels(labels, base, num_classes)

    def _labels(self, labels, base: Path, num_classes):
        if isinstance(labels, (list, tuple)):
            return [str(x) for x in labels], None
        if labels is not None:
            return read_labels_file(labels)
        for candidate in (base / "labels.txt", self.root / "labels.txt"):
            if candidate.is_file():
                return read_labels_file(candidate)
        if num_classes is None:
            # no names given: count classes from the masks (one pass over the mask files)
            top = 0
            for _, mp in self.samples:
                m = read_mask_raw(mp)
                if m.ndim == 3:
                    raise DatasetError(f"mask {mp} is a colour image; add a labels.txt with 'name R G B' lines "
                                       "so colours map to classes")
                vals = m[m != IGNORE_INDEX]
                top = max(top, int(vals.max()) if vals.size else 0)
            num_classes = top + 1
        return [f"class_{i}" for i in range(int(num_classes))], None

    def load_mask(self, path: Path) -> np.ndarray:
        m = read_mask_raw(path)
        if m.ndim == 3 and self.palette is None and (m[..., 0] == m[..., 1]).all() and (m[..., 0] == m[..., 2]).all():
            m = np.ascontiguousarray(m[..., 0])  # ids saved as a grey RGB image
        if m.ndim == 3:
            if self.palette is None:
                raise DatasetError(f"mask {path} is a colour image but the labels give no colours; "
                                   "add 'name R G B' lines to labels.txt or store single-channel class ids")
            m = colors_to_ids(m, self.palette, path)
        return m
