"""Mask R-CNN (He et al., 2017): a ResNet + FPN backbone, a region proposal network, RoIAlign,
a box head and a mask head.

Built to export with fixed shapes end to end (`edgeseg.models.detection` has the primitives):

* every stage keeps a fixed number of boxes: the RPN's top `pre_nms_top_n` per level, then NMS
  (`nms_topk`) to `post_nms_top_n` proposals; the box head's class-aware NMS to
  `detections_per_img` detections. Slots NMS leaves empty are padding: a proposal slot carries
  a validity flag into the box head, a detection slot has score 0.
* RoIs are pooled from the FPN level their size picks, in one `RoiAlign` call: the levels are
  padded (edge-replicated) to the finest level's size and stacked along the batch axis, and each
  RoI's batch index and coordinates address its level. Boxes lie inside the image, so edge
  padding reads exactly what RoIAlign's border rule reads; one call, not one per level.
* anchors are constants of the input size, so the graph has no shape arithmetic.

In eval mode `forward(images)` returns fixed-size tensors, in `OUTPUTS` order (D =
detections_per_img): `boxes` (N, D, 4) x1 y1 x2 y2 in input pixels, `scores` (N, D), `classes`
(N, D) int64 in 0..num_classes-1 (no background class), `masks` (N, D, M, M) mask probabilities
over each box (M = 2 * mask_pool, 28 by default): resized onto its box and thresholded at 0.5,
one is the object's mask. Rows are sorted by score; empty rows are all zeros. This is the
`detections` instance layout with box-relative masks (`instance_layout()`), which the runtime
pastes per object. In train mode `forward(images, targets)` returns the five losses
(`edgeseg.models.rcnn_losses`; `training_loss` takes the padded batches of
`edgeseg.train_instances` as well).

Module names follow torchvision's layout (backbone.body / backbone.fpn, rpn.head, roi_heads.*),
so torchvision-style weights load by name (`load_backbone_weights`).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.models.detection import (box_area, clip_boxes, decode_boxes, grid_anchors, nms_topk, offset_by_group,
                                      roi_align)
from edgeseg.models.layers import make_divisible
from edgeseg.models.registry import register
from edgeseg.models.resnet import ResNet

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # box-head regression weights (Faster R-CNN's)
OUTPUTS = ("boxes", "scores", "classes", "masks")


# -- backbone ----------------------------------------------------------------------------------
class FPN(nn.Module):
    """Feature pyramid (Lin et al., 2017): 1x1 laterals, nearest x2 top-down path, 3x3 outputs,
    and with `extra_level` one more level by stride-2 subsampling of the coarsest (P6)."""

    def __init__(self, in_channels: list[int], channels: int, extra_level: bool):
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1)) for _ in in_channels)
        self.extra_level = extra_level
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        last = self.inner_blocks[-1](feats[-1])
        out = [self.layer_blocks[-1](last)]
        for i in range(len(feats) - 2, -1, -1):
            last = self.inner_blocks[i](feats[i]) + F.interpolate(last, scale_factor=2, mode="nearest")
            out.insert(0, self.layer_blocks[i](last))
        if self.extra_level:
            out.append(F.max_pool2d(out[-1], 1, 2))
        return out


class ResNetFPN(nn.Module):
    def __init__(self, depth: int, width: float, channels: int, extra_level: bool):
        super().__init__()
        self.body = ResNet(depth, output_stride=32, width=width)
        self.fpn = FPN(self.body.stage_channels, channels, extra_level)

    def forward(self, x) -> list[torch.Tensor]:
        return self.fpn(self.body.forward_stages(x))


# -- region proposals --------------------------------------------------------------------------
class RPNHead(nn.Module):
    def __init__(self, channels: int, anchors: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)))
        self.cls_logits = nn.Conv2d(channels, anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, anchors * 4, 1)
        for layer in (self.conv[0][0], self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        t = self.conv(x)
        return self.cls_logits(t), self.bbox_pred(t)


class RPN(nn.Module):
    """Scores every anchor, keeps the best per level, decodes, clips and runs NMS per level to a
    fixed number of proposals."""

    def __init__(self, channels: int, sizes, ratios, strides, *, pre_nms_top_n: tuple[int, int], post_nms_top_n: tuple[int, int],
                 nms_thresh: float = 0.7, min_size: float = 1e-3):
        super().__init__()
        self.sizes, self.ratios, self.strides = tuple(sizes), tuple(ratios), tuple(strides)
        self.head = RPNHead(channels, len(self.ratios))
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n  # (train, test)
        self.nms_thresh, self.min_size = nms_thresh, min_size
        self._anchors: dict = {}

    def anchors(self, grids) -> list[torch.Tensor]:
        """Anchors per level for these feature sizes: constants, computed once per input size."""
        key = tuple(grids)
        if key not in self._anchors:
            self._anchors[key] = [grid_anchors(s, st, g, self.ratios) for s, st, g in zip(self.sizes, self.strides, grids)]
        return self._anchors[key]

    def head_outputs(self, feats):
        """Per level: objectness (N, H*W*A) and deltas (N, H*W*A, 4), anchors (H*W*A, 4)."""
        grids = [tuple(int(d) for d in f.shape[-2:]) for f in feats]
        scores, deltas = [], []
        for f in feats:
            o, d = self.head(f)
            n, a, h, w = o.shape
            scores.append(o.permute(0, 2, 3, 1).reshape(n, h * w * a))
            deltas.append(d.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 4))
        return scores, deltas, self.anchors(grids)

    def proposals(self, scores, deltas, anchors, image_size):
        """(boxes (N, R, 4), valid (N, R)): the proposals, best first, from detached head outputs."""
        mode = 0 if self.training else 1
        boxes, probs, levels = [], [], []
        for lvl, (s, d, a) in enumerate(zip(scores, deltas, anchors)):
            k = min(self.pre_nms_top_n[mode], s.shape[1])
            top, idx = s.detach().topk(k, dim=1)
            dd = d.detach().gather(1, idx[..., None].expand(-1, -1, 4))
            boxes.append(decode_boxes(dd, a.to(dd)[idx]))
            probs.append(torch.sigmoid(top))
            levels.append(torch.full((k,), lvl, dtype=torch.long))
        boxes = clip_boxes(torch.cat(boxes, 1), image_size)
        probs = torch.cat(probs, 1)
        w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        probs = torch.where(torch.minimum(w, h) >= self.min_size, probs, torch.full_like(probs, -1.0))
        span = float(max(image_size) + 1)
        idx, valid = nms_topk(offset_by_group(boxes, torch.cat(levels).to(boxes.device), span), probs, self.nms_thresh,
                              self.post_nms_top_n[mode], score_threshold=-0.5)
        return boxes.gather(1, idx[..., None].expand(-1, -1, 4)), valid


# -- RoI heads ---------------------------------------------------------------------------------
class MultiLevelRoIAlign(nn.Module):
    """RoIAlign from the pyramid level each RoI's size picks (FPN paper, eq. 1: level
    floor(4 + log2(sqrt(area) / 224)), clamped to the pooled levels), in one RoiAlign call."""

    def __init__(self, strides, output_size: int, sampling_ratio: int = 2, canonical=(224.0, 4)):
        super().__init__()
        self.strides, self.output_size, self.sampling_ratio = tuple(strides), output_size, sampling_ratio
        self.k_min = int(round(math.log2(self.strides[0])))
        self.canonical = canonical
        self.register_buffer("scales", torch.tensor([1.0 / s for s in self.strides]), persistent=False)

    def level(self, rois: torch.Tensor) -> torch.Tensor:
        size, k0 = self.canonical
        k = torch.floor(k0 + torch.log2(torch.sqrt(box_area(rois)) / size + 1e-8) + 1e-6)
        return (k.clamp(self.k_min, self.k_min + len(self.strides) - 1) - self.k_min).long()

    def forward(self, feats: list[torch.Tensor], rois: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """feats: the pooled levels, finest first; rois (R, 4) in input pixels; batch_index (R,)."""
        feats = feats[: len(self.strides)]
        n = feats[0].shape[0]
        h, w = (int(d) for d in feats[0].shape[-2:])
        atlas = torch.cat([F.pad(f, (0, w - f.shape[-1], 0, h - f.shape[-2]), mode="replicate") if f.shape[-2:] != (h, w)
                           else f for f in feats])  # (L * N, C, h, w), level-major
        lvl = self.level(rois)
        return roi_align(atlas, rois * self.scales[lvl][:, None], self.output_size, 1.0, self.sampling_ratio,
                         batch_index=lvl * n + batch_index)


class BoxHead(nn.Module):
    """Two fully connected layers on the pooled RoI, then class scores and class-wise deltas
    (torchvision's TwoMLPHead + FastRCNNPredictor)."""

    def __init__(self, channels: int, pool: int, representation: int, num_classes: int):
        super().__init__()
        self.fc6 = nn.Linear(channels * pool * pool, representation)
        self.fc7 = nn.Linear(representation, representation)
        self.cls_score = nn.Linear(representation, num_classes + 1)
        self.bbox_pred = nn.Linear(representation, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        x = F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """Four 3x3 convolutions, a 2x2 stride-2 transposed convolution and per-class mask logits."""

    def __init__(self, channels: int, mask_channels: int, num_classes: int, convs: int = 4):
        super().__init__()
        layers, c = [], channels
        for _ in range(convs):
            layers.append(nn.Sequential(nn.Conv2d(c, mask_channels, 3, padding=1), nn.ReLU(inplace=True)))
            c = mask_channels
        self.convs = nn.Sequential(*layers)
        self.conv5_mask = nn.ConvTranspose2d(mask_channels, mask_channels, 2, 2)
        self.mask_fcn_logits = nn.Conv2d(mask_channels, num_classes + 1, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.mask_fcn_logits(F.relu(self.conv5_mask(self.convs(x))))


# -- the network -------------------------------------------------------------------------------
class MaskRCNN(nn.Module):
    """Mask R-CNN with fixed-size outputs (see the module docstring).

    The defaults are the paper's / torchvision's (ResNet-50, FPN 256, anchors 32..512 on P2..P6,
    1000 proposals, 100 detections). Small inputs want fewer levels and smaller anchors:
    `anchor_sizes=(16, 32, 64, 128)` uses P2..P5 only.
    """

    task = "instance-segmentation"

    def __init__(self, num_classes: int, depth: int = 50, width: float = 1.0, fpn_channels: int = 256,
                 anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                 rpn_pre_nms_top_n=(2000, 1000), rpn_post_nms_top_n=(2000, 1000), rpn_nms_thresh: float = 0.7,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, detections_per_img: int = 100,
                 representation_size: int = 1024, mask_channels: int = 256, mask_convs: int = 4, box_pool: int = 7,
                 mask_pool: int = 14, backbone_weights: str | None = None):
        super().__init__()
        if depth not in (18, 34, 50, 101):
            raise ValueError(f"Mask R-CNN depth must be 18, 34, 50 or 101, got {depth}")
        if not 4 <= len(anchor_sizes) <= 5:
            raise ValueError(f"anchor_sizes needs 4 (P2..P5) or 5 (P2..P6) sizes, got {len(anchor_sizes)}")
        self.num_classes = int(num_classes)
        channels = make_divisible(fpn_channels)
        strides = tuple(4 * 2**i for i in range(len(anchor_sizes)))
        self.backbone = ResNetFPN(depth, width, channels, extra_level=len(anchor_sizes) == 5)
        self.rpn = RPN(channels, anchor_sizes, aspect_ratios, strides, pre_nms_top_n=tuple(rpn_pre_nms_top_n),
                       post_nms_top_n=tuple(rpn_post_nms_top_n), nms_thresh=rpn_nms_thresh)
        pooled = strides[:4]  # RoIs are pooled from P2..P5 (P6 only proposes)
        self.roi_heads = nn.Module()
        self.roi_heads.box_roi_pool = MultiLevelRoIAlign(pooled, box_pool)
        self.roi_heads.box_head = BoxHead(channels, box_pool, representation_size, num_classes)
        self.roi_heads.mask_roi_pool = MultiLevelRoIAlign(pooled, mask_pool)
        self.roi_heads.mask_head = MaskHead(channels, make_divisible(mask_channels), num_classes, mask_convs)
        self.sampling = {"rpn": (rpn_batch_size_per_image, rpn_positive_fraction),
                         "box": (box_batch_size_per_image, box_positive_fraction)}
        self.box_score_thresh, self.box_nms_thresh, self.detections_per_img = box_score_thresh, box_nms_thresh, detections_per_img
        self.mask_size = 2 * mask_pool
        self.input_multiple = 32 * (2 if len(anchor_sizes) == 5 else 1)  # the top-down path doubles exactly
        if backbone_weights:
            load_backbone_weights(self, backbone_weights)

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        size = tuple(int(d) for d in images.shape[-2:])
        if any(d % self.input_multiple for d in size):
            raise ValueError(f"Mask R-CNN input sides must be multiples of {self.input_multiple}, got {size}")
        feats = self.backbone(images)
        scores, deltas, anchors = self.rpn.head_outputs(feats)
        proposals, valid = self.rpn.proposals(scores, deltas, anchors, size)
        if self.training:
            if targets is None:
                raise ValueError("training Mask R-CNN needs targets (boxes, labels, masks per image)")
            from edgeseg.models.rcnn_losses import maskrcnn_losses

            return maskrcnn_losses(self, feats, (scores, deltas, anchors), proposals, valid, targets, size)
        return self.detect(feats, proposals, valid, size)

    def instance_layout(self) -> dict:
        """The manifest's `instances` entry for this network's outputs (edgeseg.instance_layout)."""
        from edgeseg.instance_layout import InstanceLayout

        return InstanceLayout("detections", self.num_classes, outputs={k: k for k in OUTPUTS}, mask_space="box",
                              score_threshold=self.box_score_thresh, iou_threshold=self.box_nms_thresh,
                              max_detections=self.detections_per_img).to_dict()

    def training_loss(self, images: torch.Tensor, targets, loss_fn=None, ignore_index=None) -> torch.Tensor:
        """The sum of the five losses: what `edgeseg.train.fit` minimises. `targets` is a list of
        per-image dicts (see the module doc) or the padded batch of
        `edgeseg.train_instances.InstanceReaderDataset`: boxes (N, G, 4), classes (N, G) with -1
        for padding, masks (N, G, h, w) uint8 0..255 (the share of each pixel the object covers)."""
        if isinstance(targets, dict):
            targets = [{"boxes": b[c >= 0], "labels": c[c >= 0], "masks": m[c >= 0].float() / 255.0}
                       for b, c, m in zip(targets["boxes"], targets["classes"], targets["masks"])]
        return sum(self(images, targets).values())

    def box_outputs(self, feats, rois: torch.Tensor, batch_index: torch.Tensor):
        return self.roi_heads.box_head(self.roi_heads.box_roi_pool(feats, rois, batch_index))

    def mask_logits(self, feats, rois: torch.Tensor, batch_index: torch.Tensor):
        return self.roi_heads.mask_head(self.roi_heads.mask_roi_pool(feats, rois, batch_index))

    def detect(self, feats, proposals: torch.Tensor, valid: torch.Tensor, size) -> tuple[torch.Tensor, ...]:
        n, r = proposals.shape[:2]
        k = self.num_classes
        batch_index = torch.arange(n, device=proposals.device).repeat_interleave(r)
        logits, deltas = self.box_outputs(feats, proposals.reshape(n * r, 4), batch_index)
        probs = F.softmax(logits, -1)[:, 1:].reshape(n, r * k)
        boxes = decode_boxes(deltas.reshape(n, r, k + 1, 4)[:, :, 1:], proposals[:, :, None], BOX_WEIGHTS)
        boxes = clip_boxes(boxes, size).reshape(n, r * k, 4)
        w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        ok = torch.logical_and(valid.repeat_interleave(k, 1), torch.minimum(w, h) >= 1e-2)
        probs = torch.where(ok, probs, torch.full_like(probs, -1.0))
        classes = torch.arange(k, device=boxes.device).repeat(r)  # the class of each of the R * K candidates
        idx, keep = nms_topk(offset_by_group(boxes, classes, float(max(size) + 1)), probs, self.box_nms_thresh,
                             self.detections_per_img, score_threshold=self.box_score_thresh)
        live = keep.to(probs.dtype)  # empty rows become zeros, the same on every backend
        det_boxes = boxes.gather(1, idx[..., None].expand(-1, -1, 4)) * live[..., None]
        det_scores = probs.gather(1, idx) * live
        det_classes = torch.where(keep, classes[idx], torch.zeros_like(idx))
        d = idx.shape[1]
        masks = self.mask_logits(feats, det_boxes.reshape(n * d, 4), torch.arange(n, device=idx.device).repeat_interleave(d))
        pick = (det_classes.reshape(n * d) + 1)[:, None, None, None].expand(-1, 1, self.mask_size, self.mask_size)
        masks = torch.sigmoid(masks.gather(1, pick)).reshape(n, d, self.mask_size, self.mask_size) * live[..., None, None]
        return det_boxes, det_scores, det_classes, masks


# -- weights -----------------------------------------------------------------------------------
_PREFIXES = ("module.", "model.")


def backbone_state_dict(sd: dict, model: MaskRCNN) -> dict:
    """The tensors of a torchvision-style file that fit this model's backbone, under its names.

    Takes a classification ResNet (`conv1.weight`, `layer1.0.conv1.weight`, ...; `fc.*` is left
    out), a torchvision detection checkpoint (`backbone.body.*`, `backbone.fpn.*`, older FPNs
    without the `.0` of their conv wrappers), or this model's own state_dict."""
    own = model.state_dict()
    out = {}
    for key, value in sd.items():
        for p in _PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
        if key.startswith(("conv1.", "bn1.", "layer")):
            key = "backbone.body." + key
        elif key.startswith("body."):
            key = "backbone." + key
        elif key.startswith(("fpn.", "backbone.fpn.")):
            key = "backbone." + key if key.startswith("fpn.") else key
            parts = key.split(".")
            if len(parts) == 5:  # backbone.fpn.inner_blocks.0.weight (torchvision < 0.13)
                key = ".".join(parts[:4] + ["0", parts[4]])
        if key.startswith("backbone.") and key in own and own[key].shape == value.shape:
            out[key] = value
    return out


def load_backbone_weights(model: MaskRCNN, path: str | os.PathLike) -> list[str]:
    """Load ResNet (and FPN, when the file has it) weights from a local torchvision-style file.
    Returns the backbone tensors the file did not provide."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights not found: {path} (weights are read from local files only)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(sd).__name__}")
    usable = backbone_state_dict(sd, model)
    if not any(k.startswith("backbone.body.") for k in usable):
        raise ValueError(f"{path}: no tensor fits the ResNet-{model.backbone.body.depth} backbone by name and shape; "
                         "pass a torchvision-style ResNet or Mask R-CNN state_dict of the same depth and width")
    model.load_state_dict(usable, strict=False)
    return [k for k in model.state_dict() if k.startswith("backbone.") and k not in usable and "num_batches" not in k]


# A configuration for small inputs (128..320 px) and CPU training: ResNet-18 at quarter width, P2..P5
# with anchors 16..128, a few hundred proposals, light heads, 14 x 14 masks. Trains on synthetic
# instance scenes at 128 x 128 in minutes on two cores (the README's `edgeseg train` command).
PRESETS = {
    "compact": dict(depth=18, width=0.25, fpn_channels=48, anchor_sizes=(16, 32, 64, 128), rpn_pre_nms_top_n=(300, 300),
                    rpn_post_nms_top_n=(150, 100), rpn_batch_size_per_image=128, box_batch_size_per_image=64,
                    detections_per_img=20, representation_size=128, mask_channels=32, mask_convs=2, mask_pool=7),
}


@register("maskrcnn_resnet", task="instance-segmentation")
def maskrcnn_resnet(num_classes: int, preset: str | None = None, **kw):
    """Mask R-CNN, ResNet + FPN (`depth` 18/34/50, default 50; preset='compact' for small inputs on CPU)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown Mask R-CNN preset {preset!r}; presets: {', '.join(PRESETS)}")
        kw = {**PRESETS[preset], **kw}
    kw.setdefault("depth", 50)
    return MaskRCNN(num_classes, **kw)
