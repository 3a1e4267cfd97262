"""COCO instance annotations (Lin et al., 2014): semantic masks (`COCOSegmentation`) or the
instances themselves (`COCOInstances`).

    coco:/data/coco/annotations/instances_val2017.json:/data/coco/val2017
    coco:/data/coco   + split "val"  -> annotations/instances_val2017.json and val2017/

Classes are the JSON's categories in id order, renumbered 1..K, with 0 = background (so COCO's 80
sparse ids 1..90 become 1..80). Instance shapes come as polygons, uncompressed RLE (`counts` a
list, usually crowd regions) or compressed RLE (`counts` a string, as in result files); all three
decode here. Overlaps resolve so smaller instances stay visible (painted in decreasing area);
crowd regions become 255 = ignore (`crowd="class"` paints them as their category instead).
`COCOInstances` numbers the same categories 0..K-1 (no background) and keeps one mask per
annotation.

pycocotools is used when installed (`pip install edgeseg[coco]`); without it the built-in
decoders run: RLE decodes exactly the same, polygons are filled by the pixel-centre rule, which
agrees with pycocotools except on some boundary pixels (about 2% of a small polygon's area).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgeseg.data.base import IGNORE_INDEX, DatasetError, SegmentationDataset, read_image


# --- RLE ----------------------------------------------------------------------------------------
def rle_counts_from_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (maskApi.c rleFrString): 6-bit chunks offset by 48,
    5 data bits + a continuation bit, sign-extended, counts after the second delta-coded."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("truncated RLE string")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {chr(data[p])!r} in RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_counts_to_string(counts) -> str:
    """Encode run lengths as COCO's compressed RLE string (maskApi.c rleToString)."""
    out = []
    counts = [int(c) for c in counts]
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_decode(rle: dict) -> np.ndarray:
    """{'size': [h, w], 'counts': list or str} -> uint8 mask (h, w). Runs alternate 0/1 starting
    with 0, in column-major (Fortran) order."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_counts_from_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(counts) != h * w or any(c < 0 for c in counts):
        raise ValueError(f"RLE runs sum to {sum(counts)}, expected {h}x{w} = {h * w}")
    vals = np.zeros(len(counts), np.uint8)
    vals[1::2] = 1
    return np.repeat(vals, counts).reshape(w, h).T.copy()


def rle_encode(mask: np.ndarray, compressed: bool = True) -> dict:
    """uint8/bool mask (h, w) -> RLE dict (compressed string counts, or a list when compressed=False)."""
    flat = np.asarray(mask, bool).T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    h, w = mask.shape
    return {"size": [h, w], "counts": rle_counts_to_string(runs) if compressed else runs}


def polygon_mask(flat, h: int, w: int) -> np.ndarray:
    """Fill one polygon [x1, y1, x2, y2, ...] (pixel i spans [i, i+1)): a pixel is inside when
    its centre is, by the even-odd rule with half-open spans."""
    m = np.zeros((h, w), np.uint8)
    pts = np.asarray(flat, np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return m
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    keep = y0 != y1
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    yc = np.arange(h) + 0.5
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    cross = (yc[:, None] >= lo) & (yc[:, None] < hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = x0 + (yc[:, None] - y0) * (x1 - x0) / (y1 - y0)
    for r in np.flatnonzero(cross.any(1)):
        xs = np.sort(xi[r][cross[r]])
        for a, b in zip(xs[0::2], xs[1::2]):
            j0, j1 = max(0, int(np.ceil(a - 0.5))), min(w, int(np.ceil(b - 0.5)))
            if j1 > j0:
                m[r, j0:j1] ^= 1
    return m


def _have_pycocotools() -> bool:
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError:
        return False
    return True


def annotation_mask(segm, h: int, w: int, backend: str = "auto") -> np.ndarray:
    """Decode one annotation's `segmentation` (polygons, RLE list or RLE string) to a (h, w) uint8 mask."""
    use_coco = backend == "pycocotools" or (backend == "auto" and _have_pycocotools())
    if isinstance(segm, dict):
        if [int(v) for v in segm.get("size", [])] != [h, w]:
            raise ValueError(f"RLE size {segm.get('size')} differs from the image's {h}x{w}")
        if isinstance(segm.get("counts"), list) and sum(int(c) for c in segm["counts"]) != h * w:
            raise ValueError(f"RLE runs sum to {sum(int(c) for c in segm['counts'])}, expected {h}x{w} = {h * w}")
        if use_coco:
            from pycocotools import mask as mu

            rle = mu.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
            return mu.decode(rle).astype(np.uint8)
        return rle_decode(segm)
    if isinstance(segm, list):
        polys = [segm] if segm and not isinstance(segm[0], (list, tuple)) else segm
        for p in polys:
            if len(p) % 2 or len(p) < 6:
                raise ValueError(f"a polygon needs an even number (>= 6) of coordinates, got {len(p)}")
        if use_coco:
            from pycocotools import mask as mu

            return mu.decode(mu.merge(mu.frPyObjects([list(map(float, p)) for p in polys], h, w))).astype(np.uint8)
        m = np.zeros((h, w), np.uint8)
        for p in polys:
            m |= polygon_mask(p, h, w)
        return m
    raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")


# --- the reader ---------------------------------------------------------------------------------
class COCOSegmentation(SegmentationDataset):
    palette = None
    has_splits = False

    def __init__(self, annotations: str | Path, images: str | Path, crowd: str = "ignore",
                 skip_empty: bool = False, backend: str = "auto"):
        super().__init__()
        if crowd not in ("ignore", "class"):
            raise DatasetError(f"crowd must be 'ignore' or 'class', got {crowd!r}")
        if backend not in ("auto", "pycocotools", "builtin"):
            raise DatasetError(f"backend must be 'auto', 'pycocotools' or 'builtin', got {backend!r}")
        if backend == "pycocotools" and not _have_pycocotools():
            raise DatasetError("backend='pycocotools' but pycocotools is not installed: pip install 'edgeseg[coco]'")
        self.annotations, self.images = Path(annotations), Path(images)
        self.crowd, self.backend = crowd, backend
        if not self.annotations.is_file():
            raise DatasetError(f"COCO annotation file not found: {self.annotations}")
        if not self.images.is_dir():
            raise DatasetError(f"COCO image folder not found: {self.images}")
        try:
            doc = json.loads(self.annotations.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot parse COCO annotation file {self.annotations}: {e}") from None
        if not isinstance(doc, dict) or not {"images", "annotations", "categories"} <= set(doc):
            raise DatasetError(f"{self.annotations} is not a COCO instances file (needs images, annotations, categories)")
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        if len(cats) >= IGNORE_INDEX:
            raise DatasetError(f"{self.annotations} has {len(cats)} categories; at most {IGNORE_INDEX - 1} fit 8-bit masks")
        self.category_to_class = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
        self.labels = ["background"] + [str(c["name"]) for c in cats]
        by_image = defaultdict(list)
        for a in doc["annotations"]:
            by_image[a["image_id"]].append(a)
        self.records = []
        for im in sorted(doc["images"], key=lambda r: r["id"]):
            anns = by_image.get(im["id"], [])
            if skip_empty and not anns:
                continue
            self.records.append((im, anns))
            self.samples.append((self.images / im["file_name"], self.annotations))

    def name(self, i: int) -> str:
        return str(self.samples[i][0])

    def decoded(self, i: int) -> list[tuple[bool, int, np.ndarray]]:
        """(iscrowd, class 1..K, bool mask) for each annotation of image i, in file order."""
        im, anns = self.records[i]
        h, w = int(im["height"]), int(im["width"])
        out = []
        for a in anns:
            if a.get("category_id") not in self.category_to_class:
                raise DatasetError(f"{self.annotations}: annotation {a.get('id')} of image {im['id']} ({im['file_name']}) "
                                   f"has category_id {a.get('category_id')}, which is not among the categories")
            try:
                m = annotation_mask(a["segmentation"], h, w, self.backend).astype(bool)
            except (KeyError, ValueError, TypeError) as e:
                raise DatasetError(f"{self.annotations}: annotation {a.get('id')} of image {im['file_name']}: "
                                   f"bad segmentation ({e})") from None
            out.append((bool(a.get("iscrowd", 0)), self.category_to_class[a["category_id"]], m))
        return out

    def semantic_mask(self, i: int) -> np.ndarray:
        im = self.records[i][0]
        mask = np.zeros((int(im["height"]), int(im["width"])), np.uint8)
        # crowd regions first, then instances from the largest to the smallest
        for crowd, cls, m in sorted(self.decoded(i), key=lambda d: (not d[0], -float(d[2].sum()))):
            mask[m] = IGNORE_INDEX if crowd and self.crowd == "ignore" else cls
        return mask

    def read(self, i: int) -> np.ndarray:
        """The image of sample i, checked against the size the annotation file gives."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        i %= len(self)
        img = read_image(self.samples[i][0])
        im = self.records[i][0]
        if img.shape[:2] != (int(im["height"]), int(im["width"])):
            raise DatasetError(f"image {self.samples[i][0]} is {img.shape[1]}x{img.shape[0]} but {self.annotations} "
                               f"says {im['width']}x{im['height']}")
        return img

    def __getitem__(self, i: int):
        img = self.read(i)
        return img, self.semantic_mask(i % len(self))


class COCOInstances(COCOSegmentation):
    """The same files read for instance segmentation: `ds[i] -> (BGR image, InstanceAnnotations)`.

    `labels` are the categories in id order without background (class id = position), each
    annotation one mask as the file gives it (instances may overlap); crowd regions come with
    `iscrowd` set, which the COCO evaluation treats as regions to ignore."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.labels = self.labels[1:]

    def __getitem__(self, i: int):
        from edgeseg.data.instances import InstanceAnnotations

        img = self.read(i)
        decoded = self.decoded(i % len(self))
        masks = np.stack([d[2] for d in decoded]) if decoded else np.zeros((0, *img.shape[:2]), bool)
        return img, InstanceAnnotations(masks, [d[1] - 1 for d in decoded], iscrowd=[d[0] for d in decoded],
                                        image_size=img.shape[:2])
