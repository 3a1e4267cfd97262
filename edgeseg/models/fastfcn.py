"""FastFCN (Wu et al., "FastFCN: Rethinking Dilated Convolution in the Backbone for Semantic
Segmentation", 2019).

The encoder runs without dilation (output stride 32, the cheap plain network); the Joint Pyramid
Upsampling module rebuilds a stride-8 feature from the stride-8/16/32 features: each is projected
by a 3x3 conv, the two deeper ones are upsampled by fixed factors (2 and 4) to stride 8, and
parallel separable convolutions with dilations 1, 2, 4 and 8 over their concatenation extract
multi-scale context, standing in for the dilated backbone. A segmentation head (FCN or ASPP, as
in the paper's FCN / DeepLabV3 variants) runs on that feature.
"""
from __future__ import annotations

import torch
from torch import nn

from edgeseg.models.deeplabv3plus import ASPP
from edgeseg.models.layers import ConvBNAct, upsample
from edgeseg.models.registry import register
from edgeseg.models.resnet import build_encoder


class SeparableConv(nn.Sequential):
    """Depthwise dilated 3x3 + BN, then pointwise 1x1 + BN + ReLU (JPU's dilated branches)."""

    def __init__(self, cin, cout, dilation):
        super().__init__(
            nn.Conv2d(cin, cin, 3, 1, dilation, dilation=dilation, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            ConvBNAct(cin, cout, 1),
        )


class JPU(nn.Module):
    """Joint Pyramid Upsampling: features at strides (8, 16, 32) -> one stride-8 feature of
    4 * width channels."""

    def __init__(self, in_channels: tuple[int, int, int], width: int = 512, dilations=(1, 2, 4, 8)):
        super().__init__()
        self.proj = nn.ModuleList(ConvBNAct(c, width, 3) for c in in_channels)
        self.dilated = nn.ModuleList(SeparableConv(len(in_channels) * width, width, d) for d in dilations)
        self.out_channels = width * len(dilations)

    def forward(self, f8, f16, f32):
        y = torch.cat([self.proj[0](f8), upsample(self.proj[1](f16), 2), upsample(self.proj[2](f32), 4)], 1)
        return torch.cat([d(y) for d in self.dilated], 1)


class FCNHead(nn.Sequential):
    def __init__(self, cin, num_classes, mid=None, dropout=0.1):
        mid = mid or max(cin // 4, 32)
        super().__init__(ConvBNAct(cin, mid, 3), nn.Dropout(dropout), nn.Conv2d(mid, num_classes, 1))


class FastFCN(nn.Module):
    """ResNet (undilated) + JPU + head. `head` is 'fcn' (default) or 'aspp'."""

    def __init__(self, num_classes: int, depth: int = 50, width: float = 1.0, jpu_width: int = 512,
                 head: str = "fcn", head_channels: int = 256, backbone_weights: str | None = None):
        super().__init__()
        self.backbone = build_encoder("resnet", 32, width=width, depth=depth, backbone_weights=backbone_weights)
        ch = self.backbone.channels
        self.jpu = JPU((ch[8], ch[16], ch[32]), jpu_width)
        if head == "fcn":
            self.head = FCNHead(self.jpu.out_channels, num_classes, mid=head_channels)
        elif head == "aspp":
            # DeepLabV3's head at stride 8: rates (12, 24, 36)
            self.head = nn.Sequential(ASPP(self.jpu.out_channels, head_channels, (12, 24, 36)),
                                      ConvBNAct(head_channels, head_channels, 3), nn.Conv2d(head_channels, num_classes, 1))
        else:
            raise ValueError(f"FastFCN head must be 'fcn' or 'aspp', got {head!r}")
        self.input_multiple = 32

    def forward(self, x):
        f = self.backbone(x)
        return upsample(self.head(self.jpu(f[8], f[16], f[32])), 8)


@register("fastfcn_resnet")
def fastfcn_resnet(num_classes: int, **kw):
    """FastFCN: undilated ResNet (`depth`, default 50) + Joint Pyramid Upsampling + FCN/ASPP head."""
    return FastFCN(num_classes, **kw)
