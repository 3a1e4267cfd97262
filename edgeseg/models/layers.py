"""Building blocks shared by the zoo, chosen for clean export: Conv/BN/activation, squeeze-excite
with a global pool, and resizes by fixed integer factors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, dilation=1, groups=1, act: type[nn.Module] | None = nn.ReLU):
        pad = (k - 1) // 2 * dilation
        layers = [nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.Hardswish, nn.ReLU6) else act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        mid = make_divisible(channels // reduction)
        self.fc1 = nn.Conv2d(channels, mid, 1)
        self.fc2 = nn.Conv2d(mid, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)  # ReduceMean: exports everywhere, unlike adaptive pools
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


def upsample(x: torch.Tensor, factor: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize by a fixed integer factor: a constant-scale Resize in ONNX, no Shape ops."""
    if factor == 1:
        return x
    if mode == "nearest":
        return F.interpolate(x, scale_factor=factor, mode="nearest")
    return F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False)
