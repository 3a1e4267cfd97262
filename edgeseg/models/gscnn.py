"""Gated-SCNN (Takikawa et al., "Gated-SCNN: Gated Shape CNNs for Semantic Segmentation", 2019).

A regular stream (ResNet with an atrous last stage, ASPP, DeepLabV3+-style decoder) and a shape
stream that processes only boundary information: it starts from the stride-4 feature and passes
through residual blocks and gated convolutions, each gated by an attention map computed from the
shape features and a deeper regular-stream feature. The shape stream's edge logits are fused with
an image-gradient map into an attention map that enters ASPP as an extra branch.

Deployment changes from the paper:
- The paper feeds OpenCV Canny edges of the uint8 input image (computed in NumPy, outside the
  graph). Here the image gradient is a Sobel magnitude of the channel-mean of the network input,
  done by a fixed (non-trainable) convolution inside the graph, so the whole model exports as one
  ONNX/CoreML graph with no host-side step.
- The shape stream runs at stride 4 (the paper: full resolution) and the edge map is upsampled
  by a fixed factor 4; resizes use fixed integer factors only.
- `forward` returns the segmentation logits; `return_edges=True` (argument or attribute) adds
  the fused edge logits (N, 1, H, W) as a second output. Exports keep the default single output.

Training uses `training_loss`: the segmentation loss, a class-balanced edge BCE against the
label boundaries, and the paper's attention loss (segmentation CE restricted to confident edge
pixels). The dual-task consistency regulariser of the paper is not included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.models.deeplabv3plus import ASPP
from edgeseg.models.layers import ConvBNAct, upsample
from edgeseg.models.registry import register
from edgeseg.models.resnet import BasicBlock, build_encoder


class GatedSpatialConv(nn.Module):
    """Gated convolution: alpha = sigmoid(BN(conv1x1(relu(conv1x1(BN([s, r])))))), then
    conv1x1(s * (1 + alpha)). `s`: shape-stream feature, `r`: one-channel regular-stream map."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.BatchNorm2d(channels + 1),
            nn.Conv2d(channels + 1, channels + 1, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels + 1, 1, 1),
            nn.BatchNorm2d(1),
            nn.Sigmoid(),
        )
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, s, r):
        alpha = self.gate(torch.cat([s, r], 1))
        return self.conv(s * (alpha + 1))


class SobelMagnitude(nn.Module):
    """|grad I| of the channel mean, by fixed Sobel kernels (buffers, not weights)."""

    def __init__(self):
        super().__init__()
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
        self.register_buffer("kernel", torch.stack([gx, gx.t()])[:, None], persistent=False)

    def forward(self, x):
        g = F.conv2d(x.mean(1, keepdim=True), self.kernel, padding=1)
        return torch.sqrt((g * g).sum(1, keepdim=True) + 1e-6)


class GSCNN(nn.Module):
    def __init__(self, num_classes: int, depth: int = 50, width: float = 1.0, output_stride: int = 16,
                 aspp_channels: int = 256, decoder_channels: int = 256, shape_channels: int = 64,
                 return_edges: bool = False, edge_weight: float = 1.0, att_weight: float = 1.0,
                 backbone_weights: str | None = None):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"Gated-SCNN output_stride must be 8 or 16, got {output_stride}")
        self.backbone = build_encoder("resnet", output_stride, width=width, depth=depth, backbone_weights=backbone_weights)
        strides, chans = self.backbone.stage_strides, self.backbone.stage_channels
        self.gate_factors = tuple(s // 4 for s in strides[1:])  # layer2..layer4 -> stride 4
        c1, c2, c3 = shape_channels, shape_channels // 2, shape_channels // 4
        # shape stream
        self.dsn = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in chans[1:])
        self.res1 = nn.Sequential(nn.Conv2d(chans[0], c1, 1), BasicBlock(c1, c1))
        self.d1, self.gate1 = nn.Conv2d(c1, c2, 1), GatedSpatialConv(c2)
        self.res2, self.d2, self.gate2 = BasicBlock(c2, c2), nn.Conv2d(c2, c3, 1), GatedSpatialConv(c3)
        self.res3, self.d3, self.gate3 = BasicBlock(c3, c3), nn.Conv2d(c3, 8, 1), GatedSpatialConv(8)
        self.fuse = nn.Conv2d(8, 1, 1, bias=False)
        self.gradient = SobelMagnitude()
        self.cw = nn.Conv2d(2, 1, 1, bias=False)
        # regular stream head: ASPP with the edge attention as an extra branch, then the decoder
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(chans[-1], aspp_channels, rates, extra_channels=1)
        self.bot_aspp = ConvBNAct(aspp_channels, aspp_channels, 1)
        self.bot_fine = ConvBNAct(chans[0], 48, 1)
        self.final = nn.Sequential(ConvBNAct(aspp_channels + 48, decoder_channels, 3),
                                   ConvBNAct(decoder_channels, decoder_channels, 3),
                                   nn.Conv2d(decoder_channels, num_classes, 1))
        self.output_stride = output_stride
        self.return_edges = return_edges
        self.edge_weight, self.att_weight = float(edge_weight), float(att_weight)
        self.input_multiple = output_stride

    def forward(self, x, return_edges: bool | None = None):
        m1, m2, m3, m4 = self.backbone.forward_stages(x)
        gates = [upsample(d(m), f) for d, m, f in zip(self.dsn, (m2, m3, m4), self.gate_factors)]
        cs = self.gate1(self.d1(self.res1(m1)), gates[0])
        cs = self.gate2(self.d2(self.res2(cs)), gates[1])
        cs = self.gate3(self.d3(self.res3(cs)), gates[2])
        edge_logits = self.fuse(cs)  # stride 4
        grad = F.avg_pool2d(self.gradient(x), 4)
        acts = torch.sigmoid(self.cw(torch.cat([torch.sigmoid(edge_logits), grad], 1)))
        pool = self.output_stride // 4
        y = self.aspp(m4, F.avg_pool2d(acts, pool) if pool > 1 else acts)
        y = upsample(self.bot_aspp(y), pool)
        y = self.final(torch.cat([self.bot_fine(m1), y], 1))
        seg = upsample(y, 4)
        if self.return_edges if return_edges is None else return_edges:
            return seg, upsample(edge_logits, 4)
        return seg

    @staticmethod
    def edge_target(target: torch.Tensor, ignore_index: int = 255):
        """Label boundaries of (N, H, W) class maps: (edges float, valid bool), each (N, 1, H, W).

        A pixel is an edge when its 3x3 neighbourhood holds another valid class; ignored pixels are
        not scored."""
        t = target[:, None].float()
        valid = target[:, None] != ignore_index
        big = torch.where(valid, t, torch.full_like(t, -1.0))
        small = torch.where(valid, t, torch.full_like(t, 1e4))
        hi = F.max_pool2d(big, 3, 1, 1)
        lo = -F.max_pool2d(-small, 3, 1, 1)
        return ((hi != t) | (lo != t)).float() * valid, valid

    def training_loss(self, x, target, seg_loss, ignore_index: int = 255):
        """Segmentation loss + edge_weight * balanced edge BCE + att_weight * CE on edge pixels."""
        seg, edge = self(x, return_edges=True)
        loss = seg_loss(seg, target)
        edges, valid = self.edge_target(target, ignore_index)
        if self.edge_weight:
            n_pos = (edges * valid).sum()
            n = valid.sum().clamp(min=1)
            # class balance as in the paper: positives weighted by the share of negatives
            w = torch.where(edges > 0, (n - n_pos) / n, n_pos / n) * valid
            bce = F.binary_cross_entropy_with_logits(edge, edges, weight=w, reduction="sum") / n
            loss = loss + self.edge_weight * bce
        if self.att_weight:
            confident = (torch.sigmoid(edge.detach())[:, 0] > 0.8) & (target != ignore_index)
            if confident.any():
                att_t = torch.where(confident, target, torch.full_like(target, ignore_index))
                loss = loss + self.att_weight * F.cross_entropy(seg, att_t, ignore_index=ignore_index)
        return loss


@register("gscnn_resnet")
def gscnn_resnet(num_classes: int, **kw):
    """Gated-SCNN: ResNet regular stream (`depth`, default 50) + gated shape stream; edges on request."""
    return GSCNN(num_classes, **kw)
