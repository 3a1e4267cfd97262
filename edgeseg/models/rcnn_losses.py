"""Mask R-CNN's training objective: anchor and proposal matching, balanced sampling, and the five
losses (RPN objectness and boxes, box-head classes and boxes, masks), as in the paper and
torchvision's reference implementation.

Targets are one dict per image: `boxes` (G, 4) x1 y1 x2 y2 in input pixels, `labels` (G,) in
0..num_classes-1, `masks` (G, H/s, W/s) at the input size or an integer fraction of it: floats
are the share of each pixel the object covers, other dtypes nonzero where the object is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeseg.models.detection import box_iou, encode_boxes, roi_align

BACKGROUND, IGNORE = -1, -2  # match results besides a target index


def match(iou: torch.Tensor, high: float, low: float, allow_low_quality: bool) -> torch.Tensor:
    """For each candidate (column of iou (G, A)), the best target index, BACKGROUND below `low`,
    IGNORE in between; with `allow_low_quality`, each target's best candidates match it anyway
    (so every object has a positive anchor even when none overlaps it by `high`)."""
    if iou.shape[0] == 0:
        return torch.full((iou.shape[1],), BACKGROUND, dtype=torch.long, device=iou.device)
    best, matches = iou.max(0)
    out = matches.clone()
    out[best < low] = BACKGROUND
    out[(best >= low) & (best < high)] = IGNORE
    if allow_low_quality:
        per_target = iou.max(1, keepdim=True).values
        cand = ((iou == per_target) & (per_target > 0)).any(0)
        out[cand] = matches[cand]
    return out


def sample(labels: torch.Tensor, batch: int, positive_fraction: float, gen: torch.Generator | None = None):
    """Indices of up to `batch` candidates, at most `positive_fraction` of them positive (labels >= 1;
    0 is negative, < 0 ignored), drawn at random."""
    pos = torch.nonzero(labels >= 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(int(batch * positive_fraction), pos.numel())
    n_neg = min(batch - n_pos, neg.numel())
    pos = pos[torch.randperm(pos.numel(), generator=gen, device=pos.device)[:n_pos]]
    neg = neg[torch.randperm(neg.numel(), generator=gen, device=neg.device)[:n_neg]]
    return pos, neg


def _check_target(t: dict, size, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    boxes, labels, masks = t["boxes"].float(), t["labels"].long(), t["masks"]
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1] or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"a target needs boxes (G, 4), labels (G,) and masks (G, H, W); got {tuple(boxes.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(masks.shape)}")
    h, w = masks.shape[-2:] if masks.dim() == 3 else (0, 0)
    if not h or not w or size[0] % h or size[1] % w or size[0] // h != size[1] // w:
        raise ValueError(f"target masks are {tuple(masks.shape[-2:])} for a {tuple(size)} input: give masks at input size "
                         "or the same integer fraction of both sides")
    masks = masks if masks.is_floating_point() else (masks != 0).float()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"target labels must be in 0..{num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    return boxes, labels, masks


def rpn_losses(model, scores, deltas, anchors, gt_boxes: list[torch.Tensor]):
    """Objectness BCE and smooth-L1 box loss over sampled anchors (all levels together)."""
    batch, frac = model.sampling["rpn"]
    logits, regress = torch.cat(scores, 1), torch.cat(deltas, 1)
    anchors = torch.cat(anchors).to(regress)
    sel_logits, sel_labels, pos_pred, pos_target = [], [], [], []
    for i, gt in enumerate(gt_boxes):
        m = match(box_iou(gt, anchors), 0.7, 0.3, allow_low_quality=True)
        labels = torch.where(m >= 0, 1, torch.where(m == BACKGROUND, 0, -1))
        pos, neg = sample(labels, batch, frac)
        idx = torch.cat([pos, neg])
        sel_logits.append(logits[i, idx])
        sel_labels.append((labels[idx] == 1).to(logits.dtype))
        pos_pred.append(regress[i, pos])
        pos_target.append(encode_boxes(gt[m[pos]], anchors[pos]) if pos.numel() else regress.new_zeros(0, 4))
    n = max(1, sum(x.numel() for x in sel_labels))
    box = F.smooth_l1_loss(torch.cat(pos_pred), torch.cat(pos_target), beta=1 / 9, reduction="sum") / n
    obj = F.binary_cross_entropy_with_logits(torch.cat(sel_logits), torch.cat(sel_labels), reduction="sum") / n
    return obj, box


def maskrcnn_losses(model, feats, rpn_out, proposals, valid, targets: list[dict], size) -> dict[str, torch.Tensor]:
    from edgeseg.models.maskrcnn import BOX_WEIGHTS

    if len(targets) != proposals.shape[0]:
        raise ValueError(f"got {len(targets)} targets for {proposals.shape[0]} images")
    k = model.num_classes
    checked = [_check_target(t, size, k) for t in targets]
    gt_boxes = [b.to(proposals.device) for b, _, _ in checked]
    loss_objectness, loss_rpn_box = rpn_losses(model, *rpn_out, gt_boxes)

    # proposals (and the targets themselves) matched to objects, sampled per image
    batch, frac = model.sampling["box"]
    rois, index, labels, reg_targets, mask_targets = [], [], [], [], []
    for i, (boxes, lab, masks) in enumerate(checked):
        cand = torch.cat([proposals[i][valid[i]], boxes])
        m = match(box_iou(boxes, cand), 0.5, 0.5, allow_low_quality=False)
        cls = (lab[m.clamp(min=0)] + 1) * (m >= 0) if lab.numel() else torch.zeros_like(m)
        pos, neg = sample(cls, batch, frac)
        idx = torch.cat([pos, neg])
        rois.append(cand[idx])
        index.append(torch.full((idx.numel(),), i, dtype=torch.long))
        labels.append(cls[idx])
        reg_targets.append(encode_boxes(boxes[m[pos]], cand[pos], BOX_WEIGHTS) if pos.numel() else cand.new_zeros(0, 4))
        if pos.numel():
            # the object's mask as the head sees it: RoIAlign of the mask over the proposal
            scale = masks.shape[-1] / size[1]
            mask_targets.append(roi_align(masks.to(cand)[:, None], cand[pos], model.mask_size, scale, 2, batch_index=m[pos])[:, 0])
        else:
            mask_targets.append(cand.new_zeros(0, model.mask_size, model.mask_size))
    rois, index, labels = torch.cat(rois), torch.cat(index), torch.cat(labels)
    logits, deltas = model.box_outputs(feats, rois, index)
    loss_classifier = F.cross_entropy(logits, labels)
    pos = torch.nonzero(labels > 0).flatten()
    pos_deltas = deltas.reshape(-1, k + 1, 4)[pos, labels[pos]]
    loss_box = F.smooth_l1_loss(pos_deltas, torch.cat(reg_targets), beta=1 / 9, reduction="sum") / max(1, labels.numel())
    if pos.numel():
        mask_logits = model.mask_logits(feats, rois[pos], index[pos])
        picked = mask_logits[torch.arange(pos.numel()), labels[pos]]
        loss_mask = F.binary_cross_entropy_with_logits(picked, torch.cat(mask_targets))
    else:
        loss_mask = deltas.sum() * 0
    return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box, "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box, "loss_mask": loss_mask}
