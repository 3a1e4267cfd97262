"""U-Net (Ronneberger et al., 2015) with batch norm, padded convolutions and bilinear or
transposed-convolution upsampling."""
from __future__ import annotations

import torch
from torch import nn

from edgeseg.models.layers import ConvBNAct, upsample
from edgeseg.models.registry import register


class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(ConvBNAct(cin, cout, 3), ConvBNAct(cout, cout, 3))


class UNet(nn.Module):
    def __init__(self, num_classes: int, base: int = 32, depth: int = 4, bilinear: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        chans = [base * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(3, chans[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), DoubleConv(chans[i], chans[i + 1])) for i in range(depth))
        self.bilinear = bilinear
        self.up = nn.ModuleList(
            nn.Identity() if bilinear else nn.ConvTranspose2d(chans[i + 1], chans[i + 1], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(DoubleConv(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        self.input_multiple = 2**depth

    def forward(self, x):
        skips = [self.inc(x)]
        for d in self.down:
            skips.append(d(skips[-1]))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = upsample(y, 2) if self.bilinear else up(y)
            y = dec(torch.cat([y, skips.pop()], 1))
        return self.head(y)


@register("unet")
def unet(num_classes: int, **kw):
    """U-Net; `base` channels (32), `depth` (4), bilinear or transposed-conv upsampling."""
    return UNet(num_classes, **kw)
