"""A one-stage instance segmentation network in the YOLO-seg style (Bolya et al.'s YOLACT masks on
an anchor-free detector, as Ultralytics' YOLOv8-seg): an encoder, a feature pyramid at strides
8/16/32, a dense head per level and a prototype branch at stride 4.

    net = models.create("yoloseg", num_classes=4, encoder="mobilenetv3_small")
    predictions, protos = net(x)      # eval: (N, 4 + nc + nm, A), (N, nm, H/4, W/4)

Every anchor (one per feature cell, `A` in all) predicts its box as distances from the cell's
centre to the four sides, a score per class (sigmoid: several classes may fire) and `num_masks`
coefficients; an object's mask is sigmoid(coefficients . prototypes) cropped to its box. The
outputs are the `yolo` instance layout (edgeseg.instance_layout): rows cx, cy, w, h in input
pixels, class scores in 0..1, raw coefficients - the layout of Ultralytics' exports, so the same
runtime post-processing serves both. Export-friendly: the anchor grid is a constant of the input
size and nothing in the body depends on the data; NMS and mask assembly are the runtime's, or
the graph's with `converters.instance_export` (--instance-tail).

Training (`training_loss`) assigns anchors to objects with the task-aligned rule of TOOD/YOLOv8
(`edgeseg.instance_losses`). Encoders are named at build time: `ENCODERS` is the table.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.models.layers import ConvBNAct, make_divisible
from edgeseg.models.registry import register

STRIDES = (8, 16, 32)
PROTO_STRIDE = 4


def _mobilenet(variant):
    def build(width: float = 1.0, depth=None):
        from edgeseg.models.backbones import MobileNetV3

        return MobileNetV3(variant, width, output_stride=32)

    return build


def _resnet(depth_default):
    def build(width: float = 1.0, depth=None):
        from edgeseg.models.resnet import ResNet

        return ResNet(depth or depth_default, output_stride=32, width=width)

    return build


# name -> builder(width) of an encoder whose forward gives {stride: feature} and `.channels`
ENCODERS = {
    "mobilenetv3_small": _mobilenet("small"),
    "mobilenetv3_large": _mobilenet("large"),
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
}


class Head(nn.Module):
    """One pyramid level: a box/coefficient branch and a class branch (decoupled, as YOLOv8)."""

    def __init__(self, c: int, num_classes: int, num_masks: int, stride: int):
        super().__init__()
        self.reg = nn.Sequential(ConvBNAct(c, c, 3, act=nn.SiLU), ConvBNAct(c, c, 3, act=nn.SiLU))
        self.cls = nn.Sequential(ConvBNAct(c, c, 3, act=nn.SiLU), ConvBNAct(c, c, 3, act=nn.SiLU))
        self.box = nn.Conv2d(c, 4, 1)
        self.coef = nn.Conv2d(c, num_masks, 1)
        self.logits = nn.Conv2d(c, num_classes, 1)
        nn.init.constant_(self.logits.bias, -math.log((1 - 0.01) / 0.01))  # start near 1% objectness
        nn.init.normal_(self.box.weight, std=0.01)
        nn.init.constant_(self.box.bias, math.log(math.e**2 - 1))  # softplus -> 2 cells each side

    def forward(self, x):
        r = self.reg(x)
        return self.box(r), self.logits(self.cls(x)), self.coef(r)


class YOLOSeg(nn.Module):
    task = "instance-segmentation"

    def __init__(self, num_classes: int, encoder: str = "mobilenetv3_small", width: float = 1.0, depth: int | None = None,
                 channels: int = 64, num_masks: int = 32, proto_channels: int = 64, score_threshold: float = 0.25,
                 iou_threshold: float = 0.6, max_detections: int = 100, backbone_weights: str | None = None):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"yoloseg encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
        self.num_classes, self.num_masks = int(num_classes), int(num_masks)
        self.score_threshold, self.iou_threshold, self.max_detections = float(score_threshold), float(iou_threshold), int(max_detections)
        self.encoder = ENCODERS[encoder](width=width, depth=depth)
        if backbone_weights:
            from edgeseg.models.backbones import load_backbone_weights

            load_backbone_weights(self.encoder, backbone_weights)
        ch = self.encoder.channels
        c = make_divisible(channels)
        self.lateral = nn.ModuleList(ConvBNAct(ch[s], c, 1, act=nn.SiLU) for s in STRIDES)
        self.smooth = nn.ModuleList(ConvBNAct(c, c, 3, act=nn.SiLU) for _ in STRIDES)
        # bottom-up path (PAN): finer levels inform the coarse ones, which see large objects whole
        self.down = nn.ModuleList(ConvBNAct(c, c, 3, stride=2, act=nn.SiLU) for _ in STRIDES[1:])
        self.heads = nn.ModuleList(Head(c, self.num_classes, self.num_masks, s) for s in STRIDES)
        p = make_divisible(proto_channels)
        self.proto_in = ConvBNAct(c, p, 3, act=nn.SiLU)
        self.proto_skip = ConvBNAct(ch[PROTO_STRIDE], p, 1, act=nn.SiLU)  # stride-4 detail for mask edges
        self.proto = nn.Sequential(ConvBNAct(p, p, 3, act=nn.SiLU), nn.Conv2d(p, self.num_masks, 1))
        self.input_multiple = max(STRIDES)
        self._grids: dict = {}

    # -- the body -------------------------------------------------------------------------------
    def features(self, x):
        f = self.encoder(x)
        lat = [l(f[s]) for l, s in zip(self.lateral, STRIDES)]
        top = [lat[-1]]
        for i in range(len(lat) - 2, -1, -1):  # top-down: coarse context into fine levels
            top.insert(0, lat[i] + F.interpolate(top[0], scale_factor=2.0, mode="nearest"))
        pyr = [self.smooth[0](top[0])]
        for i in range(1, len(top)):  # bottom-up
            pyr.append(self.smooth[i](top[i] + self.down[i - 1](pyr[-1])))
        up = F.interpolate(self.proto_in(pyr[0]), scale_factor=2.0, mode="bilinear", align_corners=False)
        protos = self.proto(up + self.proto_skip(f[PROTO_STRIDE]))
        return pyr, protos

    def grid(self, pyr):
        """Anchor centres (A, 2) in input pixels and their strides (A, 1): constants of the input size."""
        key = tuple((int(p.shape[-2]), int(p.shape[-1])) for p in pyr)
        if key not in self._grids:
            centres, strides = [], []
            for (h, w), s in zip(key, STRIDES):
                ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
                centres.append(torch.stack([xs, ys], -1).reshape(-1, 2).add(0.5).mul(s))
                strides.append(torch.full((h * w, 1), float(s)))
            self._grids[key] = (torch.cat(centres), torch.cat(strides))
        c, s = self._grids[key]
        return c.to(pyr[0].device), s.to(pyr[0].device)

    def raw(self, x):
        """Training-side outputs: distances (N, A, 4) in input pixels, class logits (N, A, nc),
        coefficients (N, A, nm), protos (N, nm, h, w), anchor centres (A, 2), strides (A, 1)."""
        pyr, protos = self.features(x)
        dist, logits, coefs = [], [], []
        for p, head in zip(pyr, self.heads):
            b, l, m = head(p)
            dist.append(b.flatten(2))
            logits.append(l.flatten(2))
            coefs.append(m.flatten(2))
        centres, strides = self.grid(pyr)
        dist = F.softplus(torch.cat(dist, 2).transpose(1, 2)) * strides
        return dist, torch.cat(logits, 2).transpose(1, 2), torch.cat(coefs, 2).transpose(1, 2), protos, centres, strides

    def forward(self, x):
        dist, logits, coefs, protos, centres, _ = self.raw(x)
        lt, rb = dist[..., :2], dist[..., 2:]
        cxcy = centres + (rb - lt) / 2
        wh = lt + rb
        pred = torch.cat([cxcy, wh, torch.sigmoid(logits), coefs], -1).transpose(1, 2)
        return pred, protos

    # -- what deployment and training need ------------------------------------------------------
    def instance_layout(self) -> dict:
        """The manifest's `instances` entry for this network's outputs (edgeseg.instance_layout)."""
        from edgeseg.instance_layout import InstanceLayout

        return InstanceLayout("yolo", self.num_classes, self.num_masks, outputs={"predictions": "predictions", "protos": "protos"},
                              score_threshold=self.score_threshold, iou_threshold=self.iou_threshold,
                              max_detections=self.max_detections).to_dict()

    output_names = ("predictions", "protos")

    def training_loss(self, images: torch.Tensor, targets, loss_fn=None, ignore_index=None) -> torch.Tensor:
        """Box (GIoU), class (BCE on task-aligned scores) and mask (BCE within each box) losses
        summed. `targets`: the padded batch of `edgeseg.train_instances.InstanceReaderDataset`."""
        from edgeseg.instance_losses import yoloseg_loss

        return yoloseg_loss(self.raw(images), targets, self.num_classes)[0]


@register("yoloseg", task="instance-segmentation")
def yoloseg(num_classes: int, **kw):
    """YOLO-seg style one-stage instance model (anchor-free head, mask prototypes); encoder=mobilenetv3_small|resnet18|..."""
    return YOLOSeg(num_classes, **kw)
