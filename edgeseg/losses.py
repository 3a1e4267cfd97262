"""The field's segmentation losses, each an `nn.Module` taking logits (N, C, H, W) and integer
targets (N, H, W), with pixels equal to `ignore_index` left out.

Notation in the docstrings: V is the set of valid (not ignored) pixels, p_ic = softmax(logits)_c
at pixel i, g_ic = 1 if the target of pixel i is c else 0, y_i the target class of pixel i.

Losses combine from a string, as the CLI takes them:

    build_loss("dice+ce")
    build_loss("0.5*focal(gamma=3)+dice")
    build_loss("ce+0.01*boundary")

Distance-map losses (boundary, distance-penalised CE, Hausdorff) compute their maps from the
targets with OpenCV's exact Euclidean distance transform (no gradient flows through them).
"""
from __future__ import annotations

import ast
import inspect
import re

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.errors import EdgesegError


class LossError(EdgesegError, ValueError):
    """An unknown loss name or a malformed loss expression."""


# ---------------------------------------------------------------------------------------------
# shared helpers
def _check(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None):
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"expected logits (N, C, H, W) and target (N, H, W) of the same N, H, W; "
                         f"got {tuple(logits.shape)} and {tuple(target.shape)}")
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    C = logits.shape[1]
    if valid.any():
        t = target[valid]
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"target holds class {hi if hi >= C else lo} outside 0..{C - 1} "
                             f"(and is not ignore_index={ignore_index}); check num_classes and the labels")
    return valid


def _one_hot(target, valid, C, dtype=torch.float32):
    t = torch.where(valid, target, torch.zeros_like(target))
    return F.one_hot(t.long(), C).permute(0, 3, 1, 2).to(dtype) * valid[:, None]


def _pixel_ce(logits, target, valid):
    """Per-pixel -log p_{i,y_i} (0 on ignored pixels)."""
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    return F.cross_entropy(logits, t, reduction="none") * valid


def _edt_inside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance from each pixel of `mask` to the nearest pixel outside it (0 outside).
    A mask with no outside pixel has no boundary: its distances are returned as 0."""
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, np.float32)
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _classes_of(maps: np.ndarray, C: int) -> list[int]:
    return [c for c in np.unique(maps).tolist() if 0 <= c < C]


# ---------------------------------------------------------------------------------------------
class CrossEntropyLoss(nn.Module):
    r"""Cross-entropy.  L = -(1/|V|) \sum_{i in V} log p_{i,y_i}.

    With class `weight` w: L = -\sum_i w_{y_i} log p_{i,y_i} / \sum_i w_{y_i}.
    """

    def __init__(self, weight=None, ignore_index: int = 255, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.ignore_index, self.label_smoothing = ignore_index, float(label_smoothing)

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        if not valid.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target.long(), weight=None if self.weight is None else self.weight.to(logits), ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)


class WeightedCrossEntropyLoss(nn.Module):
    r"""Class-weighted cross-entropy against class imbalance.

    L = -\sum_{i in V} w_{y_i} log p_{i,y_i} / \sum_{i in V} w_{y_i}, with w given, or from the
    batch's class pixel counts n_c (K classes present, N = |V|):
      weight="inverse": w_c = N / (K n_c)                 (inverse frequency)
      weight="median":  w_c = median_k(f_k) / f_c, f = n/N (median frequency balancing, Eigen & Fergus)
    """

    def __init__(self, weight="inverse", ignore_index: int = 255):
        super().__init__()
        if isinstance(weight, str):
            if weight not in ("inverse", "median"):
                raise LossError(f"weighted CE weight must be a list of class weights, 'inverse' or 'median', got {weight!r}")
            self.mode, fixed = weight, None
        else:
            self.mode, fixed = "fixed", torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("fixed", fixed)
        self.ignore_index = ignore_index

    def class_weights(self, target, valid, C):
        if self.mode == "fixed":
            if self.fixed.numel() != C:
                raise ValueError(f"weighted CE has {self.fixed.numel()} class weights for {C} classes")
            return self.fixed
        counts = torch.bincount(target[valid].long(), minlength=C).float()
        present = counts > 0
        freq = counts / counts.sum().clamp(min=1)
        if self.mode == "inverse":
            w = counts.sum() / (present.sum() * counts.clamp(min=1))
        else:
            w = torch.quantile(freq[present], 0.5) / freq.clamp(min=1e-12)
        return torch.where(present, w, torch.zeros_like(w))

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        if not valid.any():
            return logits.sum() * 0.0
        w = self.class_weights(target, valid, logits.shape[1]).to(logits)
        t = torch.where(valid, target, torch.zeros_like(target)).long()
        wi = w[t] * valid
        return (_pixel_ce(logits, target, valid) * wi).sum() / wi.sum().clamp(min=1e-12)


class FocalLoss(nn.Module):
    r"""Focal loss (Lin et al., 2017).  L = -(1/|V|) \sum_{i in V} a_{y_i} (1 - p_{i,y_i})^gamma log p_{i,y_i}.

    `alpha`: None (all 1), or per-class weights a_c.
    """

    def __init__(self, gamma: float = 2.0, alpha=None, ignore_index: int = 255):
        super().__init__()
        self.gamma = float(gamma)
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        n = valid.sum()
        if n == 0:
            return logits.sum() * 0.0
        ce = _pixel_ce(logits, target, valid)
        pt = torch.exp(-ce)
        loss = (1 - pt) ** self.gamma * ce
        if self.alpha is not None:
            t = torch.where(valid, target, torch.zeros_like(target)).long()
            loss = loss * self.alpha.to(logits)[t]
        return (loss * valid).sum() / n


class DiceLoss(nn.Module):
    r"""Soft Dice loss (Milletari et al., 2016), over the whole batch.

    L = 1 - (1/|K|) \sum_{c in K} (2 \sum_i p_ic g_ic + s) / (\sum_i p_ic + \sum_i g_ic + s),
    sums over valid pixels, s = `smooth`; K = all classes (or without class 0 when
    include_background=False).
    """

    def __init__(self, smooth: float = 1.0, include_background: bool = True, ignore_index: int = 255):
        super().__init__()
        self.smooth, self.include_background, self.ignore_index = float(smooth), include_background, ignore_index

    def stats(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        p = logits.softmax(1) * valid[:, None]
        g = _one_hot(target, valid, logits.shape[1], logits.dtype)
        dims = (0, 2, 3)
        inter, psum, gsum = (p * g).sum(dims), p.sum(dims), g.sum(dims)
        if not self.include_background:
            inter, psum, gsum = inter[1:], psum[1:], gsum[1:]
        return inter, psum, gsum

    def forward(self, logits, target):
        inter, psum, gsum = self.stats(logits, target)
        return 1 - ((2 * inter + self.smooth) / (psum + gsum + self.smooth)).mean()


class IoULoss(DiceLoss):
    r"""Soft IoU / Jaccard loss (Rahman & Wang, 2016).

    L = 1 - (1/|K|) \sum_{c in K} (\sum_i p_ic g_ic + s) / (\sum_i p_ic + \sum_i g_ic - \sum_i p_ic g_ic + s).
    """

    def forward(self, logits, target):
        inter, psum, gsum = self.stats(logits, target)
        return 1 - ((inter + self.smooth) / (psum + gsum - inter + self.smooth)).mean()


class IoUBalancedLoss(nn.Module):
    r"""IoU-balanced cross-entropy: the IoU-balancing of Wu et al. (2019) applied to pixels, where
    each pixel's CE is weighted by how poorly its class is currently segmented.

    u_c = soft IoU of class c over the batch (detached), w_c = (1 - u_c)^eta,
    L = \sum_{i in V} w_{y_i} CE_i / \sum_{i in V} w_{y_i}.
    Classes already segmented well contribute less; the normalisation keeps the loss on the CE scale.
    """

    def __init__(self, eta: float = 1.0, smooth: float = 1.0, ignore_index: int = 255):
        super().__init__()
        self.eta, self.smooth, self.ignore_index = float(eta), float(smooth), ignore_index

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        if not valid.any():
            return logits.sum() * 0.0
        with torch.no_grad():
            p = logits.softmax(1) * valid[:, None]
            g = _one_hot(target, valid, logits.shape[1], logits.dtype)
            inter, psum, gsum = (p * g).sum((0, 2, 3)), p.sum((0, 2, 3)), g.sum((0, 2, 3))
            iou = (inter + self.smooth) / (psum + gsum - inter + self.smooth)
            w = (1 - iou).clamp(min=0) ** self.eta
            t = torch.where(valid, target, torch.zeros_like(target)).long()
            wi = w[t] * valid
        return (_pixel_ce(logits, target, valid) * wi).sum() / wi.sum().clamp(min=1e-12)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al., 2018, Alg. 1)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


class LovaszSoftmaxLoss(nn.Module):
    r"""Lovász-softmax (Berman et al., 2018): a convex surrogate of 1 - IoU per class.

    For class c: errors e_i = |g_ic - p_ic| over valid pixels, sorted decreasingly (permutation
    pi); L_c = \sum_k e_{pi(k)} (J(k) - J(k-1)) with J(k) = 1 - |G_c \ S_k| / |G_c \cup S_k|,
    where S_k is the first k sorted pixels. L = mean of L_c over `classes`: "present" (classes in
    the target, default) or "all". `per_image` averages per-image losses instead.
    """

    def __init__(self, classes: str = "present", per_image: bool = False, ignore_index: int = 255):
        super().__init__()
        if classes not in ("present", "all"):
            raise LossError(f"lovasz classes must be 'present' or 'all', got {classes!r}")
        self.classes, self.per_image, self.ignore_index = classes, per_image, ignore_index

    def _flat(self, probs, labels):
        C = probs.shape[1]
        losses = []
        for c in range(C):
            fg = (labels == c).to(probs.dtype)
            if self.classes == "present" and fg.sum() == 0:
                continue
            errors = (fg - probs[:, c]).abs()
            errors_sorted, perm = torch.sort(errors, descending=True)
            losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
        return torch.stack(losses).mean() if losses else probs.sum() * 0.0

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        probs = logits.softmax(1)
        C = logits.shape[1]

        def flat(p, t, v):
            return p.permute(0, 2, 3, 1).reshape(-1, C)[v.reshape(-1)], t.reshape(-1)[v.reshape(-1)]

        if self.per_image:
            return torch.stack([self._flat(*flat(probs[i:i + 1], target[i:i + 1], valid[i:i + 1]))
                                for i in range(len(target))]).mean()
        return self._flat(*flat(probs, target, valid))


class BoundaryLoss(nn.Module):
    r"""Boundary loss (Kervadec et al., 2019).

    phi_c = signed distance to the boundary of class c's target region (negative inside:
    phi_c(i) = -(d(i, outside) - 1) for i inside, +d(i, inside) outside; 0 when the class is absent).
    L = (1/(|K||V|)) \sum_{c in K} \sum_{i in V} phi_c(i) p_ic, K = foreground classes (all classes
    with include_background=True). Minimised by probability mass inside the regions; usually
    combined with a region loss, e.g. "dice+0.01*boundary".
    """

    def __init__(self, include_background: bool = False, ignore_index: int = 255):
        super().__init__()
        self.include_background, self.ignore_index = include_background, ignore_index

    @staticmethod
    def signed_distance(mask: np.ndarray) -> np.ndarray:
        """As in the paper's reference: d(outside pixel, mask) outside, -(d(inside, outside) - 1) inside."""
        if not mask.any() or mask.all():
            return np.zeros(mask.shape, np.float32)
        return np.where(mask, 1 - _edt_inside(mask), _edt_inside(~mask)).astype(np.float32)

    def maps(self, target: torch.Tensor, C: int) -> torch.Tensor:
        t = target.cpu().numpy()
        out = np.zeros((t.shape[0], C) + t.shape[1:], np.float32)
        for n in range(t.shape[0]):
            for c in _classes_of(t[n], C):
                out[n, c] = self.signed_distance(t[n] == c)
        return torch.from_numpy(out)

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        C = logits.shape[1]
        phi = self.maps(target, C).to(logits)
        first = 0 if self.include_background else 1
        if C - first < 1:
            raise LossError("boundary loss without background needs at least 2 classes")
        p = logits.softmax(1)[:, first:]
        n = valid.sum() * (C - first)
        return (phi[:, first:] * p * valid[:, None]).sum() / n.clamp(min=1)


class TopKLoss(nn.Module):
    r"""TopK cross-entropy (Wu et al., 2016, bootstrapped CE): the mean CE of the k% hardest pixels.

    L = (1/|T|) \sum_{i in T} CE_i, T = the ceil(k/100 |V|) valid pixels of largest CE.
    """

    def __init__(self, k: float = 10.0, ignore_index: int = 255):
        super().__init__()
        if not 0 < k <= 100:
            raise LossError(f"topk k is a percentage in (0, 100], got {k}")
        self.k, self.ignore_index = float(k), ignore_index

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        ce = _pixel_ce(logits, target, valid)[valid]
        if ce.numel() == 0:
            return logits.sum() * 0.0
        n = max(1, int(np.ceil(ce.numel() * self.k / 100 - 1e-9)))
        return ce.topk(n).values.mean()


class DistancePenalizedCELoss(nn.Module):
    r"""Distance-penalised cross-entropy (Caliva et al., 2019): CE weighted up near label boundaries.

    d_i = distance from pixel i to the nearest pixel not of its class y_i; D_i = 1 - d_i / max_{j: y_j = y_i} d_j
    (per image; 0 when the class fills the image). L = (1/|V|) \sum_{i in V} (1 + D_i) CE_i.
    For two classes this is the reference's map (pos and neg distance maps, each normalised by its max).
    """

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def penalty(self, target: torch.Tensor, C: int) -> torch.Tensor:
        t = target.cpu().numpy()
        out = np.zeros(t.shape, np.float32)
        for n in range(t.shape[0]):
            for c in _classes_of(t[n], C):
                m = t[n] == c
                d = _edt_inside(m)
                if d.max() > 0:
                    out[n][m] = 1 - d[m] / d.max()
        return torch.from_numpy(out)

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        n = valid.sum()
        if n == 0:
            return logits.sum() * 0.0
        w = 1 + self.penalty(target, logits.shape[1]).to(logits)
        return (_pixel_ce(logits, target, valid) * w).sum() / n


class SensitivitySpecificityLoss(nn.Module):
    r"""Sensitivity-specificity loss (Brosch et al., 2015), per class then averaged.

    L_c = r \sum_i (g_ic - p_ic)^2 g_ic / (\sum_i g_ic + s) + (1 - r) \sum_i (g_ic - p_ic)^2 (1 - g_ic) / (\sum_i (1 - g_ic) + s),
    sums over valid pixels; the first term is the sensitivity error (missed positives), the second
    the specificity error (false positives); r = `r` weighs them. L = mean over classes.
    """

    def __init__(self, r: float = 0.05, smooth: float = 1e-5, ignore_index: int = 255):
        super().__init__()
        if not 0 <= r <= 1:
            raise LossError(f"sensitivity-specificity r must be in [0, 1], got {r}")
        self.r, self.smooth, self.ignore_index = float(r), float(smooth), ignore_index

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        v = valid[:, None].float()
        p = logits.softmax(1) * v
        g = _one_hot(target, valid, logits.shape[1], logits.dtype)
        sq = (g - p) ** 2
        dims = (0, 2, 3)
        sens = (sq * g).sum(dims) / (g.sum(dims) + self.smooth)
        spec = (sq * (1 - g) * v).sum(dims) / (((1 - g) * v).sum(dims) + self.smooth)
        return (self.r * sens + (1 - self.r) * spec).mean()


class HausdorffDTLoss(nn.Module):
    r"""Hausdorff-distance loss, distance-transform form (Karimi & Salcudean, 2019).

    d^G_c(i) = distance from pixel i to the boundary of class c's target region (inside: to the
    nearest outside pixel; outside: to the nearest inside pixel; 0 when the region is empty or
    everything); d^P_c likewise for the predicted region argmax = c (no gradient).
    L = (1/(|C||V|)) \sum_c \sum_{i in V} (p_ic - g_ic)^2 (d^G_c(i)^alpha + d^P_c(i)^alpha).
    """

    def __init__(self, alpha: float = 2.0, ignore_index: int = 255):
        super().__init__()
        self.alpha, self.ignore_index = float(alpha), ignore_index

    @staticmethod
    def distance(mask: np.ndarray) -> np.ndarray:
        if not mask.any() or mask.all():
            return np.zeros(mask.shape, np.float32)
        return _edt_inside(mask) + _edt_inside(~mask)

    def maps(self, labels: np.ndarray, C: int) -> np.ndarray:
        out = np.zeros((labels.shape[0], C) + labels.shape[1:], np.float32)
        for n in range(labels.shape[0]):
            for c in _classes_of(labels[n], C):
                out[n, c] = self.distance(labels[n] == c)
        return out

    def forward(self, logits, target):
        valid = _check(logits, target, self.ignore_index)
        n = valid.sum()
        if n == 0:
            return logits.sum() * 0.0
        C = logits.shape[1]
        p = logits.softmax(1)
        g = _one_hot(target, valid, C, logits.dtype)
        dg = self.maps(torch.where(valid, target, torch.full_like(target, -1)).cpu().numpy(), C)
        dp = self.maps(p.detach().argmax(1).cpu().numpy(), C)
        dist = torch.from_numpy(dg ** self.alpha + dp ** self.alpha).to(logits)
        return ((p - g) ** 2 * dist * valid[:, None]).sum() / (n * C)


# ---------------------------------------------------------------------------------------------
# composition
LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "wce": WeightedCrossEntropyLoss,
    "focal": FocalLoss,
    "dice": DiceLoss,
    "iou": IoULoss,
    "iou_balanced": IoUBalancedLoss,
    "lovasz": LovaszSoftmaxLoss,
    "boundary": BoundaryLoss,
    "topk": TopKLoss,
    "dpce": DistancePenalizedCELoss,
    "ss": SensitivitySpecificityLoss,
    "hausdorff": HausdorffDTLoss,
}
ALIASES = {
    "cross_entropy": "ce", "crossentropy": "ce", "weighted_ce": "wce", "jaccard": "iou", "lovasz_softmax": "lovasz",
    "iou_ce": "iou_balanced", "distance_ce": "dpce", "sensitivity_specificity": "ss", "hd": "hausdorff",
    "hausdorff_dt": "hausdorff",
}


class CombinedLoss(nn.Module):
    """A weighted sum of losses; `last` holds each term's latest value (floats) for logging."""

    def __init__(self, terms: list[tuple[float, str, nn.Module]]):
        super().__init__()
        self.weights = [w for w, _, _ in terms]
        self.names = [n for _, n, _ in terms]
        self.losses = nn.ModuleList(m for _, _, m in terms)
        self.last: dict[str, float] = {}

    def forward(self, logits, target):
        total = 0.0
        for w, name, loss in zip(self.weights, self.names, self.losses):
            v = loss(logits, target)
            self.last[name] = float(v.detach())
            total = total + w * v
        return total


_TERM = re.compile(r"^\s*(?:(?P<w>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?:\((?P<args>.*)\))?\s*$", re.S)


def _split_terms(spec: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for i, ch in enumerate(spec):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        # a '+' that is not an exponent sign (1e+3) and not inside parentheses separates terms
        if ch == "+" and depth == 0 and not re.search(r"[0-9.][eE]$", cur):
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    return terms


def _parse_args(args: str, term: str) -> dict:
    if not args or not args.strip():
        return {}
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if call.args:
            raise ValueError("positional arguments")
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise LossError(f"cannot read the arguments of loss term {term.strip()!r} ({e}); "
                        "write them as name(key=value, ...), e.g. focal(gamma=3)") from None


def build_loss(spec: str, ignore_index: int = 255, **common) -> nn.Module:
    """Build a loss from an expression: terms `[weight*]name[(key=value, ...)]` joined by `+`.

    Names: ce, wce, focal, dice, iou (jaccard), iou_balanced, lovasz, boundary, topk, dpce, ss,
    hausdorff (aliases accepted). `ignore_index` and `common` keywords go to every term that takes them.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LossError("empty loss expression; e.g. 'ce', 'dice+ce' or '0.5*focal+dice'")
    terms = []
    for term in _split_terms(spec):
        m = _TERM.match(term)
        if not m:
            raise LossError(f"cannot read loss term {term.strip()!r} in {spec!r}; "
                            "expected [weight*]name[(key=value, ...)], e.g. '0.5*focal(gamma=3)'")
        name = m["name"].lower()
        name = ALIASES.get(name, name)
        if name not in LOSSES:
            raise LossError(f"unknown loss {m['name']!r} in {spec!r}; available: {', '.join(sorted(LOSSES))} "
                            f"(aliases: {', '.join(sorted(ALIASES))})")
        kw = {"ignore_index": ignore_index, **common, **_parse_args(m["args"], term)}
        cls = LOSSES[name]
        accepted = inspect.signature(cls.__init__).parameters
        unknown = [k for k in kw if k not in accepted and k not in common and k != "ignore_index"]
        if unknown:
            raise LossError(f"loss {name!r} has no option {unknown[0]!r}; its options: "
                            f"{', '.join(p for p in accepted if p != 'self')}")
        try:
            module = cls(**{k: v for k, v in kw.items() if k in accepted})
        except (TypeError, ValueError) as e:
            raise LossError(f"loss term {term.strip()!r}: {e}") from None
        terms.append((float(m["w"]) if m["w"] else 1.0, name, module))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][2]
    return CombinedLoss(terms)


__all__ = ["LossError", "build_loss", "CombinedLoss", "LOSSES", "lovasz_grad", *[c.__name__ for c in LOSSES.values()]]
