"""A third-party-style network, written the way research code is (not export-minded): pyramid
pooling to bins that do not divide the feature map, upsampling to sizes read from tensors, and a
non-local self-attention block."""
import torch
import torch.nn.functional as F
from torch import nn


class NonLocal(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.q, self.k, self.v = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)
        k = self.k(x).flatten(2)
        attn = torch.softmax(q @ k / (k.shape[1] ** 0.5), dim=-1)
        v = self.v(x).flatten(2).transpose(1, 2)
        return x + (attn @ v).transpose(1, 2).reshape(n, c, h, w)


class PSPLike(nn.Module):
    def __init__(self, num_classes=4, c=16, bins=(1, 2, 3, 6)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
        )
        self.attn = NonLocal(c)
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(c, c // 4, 1)) for b in bins)
        self.head = nn.Conv2d(c + len(bins) * (c // 4), num_classes, 1)

    def forward(self, x):
        f = self.attn(self.stem(x))
        pyramid = [f] + [F.interpolate(s(f), size=f.shape[-2:], mode="bilinear", align_corners=False) for s in self.stages]
        y = self.head(torch.cat(pyramid, 1))
        return {"out": F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def make():
    torch.manual_seed(0)
    return PSPLike().eval()


class BakedPooling(nn.Module):
    """Pyramid pooling with its kernel read as a Python int from the feature map (common in
    PSPNet ports): tracing bakes the export size's kernel into the graph, so at other sizes the
    pooled grid differs from torch's and the masks are silently wrong."""

    def __init__(self, num_classes=3, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 4, 1), nn.ReLU())
        self.proj = nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(2 * c, num_classes, 1)

    def forward(self, x):
        f = self.stem(x)
        k = int(f.shape[-1]) // 2
        p = F.interpolate(self.proj(F.avg_pool2d(f, k, k)), size=f.shape[-2:], mode="bilinear", align_corners=False)
        y = self.head(torch.cat([f, p], 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ConstantReshape(nn.Module):
    """Spatial softmax through a reshape whose shape is computed with int(): constant in the graph,
    so any other size (or batch) fails in ONNX Runtime."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = (int(v) for v in y.shape)
        return torch.softmax(y.reshape(n, c, h * w), -1).reshape(n, c, h, w)


def make_baked():
    torch.manual_seed(0)
    return BakedPooling().eval()


def make_constant_reshape():
    torch.manual_seed(0)
    return ConstantReshape().eval()


def make_global_pooling():
    """The same network with global pooling only (a pooled size of 1 holds at every input size)."""
    torch.manual_seed(0)
    return PSPLike(bins=(1,)).eval()
