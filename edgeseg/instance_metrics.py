"""COCO-style box and mask AP (AP, AP50, AP75) through pycocotools, the field's reference code.

    ev = InstanceEvaluator(labels)
    for image, truth in reader:                # truth: edgeseg.data.instances.InstanceAnnotations
        ev.add(predict(image), truth)          # a runtime InstanceResult, or anything alike
    ev.summary()    # {"box": {"AP", "AP50", "AP75"}, "mask": {...}, "per_class": {...}, ...}

A prediction has `xyxy` (N, 4 frame pixels, x2/y2 exclusive), `confidence`, `class_id` and its
masks: `masks()` (the runtime pastes its cropped masks on demand) or a `masks` (N, H, W) array.
AP is averaged over IoU 0.50:0.95 as COCO does, with up to 100 detections per image. Scores are
what pycocotools' COCOeval computes; this module only builds its inputs in memory.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

from edgeseg.errors import EdgesegError

INSTALL_HINT = "pip install pycocotools (or pip install 'edgeseg[coco]')"


class MetricsError(EdgesegError, ValueError):
    """Predictions or ground truth the evaluation cannot use, or pycocotools missing."""


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise MetricsError(f"box and mask AP are computed with pycocotools, which is not installed: {INSTALL_HINT}") from None
    return mask_utils, COCO, COCOeval


def _masks_of(obj) -> np.ndarray:
    m = obj.masks
    return np.asarray(m() if callable(m) else m, bool)


def _rle(mask_utils, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle


def _coco_box(xyxy) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return [x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)]


class InstanceEvaluator:
    """Collects predictions and ground truth image by image; `summary()` scores them."""

    def __init__(self, labels):
        self.mask_utils, self._COCO, self._COCOeval = _pycocotools()
        self.labels = list(labels)
        if not self.labels:
            raise MetricsError("the evaluation needs the model's class labels")
        self.images: list[dict] = []
        self.truth: list[dict] = []
        self.detections: list[dict] = []

    def __len__(self) -> int:
        return len(self.images)

    def add(self, prediction, truth) -> None:
        """Score one image: `prediction` at the image's size, `truth` its InstanceAnnotations."""
        image_id = len(self.images) + 1
        h, w = truth.image_size
        self.images.append({"id": image_id, "height": int(h), "width": int(w)})
        K = len(self.labels)
        gt_masks = _masks_of(truth)
        for i in range(len(truth)):
            c = int(truth.class_id[i])
            if not 0 <= c < K:
                raise MetricsError(f"ground truth class id {c} is outside the model's {K} classes ({', '.join(self.labels[:5])} ...); "
                                   "score on data labelled with the model's classes")
            rle = _rle(self.mask_utils, gt_masks[i])
            self.truth.append({"id": len(self.truth) + 1, "image_id": image_id, "category_id": c + 1,
                               "bbox": _coco_box(truth.xyxy[i]), "area": float(self.mask_utils.area(rle)),
                               "iscrowd": int(truth.iscrowd[i]), "segmentation": rle})
        n = len(prediction)
        if not n:
            return
        masks = _masks_of(prediction)
        if masks.shape != (n, int(h), int(w)):
            raise MetricsError(f"prediction masks have shape {masks.shape}, expected ({n}, {h}, {w}): predict at the image's size")
        xyxy = np.asarray(prediction.xyxy, np.float64).reshape(n, 4)
        scores = np.asarray(prediction.confidence, np.float64).reshape(n)
        classes = np.asarray(prediction.class_id).reshape(n)
        if classes.min() < 0 or classes.max() >= K:
            raise MetricsError(f"predicted class ids reach {classes.max()}, outside the {K} labels")
        for i in range(n):
            self.detections.append({"image_id": image_id, "category_id": int(classes[i]) + 1, "bbox": _coco_box(xyxy[i]),
                                    "score": float(scores[i]), "segmentation": _rle(self.mask_utils, masks[i])})

    def _ground_truth(self):
        gt = self._COCO()
        gt.dataset = {"images": self.images, "annotations": self.truth,
                      "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.labels)]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt

    def _evaluate(self, gt, iou_type: str):
        if iou_type == "bbox":  # loadRes replaces the segmentation by the box when both are given
            dets = [{k: v for k, v in d.items() if k != "segmentation"} for d in self.detections]
        else:
            dets = [{k: v for k, v in d.items() if k != "bbox"} for d in self.detections]
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(dets)
            ev = self._COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev

    def summary(self) -> dict:
        """{"box": {AP, AP50, AP75}, "mask": {...}, "per_class": {label: {box_AP50, mask_AP50, ...}},
        "images", "objects", "detections"}; AP is NaN where no ground truth exists, 0 without detections."""
        out = {"images": len(self.images), "objects": sum(1 for t in self.truth if not t["iscrowd"]),
               "detections": len(self.detections)}
        nan = float("nan")
        if not self.images:
            raise MetricsError("no images were evaluated")
        if not out["objects"] or not self.detections:
            value = nan if not out["objects"] else 0.0
            for kind in ("box", "mask"):
                out[kind] = {"AP": value, "AP50": value, "AP75": value}
            out["per_class"] = {n: {f"{k}_{m}": value for k in ("box", "mask") for m in ("AP", "AP50")} for n in self.labels}
            return out
        gt = self._ground_truth()
        per_class = {n: {} for n in self.labels}
        for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
            ev = self._evaluate(gt, iou_type)
            s = [nan if v < 0 else float(v) for v in ev.stats[:3]]
            out[kind] = {"AP": s[0], "AP50": s[1], "AP75": s[2]}
            # precision: [IoU thresholds, recall points, classes, area ranges, max dets]; -1 = no ground truth
            p = ev.eval["precision"][:, :, :, 0, -1]
            for k, name in enumerate(self.labels):
                pk = p[:, :, k]
                ap = float(pk[pk > -1].mean()) if (pk > -1).any() else nan
                p50 = pk[0]
                ap50 = float(p50[p50 > -1].mean()) if (p50 > -1).any() else nan
                per_class[name].update({f"{kind}_AP": ap, f"{kind}_AP50": ap50})
        out["per_class"] = per_class
        return out


__all__ = ["InstanceEvaluator", "MetricsError", "INSTALL_HINT"]
