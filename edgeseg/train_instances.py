"""Training and held-out scoring for the zoo's instance models (Mask R-CNN; any model whose task is
instance-segmentation, with `training_loss(images, targets)` and `instance_layout()`).

`edgeseg train` comes here through `edgeseg.train.train_model` when the architecture's task is
instance segmentation; the loop itself is `edgeseg.train.fit`, given this module's batching and
validation:

    ds = InstanceReaderDataset(open_instances("synthetic", "train"), Preprocess(size=(128, 128)))
    x, targets = collate_instances([ds[0], ds[1]])     # padded targets, as training_loss takes them
    evaluate_instances(model, open_instances("synthetic", "test"), pre)   # COCO box/mask AP

Images go through the deployment preprocessing (letterbox included), so a model is trained on what
the runtime feeds it; masks are placed exactly like the image, then kept at 1/`mask_stride` of the
input as the share of each pixel the object covers (uint8 0..255): cheaper to carry and what the
mask head's RoIAlign samples anyway. Held-out scores run the model's outputs through the runtime's
own instance post-processing (`runtime.instance_postprocess`) and pycocotools
(`edgeseg.instance_metrics`), so they are the figures a bundle of the model would get.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from edgeseg.spec import Preprocess

MIN_BOX = 1.0  # objects narrower than this many input pixels after resizing are not trained on


class InstanceReaderDataset(torch.utils.data.Dataset):
    """(BGR image, InstanceAnnotations) -> (float (3, H, W), {"boxes" (G, 4) xyxy input pixels,
    "classes" (G,) int64, "masks" (G, H/s, W/s) uint8 0..255}).

    `augment`: a horizontal flip with probability 0.5 and brightness/contrast jitter of +-20%,
    drawn from rng(seed, epoch, index) so a resumed run sees the samples it would have seen."""

    def __init__(self, reader, pre: Preprocess, augment: bool = False, seed: int = 0, mask_stride: int = 4):
        if pre.dtype != "float32" or pre.layout != "nchw":
            raise ValueError("training needs a float32 NCHW preprocessing")
        if mask_stride < 1 or pre.size[0] % mask_stride or pre.size[1] % mask_stride:
            raise ValueError(f"mask_stride {mask_stride} must divide the input size {pre.size}")
        self.reader, self.pre, self.augment = reader, pre, bool(augment)
        self.seed, self.epoch, self.mask_stride = int(seed), 0, int(mask_stride)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        img, ann = self.reader[i]
        x = self.pre.resize_image(img)  # float32 0..255 at input size, letterboxed
        boxes, masks = place_instances(ann, self.pre, img.shape[:2], self.mask_stride)
        classes = np.asarray(ann.class_id, np.int64)
        keep = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= MIN_BOX
        boxes, masks, classes = boxes[keep], masks[keep], classes[keep]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            flip, (b, c) = rng.random() < 0.5, rng.uniform(-0.2, 0.2, 2)
            if flip:
                w = self.pre.size[1]
                x, masks = x[:, ::-1], masks[:, :, ::-1]
                boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            mean = x.mean()
            x = np.clip((x - mean) * (1 + c) + mean * (1 + b), 0, 255).astype(np.float32)
        x = self.pre.normalize(np.ascontiguousarray(x)).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(x)), {
            "boxes": torch.from_numpy(boxes.astype(np.float32)), "classes": torch.from_numpy(classes),
            "masks": torch.from_numpy(np.ascontiguousarray(masks))}


def place_instances(ann, pre: Preprocess, frame_hw, mask_stride: int = 1):
    """The objects of `ann` (at frame size) where the preprocessing puts them in the network input:
    boxes (G, 4) float32 in input pixels, masks (G, H/s, W/s) uint8, the share of each pixel the
    object covers times 255."""
    lb = pre.letterbox(tuple(frame_hw))
    H, W = frame_hw
    sx, sy = lb.width / W, lb.height / H
    boxes = np.asarray(ann.xyxy, np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)
    boxes += np.array([lb.left, lb.top, lb.left, lb.top], np.float32)
    h, w = pre.size[0] // mask_stride, pre.size[1] // mask_stride
    masks = np.zeros((len(ann), h, w), np.uint8)
    full = np.zeros(pre.size, np.float32)
    for k, m in enumerate(np.asarray(ann.masks, bool)):
        full[:] = 0
        full[lb.top: lb.top + lb.height, lb.left: lb.left + lb.width] = cv2.resize(
            m.astype(np.float32), (lb.width, lb.height), interpolation=cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR)
        small = full if mask_stride == 1 else cv2.resize(full, (w, h), interpolation=cv2.INTER_AREA)
        masks[k] = np.clip(np.rint(small * 255), 0, 255).astype(np.uint8)
    return boxes, masks


def collate_instances(batch):
    """Stack images and pad targets to the batch's most objects (classes -1 mark padding rows)."""
    xs, ts = zip(*batch)
    g = max(1, max(len(t["classes"]) for t in ts))
    n = len(ts)
    mh, mw = ts[0]["masks"].shape[-2:]
    boxes = torch.zeros(n, g, 4)
    classes = torch.full((n, g), -1, dtype=torch.long)
    masks = torch.zeros(n, g, mh, mw, dtype=torch.uint8)
    for i, t in enumerate(ts):
        k = len(t["classes"])
        boxes[i, :k], classes[i, :k], masks[i, :k] = t["boxes"], t["classes"], t["masks"]
    return torch.stack(xs), {"boxes": boxes, "classes": classes, "masks": masks}


@torch.no_grad()
def predict_instances(model, images, pre: Preprocess, labels, palette=None, batch_size: int = 8, conf: float | None = None):
    """InstanceResults of `model` (eval mode) for BGR frames, through the runtime's post-processing."""
    from edgeseg.bundle import default_palette
    from runtime.instance_postprocess import InstancePostprocessor

    model.eval()
    post = InstancePostprocessor(labels, palette or default_palette(len(labels)), pre, model.instance_layout(), conf=conf)
    results = []
    for i in range(0, len(images), batch_size):
        chunk = images[i: i + batch_size]
        x = torch.from_numpy(np.concatenate([pre.apply(f) for f in chunk]))
        # an instance model returns its outputs in its layout's role order
        names = tuple(post.layout.outputs.values())
        arrays = [o.numpy() for o in model(x)]
        for j, frame in enumerate(chunk):
            results.append(post({n: a[j: j + 1] for n, a in zip(names, arrays)}, frame.shape[:2]))
    return results


def evaluate_instances(model, reader, pre: Preprocess, labels=None, batch_size: int = 8, limit: int | None = None) -> dict:
    """COCO box and mask AP of `model` on an instance reader (`edgeseg.instance_metrics` summary)."""
    from edgeseg.instance_metrics import InstanceEvaluator

    labels = list(labels or reader.labels)
    ev = InstanceEvaluator(labels)
    n = len(reader) if limit is None else min(limit, len(reader))
    for i in range(0, n, batch_size):
        items = [reader[j] for j in range(i, min(n, i + batch_size))]
        preds = predict_instances(model, [img for img, _ in items], pre, labels, getattr(reader, "palette", None), batch_size)
        for p, (_, ann) in zip(preds, items):
            ev.add(p, ann)
    return ev.summary()


def validation(reader, pre: Preprocess, labels):
    """A `fit(validate=...)` callable: the held-out AP figures to record per epoch."""

    def validate(model) -> dict:
        s = evaluate_instances(model, reader, pre, labels)
        return {"val_mask_ap50": s["mask"]["AP50"], "val_mask_ap": s["mask"]["AP"], "val_box_ap50": s["box"]["AP50"]}

    return validate


__all__ = ["InstanceReaderDataset", "collate_instances", "evaluate_instances", "place_instances", "predict_instances",
           "validation"]
