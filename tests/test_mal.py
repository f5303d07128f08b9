"""MAL on hand-sized cases: FreeAnchor's bags and Mean-max, MAL's selection schedule, the
negatives' positive probability and the whole loss. The contract every method passes is
``test_contract.py``."""

from __future__ import annotations

import math

import pytest
import torch

from dwlab.assign.common import pad_targets
from dwlab.assign.mal import MALAssigner, mean_max, selection_size
from dwlab.losses import joint_log_scores
from dwlab.models.outputs import HeadOutputs
from tests.hand_outputs import GT, anchors_of, one_gt, outputs_of

# ----------------------------------------------------------------------------- MAL


def test_mean_max_values_and_its_gradient_through_the_weights():
    x = torch.tensor([0.5, 0.75], requires_grad=True)
    keep = torch.tensor([True, True])
    value = mean_max(x, keep)
    # weights 1 / (1 - x) = 2, 4: (0.5 x 2 + 0.75 x 4) / 6 = 2 / 3 (the mean 0.625, the max 0.75)
    assert value.item() == pytest.approx(2 / 3)
    value.backward()
    # d/dx_i [sum x/(1-x) / sum 1/(1-x)] = n / ((1 - x_i)^2 D^2), n = 2, D = 6
    assert x.grad.tolist() == pytest.approx([2 / (0.25 * 36), 2 / (0.0625 * 36)])
    assert mean_max(torch.tensor([0.5, 0.75]), torch.tensor([True, False])).item() == pytest.approx(0.5)
    near_max = mean_max(torch.tensor([0.1, 0.999]), keep).item()  # (0.1/0.9 + 999) / (1/0.9 + 1000)
    assert near_max == pytest.approx((0.1 / 0.9 + 999.0) / (1 / 0.9 + 1000.0), rel=1e-4) and near_max > 0.998
    assert mean_max(torch.tensor([0.3, 0.6]), torch.tensor([False, False])).item() == 0.0


def test_selection_shrinks_the_bag_linearly_to_one():
    assert [selection_size(17, e, 12) for e in (None, 0, 6, 11, 20)] == [17, 17, 8, 1, 1]  # 17 - 16 x 6 / 11
    assert selection_size(17, 5, 0) == 17  # selection off: FreeAnchor's bag
    assert selection_size(17, 0, 1) == 1


# Three points of stride 8, 16 px anchors (anchor_scale 2): a0 (8, 8) anchor [0, 0, 16, 16] IoU 1,
# a1 (12, 12) anchor [4, 4, 20, 20] IoU 144 / 368, a2 (40, 40) none. Predicted boxes: a0 the GT
# (GIoU loss 0), a1 [0, 4, 16, 16] (IoU 0.75 = GIoU, loss 0.25), a2 far away (IoU 0).
MAL_POINTS = [(8.0, 8.0), (12.0, 12.0), (40.0, 40.0)]
MAL_BOXES = [GT, [0.0, 4.0, 16.0, 16.0], [36.0, 36.0, 44.0, 44.0]]
MAL_SCORES = [[0.5, 0.1], [0.8, 0.2], [0.3, 0.05]]


def mal_case(**kw) -> tuple[MALAssigner, HeadOutputs]:
    assigner = MALAssigner(2, bag_size=2, anchor_scale=2.0, **kw)
    return assigner, outputs_of(anchors_of([MAL_POINTS], [8.0]), MAL_BOXES, MAL_SCORES)


def test_mal_bag_is_the_top_anchor_ious_and_confidence_is_cls_times_loc():
    assigner, out = mal_case()
    gt_boxes, gt_labels, gt_valid = pad_targets(one_gt(), torch.device("cpu"))
    log_s, _ = joint_log_scores(out.cls_logits, out.centerness.unsqueeze(-1))
    bags = assigner.bags(out, log_s, gt_boxes, gt_labels, gt_valid)
    assert sorted(bags.anchor[0, :, 0].tolist()) == [0, 1]
    conf = dict(zip(bags.anchor[0, :, 0].tolist(), bags.conf[0, :, 0].tolist()))
    assert conf == pytest.approx({0: 0.5, 1: 0.8 * math.exp(-4.0 * 0.25)}, rel=1e-5)  # s x exp(-4 GIoU loss)
    assert bags.selected.all()


def test_mal_positive_probability_of_the_negatives():
    assigner, out = mal_case()
    targets = one_gt()
    gt_boxes, gt_labels = targets[0].boxes[None], targets[0].labels[None]
    p = assigner.positive_probability(out.boxes().detach(), gt_boxes, gt_labels, torch.ones(1, 1, dtype=torch.bool))
    # IoU 1, 0.75, 0 with t1 = 0.6, t2 = 1: (IoU - 0.6) / 0.4 clipped, on class 0 only
    assert p[0].flatten().tolist() == pytest.approx([1.0, 0.0, 0.375, 0.0, 0.0, 0.0])


def fl(x: float) -> float:
    return x * x * -math.log(1.0 - x)


def test_mal_loss_hand_case_with_the_whole_bag_and_with_one_anchor():
    assigner, out = mal_case()
    terms = assigner(out, one_gt())
    c0, c1 = 0.5, 0.8 * math.exp(-1.0)
    bag = (c0 / (1 - c0) + c1 / (1 - c1)) / (1 / (1 - c0) + 1 / (1 - c1))
    assert terms["loss_cls_pos"].item() == pytest.approx(-math.log(bag), rel=1e-5)
    # negatives: s (1 - P+) on class 0 = 0.5 x 0, 0.8 x 0.625, 0.3; class 1 = 0.1, 0.2, 0.05
    neg = sum(fl(x) for x in (0.0, 0.5, 0.3, 0.1, 0.2, 0.05)) / (40 / 9)
    assert terms["loss_neg"].item() == pytest.approx(neg, rel=1e-5)
    assert assigner.loss_weights == {"loss_cls_pos": 0.5, "loss_neg": 0.5}
    (terms["loss_cls_pos"] + terms["loss_neg"]).backward()  # P+ = 1 on a0 (ln 0 inside): finite
    assert all(bool(torch.isfinite(t.grad).all()) for t in (out.cls_logits, out.centerness, out.distances))
    assigner.set_epoch(11)  # the last epoch of the selection: one anchor, the most confident (a0)
    terms = assigner(out, one_gt())
    assert terms["loss_cls_pos"].item() == pytest.approx(-math.log(0.5), rel=1e-5)
    assert terms["loss_neg"].item() == pytest.approx(neg, rel=1e-5)  # negatives do not shrink


def test_mal_selection_off_keeps_the_whole_bag_every_epoch():
    assigner, out = mal_case(select_epochs=0)
    before = assigner(out, one_gt())["loss_cls_pos"].item()
    assigner.set_epoch(30)
    assert assigner(out, one_gt())["loss_cls_pos"].item() == before


@pytest.mark.parametrize(
    "field, value", [("bag_size", 0), ("bbox_threshold", 1.0), ("alpha", 1.5), ("select_epochs", -1)]
)
def test_mal_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MALAssigner(2, **{field: value})
