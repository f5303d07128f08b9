"""The dynamic assigners of Table 6 (SimOTA, OTA, PAA, AutoAssign as published) on hand-sized
cases: which anchors each makes positive, and the values of its terms where they can be worked
out by hand. The contract all methods share is tests/test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dwlab.assign.autoassign_paper import AutoAssignDetachAssigner, AutoAssignPaperAssigner
from dwlab.assign.ota import OTAAssigner
from dwlab.assign.paa import PAAAssigner, fit_gmm, gmm_positives
from dwlab.assign.simota import SimOTAAssigner
from dwlab.box_ops import boxes_to_distances
from dwlab.data.target import Target
from dwlab.models.outputs import Anchors, HeadOutputs

CPU = torch.device("cpu")


def level(h: int, w: int, stride: int = 8) -> Anchors:
    return Anchors.grid([(h, w)], [stride], 0.5, CPU)  # points at 4, 12, 20, ...


def head(anchors: Anchors, boxes: torch.Tensor, cls_logits: torch.Tensor, ctr: float = 0.0) -> HeadOutputs:
    """One image whose anchor a predicts boxes[a] (xyxy ``Tensor[A, 4]``), class logits
    ``Tensor[A, C]`` and a constant centerness logit; leaves with gradient."""
    distances = boxes_to_distances(anchors.points, boxes).clamp(min=0.01)
    return HeadOutputs(
        cls_logits[None].clone().requires_grad_(),
        torch.full((1, len(anchors)), ctr).requires_grad_(),
        distances[None].clone().requires_grad_(),
        anchors,
    )


def target(*boxes_and_labels) -> Target:
    boxes, labels = zip(*boxes_and_labels)
    return Target(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels))


def exact_and_tiny(anchors: Anchors, gt: list[float], exact: list[int]) -> torch.Tensor:
    """Predicted boxes: ``gt`` for the anchors in ``exact``, a 2 px box around the point otherwise."""
    p = anchors.points
    boxes = torch.cat([p - 1.0, p + 1.0], dim=-1)
    boxes[exact] = torch.tensor(gt)
    return boxes


# ----------------------------------------------------------------------------- SimOTA


def test_simota_takes_k_from_the_top_ious_and_the_cheapest_candidates():
    a = level(6, 6)  # x, y in 4, 12, ..., 44; GT centre (20, 20): square 20 +- 12 -> 12, 20, 28
    gt = [0.0, 0.0, 40.0, 40.0]
    exact = [7, 14, 28]  # (12, 12), (20, 20), (36, 36): the last outside the square
    out = head(a, exact_and_tiny(a, gt, exact), torch.zeros(36, 2))
    assigner = SimOTAAssigner(2)
    boxes, labels, valid = torch.tensor([[gt]]), torch.tensor([[1]]), torch.tensor([[True]])
    matched = assigner.match(out, boxes, labels, valid)[0]
    # candidates: the 9 points of the square; IoU 1 for two of them, tiny elsewhere -> k = 2
    assert (matched >= 0).nonzero().flatten().tolist() == [7, 14] and matched[[7, 14]].tolist() == [0, 0]
    # a 2nd GT centred on (36, 36) makes anchor 28 a candidate of the image: its box is GT 0's,
    # but outside GT 0's square it costs 1e6 more there, so GT 1 (k = 1, IoU 0.13) takes it; its
    # IoU 1 still counts in GT 0's top IoUs (k = 3, as released), so GT 0 adds its next cheapest, 8
    two = torch.tensor([[gt, [24.0, 24.0, 48.0, 48.0]]])
    m2 = assigner.match(out, two, torch.tensor([[1, 1]]), torch.tensor([[True, True]]))[0]
    assert (m2 >= 0).nonzero().flatten().tolist() == [7, 8, 14, 28] and m2[[7, 8, 14, 28]].tolist() == [0, 0, 0, 1]


def test_simota_conflicts_go_to_the_cheapest_gt_and_terms_match_yolox():
    a = level(6, 6)
    gt = [0.0, 0.0, 40.0, 40.0]
    cls = torch.full((36, 2), -4.0)
    cls[:, 1] = 2.0  # class 1 likely everywhere: the class-1 GT is cheaper on a shared anchor
    out = head(a, exact_and_tiny(a, gt, [14]), cls)
    assigner = SimOTAAssigner(2)
    boxes = torch.tensor([[gt, gt]])
    matched = assigner.match(out, boxes, torch.tensor([[0, 1]]), torch.tensor([[True, True]]))[0]
    assert (matched >= 0).nonzero().flatten().tolist() == [14] and matched[14].item() == 1  # k = 1 each, one anchor
    terms = assigner(out, [target((gt, 0), (gt, 1))])
    # one positive (IoU 1 with its GT): cls BCE against one-hot(1) * 1, objectness over all 36
    expected_cls = F.binary_cross_entropy_with_logits(cls[14], torch.tensor([0.0, 1.0]), reduction="sum")
    obj_target = torch.zeros(36)
    obj_target[14] = 1.0
    expected_obj = F.binary_cross_entropy_with_logits(torch.zeros(36), obj_target, reduction="sum")
    assert terms["loss_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-5)
    assert terms["loss_obj"].item() == pytest.approx(expected_obj.item(), rel=1e-5)
    assert terms["loss_box"].item() == pytest.approx(0.0, abs=1e-5)
    assert assigner.head_init.centerness_bias == pytest.approx(math.log(0.01 / 0.99))


# ----------------------------------------------------------------------------- OTA


def test_ota_transports_each_gt_its_dynamic_k_and_the_rest_to_the_background():
    a = level(6, 6)  # GT centre (20, 20), radius 2.5 strides clipped to the box: x, y in 4..36 (25 points)
    gt = [0.0, 0.0, 40.0, 40.0]
    exact = [0, 14, 28]  # (4, 4), (20, 20), (36, 36): IoU 1; the others' 2 px boxes IoU 0.0025
    out = head(a, exact_and_tiny(a, gt, exact), torch.zeros(36, 2))
    assigner = OTAAssigner(2)
    boxes, labels, valid = torch.tensor([[gt]]), torch.tensor([[1]]), torch.tensor([[True]])
    pi = assigner.plan(out, boxes, labels, valid)[0]  # [2, A], rows divided by their max
    assert pi.shape == (2, 36) and pi.max(-1).values.tolist() == pytest.approx([1.0, 1.0])
    # k = floor(3 + 22 * 0.0025) = 3: the three exact boxes (cls cost below the background's at p = 0.5)
    assert pi.argmax(0).eq(0).nonzero().flatten().tolist() == exact
    terms = assigner(out, [target((gt, 1))])
    assert terms["loss_box"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["loss_obj"].item() == pytest.approx(math.log(2), rel=1e-5)  # BCE(0.5, IoU 1) per positive
    focal_all = 36 * 2 * 0.75 * 0.25 * math.log(2) + 3 * (0.25 - 0.75) * 0.25 * math.log(2)  # alpha 0.25, p 0.5
    assert terms["loss_cls"].item() == pytest.approx(focal_all / 3, rel=1e-5)
    # a padded GT (a batch whose other image has two) takes no anchor
    two = torch.tensor([[gt, [0.0, 0.0, 8.0, 8.0]]])
    matched = assigner.match(out, two, torch.tensor([[1, 0]]), torch.tensor([[True, False]]))[0]
    assert (matched >= 0).nonzero().flatten().tolist() == exact and set(matched[exact].tolist()) == {0}


# ----------------------------------------------------------------------------- AutoAssign as published


def test_autoassign_paper_terms_by_hand():
    a = level(2, 2)  # points (4, 4), (12, 4), (4, 12), (12, 12)
    gt = [0.0, 0.0, 16.0, 8.0]  # centre (8, 4): the bag is (4, 4) and (12, 4), offsets -+0.5 stride
    out = head(a, torch.tensor([gt] * 4), torch.zeros(4, 2))  # s = 0.25 everywhere, exact boxes
    terms = AutoAssignPaperAssigner(2)(out, [target((gt, 1))])
    prior_sum = 2 * math.exp(-0.125)
    assert terms["loss_cls_pos"].item() == pytest.approx(math.log(4), rel=1e-5)  # w+ 1/2 each, P = s
    # in-bag entries of class 1: IoU 1 -> w- = 0; the other 6 entries: s^2 * -ln(1 - s)
    assert terms["loss_neg"].item() == pytest.approx(6 * 0.25**2 * math.log(4 / 3) / prior_sum, rel=1e-5)
    assert terms["loss_prior"].item() == pytest.approx(1 / prior_sum, rel=1e-5)


def test_autoassign_paper_weights_carry_gradient_and_detach_does_not():
    a = level(2, 2)
    gt = [0.0, 0.0, 16.0, 8.0]
    cls = torch.tensor([[-1.0, 0.5], [-1.0, -0.5], [0.0, 0.0], [0.0, 0.0]])  # the bag's scores differ
    grads = {}
    for assigner in (AutoAssignPaperAssigner(2), AutoAssignDetachAssigner(2)):
        out = head(a, torch.tensor([gt] * 4), cls)
        assigner(out, [target((gt, 1))])["loss_cls_pos"].backward()
        grads[assigner.detach] = out.cls_logits.grad[0, :2, 1]
    # d/ds of -ln(sum w+ P): detached, each point's share w+_i P_i / bag; with w+'s gradient, more
    # to the point with the larger score (exp(P / tau) favours it)
    assert not torch.allclose(grads[False], grads[True])
    assert (grads[False][0] - grads[True][0]).item() < 0  # the better point is pushed up harder
    paper = AutoAssignPaperAssigner(2)
    out = head(a, torch.tensor([gt] * 4), cls)
    terms = paper(out, [target((gt, 1))])
    (terms["loss_cls_pos"] + terms["loss_prior"]).backward()
    assert paper.learnable.sigma.grad[1].abs().sum() > 0 and paper.learnable.sigma.grad[0].abs().sum() == 0
    assert not hasattr(AutoAssignDetachAssigner(2), "learnable")
    assert set(AutoAssignDetachAssigner(2).loss_weights) == {"loss_cls_pos", "loss_neg"}


def test_a_methods_learnable_parameters_train_and_save_with_the_detector():
    from dwlab.config import validate
    from dwlab.runner import build_detector, eval_detector, make_optimizer

    cfg = validate({"model": {"backbone": "resnet10", "pretrained": False, "fpn_channels": 16, "head_convs": 1,
                              "head_norm_groups": 4}, "assigner": {"name": "autoassign_paper"}}, "t")  # fmt: skip
    assigner = AutoAssignPaperAssigner(3)
    model = build_detector(cfg, 3, assigner)
    assert model.assigner is assigner.learnable
    optimised = {id(p) for group in make_optimizer(model, cfg).param_groups for p in group["params"]}
    assert {id(assigner.learnable.mean), id(assigner.learnable.sigma)} <= optimised
    assert {"assigner.mean", "assigner.sigma"} <= set(model.state_dict())
    eval_detector(cfg, 3).load_state_dict(model.state_dict())  # strict: evaluation loads it back


# ----------------------------------------------------------------------------- PAA


def test_paa_gmm_matches_scikit_learn_on_each_row_at_once():
    mixture = pytest.importorskip("sklearn.mixture")  # the released fit: a reference here, never in training
    g = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.rand(6, generator=g) * 0.5 + 0.3, torch.rand(9, generator=g) + 2.0]),
            torch.cat([torch.rand(3, generator=g) + 1.0, torch.rand(12, generator=g) * 2 + 4.0])]  # fmt: skip
    x = torch.stack(rows).double()
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, -4:] = False  # a shorter row: its last 4 are padding
    fit = fit_gmm(x, valid, iters=100)
    for i in range(2):
        data = x[i][valid[i]].numpy()[:, None]
        ref = mixture.GaussianMixture(
            2, weights_init=[0.5, 0.5], means_init=[[data.min()], [data.max()]], precisions_init=[[[1.0]], [[1.0]]],
            tol=1e-12, max_iter=100,
        ).fit(data)  # fmt: skip
        assert fit.mean[i].tolist() == pytest.approx(ref.means_[:, 0].tolist(), rel=1e-6)
        assert fit.var[i].tolist() == pytest.approx(ref.covariances_[:, 0, 0].tolist(), rel=1e-5)
        assert fit.weight[i].tolist() == pytest.approx(ref.weights_.tolist(), rel=1e-6)


def test_paa_separates_at_the_foreground_peak_with_the_released_fallbacks():
    x = torch.tensor([[0.1, 0.2, 0.25, 0.3, 2.0, 2.1, 2.2, 2.4], [0.5, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
    valid = torch.tensor([[True] * 8, [True] + [False] * 7])
    pos = gmm_positives(x, valid, iters=50)
    # row 0: the low cluster's densest sample is 0.2 or 0.25: positives up to it, the rest negative
    assert pos[0, :2].all() and not pos[0, 4:].any() and not pos[0, 3]
    assert pos[1].tolist() == [True] + [False] * 7  # one candidate: kept (released)


def test_paa_pre_assigns_by_anchor_iou_and_keeps_the_low_loss_candidates():
    a = level(6, 6)  # anchors: 64 px squares around each point (8 x stride 8)
    gt = [0.0, 0.0, 40.0, 40.0]
    exact = [7, 8, 14]
    out = head(a, exact_and_tiny(a, gt, exact), torch.zeros(36, 2))
    assigner = PAAAssigner(2)
    boxes, labels, valid = torch.tensor([[gt]]), torch.tensor([[0]]), torch.tensor([[True]])
    pre = assigner.pre_assign(a, boxes, valid)[0]
    assert bool((pre == 0).all())  # every 64 px anchor overlaps the 40 px GT by >= 0.1 here
    matched = assigner.match(out, boxes, labels, valid)[0]
    # 9 candidates (one level): the 3 exact boxes score 1 GIoU loss lower: the GMM's foreground
    assert (matched >= 0).nonzero().flatten().tolist() == exact
    terms = assigner(out, [target((gt, 0))])
    assert terms["loss_box"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["loss_obj"].item() == pytest.approx(math.log(2), rel=1e-5)
