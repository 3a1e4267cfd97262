"""DeepLabV3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution", 2018).

An encoder with atrous (dilated) last stages, Atrous Spatial Pyramid Pooling on its deepest
feature, and a decoder that refines the upsampled ASPP output with stride-4 features.

Export notes: the image-pooling branch of ASPP is a global mean (ReduceMean) whose 1x1 projection
is *added* to the projection of the spatial branches. That is the same function as concatenating a
broadcast copy and projecting (a 1x1 convolution is linear over its input channels), without the
Shape/Expand ops a broadcast-to-size needs. All resizes use fixed integer factors.
"""
from __future__ import annotations

import torch
from torch import nn

from edgeseg.models.layers import ConvBNAct, upsample
from edgeseg.models.registry import register
from edgeseg.models.resnet import build_encoder


class SeparableConvBNAct(nn.Sequential):
    """Depthwise (atrous) 3x3 + BN + act, then pointwise 1x1 + BN + act."""

    def __init__(self, cin, cout, dilation=1, act=nn.ReLU):
        super().__init__(ConvBNAct(cin, cin, 3, dilation=dilation, groups=cin, act=act), ConvBNAct(cin, cout, 1, act=act))


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: a 1x1 branch, one 3x3 branch per rate, image pooling.

    `extra_channels` adds one more spatial input (already at the feature's resolution) projected
    by a 1x1 branch; Gated-SCNN feeds its edge map through it.
    """

    def __init__(self, cin: int, cout: int = 256, rates=(6, 12, 18), separable: bool = False,
                 dropout: float = 0.1, extra_channels: int = 0):
        super().__init__()
        branch = (lambda r: SeparableConvBNAct(cin, cout, r)) if separable else (lambda r: ConvBNAct(cin, cout, 3, dilation=r))
        self.branches = nn.ModuleList([ConvBNAct(cin, cout, 1)] + [branch(r) for r in rates])
        self.extra = ConvBNAct(extra_channels, cout, 1) if extra_channels else None
        n = len(self.branches) + (1 if extra_channels else 0)
        # image pooling: mean -> 1x1 conv -> ReLU; no BN (a 1x1 map breaks BN at batch size 1)
        self.pool = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Conv2d(n * cout, cout, 1, bias=False)
        self.project_pool = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x, extra=None):
        ys = [b(x) for b in self.branches]
        if self.extra is not None:
            if extra is None:
                raise ValueError("this ASPP was built with extra_channels and needs the extra input")
            ys.append(self.extra(extra))
        pooled = self.pool(x.mean((2, 3), keepdim=True))
        y = self.project(torch.cat(ys, 1)) + self.project_pool(pooled)
        return self.dropout(self.act(self.bn(y)))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on a ResNet or MobileNetV3 encoder.

    output_stride 16 uses ASPP rates (6, 12, 18) and output_stride 8 doubles them, as in the paper.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet", depth: int = 50, variant: str = "large",
                 width: float = 1.0, output_stride: int = 16, aspp_channels: int = 256, decoder_channels: int = 256,
                 low_channels: int = 48, rates=None, separable: bool | None = None, dropout: float = 0.1,
                 backbone_weights: str | None = None):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"DeepLabV3+ output_stride must be 8 or 16, got {output_stride}")
        self.backbone = build_encoder(backbone, output_stride, width=width, variant=variant, depth=depth,
                                      backbone_weights=backbone_weights)
        rates = tuple(rates) if rates is not None else ((6, 12, 18) if output_stride == 16 else (12, 24, 36))
        separable = (backbone == "mobilenetv3") if separable is None else separable
        high_c, low_c = self.backbone.channels[output_stride], self.backbone.channels[4]
        self.aspp = ASPP(high_c, aspp_channels, rates, separable=separable, dropout=dropout)
        self.low_proj = ConvBNAct(low_c, low_channels, 1)
        conv = (lambda i, o: SeparableConvBNAct(i, o)) if separable else (lambda i, o: ConvBNAct(i, o, 3))
        self.decoder = nn.Sequential(conv(aspp_channels + low_channels, decoder_channels),
                                     conv(decoder_channels, decoder_channels))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.output_stride = output_stride
        self.input_multiple = output_stride  # every stride divides the input exactly

    def forward(self, x):
        f = self.backbone(x)
        y = upsample(self.aspp(f[self.output_stride]), self.output_stride // 4)
        y = self.decoder(torch.cat([y, self.low_proj(f[4])], 1))
        return upsample(self.classifier(y), 4)


@register("deeplabv3plus_resnet")
def deeplabv3plus_resnet(num_classes: int, **kw):
    """DeepLabV3+, ResNet encoder (`depth` 18/34/50/101, default 50), atrous output stride 16 (or 8)."""
    kw.setdefault("depth", 50)
    return DeepLabV3Plus(num_classes, backbone="resnet", **kw)


@register("deeplabv3plus_mobilenetv3")
def deeplabv3plus_mobilenetv3(num_classes: int, **kw):
    """DeepLabV3+, MobileNetV3 encoder (`variant` large/small) with separable ASPP and decoder."""
    return DeepLabV3Plus(num_classes, backbone="mobilenetv3", **kw)
