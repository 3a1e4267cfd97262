"""LR-ASPP (Howard et al., "Searching for MobileNetV3", 2019) on a MobileNetV3 encoder."""
from __future__ import annotations

from torch import nn

from edgeseg.models.backbones import MobileNetV3, load_backbone_weights
from edgeseg.models.layers import ConvBNAct, upsample
from edgeseg.models.registry import register


class LRASPP(nn.Module):
    """Lite R-ASPP: a 1x1 branch gated by a global-context branch, plus a low-level skip.

    `low_stride` picks the skip feature (8 in the paper; 4 gives sharper masks for small models).
    """

    def __init__(self, num_classes: int, variant: str = "large", width: float = 1.0, low_stride: int = 8,
                 head_channels: int = 128, backbone_weights: str | None = None):
        super().__init__()
        self.backbone = MobileNetV3(variant, width, output_stride=16)
        if backbone_weights:
            load_backbone_weights(self.backbone, backbone_weights)
        if low_stride not in (4, 8):
            raise ValueError(f"low_stride must be 4 or 8, got {low_stride}")
        self.low_stride = low_stride
        high_c, low_c = self.backbone.channels[16], self.backbone.channels[low_stride]
        self.cbr = ConvBNAct(high_c, head_channels, 1)
        self.scale = nn.Sequential(nn.Conv2d(high_c, head_channels, 1, bias=False), nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_c, num_classes, 1)
        self.high_classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.input_multiple = 32

    def forward(self, x):
        f = self.backbone(x)
        high = f[16]
        y = self.cbr(high) * self.scale(high.mean((2, 3), keepdim=True))
        y = upsample(y, 16 // self.low_stride)
        y = self.low_classifier(f[self.low_stride]) + self.high_classifier(y)
        return upsample(y, self.low_stride)


@register("lraspp_mobilenetv3")
def lraspp_mobilenetv3(num_classes: int, **kw):
    """LR-ASPP, MobileNetV3-Large encoder (variant='small' for the small one); mobile real-time."""
    return LRASPP(num_classes, **kw)


@register("lraspp_mobilenetv3_small")
def lraspp_mobilenetv3_small(num_classes: int, **kw):
    """LR-ASPP, MobileNetV3-Small encoder; the smallest zoo model."""
    kw.setdefault("variant", "small")
    return LRASPP(num_classes, **kw)
