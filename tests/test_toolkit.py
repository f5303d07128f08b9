"""The assignment toolkit (``dwlab.assign.common``) on hand-sized cases: candidate regions, the
centre prior, the class cost, masked pairwise IoU, dynamic k, the k cheapest anchors, one GT per
anchor; and a method's head initialisation reaching the detector."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from dwlab.assign.base import HeadInit, check_positive
from dwlab.assign.common import (
    centre_offsets,
    centre_region,
    class_cost,
    dynamic_k,
    entry_minima,
    gaussian_prior,
    one_gt_per_anchor,
    pairwise_iou,
    sinkhorn,
    smallest_k,
)
from dwlab.assign.fcos import FCOSAssigner
from dwlab.config import validate
from dwlab.models.outputs import Anchors
from dwlab.runner import build_detector

CPU = torch.device("cpu")


def level(h: int, w: int, stride: int = 8) -> Anchors:
    return Anchors.grid([(h, w)], [stride], 0.5, CPU)  # points at 4, 12, 20, ...


def test_centre_region_counts_points_of_the_square_around_the_centre():
    a = level(6, 6)  # x, y in 4, 12, 20, 28, 36, 44
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 10.0, 40.0]])  # centres (20, 20), (5, 20)
    inside = centre_region(a.points[:, None], a.strides[:, None], boxes[None], 1.5)  # [A, G]
    # GT 0: 20 +- 12 -> 12, 20, 28 on both axes; GT 1: x in (-7, 17) clipped to (0, 10) -> 4; y 12, 20, 28
    assert inside.sum(0).tolist() == [9, 3]
    free = centre_region(a.points[:, None], a.strides[:, None], boxes[None], 1.5, clip_to_box=False)
    assert free.sum(0).tolist() == [9, 6]  # GT 1 unclipped: x 4 and 12
    assert sorted(a.points[inside[:, 1]].tolist()) == [[4.0, 12.0], [4.0, 20.0], [4.0, 28.0]]


def test_centre_offsets_and_gaussian_prior():
    points, strides = torch.tensor([[12.0, 4.0], [4.0, 20.0]]), torch.tensor([8.0, 16.0])
    gt_boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]])  # centre (4, 4)
    offsets = centre_offsets(points, strides, gt_boxes, torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert offsets.tolist() == [[1.0, 0.0], [0.0, 1.0]]  # one stride right; 16 px down at stride 16
    assert gaussian_prior(offsets, 1.0).tolist() == pytest.approx([math.exp(-0.5)] * 2)
    assert gaussian_prior(offsets, 1.0, mean=torch.tensor([1.0, 0.0])).tolist() == pytest.approx([1.0, math.exp(-1.0)])
    sigma = torch.tensor([[2.0, 1.0], [1.0, 0.5]])  # per pair and axis
    assert gaussian_prior(offsets, sigma).tolist() == pytest.approx([math.exp(-1 / 8), math.exp(-2.0)])


def test_class_cost_is_the_one_hot_loss_summed_over_classes():
    p = torch.tensor([[[0.2, 0.7]]])  # one image, one anchor, two classes
    log_p, log1m_p = p.log(), (1 - p).log()
    labels = torch.tensor([[1, 0]])  # two GTs
    bce = class_cost(log_p, log1m_p, labels)
    assert bce[0, 0].tolist() == pytest.approx([-math.log(0.7) - math.log(0.8), -math.log(0.2) - math.log(0.3)])
    focal = class_cost(log_p, log1m_p, labels, gamma=2.0, alpha=0.25)
    gt1 = 0.25 * 0.3**2 * -math.log(0.7) + 0.75 * 0.2**2 * -math.log(0.8)
    assert float(focal[0, 0, 0]) == pytest.approx(gt1, rel=1e-5)
    own = class_cost(log_p, log1m_p, labels, gamma=2.0, alpha=0.25, all_classes=False)  # DETR: the GT's class only
    pos, neg = 0.25 * 0.3**2 * -math.log(0.7), 0.75 * 0.7**2 * -math.log(0.3)  # L+ and L- of p = 0.7
    assert float(own[0, 0, 0]) == pytest.approx(pos - neg, rel=1e-5)
    # random logits: torchvision's focal loss against each GT's one-hot target, summed over classes
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 5, 4, generator=g), torch.randint(4, (2, 3), generator=g)
    cost = class_cost(F.logsigmoid(logits), F.logsigmoid(-logits), labels, gamma=2.0, alpha=0.25)
    one_hot = F.one_hot(labels, 4).float()[:, None].expand(2, 5, 3, 4)
    expected = sigmoid_focal_loss(logits[:, :, None].expand(2, 5, 3, 4), one_hot, reduction="none").sum(-1)
    assert torch.allclose(cost, expected, atol=1e-6)


def test_pairwise_iou_masks_padding():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]])  # [1, 2, 4]
    gts = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])
    iou = pairwise_iou(boxes, gts, torch.tensor([[True, True, False]]), fill=-1.0)
    assert iou.shape == (1, 2, 3)
    assert torch.allclose(iou[0], torch.tensor([[1.0, 1 / 3, -1.0], [0.0, 0.0, -1.0]]), atol=1e-6)


def test_dynamic_k_and_the_k_cheapest_anchors():
    ious = torch.tensor([[0.9, 0.0], [0.8, 0.1], [0.5, 0.0], [0.1, 0.2]])  # [A, G]
    assert dynamic_k(ious, 3).tolist() == [2, 1]  # floor(0.9 + 0.8 + 0.5); floor(0.3) -> at least 1
    assert dynamic_k(ious, 20).tolist() == [2, 1]  # q beyond A: all anchors
    cost = torch.tensor([[3.0, 1.0], [1.0, 1.0], [2.0, 1.0], [1.0, 0.0]])
    chosen = smallest_k(cost, torch.tensor([2, 3]))
    assert chosen.T.nonzero().tolist() == [[0, 1], [0, 3], [1, 0], [1, 1], [1, 3]]  # ties: lower index first
    with pytest.raises(ValueError):
        dynamic_k(ious, 0)


def test_one_gt_per_anchor_keeps_the_largest_or_smallest_key():
    claims = torch.tensor([[True, True], [False, True], [False, False]])
    key = torch.tensor([[0.3, 0.5], [0.9, 0.2], [1.0, 1.0]])
    assert one_gt_per_anchor(claims, key, largest=True).tolist() == [1, 1, -1]
    assert one_gt_per_anchor(claims, key, largest=False).tolist() == [0, 1, -1]
    tie = one_gt_per_anchor(torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3), largest=True)
    assert tie.tolist() == [0]  # ties: the first GT


def test_sinkhorn_finds_the_transport_plan_and_keeps_the_marginals():
    cost = torch.tensor([[0.0, 0.0, 5.0], [5.0, 5.0, 0.0]])  # supplier 0 wants anchors 0, 1; supplier 1 anchor 2
    pi = sinkhorn(cost, torch.tensor([2.0, 1.0]), torch.ones(3))
    assert torch.allclose(pi, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), atol=1e-4)
    g = torch.Generator().manual_seed(0)  # random costs, batched: the plan's marginals are the supplies
    cost, supply = torch.rand(2, 3, 7, generator=g), torch.tensor([[2.0, 1.0, 4.0], [1.0, 1.0, 5.0]])
    pi = sinkhorn(cost, supply, torch.ones(2, 7), eps=0.5, iters=200)
    assert torch.allclose(pi.sum(-1), supply, atol=1e-4) and torch.allclose(pi.sum(-2), torch.ones(2, 7), atol=1e-4)
    assert bool((sinkhorn(cost, supply, torch.ones(2, 7), eps=0.5, iters=200)[0] == pi[0]).all())


def test_entry_minima():
    entry, (low,) = entry_minima(torch.tensor([5, 2, 5]), torch.tensor([3.0, 1.0, 2.0]))
    assert entry.tolist() == [2, 5] and low.tolist() == [1.0, 2.0]


def test_a_methods_head_init_reaches_the_detector(monkeypatch):
    cfg = validate({"model": {"backbone": "resnet10", "pretrained": False, "fpn_channels": 16, "head_convs": 1,
                              "head_norm_groups": 4}, "assigner": {"name": "fcos"}}, "t")  # fmt: skip
    assert build_detector(cfg, 3, FCOSAssigner(3)).head.centerness.bias.item() == 0.0  # FCOS: the default
    monkeypatch.setattr(FCOSAssigner, "head_init", HeadInit(centerness_prior=0.01), raising=False)
    bias = build_detector(cfg, 3, FCOSAssigner(3)).head.centerness.bias.item()
    assert bias == pytest.approx(math.log(0.01 / 0.99)) and torch.sigmoid(torch.tensor(bias)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="centerness_prior"):
        HeadInit(centerness_prior=1.0)
    with pytest.raises(ValueError, match="topk must be positive, got 0"):
        check_positive(num_classes=3, topk=0)
