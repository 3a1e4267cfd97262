"""ResNet encoders (He et al., 2016) returning feature maps by output stride.

Module names follow the common torchvision layout (conv1, bn1, layer1..layer4, downsample.0/1),
so a torchvision-style ResNet state_dict loads by name through `load_backbone_weights` (the
classifier `fc.*` is simply not matched). `output_stride` 8 or 16 replaces the strides of the
last stages by dilation (atrous convolution), as DeepLab does; 32 keeps the plain network.
"""
from __future__ import annotations

import torch
from torch import nn

from edgeseg.models.layers import make_divisible


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet-18/34/50/101 encoder. `forward(x)` returns {2, 4, 8, 16, 32: feature} for
    output_stride=32; with output_stride 16 (or 8) the dilated stages share the last stride, and
    as in `MobileNetV3` the deepest feature at a stride is the one returned for it.

    `width` scales every stage's channels (1.0 is the standard network whose weights load from
    torchvision-style state_dicts; smaller widths make light encoders for small inputs).
    """

    def __init__(self, depth: int = 50, output_stride: int = 32, width: float = 1.0):
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(_DEPTHS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block, counts = _DEPTHS[depth]
        stem = make_divisible(64 * width)
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.channels = {2: stem, 4: stem}
        cin, stride, dilation = stem, 4, 1
        stage_strides, self.stage_channels = [], []
        for i, n in enumerate(counts):
            planes = make_divisible(64 * 2**i * width)
            s = 1 if i == 0 else 2
            prev_dilation = dilation
            if s == 2 and stride * 2 > output_stride:
                dilation, s = dilation * 2, 1
            elif s == 2:
                stride *= 2
            layers, cin = self._stage(block, cin, planes, n, s, dilation, prev_dilation)
            setattr(self, f"layer{i + 1}", layers)
            stage_strides.append(stride)
            self.stage_channels.append(cin)
            self.channels[stride] = cin
        self.stage_strides = tuple(stage_strides)
        self.out_channels = cin
        self.output_stride = stride
        self.depth = depth

    @staticmethod
    def _stage(block, cin, planes, n, stride, dilation, first_dilation):
        down = None
        if stride != 1 or cin != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        # the first block keeps the previous dilation (as in DeepLab's multi-grid-free variant)
        blocks = [block(cin, planes, stride, first_dilation, down)]
        cin = planes * block.expansion
        blocks += [block(cin, planes, 1, dilation) for _ in range(n - 1)]
        return nn.Sequential(*blocks), cin

    def forward_stages(self, x) -> list[torch.Tensor]:
        """The outputs of layer1..layer4 (strides in `self.stage_strides`), for heads that tap
        stages sharing a stride (Gated-SCNN's shape stream)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(len(self.stage_strides)):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs

    def forward(self, x) -> dict[int, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        feats = {2: x}
        x = self.maxpool(x)
        for i, s in enumerate(self.stage_strides):
            x = getattr(self, f"layer{i + 1}")(x)
            feats[s] = x
        return feats


def build_encoder(backbone: str, output_stride: int, width: float = 1.0, variant: str = "large",
                  depth: int = 50, backbone_weights: str | None = None):
    """A zoo encoder by name ('resnet' or 'mobilenetv3'), with user weights from a local file."""
    from edgeseg.models.backbones import MobileNetV3, load_backbone_weights

    if backbone == "resnet":
        enc = ResNet(depth, output_stride=output_stride, width=width)
    elif backbone == "mobilenetv3":
        enc = MobileNetV3(variant, width, output_stride=output_stride)
    else:
        raise ValueError(f"backbone must be 'resnet' or 'mobilenetv3', got {backbone!r}")
    if backbone_weights:
        load_backbone_weights(enc, backbone_weights)
    return enc
