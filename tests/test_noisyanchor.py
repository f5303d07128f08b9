"""NoisyAnchor on hand-sized cases: the top-N candidates and who gets an anchor two GTs chose,
the soft labels and re-weights of a tiny image (and their NaN / inf guards), the sum-keeping
rescale, the soft focal loss, and the loss terms keeping the unweighted sums while the
re-weights move the gradient. The contract all methods share is tests/test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dwlab.assign.noisyanchor import NoisyAnchorAssigner, clean_targets, keep_sum
from dwlab.box_ops import boxes_to_distances
from dwlab.config import AssignerConfig
from dwlab.data.target import Target
from dwlab.losses import focal_loss
from dwlab.models.outputs import Anchors, HeadOutputs

CPU = torch.device("cpu")


def row() -> Anchors:
    """One level, stride 8, four points along y = 4: x = 4, 12, 20, 28."""
    return Anchors.grid([(1, 4)], [8], 0.5, CPU)


# anchor_scale 1: 8 px anchors [0, 8], [8, 16], [16, 24], [24, 32] (x), [0, 8] (y)
# GT A [0, 12] x [0, 8]: IoU 2/3, 1/4, 0, 0;  GT B [8, 24] x [0, 8]: IoU 0, 1/2, 1/2, 0
GTS = torch.tensor([[[0.0, 0.0, 12.0, 8.0], [8.0, 0.0, 24.0, 8.0]]])


@pytest.mark.parametrize(
    "topn, expected",
    [
        (2, [0, 1, 1, -1]),  # A: anchors 0, 1; B: 1, 2; anchor 1 in both -> B (1/2 > 1/4)
        (1, [0, 1, -1, -1]),  # A: 0; B: 1 and 2 tie at 1/2 -> the lower index, 1
    ],
)
def test_top_n_per_gt_and_an_anchor_of_two_gts_goes_to_the_higher_iou(topn, expected):
    assigner = NoisyAnchorAssigner(3, topn=topn, anchor_scale=1.0)
    matched = assigner.match(row(), GTS, torch.ones(1, 2, dtype=torch.bool))
    assert matched[0].tolist() == expected


def test_top_n_takes_anchors_whatever_their_iou_and_ignores_padding():
    # topn 4: every anchor is in both top 4s; anchor 3 (IoU 0 with both) is positive all the
    # same, for the first GT of the tie
    assigner = NoisyAnchorAssigner(3, topn=4, anchor_scale=1.0)
    assert assigner.match(row(), GTS, torch.ones(1, 2, dtype=torch.bool))[0].tolist() == [0, 1, 1, 0]
    # B padded away: A's top 3 alone, the third of IoU 0
    assigner = NoisyAnchorAssigner(3, topn=3, anchor_scale=1.0)
    assert assigner.match(row(), GTS, torch.tensor([[True, False]]))[0].tolist() == [0, 0, 0, -1]


def test_soft_labels_and_reweights_of_a_tiny_image():
    """loc 0.2, 0.4, 0.6 (mean 0.4), cls 0.5 each, alpha 0.75:
    c = 0.75 [0.5, 1, 1.5] + 0.25 = [0.625, 1, 1.375]; y = 0.4 + (c - 0.625) 0.6 / 0.75 =
    [0.4, 0.7, 1]; u = 1 / (1 - loc) = [5/4, 5/3, 5/2], mean 65/36; v = 2 each:
    r = 0.75 u 36/65 + 0.25 = 0.75 [45, 60, 90] / 65 + 0.25. A second image with one positive:
    y = 1, r = 1."""
    loc = torch.tensor([0.2, 0.4, 0.6, 0.9])
    cls = torch.tensor([0.5, 0.5, 0.5, 0.3])
    y, r = clean_targets(loc, cls, torch.tensor([0, 0, 0, 1]), 2, alpha=0.75)
    assert y.tolist() == pytest.approx([0.4, 0.7, 1.0, 1.0], abs=1e-6)
    assert r.tolist() == pytest.approx([0.75 * 45 / 65 + 0.25, 0.75 * 60 / 65 + 0.25, 0.75 * 90 / 65 + 0.25, 1.0])
    assert r[:3].mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "loc, cls",
    [
        ([0.3, 0.3, 0.3], [0.2, 0.2, 0.2]),  # all alike: max c - min c = 0
        ([0.0, 0.0, 0.0], [0.2, 0.4, 0.6]),  # every predicted box misses: mean(loc) = 0
        ([1.0, 0.5, 0.2], [1.0, 0.1, 0.3]),  # IoU 1 and a score of 1: 1 / (1 - q) = inf
    ],
)
def test_the_released_nan_and_inf_cases_are_finite(loc, cls):
    y, r = clean_targets(torch.tensor(loc), torch.tensor(cls), torch.zeros(3, dtype=torch.long), 1, alpha=0.75)
    assert torch.isfinite(y).all() and torch.isfinite(r).all()
    assert ((y >= 0) & (y <= 1)).all() and (r > 0).all()
    if loc[0] == loc[1] == loc[2] and cls[0] == cls[1]:
        assert y.tolist() == [1.0, 1.0, 1.0] and r.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_keep_sum_keeps_the_value_and_moves_the_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    out = keep_sum(x**2, torch.tensor([1.0, 3.0]))  # sum 5, weighted 13: scale 5 / 13
    assert out.item() == pytest.approx(5.0)
    out.backward()
    assert x.grad.tolist() == pytest.approx([5 / 13 * 2, 5 / 13 * 3 * 4])
    zero = keep_sum(torch.zeros(2, requires_grad=True), torch.ones(2))
    assert zero.item() == 0.0


def test_focal_loss_is_torchvisions_for_hard_targets_and_the_soft_form_otherwise():
    g = torch.Generator().manual_seed(0)
    logits, hard = torch.randn(5, 3, generator=g), (torch.rand(5, 3, generator=g) > 0.5).float()
    ours = focal_loss(logits, None, hard, alpha=0.5, gamma=2.0, reduction="sum")
    assert ours.item() == pytest.approx(sigmoid_focal_loss(logits, hard, alpha=0.5, gamma=2.0, reduction="sum").item())
    # s = 0.25, t = 0.4: -a t (1 - s)^2 ln s - (1 - a)(1 - t) s^2 ln(1 - s)
    s, t, a = 0.25, 0.4, 0.5
    expected = -a * t * (1 - s) ** 2 * math.log(s) - (1 - a) * (1 - t) * s**2 * math.log(1 - s)
    got = focal_loss(torch.logit(torch.tensor([s])), None, torch.tensor([t]), alpha=a, gamma=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the joint score: s = sigmoid(cls) * sigmoid(ctr)
    joint = focal_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([t]), alpha=a, gamma=2.0)
    assert joint.item() == pytest.approx(expected, rel=1e-5)


def test_terms_keep_the_unweighted_sums_and_the_reweights_move_the_box_gradient():
    """Two GTs on the row; each anchor predicts a box of its own quality; the terms equal the
    unweighted sums over N, and each positive's box gradient is r_a K of the unweighted one."""
    anchors = row()
    assigner = NoisyAnchorAssigner(2, topn=2, anchor_scale=1.0)
    gts = [Target(GTS[0], torch.tensor([0, 1]))]
    pred = torch.tensor([[0.0, 0.0, 12.0, 8.0], [8.0, 0.0, 22.0, 8.0], [17.0, 1.0, 23.0, 7.0], [24.0, 0.0, 32.0, 8.0]])

    def head():
        return HeadOutputs(
            torch.tensor([[[1.0, -2.0], [-1.0, 0.5], [-2.0, 0.0], [-3.0, -3.0]]]).requires_grad_(),
            torch.zeros(1, 4).requires_grad_(),
            boxes_to_distances(anchors.points, pred)[None].clone().requires_grad_(),
            anchors,
        )

    out = head()
    asg = assigner.assign(out, gts)
    assert asg.matched[0].tolist() == [0, 1, 1, -1]
    terms = assigner(out, gts)
    n = 3
    giou = generalized_box_iou_loss(pred[:3], GTS[0][[0, 1, 1]], reduction="none")
    assert terms["loss_box"].item() == pytest.approx(giou.sum().item() / n, rel=1e-5)
    target = torch.zeros(1, 4, 2)
    target[0, [0, 1, 2], [0, 1, 1]] = asg.soft
    fl = focal_loss(out.cls_logits, out.centerness.unsqueeze(-1), target, alpha=0.5, gamma=2.0, reduction="sum")
    assert terms["loss_cls"].item() == pytest.approx(fl.item() / n, rel=1e-5)
    terms["loss_box"].backward()
    plain = head()
    (generalized_box_iou_loss(plain.boxes()[0, :3], GTS[0][[0, 1, 1]], reduction="sum") / n).backward()
    r = asg.reweight
    k = giou.sum() / (r * giou).sum()
    for a in (1, 2):  # anchor 0 predicts its GT exactly: no gradient to compare
        assert out.distances.grad[0, a].tolist() == pytest.approx((r[a] * k * plain.distances.grad[0, a]).tolist(), rel=1e-4)
    assert not asg.soft.requires_grad and not asg.reweight.requires_grad


def test_config_section_defaults():
    cfg = AssignerConfig().noisyanchor
    assert (cfg.topn, cfg.anchor_scale, cfg.alpha, cfg.focal_alpha, cfg.focal_gamma) == (12, 8.0, 0.75, 0.5, 2.0)
    with pytest.raises(ValueError):
        NoisyAnchorAssigner(3, alpha=1.5)
