"""Losses of the one-stage instance model (`edgeseg.models.yoloseg`).

Anchors are assigned to objects by the task-aligned rule of TOOD (Feng et al., 2021), as
YOLOv8 does: among the anchors whose centre lies inside an object's box, the `topk` with the
highest alignment score^alpha * IoU^beta (predicted class score and box overlap, detached) are
its positives; an anchor claimed by several objects goes to the one it overlaps most. Class
targets are the alignment normalised per object to its best IoU, so a well-placed anchor learns
a high score and NMS keeps the best box. Then:

* class: binary cross-entropy on every anchor and class against those soft targets;
* box: GIoU loss of each positive's box, weighted by its target score;
* mask: binary cross-entropy of sigmoid(coefficients . prototypes) against the object's mask at
  prototype resolution, inside its box only and normalised by the box's area (YOLACT's crop).

Targets are the padded batch of `edgeseg.train_instances`: boxes (N, G, 4) xyxy input pixels,
classes (N, G) with -1 for padding, masks (N, G, h, w) uint8 0..255 (the share of each pixel
the object covers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeseg.models.detection import box_iou

WEIGHTS = {"box": 7.5, "cls": 1.0, "mask": 7.5}


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of paired boxes (..., 4) xyxy."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter + 1e-7
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1) + 1e-7
    iou = inter / union
    return iou - (hull - union) / hull


@torch.no_grad()
def assign(scores: torch.Tensor, boxes: torch.Tensor, centres: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
           topk: int = 10, alpha: float = 0.5, beta: float = 6.0):
    """Task-aligned assignment. scores (N, A, nc) probabilities, boxes (N, A, 4) predicted xyxy,
    centres (A, 2), gt_boxes (N, G, 4), gt_classes (N, G) (-1 padding).
    Returns (positive (N, A) bool, object index (N, A), target scores (N, A, nc))."""
    n, a, nc = scores.shape
    g = gt_boxes.shape[1]
    valid = gt_classes >= 0  # (N, G)
    if g == 0:
        return torch.zeros(n, a, dtype=torch.bool), torch.zeros(n, a, dtype=torch.long), torch.zeros_like(scores)
    x, y = centres[:, 0], centres[:, 1]
    inside = ((x[None, None] > gt_boxes[..., 0:1]) & (x[None, None] < gt_boxes[..., 2:3]) &
              (y[None, None] > gt_boxes[..., 1:2]) & (y[None, None] < gt_boxes[..., 3:4]) & valid[..., None])  # (N, G, A)
    overlaps = box_iou(gt_boxes, boxes).clamp(min=0)  # (N, G, A)
    cls = gt_classes.clamp(min=0)
    s = scores.gather(2, cls[:, None, :].expand(n, a, g)).transpose(1, 2)  # (N, G, A): each anchor's score for the object's class
    metric = s.pow(alpha) * overlaps.pow(beta) * inside
    k = min(topk, a)
    top = metric.topk(k, dim=2).indices
    chosen = torch.zeros_like(inside).scatter_(2, top, True) & inside
    # an anchor claimed twice: the object it overlaps most keeps it
    claims = chosen.sum(1)  # (N, A)
    best = torch.where(chosen, overlaps, torch.full_like(overlaps, -1.0)).argmax(1)  # (N, A)
    multi = claims > 1
    chosen = torch.where(multi[:, None], F.one_hot(best, g).transpose(1, 2).bool() & chosen, chosen)
    positive = chosen.any(1)
    obj = chosen.float().argmax(1)
    # soft targets: alignment scaled so each object's best anchor gets its best IoU
    metric = metric * chosen
    norm = metric.amax(2, keepdim=True).clamp(min=1e-9)
    best_iou = (overlaps * chosen).amax(2, keepdim=True)
    align = (metric / norm * best_iou).amax(1)  # (N, A)
    target_cls = cls.gather(1, obj)
    target = torch.zeros_like(scores)
    target.scatter_(2, target_cls[..., None], align[..., None])
    target = target * positive[..., None]
    return positive, obj, target


def yoloseg_loss(raw, targets: dict, num_classes: int, proto_stride: int = 4, weights: dict | None = None):
    """(total, {"box", "cls", "mask"}) for `YOLOSeg.raw` outputs and a padded target batch."""
    w = {**WEIGHTS, **(weights or {})}
    dist, logits, coefs, protos, centres, _ = raw
    gt_boxes, gt_classes = targets["boxes"].float(), targets["classes"].long()
    gt_masks = targets["masks"]
    boxes = torch.cat([centres - dist[..., :2], centres + dist[..., 2:]], -1)  # (N, A, 4)
    positive, obj, target = assign(torch.sigmoid(logits.detach()), boxes.detach(), centres, gt_boxes, gt_classes)
    norm = target.sum().clamp(min=1.0)
    loss_cls = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / norm
    if not positive.any():
        zero = (dist.sum() + coefs.sum() + protos.sum()) * 0.0
        return w["cls"] * loss_cls + zero, {"box": 0.0, "cls": float(loss_cls), "mask": 0.0}
    bi, ai = positive.nonzero(as_tuple=True)
    oi = obj[bi, ai]
    weight = target[bi, ai].sum(-1)
    tb = gt_boxes[bi, oi]
    loss_box = ((1.0 - giou(boxes[bi, ai], tb)) * weight).sum() / norm
    # masks at prototype resolution, inside the object's box
    ph, pw = protos.shape[-2:]
    tm = gt_masks[bi, oi].float() / 255.0
    if tm.shape[-2:] != (ph, pw):
        tm = F.interpolate(tm[:, None], size=(ph, pw), mode="bilinear", align_corners=False)[:, 0]
    pred = torch.einsum("pk,pkhw->phw", coefs[bi, ai], protos[bi])
    xs = (torch.arange(pw, dtype=tb.dtype) + 0.5)[None, None, :] * proto_stride  # prototype pixel centres, input pixels
    ys = (torch.arange(ph, dtype=tb.dtype) + 0.5)[None, :, None] * proto_stride
    crop = ((xs >= tb[:, 0, None, None]) & (xs < tb[:, 2, None, None]) & (ys >= tb[:, 1, None, None]) & (ys < tb[:, 3, None, None]))
    bce = F.binary_cross_entropy_with_logits(pred, tm, reduction="none") * crop
    area = crop.sum((1, 2)).clamp(min=1)
    loss_mask = (bce.sum((1, 2)) / area).mean()
    total = w["box"] * loss_box + w["cls"] * loss_cls + w["mask"] * loss_mask
    return total, {"box": float(loss_box.detach()), "cls": float(loss_cls.detach()), "mask": float(loss_mask.detach())}


__all__ = ["yoloseg_loss", "assign", "giou", "WEIGHTS"]
