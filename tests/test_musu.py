"""MuSu on hand-sized cases: the mutual selection (classification samples chosen by the
regression head's predicted boxes, regression samples by the classification scores), its loss
and its geometric warm-up. The contract every method passes is ``test_contract.py``."""

from __future__ import annotations

import pytest
import torch

from dwlab.assign.musu import MuSuAssigner, per_gt_max_ratio, top_in_bag
from dwlab.data.target import Target
from dwlab.losses import quality_focal_loss
from dwlab.models.outputs import HeadOutputs
from tests.hand_outputs import GT, anchors_of, one_gt, outputs_of

# ----------------------------------------------------------------------------- MuSu

# Four points inside GT [0, 0, 16, 16], one outside. Predicted boxes (IoU with the GT):
#   a0 (8, 8)   [0, 0, 16, 16]  IoU 1     score 0.1
#   a1 (12, 4)  [0, 0, 16, 8]   IoU 0.5   score 0.8   (GIoU loss 0.5: the enclosing box is the GT)
#   a2 (4, 12)  [0, 8, 8, 16]   IoU 0.25  score 0.6   (GIoU loss 0.75)
#   a3 (12, 12) [0, 4, 16, 16]  IoU 0.75  score 0.2
#   a4 (40, 40) outside the GT             score 0.9
MUSU_POINTS = [(8.0, 8.0), (12.0, 4.0), (4.0, 12.0), (12.0, 12.0), (40.0, 40.0)]
MUSU_BOXES = [GT, [0.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0], [0.0, 4.0, 16.0, 16.0], [36.0, 36.0, 44.0, 44.0]]
MUSU_SCORES = [[0.1, 0.05], [0.8, 0.05], [0.6, 0.05], [0.2, 0.05], [0.9, 0.05]]


def musu_case(**kw) -> tuple[MuSuAssigner, HeadOutputs]:
    assigner = MuSuAssigner(2, cls_topk=2, reg_topk=2, **kw)
    return assigner, outputs_of(anchors_of([MUSU_POINTS], [8.0]), MUSU_BOXES, MUSU_SCORES)


def test_top_in_bag_takes_the_k_largest_keys_of_each_bag_only():
    key = torch.tensor([[[0.9, 0.1], [0.5, 0.7], [0.3, 0.8], [0.7, 0.2]]])  # [1, A=4, G=2]
    bag = torch.tensor([[[False, True], [True, True], [True, False], [True, False]]])
    sel = top_in_bag(key, bag, 2)
    # GT 0: a0 (0.9) is outside its bag -> a3 (0.7), a1 (0.5); GT 1: its bag has 2 anchors
    assert sel[0].T.tolist() == [[False, True, False, True], [True, True, False, False]]
    assert top_in_bag(key, bag, 9).equal(bag)  # a bag smaller than k: all of it


def test_musu_classification_samples_by_iou_regression_samples_by_score():
    assigner, out = musu_case()
    m, _, _ = assigner.match(out, one_gt())
    assert m.cls_matched[0].tolist() == [0, -1, -1, 0, -1]  # the two best boxes: IoU 1, 0.75
    assert m.reg_matched[0].tolist() == [-1, 0, 0, -1, -1]  # the two best scores in the bag: 0.8, 0.6
    assert m.iou[0, :4, 0].tolist() == pytest.approx([1.0, 0.5, 0.25, 0.75])


def test_musu_loss_hand_case():
    assigner, out = musu_case()
    terms = assigner(out, one_gt())
    # cls: QFL with targets IoU 1 (a0) and 0.75 (a3) on class 0, over 2 samples
    target = torch.zeros(1, 5, 2)
    target[0, 0, 0], target[0, 3, 0] = 1.0, 0.75
    qfl = quality_focal_loss(out.cls_logits, out.centerness.unsqueeze(-1), target, reduction="sum")
    assert terms["loss_cls"].item() == pytest.approx(qfl.item() / 2, rel=1e-5)
    # box: weights 0.8 / 0.8 = 1 (a1) and 0.6 / 0.8 = 0.75 (a2): (1 x 0.5 + 0.75 x 0.75) / 1.75
    assert terms["loss_box"].item() == pytest.approx((0.5 + 0.75 * 0.75) / 1.75, rel=1e-5)
    assert assigner.loss_weights == {"loss_cls": 1.0, "loss_box": 2.0}


def test_musu_warmup_ranks_both_heads_by_the_anchor_iou_then_mutually():
    # anchor_scale 2: 16 px anchors; a0's is the GT (IoU 1), a1-a3's overlap it by 144 / 368 (a tie:
    # the lower index first), a4's not at all
    assigner, out = musu_case(anchor_scale=2.0, warmup_epochs=1)
    assigner.set_epoch(0)
    m, _, _ = assigner.match(out, one_gt())
    assert m.cls_matched[0].tolist() == m.reg_matched[0].tolist() == [0, 0, -1, -1, -1]
    assigner.set_epoch(1)
    m, _, _ = assigner.match(out, one_gt())
    assert m.cls_matched[0].tolist() == [0, -1, -1, 0, -1] and m.reg_matched[0].tolist() == [-1, 0, 0, -1, -1]


def test_musu_anchor_chosen_by_two_gts_keeps_the_better_box():
    # a second GT [0, 0, 16, 12] of class 1 holds a0 and a1 only (a2, a3 lie on its bottom edge);
    # both are its classification samples (IoU 192 / 256 and 128 / 192). a0 is also the first
    # GT's (IoU 1) and keeps that GT, the one its box overlaps most
    assigner, out = musu_case()
    targets = [Target(torch.tensor([GT, [0.0, 0.0, 16.0, 12.0]]), torch.tensor([0, 1]))]
    m, _, _ = assigner.match(out, targets)
    assert m.iou[0, :2, 1].tolist() == pytest.approx([0.75, 128 / 192])
    assert m.cls_matched[0].tolist() == [0, 1, -1, 0, -1]


def test_per_gt_max_ratio_divides_by_the_max_of_its_gt():
    values = torch.tensor([0.2, 0.4, 0.3, 0.0])
    ratio = per_gt_max_ratio(values, torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 1]), 2, 2)
    assert ratio.tolist() == pytest.approx([0.5, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("field, value", [("cls_topk", 0), ("reg_topk", 0), ("warmup_epochs", -1)])
def test_musu_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MuSuAssigner(2, **{field: value})
