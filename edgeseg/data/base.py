"""What every dataset reader shares: the error type, image/mask reading with errors that name the
file, and the reader interface.

A reader is indexable: `ds[i] -> (BGR uint8 HxWx3, uint8 HxW class mask)`, `len(ds)`, with
`ds.labels` (class names, index = class id), `ds.palette` (RGB per class, or None) and
`ds.ignore_index` (255: pixels not scored). `ds.name(i)` says which file a sample came from.
NumPy + OpenCV only: the runtime and calibration read datasets without torch.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from edgeseg.errors import EdgesegError

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(EdgesegError, ValueError):
    """A dataset that cannot be read: missing layout, corrupt image, mislabelled mask."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as BGR uint8 HxWx3, or raise a DatasetError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image not found: {path}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise DatasetError(f"cannot decode image {path}: the file is corrupt or not an image; "
                           "re-export it or remove it from the dataset")
    return img


def read_mask_raw(path: str | os.PathLike) -> np.ndarray:
    """Read a mask file unchanged: HxW for index/grey PNGs, HxWx3 (BGR) for colour or palette PNGs."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"mask not found: {path}")
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None or m.size == 0:
        raise DatasetError(f"cannot decode mask {path}: the file is corrupt or not an image")
    if m.dtype != np.uint8:
        if m.dtype == np.uint16 and m.max() <= 255:
            m = m.astype(np.uint8)
        else:
            raise DatasetError(f"mask {path} has {m.dtype} pixels with values up to {m.max()}; "
                               "class masks must be 8-bit (class ids 0..254, 255 = ignore)")
    if m.ndim == 3 and m.shape[2] == 4:
        m = m[..., :3]
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[..., 0]
    return m


def colors_to_ids(mask_bgr: np.ndarray, palette, path, ignore_colors=None) -> np.ndarray:
    """Map a colour mask (BGR) to class ids through an RGB `palette`; unknown colours are an error
    naming the file and the colour. `ignore_colors`: RGB colours that mean 'ignore' (255)."""
    rgb = mask_bgr[..., ::-1].astype(np.int32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    lut = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(palette)}
    for r, g, b in ignore_colors or []:
        lut[(int(r) << 16) | (int(g) << 8) | int(b)] = IGNORE_INDEX
    keys, inverse = np.unique(code, return_inverse=True)
    ids = np.empty(len(keys), np.uint8)
    for k, key in enumerate(keys.tolist()):
        if key not in lut:
            color = ((key >> 16) & 255, (key >> 8) & 255, key & 255)
            raise DatasetError(f"mask {path} has colour RGB{color}, which is no class of the palette; "
                               "the mask is mislabelled or belongs to another dataset")
        ids[k] = lut[key]
    return ids[inverse.reshape(code.shape)]


def check_mask(mask: np.ndarray, num_classes: int, path, image_shape=None, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Raise a DatasetError naming `path` when the mask holds class ids outside 0..num_classes-1
    (other than ignore_index) or does not match the image size."""
    if image_shape is not None and mask.shape[:2] != tuple(image_shape[:2]):
        raise DatasetError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                           f"{image_shape[1]}x{image_shape[0]}; masks must have the image's size")
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        raise DatasetError(f"mask {path} holds class id(s) {bad.tolist()[:5]} outside 0..{num_classes - 1} "
                           f"(and not ignore={ignore_index}); the mask is mislabelled or the labels list is incomplete")
    return mask


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class SegmentationDataset:
    """Base of the readers: subclasses fill `self.samples` with (image path, mask path) pairs and
    may override `load_mask` (format-specific decoding)."""

    labels: list[str] = []
    palette: list[list[int]] | None = None
    ignore_index = IGNORE_INDEX
    has_splits = True

    def __init__(self):
        self.samples: list[tuple[Path, Path]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, i: int) -> str:
        return str(self.samples[i][0])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def load_mask(self, path: Path) -> np.ndarray:
        m = read_mask_raw(path)
        if m.ndim == 3:
            if self.palette is None:
                raise DatasetError(f"mask {path} is a colour image but this dataset has no palette to map colours to "
                                   "classes; store masks as single-channel class ids")
            m = colors_to_ids(m, self.palette, path)
        return m

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        img_path, mask_path = self.samples[i]
        img = read_image(img_path)
        mask = self.load_mask(mask_path)
        return img, check_mask(mask, self.num_classes, mask_path, img.shape, self.ignore_index)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes)"


def require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}; {hint}")
    return path
