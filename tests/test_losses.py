"""Every loss against values worked out by hand on tiny inputs, ignore_index handling, the
expression parser, and a decrease under a few optimisation steps."""
from __future__ import annotations

import math

import pytest
import torch

from edgeseg.losses import (
    LOSSES, BoundaryLoss, CombinedLoss, CrossEntropyLoss, DiceLoss, DistancePenalizedCELoss, FocalLoss,
    HausdorffDTLoss, IoUBalancedLoss, IoULoss, LossError, LovaszSoftmaxLoss, SensitivitySpecificityLoss, TopKLoss,
    WeightedCrossEntropyLoss, build_loss,
)

L = math.log


def logits_for(p1):
    """Two-class logits (1, 2, 1, W) whose softmax is exactly (1 - p1, p1) per pixel."""
    p1 = torch.tensor(p1, dtype=torch.float64)
    return torch.stack([torch.log(1 - p1), torch.log(p1)])[None, :, None, :]


def tgt(*v):
    return torch.tensor(v)[None, None, :]


# Row A: 4 pixels, p(class 1) = .9 .6 .2 .5, targets 1 1 0 0
# => probability of the target class p_y = .9 .6 .8 .5, CE_i = -ln p_y = 0.1053605 0.5108256 0.2231436 0.6931472
A = logits_for([0.9, 0.6, 0.2, 0.5])
TA = tgt(1, 1, 0, 0)
CE_A = [-L(0.9), -L(0.6), -L(0.8), -L(0.5)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def close(value, expected, tol=1e-6):
    assert float(value) == pytest.approx(expected, abs=tol)


def test_cross_entropy():
    # (0.1053605 + 0.5108256 + 0.2231436 + 0.6931472) / 4 = 1.5324769 / 4
    close(CrossEntropyLoss()(A, TA), 0.3831192)
    # pixel 1 ignored: (0.1053605 + 0.2231436 + 0.6931472) / 3
    close(CrossEntropyLoss()(A, tgt(1, 255, 0, 0)), 0.3405504)
    # class weights (1, 3): (3 * (0.1053605 + 0.5108256) + 0.2231436 + 0.6931472) / (3 + 3 + 1 + 1) = 2.7648491 / 8
    close(CrossEntropyLoss(weight=[1.0, 3.0])(A, TA), 0.3456061)


def test_weighted_cross_entropy():
    close(WeightedCrossEntropyLoss(weight=[1.0, 3.0])(A, TA), 0.3456061)
    # targets 1 1 1 0: CE = -ln .9, -ln .6, -ln .2, -ln .5 = 0.1053605 0.5108256 1.6094379 0.6931472
    # inverse frequency, N = 4, K = 2: w1 = 4 / (2 * 3) = 2/3, w0 = 4 / (2 * 1) = 2
    # (2/3 * 2.2256240 + 2 * 0.6931472) / (3 * 2/3 + 2) = 2.8700437 / 4
    t = tgt(1, 1, 1, 0)
    close(WeightedCrossEntropyLoss("inverse")(A, t), 0.7175109)
    # median frequency: f = (.25, .75), median .5 -> w0 = 2, w1 = 2/3: the same ratio, the same value
    close(WeightedCrossEntropyLoss("median")(A, t), 0.7175109)
    with pytest.raises(LossError):
        WeightedCrossEntropyLoss("sqrt")


def test_focal():
    # gamma 2: (1 - p_y)^2 = .01 .16 .04 .25; sum (1 - p_y)^2 CE_i = 0.0010536 + 0.0817321 + 0.0089257 + 0.1732868
    # = 0.2649983, / 4
    close(FocalLoss(gamma=2)(A, TA), 0.0662496)
    # gamma 0 is cross-entropy
    close(FocalLoss(gamma=0)(A, TA), 0.3831192)


def test_dice():
    # class 1: sum p g = .9 + .6 = 1.5, sum p = 2.2, sum g = 2 -> 3 / 4.2 = 0.7142857
    # class 0: sum p g = .8 + .5 = 1.3, sum p = 1.8, sum g = 2 -> 2.6 / 3.8 = 0.6842105
    close(DiceLoss(smooth=0)(A, TA), 1 - (0.7142857 + 0.6842105) / 2)
    # smooth 1: 4 / 5.2 = 0.7692308 and 3.6 / 4.8 = 0.75
    close(DiceLoss(smooth=1)(A, TA), 1 - (0.7692308 + 0.75) / 2)
    close(DiceLoss(smooth=0, include_background=False)(A, TA), 1 - 0.7142857)


def test_iou():
    # class 1: 1.5 / (2.2 + 2 - 1.5) = 0.5555556; class 0: 1.3 / (1.8 + 2 - 1.3) = 0.52
    close(IoULoss(smooth=0)(A, TA), 1 - (0.5555556 + 0.52) / 2)
    assert build_loss("jaccard(smooth=0)")(A, TA) == pytest.approx(float(IoULoss(smooth=0)(A, TA)))


def test_iou_balanced():
    # soft IoU from test_iou: class 1 0.5555556, class 0 0.52 -> w1 = 0.4444444, w0 = 0.48 (eta 1)
    # (0.4444444 * (0.1053605 + 0.5108256) + 0.48 * (0.2231436 + 0.6931472)) / (2 * 0.4444444 + 2 * 0.48)
    # = (0.2738605 + 0.4398196) / 1.8488889
    close(IoUBalancedLoss(eta=1, smooth=0)(A, TA), 0.3860048)
    # eta 0: every weight 1 -> cross-entropy
    close(IoUBalancedLoss(eta=0, smooth=0)(A, TA), 0.3831192)


def test_lovasz_softmax():
    # class 1: errors |g - p| = .1 .4 .2 .5; sorted .5 .4 .2 .1 with g = 0 1 0 1
    #   |G| = 2: intersections 2 1 1 0, unions 3 3 4 4 -> J = 1/3 2/3 3/4 1 -> steps 1/3 1/3 1/12 1/4
    #   .5/3 + .4/3 + .2/12 + .1/4 = 0.3416667
    # class 0: errors .1 .4 .2 .5; sorted .5 .4 .2 .1 with g = 1 0 1 0
    #   intersections 1 1 0 0, unions 2 3 3 4 -> J = 1/2 2/3 1 1 -> steps 1/2 1/6 1/3 0
    #   .25 + .4/6 + .2/3 = 0.3833333
    close(LovaszSoftmaxLoss()(A, TA), (0.3416667 + 0.3833333) / 2)
    # with only class 1 present in the target, "present" scores class 1 only:
    # errors |1 - p1| = .1 .4 .8 .5 sorted .8 .5 .4 .1, g all 1: J = 1 - (4 - k)/4 -> steps 1/4 each
    close(LovaszSoftmaxLoss()(A, tgt(1, 1, 1, 1)), (0.8 + 0.5 + 0.4 + 0.1) / 4)


def test_topk():
    # the 50% hardest of CE = 0.105 0.511 0.223 0.693 are 0.6931472 and 0.5108256
    close(TopKLoss(k=50)(A, TA), (0.6931472 + 0.5108256) / 2)
    close(TopKLoss(k=25)(A, TA), 0.6931472)
    close(TopKLoss(k=100)(A, TA), 0.3831192)


def test_sensitivity_specificity():
    # class 1: (g - p)^2 = .01 .16 .04 .25; sensitivity term (g = 1): (.01 + .16) / 2 = .085,
    #          specificity term (g = 0): (.04 + .25) / 2 = .145 -> .05 * .085 + .95 * .145 = 0.142
    # class 0: g = 0 0 1 1, same squared errors: sens (.04 + .25) / 2 = .145, spec .085
    #          -> .05 * .145 + .95 * .085 = 0.088;  mean 0.115
    close(SensitivitySpecificityLoss(r=0.05, smooth=0)(A, TA), 0.115)
    close(SensitivitySpecificityLoss(r=0.5, smooth=0)(A, TA), ((0.085 + 0.145) / 2 + (0.145 + 0.085) / 2) / 2)


# Row B: 6 pixels, target 0 1 1 1 0 0, p(class 1) = .2 .7 .9 .6 .4 .1  (p(class 0) = .8 .3 .1 .4 .6 .9)
B = logits_for([0.2, 0.7, 0.9, 0.6, 0.4, 0.1])
TB = tgt(0, 1, 1, 1, 0, 0)


def test_boundary():
    # signed distance of class 1's region (pixels 1..3): inside 1 - d(outside) = 0 -1 0,
    # outside d(region) = 1 (px0), 1 (px4), 2 (px5): phi1 = 1 0 -1 0 1 2
    # sum phi1 * p1 = .2 + 0 - .9 + 0 + .4 + .2 = -0.1; foreground only: / (1 class * 6 px)
    close(BoundaryLoss()(B, TB), -0.1 / 6)
    # class 0 (pixels 0, 4, 5): phi0 = 0 1 2 1 0 -1; sum phi0 * p0 = 0 + .3 + .2 + .4 + 0 - .9 = 0.0
    # all classes: (-0.1 + 0.0) / (2 * 6)
    close(BoundaryLoss(include_background=True)(B, TB), -0.1 / 12)
    assert BoundaryLoss.signed_distance(TB[0].numpy() == 1).tolist() == [[1, 0, -1, 0, 1, 2]]


def test_distance_penalized_ce():
    # d to the nearest pixel of another class: class 1 px1..3: 1 2 1 (max 2) -> D = .5 0 .5
    # class 0: px0 1, px4 1, px5 2 (max 2) -> D = .5 .5 0;  weights 1 + D = 1.5 1.5 1 1.5 1.5 1
    # CE: -ln .8, -ln .7, -ln .9, -ln .6, -ln .6, -ln .9 = 0.2231436 0.3566749 0.1053605 0.5108256 0.5108256 0.1053605
    # (1.5 * (0.2231436 + 0.3566749 + 0.5108256 + 0.5108256) + 0.1053605 + 0.1053605) / 6 = 2.6129256 / 6
    close(DistancePenalizedCELoss()(B, TB), 0.4354876)
    assert DistancePenalizedCELoss().penalty(TB, 2)[0, 0].tolist() == [0.5, 0.5, 0.0, 0.5, 0.5, 0.0]


def test_hausdorff_dt():
    # unsigned distance to the boundary of either class region: 1 1 2 1 1 2 (pixels 2 and 5 lie deeper)
    # the prediction (argmax) equals the target, so d_P = d_G: d_G^2 + d_P^2 = 2 2 8 2 2 8
    # (p1 - g1)^2 = .04 .09 .01 .16 .16 .01, the same for class 0
    # 2 classes * (.08 + .18 + .08 + .32 + .32 + .08) = 2.12, / (2 classes * 6 px)
    close(HausdorffDTLoss(alpha=2)(B, TB), 2.12 / 12)
    # a wrong prediction at px4 (p1 .4 -> .8): predicted class-1 region px1..4, d_P = 1 1 2 2 1 1
    # class 1: (p - g)^2 = .04 .09 .01 .16 .64 .01; d_G^2 + d_P^2 = 2 2 8 5 2 5
    #   .08 + .18 + .08 + .80 + 1.28 + .05 = 2.47, the same for class 0 -> 4.94 / 12
    close(HausdorffDTLoss(alpha=2)(logits_for([0.2, 0.7, 0.9, 0.6, 0.8, 0.1]), TB), 4.94 / 12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_get_no_gradient(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randint(0, 3, (2, 8, 8))
    t[0, :3, :3] = 255
    loss = build_loss(name)(x, t)
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad[0, :, :3, :3].abs().max() == 0
    assert x.grad[0, :, 4:, 4:].abs().max() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_decreases_under_optimisation(name):
    torch.manual_seed(0)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:12, 3:9] = 1
    target[0, 10:15, 10:15] = 2
    target[1, 1:4, 9:15] = 2
    target[1, 0, 0] = 255
    logits = torch.nn.Parameter(torch.randn(2, 3, 16, 16) * 0.5)
    loss_fn = build_loss(name)
    opt = torch.optim.Adam([logits], lr=0.05)
    first = float(loss_fn(logits, target).detach())
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(logits, target)
        loss.backward()
        opt.step()
    last = float(loss_fn(logits, target).detach())
    assert last < first - 1e-3, f"{name}: {first:.4f} -> {last:.4f}"


def test_build_loss_expressions():
    combo = build_loss("0.5*focal+dice")
    assert isinstance(combo, CombinedLoss)
    expected = 0.5 * FocalLoss()(A, TA) + DiceLoss()(A, TA)
    assert float(combo(A, TA)) == pytest.approx(float(expected))
    assert set(combo.last) == {"focal", "dice"}
    assert isinstance(build_loss("ce"), CrossEntropyLoss)
    assert build_loss("focal(gamma=0)")(A, TA) == pytest.approx(0.3831192, abs=1e-6)
    w = build_loss("wce(weight=[1.0, 3.0]) + 1e-2*boundary")
    assert w.weights == [1.0, 0.01]
    assert float(build_loss("dice+ce", ignore_index=0)(A, TA)) == pytest.approx(
        float(DiceLoss(ignore_index=0)(A, TA) + CrossEntropyLoss(ignore_index=0)(A, TA)))
    for bad, words in [("nope", "unknown loss"), ("dice+", "cannot read"), ("focal(beta=1)", "no option 'beta'"),
                       ("focal(gamma=)", "arguments"), ("", "empty"), ("topk(k=0)", "percentage")]:
        with pytest.raises(LossError, match=words):
            build_loss(bad)


def test_target_out_of_range_is_reported():
    with pytest.raises(ValueError, match="class 2 outside 0..1"):
        DiceLoss()(A, tgt(1, 2, 0, 0))
