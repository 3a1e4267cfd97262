"""Encoders returning feature maps by output stride ({4: ..., 8: ..., 16: ..., 32: ...}).

Weights come from a local file only (`load_backbone_weights`): nothing is downloaded at run time.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from edgeseg.models.layers import ConvBNAct, SqueezeExcite, make_divisible

# MobileNetV3 (Howard et al., 2019) block tables: kernel, expansion, out, SE, activation, stride
_MBV3 = {
    "large": [
        (3, 16, 16, False, "RE", 1),
        (3, 64, 24, False, "RE", 2),
        (3, 72, 24, False, "RE", 1),
        (5, 72, 40, True, "RE", 2),
        (5, 120, 40, True, "RE", 1),
        (5, 120, 40, True, "RE", 1),
        (3, 240, 80, False, "HS", 2),
        (3, 200, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1),
        (3, 480, 112, True, "HS", 1),
        (3, 672, 112, True, "HS", 1),
        (5, 672, 160, True, "HS", 2),
        (5, 960, 160, True, "HS", 1),
        (5, 960, 160, True, "HS", 1),
    ],
    "small": [
        (3, 16, 16, True, "RE", 2),
        (3, 72, 24, False, "RE", 2),
        (3, 88, 24, False, "RE", 1),
        (5, 96, 40, True, "HS", 2),
        (5, 240, 40, True, "HS", 1),
        (5, 240, 40, True, "HS", 1),
        (5, 120, 48, True, "HS", 1),
        (5, 144, 48, True, "HS", 1),
        (5, 288, 96, True, "HS", 2),
        (5, 576, 96, True, "HS", 1),
        (5, 576, 96, True, "HS", 1),
    ],
}


class InvertedResidual(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, stride, dilation=1):
        super().__init__()
        A = nn.Hardswish if act == "HS" else nn.ReLU
        layers = []
        if exp != cin:
            layers.append(ConvBNAct(cin, exp, 1, act=A))
        layers.append(ConvBNAct(exp, exp, k, stride=stride, dilation=dilation, groups=exp, act=A))
        if se:
            layers.append(SqueezeExcite(exp))
        layers.append(ConvBNAct(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    """MobileNetV3 encoder. `output_stride=16` dilates the last stage instead of striding (as in
    LR-ASPP and DeepLabV3+); features are returned at strides 2..output_stride."""

    def __init__(self, variant: str = "large", width: float = 1.0, output_stride: int = 16):
        super().__init__()
        if variant not in _MBV3:
            raise ValueError(f"MobileNetV3 variant must be one of {sorted(_MBV3)}, got {variant!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        c = make_divisible(16 * width)
        self.stem = ConvBNAct(3, c, 3, stride=2, act=nn.Hardswish)
        blocks, self.stage_ends, self.channels = [], {}, {2: c}
        stride, dilation = 2, 1
        for i, (k, exp, cout, se, act, s) in enumerate(_MBV3[variant]):
            exp, cout = make_divisible(exp * width), make_divisible(cout * width)
            if s == 2 and stride * 2 > output_stride:
                dilation, s = dilation * 2, 1
            elif s == 2:
                stride *= 2
            blocks.append(InvertedResidual(c, k, exp, cout, se, act, s, dilation if s == 1 else 1))
            c = cout
            self.stage_ends[stride] = i  # the last block at each stride gives that stride's feature
            self.channels[stride] = c
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = c
        self.output_stride = min(stride, output_stride)

    def forward(self, x) -> dict[int, torch.Tensor]:
        feats = {2: self.stem(x)}
        y = feats[2]
        ends = {i: s for s, i in self.stage_ends.items()}
        for i, blk in enumerate(self.blocks):
            y = blk(y)
            if i in ends:
                feats[ends[i]] = y
        return feats


def load_backbone_weights(module: nn.Module, path: str | os.PathLike, strict: bool = False) -> list[str]:
    """Load encoder weights from a local file (a state_dict, optionally under 'state_dict').

    Keys that match by name and shape load; returns the names of encoder weights left untouched.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights not found: {path} (weights are read from local files only)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    own = module.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor matches the backbone by name and shape; is it for this architecture?")
    missing = [k for k in own if k not in usable]
    if strict and missing:
        raise ValueError(f"{path}: missing {len(missing)} backbone tensors, e.g. {missing[:3]}")
    module.load_state_dict(usable, strict=False)
    return missing
