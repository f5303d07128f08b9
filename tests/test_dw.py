"""Dual Weighting: weights (Eq. 3-8, Table 5) on hand-computed cases, and the assigner's loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from dwlab.assign.bags import candidate_prior_dense
from dwlab.assign.base import weighted_total
from dwlab.assign.dw import (
    DWAssigner,
    DWParams,
    dual_weights,
    p_neg,
)
from dwlab.box_ops import boxes_to_distances, distances_to_boxes
from dwlab.config import DWAssignerConfig
from dwlab.data.target import Target
from dwlab.losses import log1m_joint_score, log_joint_score, weighted_joint_bce
from dwlab.models.outputs import Anchors, HeadOutputs

CPU = torch.device("cpu")
PAPER = dict(beta=5.0, mu=5.0, gamma1=2.0, gamma2=2.0)
OFFICIAL = dict(loc_score="exp_giou", mu_norm=3.0, pneg_high=1.0, pneg_bag_minmax=True)
T = torch.tensor


def col(*values):
    return T(values, dtype=torch.float32)[:, None]  # one GT: Tensor[A, 1]


def pneg_hand(iou, gamma1=2.0, low=0.5, high=0.95):
    if iou < low:
        return 1.0
    if iou > high:
        return 0.0
    k = 1 / (high**gamma1 - low**gamma1)
    return -k * iou**gamma1 + k * high**gamma1


def wpos_hand(s, iou, prior, beta=5.0, mu=5.0, mu_norm=None, loc=None):
    mu_norm = mu if mu_norm is None else mu_norm
    t = [si * (li if loc else ii**beta) for si, ii, li in zip(s, iou, loc or iou)]
    den = sum(math.exp(mu_norm * ti) * ti * p for ti, p in zip(t, prior))
    return [math.exp(mu * ti) * ti * p / den for ti, p in zip(t, prior)]


# ----------------------------------------------------------------------------- P_neg, I_neg


def test_pneg_passes_through_its_two_points():
    assert p_neg(T([0.5, 0.95]), 2.0).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    for gamma1 in (1.0, 3.0, 5.0):
        assert p_neg(T([0.5, 0.95]), gamma1).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_pneg_flat_outside_and_decreasing_between():
    assert p_neg(T([0.0, 0.2, 0.4999]), 2.0).tolist() == [1.0, 1.0, 1.0]
    assert p_neg(T([0.951, 0.99, 1.0]), 2.0).tolist() == [0.0, 0.0, 0.0]
    iou = torch.linspace(0.5, 0.95, 101, dtype=torch.float64)
    for gamma1 in (1, 2, 3, 4, 5):
        assert bool((p_neg(iou, gamma1).diff() < 0).all())


def test_pneg_hand_values():
    # gamma1 = 2: k = 1 / (0.95^2 - 0.5^2) = 1 / 0.6525; P(0.8) = (0.9025 - 0.64) / 0.6525
    assert float(p_neg(T(0.8), 2.0)) == pytest.approx(0.2625 / 0.6525, rel=1e-6)
    assert float(p_neg(T(0.725), 1.0)) == pytest.approx(0.5, rel=1e-6)  # linear: midpoint
    assert float(p_neg(T(0.75), 2.0, high=1.0)) == pytest.approx((1 - 0.5625) / 0.75, rel=1e-6)


def test_ineg_is_score_power_gamma2():
    s, iou, prior = col(0.3, 0.6, 0.2), col(0.2, 0.1, 0.9), col(1.0, 1.0, 0.0)
    for gamma2 in (1.0, 2.0, 3.0):
        _, w_neg = dual_weights(s, iou, prior, beta=5.0, mu=5.0, gamma1=2.0, gamma2=gamma2)
        # in bag with IoU < 0.5 (P_neg = 1) and outside the bag alike: s ** gamma2
        assert w_neg[:, 0].tolist() == pytest.approx([0.3**gamma2, 0.6**gamma2, 0.2**gamma2], rel=1e-6)


# ----------------------------------------------------------------------------- positive weight


def test_pos_weights_hand_case():
    s, iou, prior = [0.5, 1.0, 0.8], [1.0, 1.0, 0.7], [1.0, 1.0, 0.5]
    w_pos, _ = dual_weights(col(*s), col(*iou), col(*prior), **PAPER)
    t = [0.5, 1.0, 0.8 * 0.7**5]
    num = [math.exp(5 * x) * x * p for x, p in zip(t, prior)]
    assert w_pos[:, 0].tolist() == pytest.approx([n / sum(num) for n in num], rel=1e-5)


def test_pos_weights_sum_to_one_per_bag_and_zero_outside():
    torch.manual_seed(0)
    scores, ious = torch.rand(30, 4), torch.rand(30, 4)
    prior = torch.rand(30, 4) * (torch.rand(30, 4) < 0.4)
    prior[:, 3] = 0  # an empty bag
    w_pos, w_neg = dual_weights(scores, ious, prior, **PAPER)
    assert w_pos.sum(0)[:3].tolist() == pytest.approx([1.0, 1.0, 1.0], rel=1e-5)
    assert bool((w_pos[prior == 0] == 0).all()) and bool((w_pos[prior > 0] > 0).all())
    assert torch.allclose(w_neg[prior == 0], scores[prior == 0] ** 2)
    assert not w_pos.requires_grad and not w_neg.requires_grad


def test_bag_with_all_zero_iou_falls_back_to_prior():
    w_pos, _ = dual_weights(col(0.5, 0.5), col(0.0, 0.0), col(1.0, 3.0), **PAPER)
    assert w_pos[:, 0].tolist() == pytest.approx([0.25, 0.75])


# ----------------------------------------------------------------------------- Table 5


@pytest.mark.parametrize("variant", ["full", "pos_only", "no_pneg", "no_ineg", "one_minus_wpos"])
def test_negative_variants_hand_case(variant):
    s, iou = [0.6, 0.3, 0.9], [0.8, 0.4, 0.3]
    prior = [1.0, 1.0, 0.0]  # the third anchor is outside the bag
    w_pos, w_neg = dual_weights(col(*s), col(*iou), col(*prior), **PAPER, neg_variant=variant)
    wp = wpos_hand(s[:2], iou[:2], prior[:2])
    pn = [0.2625 / 0.6525, 1.0]
    ineg = [0.36, 0.09]
    expected = {
        "full": [pn[0] * ineg[0], pn[1] * ineg[1]],
        "pos_only": [0.0, 0.0],
        "no_pneg": ineg,
        "no_ineg": pn,
        "one_minus_wpos": [(1 - wp[0]) * ineg[0], (1 - wp[1]) * ineg[1]],
    }[variant]
    assert w_neg[:, 0].tolist() == pytest.approx(expected + [0.81], rel=1e-5)  # outside: s^2
    assert w_pos[:, 0].tolist() == pytest.approx(wp + [0.0], rel=1e-5)  # pos side unchanged


def test_dual_weights_separate_anchors_that_coupled_weights_confuse():
    """Fig. 1: four anchors of one GT. GFL-style quality focal weights derive the negative from
    the positive (target y = IoU): pos y|y - s|^2, neg (1 - y)|y - s|^2."""
    s = [0.3, 0.8, 0.8, 0.8 * (0.6 / 0.9) ** 5]  # A, B, C, D
    iou = [0.3, 0.6, 0.8, 0.9]
    w_pos, w_neg = dual_weights(col(*s), col(*iou), col(1.0, 1.0, 1.0, 1.0), **PAPER)
    w_pos, w_neg = w_pos[:, 0], w_neg[:, 0]
    gfl = [(y * (y - x) ** 2, (1 - y) * (y - x) ** 2) for x, y in zip(s, iou)]
    # A and C: score equals IoU, so GFL gives both (0, 0); DW gives them different pairs
    assert gfl[0] == gfl[2] == (0.0, 0.0)
    assert abs(float(w_pos[0] - w_pos[2])) > 0.1 and abs(float(w_neg[0] - w_neg[2])) > 0.1
    # B and D: same consistency t = s * iou^5, hence the same pos weight, and any negative
    # weight derived from it (e.g. 1 - w_pos) is the same too; DW's negatives differ
    assert float(w_pos[1]) == pytest.approx(float(w_pos[3]), rel=1e-5)
    assert float(1 - w_pos[1]) == pytest.approx(float(1 - w_pos[3]), rel=1e-5)
    assert float(w_neg[1]) == pytest.approx(pneg_hand(0.6) * 0.64, rel=1e-5)
    assert float(w_neg[3]) == pytest.approx(pneg_hand(0.9) * s[3] ** 2, rel=1e-5)
    assert float(w_neg[1]) > 10 * float(w_neg[3])


# ----------------------------------------------------------------------------- official variant


def test_official_weights_hand_case():
    s, giou_loss, iou, prior = [0.5, 0.4, 0.2], [0.1, 0.3, 0.6], [0.9, 0.7, 0.3], [1.0, 0.5, 0.8]
    w_pos, w_neg = dual_weights(
        col(*s), col(*iou), col(*prior), **PAPER, giou_loss=col(*giou_loss), **OFFICIAL
    )
    loc = [math.exp(-5 * g) for g in giou_loss]
    assert w_pos[:, 0].tolist() == pytest.approx(wpos_hand(s, iou, prior, mu_norm=3.0, loc=loc), rel=1e-5)
    # P_neg: x = (1 - iou^2) / 0.75 = [0.25333, 0.68, 1.21333]; min-max with t1 = 0.25333,
    # t2 = min(1, 1.2133) = 1, then IoU < 0.5 -> 1
    x = [(1 - v**2) / 0.75 for v in iou]
    pn = [0.0, (x[1] - x[0]) / (1 - x[0]), 1.0]
    assert w_neg[:, 0].tolist() == pytest.approx([p * v**2 for p, v in zip(pn, s)], rel=1e-5, abs=1e-9)


def test_official_constructor_fills_released_constants():
    a = DWAssigner(3, DWParams(variant="official")).params
    assert (a.loc_score, a.mu_norm, a.pneg_high, a.pneg_bag_minmax, a.pos_scale) == ("exp_giou", 3.0, 1.0, True, 0.25)
    b = DWAssigner.from_config(DWAssignerConfig(variant="official", mu_norm=4.0), 3).params
    assert (b.loc_score, b.mu_norm, b.pos_scale) == ("exp_giou", 4.0, 0.25)
    p = DWAssigner(3, DWParams(mu=6.0)).params
    assert (p.loc_score, p.mu_norm, p.pneg_high, p.pneg_bag_minmax, p.pos_scale) == ("iou_pow", 6.0, 0.95, False, 1.0)
    for bad in (dict(neg_variant="none"), dict(bag="all"), dict(variant="mmdet"), dict(pneg_low=0.96)):
        with pytest.raises(ValueError):
            DWAssigner(3, DWParams(**bad))


# ----------------------------------------------------------------------------- the assigner

SIZES, STRIDES, C = [(8, 8), (4, 4)], [8, 16], 3


def make_outputs(batch, seed=0, boxes=None, noise=0.15, requires_grad=True):
    """Random head outputs on a 64x64 input; with ``boxes`` (one per image), distances that
    predict that box from every anchor, perturbed (so in-box IoUs are high but not 1)."""
    g = torch.Generator().manual_seed(seed)
    anchors = Anchors.grid(SIZES, STRIDES, 0.5, CPU)
    a = len(anchors)
    cls = torch.randn(batch, a, C, generator=g)
    ctr = torch.randn(batch, a, generator=g)
    if boxes is None:
        dist = torch.rand(batch, a, 4, generator=g) * 20
    else:
        exact = boxes_to_distances(anchors.points[None], boxes[:, None, :]).clamp(min=1.0)
        dist = exact * (1 + noise * torch.randn(batch, a, 4, generator=g)).clamp(min=0.3)
    if requires_grad:
        cls, ctr, dist = (x.requires_grad_() for x in (cls, ctr, dist))
    return HeadOutputs(cls, ctr, dist, anchors)


def targets_two_images():
    return [
        Target(T([[6.0, 4.0, 40.0, 46.0], [10.0, 8.0, 44.0, 50.0]]), T([0, 0])),  # same class, IoU 0.66
        Target(T([[10.0, 8.0, 50.0, 36.0]]), T([2])),
    ]


def sub(outputs, i):
    return HeadOutputs(outputs.cls_logits[i : i + 1], outputs.centerness[i : i + 1], outputs.distances[i : i + 1], outputs.anchors)


def test_losses_are_finite_and_gradient_reaches_head_not_weights():
    outputs = make_outputs(2)
    assigner = DWAssigner(C)
    losses = assigner(outputs, targets_two_images())
    assert set(losses) == {"loss_cls_pos", "loss_box", "loss_neg"} == set(assigner.loss_weights)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    weighted_total(losses, assigner.loss_weights).backward()
    for x in (outputs.cls_logits, outputs.centerness, outputs.distances):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    asg = assigner.assign(outputs, targets_two_images())
    assert not any(t.requires_grad for t in (asg.w_pos, asg.w_neg, asg.p_neg, asg.entry_neg_factor))


def test_weights_act_as_constants_in_the_gradient():
    """d loss_cls_pos / d cls = sum over pairs of -w_pos (1 - sigmoid(x)) / N: the weights
    (which depend on s) contribute nothing of their own to the gradient."""
    outputs = make_outputs(2)
    targets = targets_two_images()
    assigner = DWAssigner(C)
    loss = assigner(outputs, targets)["loss_cls_pos"]
    (grad,) = torch.autograd.grad(loss, outputs.cls_logits)
    asg = assigner.assign(outputs, targets)
    x = outputs.cls_logits.detach()[asg.image, asg.anchor, asg.label]
    expected = torch.zeros_like(grad).index_put_(
        (asg.image, asg.anchor, asg.label), -asg.w_pos * (1 - torch.sigmoid(x)) / 3, accumulate=True
    )
    assert torch.allclose(grad, expected, atol=1e-7)


@pytest.mark.parametrize("gamma2", [2.0, 3.0])
def test_neg_gradient_is_the_analytic_derivative_with_pneg_constant(gamma2):
    """d/dx of P_neg s^g (-ln(1 - s)) with s = sigmoid(x) sigmoid(y), P_neg constant:
    P_neg (g s^(g-1) (-ln(1 - s)) + s^g / (1 - s)) ds/dx, ds/dx = s (1 - sigmoid(x)). Outside the
    bag (other class channels) P_neg is replaced by 1: the focal negative's derivative."""
    anchors = Anchors.grid([(4, 4)], [8], 0.5, CPU)
    g = torch.Generator().manual_seed(3)
    box = T([[2.0, 3.0, 22.0, 25.0]])
    dist = (boxes_to_distances(anchors.points, box) * (1 + 0.3 * torch.rand(16, 4, generator=g))).clamp(min=1.0)
    cls, ctr = torch.randn(1, 16, C, generator=g).requires_grad_(), torch.randn(1, 16, generator=g)
    outputs = HeadOutputs(cls, ctr, dist[None], anchors)
    assigner = DWAssigner(C, DWParams(gamma2=gamma2))
    targets = [Target(box, T([1]))]
    (grad,) = torch.autograd.grad(assigner.loss_sums(outputs, targets).neg, cls)
    asg = assigner.assign(outputs, targets)
    assert 0 < len(asg.anchor) < 16
    ious = box_iou(distances_to_boxes(anchors.points, dist), box)[:, 0].tolist()
    for a in range(16):
        for c in range(C):
            x, y = float(cls.detach()[0, a, c]), float(ctr[0, a])
            sx = 1 / (1 + math.exp(-x))
            s = sx / (1 + math.exp(-y))
            in_bag = c == 1 and a in asg.anchor.tolist()
            factor = pneg_hand(ious[a]) if in_bag else 1.0
            ds_dx = s * (1 - sx)
            d = factor * (gamma2 * s ** (gamma2 - 1) * -math.log(1 - s) + s**gamma2 / (1 - s)) * ds_dx
            assert float(grad[0, a, c]) == pytest.approx(d, rel=1e-4, abs=1e-9), (a, c)
    assert any(0.0 < pneg_hand(ious[a]) < 1.0 for a in asg.anchor.tolist())  # P_neg is not trivial


def test_neg_gradient_is_torchvision_focal_times_the_factor():
    """With centerness saturated (sigmoid = 1) s = sigmoid(cls): outside bags the neg term is
    torchvision's sigmoid_focal_loss(target 0, alpha off, gamma = gamma2), value and gradient;
    in-bag entries on the GT's class get that gradient times their constant factor P_neg."""
    outputs = make_outputs(2, boxes=torch.stack([targets_two_images()[0].boxes[0], targets_two_images()[1].boxes[0]]))
    with torch.no_grad():
        outputs.centerness.fill_(30.0)
    cls = outputs.cls_logits
    assigner = DWAssigner(C)
    asg = assigner.assign(outputs, targets_two_images())
    (grad,) = torch.autograd.grad(assigner.loss_sums(outputs, targets_two_images()).neg, cls)
    (focal_grad,) = torch.autograd.grad(sigmoid_focal_loss(cls, torch.zeros_like(cls), alpha=-1, reduction="sum"), cls)
    factor = torch.ones(cls.numel()).index_put_((asg.entry,), asg.entry_p_neg).reshape(cls.shape)
    assert float(asg.entry_p_neg.min()) < 0.5  # some in-bag entries are well damped
    torch.testing.assert_close(grad, factor * focal_grad, rtol=1e-4, atol=1e-7)
    empty = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)) for _ in range(2)]
    neg = assigner.loss_sums(outputs, empty).neg
    focal = sigmoid_focal_loss(cls, torch.zeros_like(cls), alpha=-1, reduction="sum")
    assert float(neg.detach()) == pytest.approx(float(focal.detach()), rel=1e-5)


def test_no_ineg_drops_the_score_power_in_bag_only():
    targets = targets_two_images()
    outputs = make_outputs(2, boxes=torch.stack([targets[0].boxes[0], targets[1].boxes[0]]), requires_grad=False)
    asg = DWAssigner(C, DWParams(neg_variant="no_ineg")).assign(outputs, targets)
    w_neg = DWAssigner(C, DWParams(neg_variant="no_ineg")).neg_weights(outputs, asg).reshape(-1)
    s = outputs.scores().reshape(-1)
    in_bag = torch.zeros_like(s, dtype=torch.bool).index_fill(0, asg.entry, True)
    assert torch.allclose(w_neg[asg.entry], asg.entry_p_neg) and torch.allclose(w_neg[~in_bag], s[~in_bag] ** 2)


def test_image_without_gts_gives_focal_negatives_only():
    outputs = make_outputs(2)
    empty = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)) for _ in range(2)]
    assigner = DWAssigner(C)
    losses = assigner(outputs, empty)
    assert losses["loss_cls_pos"].item() == 0.0 and losses["loss_box"].item() == 0.0
    s = outputs.scores().detach()
    expected = (s**2 * -torch.log1p(-s)).sum()  # focal negative, normaliser clamped to 1
    assert losses["loss_neg"].item() == pytest.approx(float(expected), rel=1e-5)
    weighted_total(losses, assigner.loss_weights).backward()
    assert outputs.cls_logits.grad.abs().sum() > 0 and torch.isfinite(outputs.cls_logits.grad).all()


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_batched_equals_per_image(variant):
    targets = targets_two_images()
    boxes = torch.stack([targets[0].boxes[0], targets[1].boxes[0]])
    outputs = make_outputs(2, boxes=boxes, requires_grad=False)
    assigner = DWAssigner(C, DWParams(variant=variant))
    whole = assigner.loss_sums(outputs, targets)
    parts = [assigner.loss_sums(sub(outputs, i), [targets[i]]) for i in range(2)]
    for name in ("cls_pos", "reg", "neg", "num_gts", "neg_norm"):
        assert float(getattr(whole, name)) == pytest.approx(sum(float(getattr(p, name)) for p in parts), rel=1e-5)
    assert float(whole.neg_norm) > 1.0  # high IoUs: the neg normaliser is not the clamp
    losses = assigner(outputs, targets)
    scale, w = assigner.params.pos_scale, assigner.loss_weights
    assert float(w["loss_cls_pos"] * losses["loss_cls_pos"]) == pytest.approx(scale * sum(float(p.cls_pos) for p in parts) / 3, rel=1e-5)
    assert float(w["loss_box"] * losses["loss_box"]) == pytest.approx(scale * 5.0 * sum(float(p.reg) for p in parts) / 3, rel=1e-5)
    expected_neg = sum(float(p.neg) for p in parts) / sum(float(p.neg_norm) for p in parts)
    assert float(losses["loss_neg"]) == pytest.approx(expected_neg, rel=1e-5)


def test_shared_class_channel_takes_the_smallest_pneg():
    targets = targets_two_images()
    outputs = make_outputs(2, boxes=torch.stack([targets[0].boxes[0], targets[1].boxes[0]]), requires_grad=False)
    asg = DWAssigner(C).assign(outputs, targets)
    entry_w_neg = DWAssigner(C).neg_weights(outputs, asg).reshape(-1)[asg.entry]
    shared = 0
    for e, w, p in zip(asg.entry.tolist(), entry_w_neg.tolist(), asg.entry_p_neg.tolist()):
        on = ((asg.image * len(outputs.anchors) + asg.anchor) * C + asg.label) == e
        assert w == pytest.approx(float(asg.w_neg[on].min())) and p == pytest.approx(float(asg.p_neg[on].min()))
        if int(on.sum()) > 1 and float(asg.p_neg[on].max() - asg.p_neg[on].min()) > 1e-3:
            shared += 1
    assert shared > 0  # the two GTs of image 0 share anchors, with different P_neg
    assert torch.allclose(asg.entry_neg_factor, asg.entry_p_neg)  # "full": the factor is P_neg
    # the neg normaliser counts each (image, anchor, class) entry once, with its smallest P_neg
    best: dict[tuple, float] = {}
    for key in zip(asg.image.tolist(), asg.anchor.tolist(), asg.label.tolist(), asg.p_neg.tolist()):
        best[key[:3]] = min(best.get(key[:3], 1.0), key[3])
    neg_norm = float(DWAssigner(C).loss_sums(outputs, targets).neg_norm)
    assert neg_norm == pytest.approx(sum(1 - p for p in best.values()), rel=1e-5)
    assert neg_norm < float((1 - asg.p_neg).sum()) - 1e-3


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_dense_dual_weights_equal_the_assigner_pairs(variant):
    targets = targets_two_images()
    outputs = make_outputs(2, boxes=torch.stack([targets[0].boxes[0], targets[1].boxes[0]]), requires_grad=False)
    assigner = DWAssigner(C, DWParams(variant=variant))
    asg = assigner.assign(outputs, targets)
    anchors, scores, boxes = outputs.anchors, outputs.scores(), outputs.boxes()
    p = assigner.params
    kw = dict(PAPER, gamma1=p.gamma1, gamma2=p.gamma2, loc_score=p.loc_score,
              mu_norm=p.mu_norm, pneg_high=p.pneg_high, pneg_bag_minmax=p.pneg_bag_minmax)  # fmt: skip
    first = 0
    for i, t in enumerate(targets):
        prior, in_bag = candidate_prior_dense(anchors.points, anchors.strides, anchors.levels, t.boxes, kind="soft")
        giou_loss = 1 - generalized_box_iou(boxes[i], t.boxes)  # pairwise, torchvision
        w_pos, w_neg = dual_weights(scores[i][:, t.labels], box_iou(boxes[i], t.boxes), prior, in_bag=in_bag,
                                    giou_loss=giou_loss, **kw)  # fmt: skip
        sel = asg.image == i
        a, g = asg.anchor[sel], asg.gt[sel] - first
        assert int(in_bag.sum()) == len(a) and bool(in_bag[a, g].all())
        assert torch.allclose(w_pos[a, g], asg.w_pos[sel], rtol=1e-4, atol=1e-7)
        assert torch.allclose(w_neg[a, g], asg.w_neg[sel], rtol=1e-4, atol=1e-7)
        if variant == "paper":
            assert float(w_pos.sum()) == pytest.approx(len(t.labels), rel=1e-5)
        first += len(t.labels)


def test_official_loss_scales_pos_terms():
    targets = targets_two_images()
    outputs = make_outputs(2, requires_grad=False)
    assigner = DWAssigner(C, DWParams(variant="official"))
    sums, losses = assigner.loss_sums(outputs, targets), assigner(outputs, targets)
    w = assigner.loss_weights
    assert float(w["loss_cls_pos"] * losses["loss_cls_pos"]) == pytest.approx(0.25 * float(sums.cls_pos) / 3, rel=1e-6)
    assert float(w["loss_box"] * losses["loss_box"]) == pytest.approx(0.25 * 5 * float(sums.reg) / 3, rel=1e-6)


def test_all_weights_one_is_plain_bce():
    torch.manual_seed(0)
    cls, ctr = torch.randn(2, 5, C), torch.randn(2, 5)
    target = torch.zeros(2, 5, C)
    target[0, 1, 2] = target[1, 4, 0] = target[1, 0, 0] = 1.0
    pos_entry = target.reshape(-1).nonzero()[:, 0]
    pos, neg = weighted_joint_bce(cls, ctr, pos_entry, torch.ones(3), 1 - target)
    s = torch.sigmoid(cls) * torch.sigmoid(ctr)[..., None]
    assert float(pos + neg) == pytest.approx(float(F.binary_cross_entropy(s, target, reduction="sum")), rel=1e-5)


def test_assigner_reduces_to_bce_when_every_weight_is_one():
    """One-anchor bags (top-1 on one level) make w_pos = 1; pos_only puts w_neg = 0 on them;
    gamma2 = 0 makes every other negative weight 1; low IoUs make the neg normaliser 1."""
    anchors = Anchors.grid([(8, 8)], [8], 0.5, CPU)
    g = torch.Generator().manual_seed(1)
    outputs = HeadOutputs(torch.randn(1, 64, C, generator=g), torch.randn(1, 64, generator=g),
                          torch.full((1, 64, 4), 1.0), anchors)  # fmt: skip
    targets = [Target(T([[2.0, 2.0, 30.0, 30.0], [30.0, 20.0, 62.0, 60.0]]), T([1, 2]))]
    assigner = DWAssigner(C, DWParams(bag="topk", bag_topk=1, neg_variant="pos_only", gamma2=0.0))
    losses = assigner(outputs, targets)
    target = torch.zeros(1, 64, C)
    asg = assigner.assign(outputs, targets)
    assert len(asg.anchor) == 2 and torch.allclose(asg.w_pos, torch.ones(2))
    target[0, asg.anchor, asg.label] = 1.0
    bce = F.binary_cross_entropy(outputs.scores(), target, reduction="sum")
    assert float(losses["loss_cls_pos"] * 2 + losses["loss_neg"]) == pytest.approx(float(bce), rel=1e-5)


def test_log_scores_are_stable_and_exact():
    x, y = T([-60.0, -3.0, 0.0, 2.0, 60.0]), T([60.0, 1.0, 0.0, -2.0, 60.0])
    xd, yd = x.double(), y.double()
    s = torch.sigmoid(xd) * torch.sigmoid(yd)
    one_minus_s = torch.sigmoid(-xd) + torch.sigmoid(xd) * torch.sigmoid(-yd)  # exact in float64
    assert torch.allclose(log_joint_score(x, y).double(), torch.log(s), rtol=1e-5)
    assert torch.allclose(log1m_joint_score(x, y).double(), torch.log(one_minus_s), rtol=1e-4, atol=1e-6)
    assert torch.isfinite(log1m_joint_score(T([80.0]), T([80.0]))).all()  # s rounds to 1 in fp32
    outputs = make_outputs(1)
    with torch.no_grad():
        outputs.cls_logits.mul_(40)
        outputs.centerness.mul_(40)
    assigner = DWAssigner(C)
    losses = assigner(outputs, targets_two_images()[:1])
    weighted_total(losses, assigner.loss_weights).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(outputs.cls_logits.grad).all()


def test_weight_maps_and_plots(tmp_path):
    from dwlab.plots import plot_pneg, plot_weight_maps

    targets = targets_two_images()
    outputs = make_outputs(2, requires_grad=False)
    assigner = DWAssigner(C)
    maps = assigner.weights(outputs, targets)
    asg = assigner.assign(outputs, targets)
    # image 1 has one GT: the pos map is its w_pos, the neg map its class channel of w_neg
    sel = asg.image == 1
    pos = torch.zeros(len(outputs.anchors)).index_put_((asg.anchor[sel],), asg.w_pos[sel])
    assert torch.allclose(maps[1]["pos"], pos)
    assert torch.allclose(maps[1]["neg"], assigner.neg_weights(outputs, asg)[1, :, 2])
    per_level = assigner.weight_maps(outputs, targets, image=0)
    assert list(per_level) == ["P3", "P4"] and per_level["P4"]["neg"].shape == (4, 4)
    for path in (plot_pneg(tmp_path / "pneg.png"), plot_weight_maps(per_level, tmp_path / "maps.png")):
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_neg_norm_num_gts_divides_the_neg_term_by_the_gt_count():
    torch.manual_seed(0)
    anchors = Anchors.grid([(4, 4), (2, 2)], [8, 16], 0.5, torch.device("cpu"))
    a = len(anchors)
    outputs = HeadOutputs(torch.randn(1, a, 3), torch.randn(1, a), torch.rand(1, a, 4) * 12 + 2, anchors)
    targets = [Target(torch.tensor([[2.0, 2, 20, 22], [10, 6, 30, 30]]), torch.tensor([0, 2]))]
    pneg, by_gts = DWAssigner(3), DWAssigner(3, DWParams(neg_norm="num_gts"))
    sums = pneg.loss_sums(outputs, targets)
    assert torch.allclose(by_gts(outputs, targets)["loss_neg"], sums.neg / 2.0)
    assert torch.allclose(pneg(outputs, targets)["loss_neg"], sums.neg / sums.neg_norm.clamp(min=1.0))


def test_dw_params_has_exactly_the_config_fields():
    """DWParams mirrors DWAssignerConfig field for field, so that ``from_config`` never meets a
    field it does not know (a TypeError the runner would not turn into a one-line error)."""
    import dataclasses

    from dwlab.assign.dw import DWParams
    from dwlab.config import DWAssignerConfig

    assert [f.name for f in dataclasses.fields(DWParams)] == list(DWAssignerConfig.model_fields)


def test_fig5_has_one_colour_scale_per_map_row_and_the_input_image_first():
    """A level whose weights are near zero must look near zero: each row (score, IoU, pos, neg)
    shares one colour range over the levels, the weights' from 0 to the row's largest value."""
    from dwlab.plots import weight_map_figure

    per_level = {"P3": {k: torch.full((4, 4), 0.8) for k in ("score", "iou", "pos", "neg")},
                 "P6": {k: torch.full((1, 1), 1e-4) for k in ("score", "iou", "pos", "neg")}}  # fmt: skip
    fig = weight_map_figure(per_level, image=torch.rand(32, 32, 3), boxes=torch.tensor([[2.0, 2, 20, 20]]))
    axes = [ax for ax in fig.axes if ax.get_images() and ax.get_title() != "input, GT boxes"]
    maps = [ax for ax in axes if ax.get_images()[0].get_array().ndim == 2]
    assert len(maps) == 8  # 4 rows x 2 levels (+ the input image, + colour bars)
    clims = [ax.get_images()[0].get_clim() for ax in maps]
    for row in range(4):
        pair = [c for ax, c in zip(maps, clims) if ax.get_subplotspec().rowspan.start == row]
        assert len(pair) == 2 and pair[0] == pair[1]  # P3 and P6 share the row's range
        assert pair[0][1] == (1.0 if row < 2 else pytest.approx(0.8))
    assert fig.axes[0].get_title() == "input, GT boxes" and len(fig.axes[0].patches) == 1
