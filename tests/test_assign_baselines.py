"""The comparison assigners (ATSS, QFL, VFL, TOOD, AutoAssign) on hand-computed cases; their
assignments carry no gradient; every registered method trained end to end on the tiny config
(the contract every method passes on random outputs is ``test_contract.py``)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dwlab import checkpoint
from dwlab.assign import ASSIGNERS, build_assigner
from dwlab.assign.atss import ATSSAssigner
from dwlab.assign.autoassign import AutoAssignAssigner
from dwlab.assign.common import anchor_boxes, atss_match
from dwlab.assign.gfl import QFLAssigner
from dwlab.assign.table1 import TABLE1
from dwlab.assign.tood import TOODAssigner
from dwlab.assign.vfl import VFLAssigner
from dwlab.cli import app
from dwlab.config import AssignerConfig, validate
from dwlab.data.coco import collate
from dwlab.data.target import Target
from dwlab.losses import quality_focal_loss, varifocal_loss
from dwlab.models.outputs import Anchors, HeadOutputs
from dwlab.runner import (
    build_datasets,
    build_detector,
    make_assigner,
    model_with_weights,
    run_training,
    seed_everything,
)
from tests.conftest import tiny_config
from tests.hand_outputs import GT, anchors_of, outputs_of

LN = math.log


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scaled(assigner, losses: dict) -> dict:
    """Each term times its weight: the pre-weighted terms the hand cases state."""
    return {k: assigner.loss_weights[k] * v for k, v in losses.items()}


def target(*boxes, labels) -> Target:
    return Target(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long))


def empty_target() -> Target:
    return Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


def approx(x, rel=1e-5, abs=1e-7):
    return pytest.approx(x, rel=rel, abs=abs)


# ----------------------------------------------------------------------------- ATSS

# Two levels; anchor_scale 1 so that the anchor boxes are 8 px (stride 8) and 16 px (stride 16).
# GT [0, 0, 16, 16], centre (8, 8); topk 2 per level.
#   P3: (8, 8) d=0 box [4,4,12,12] IoU 64/256;  (14, 8) d=6 box [10,4,18,12] IoU 48/272;  (40, 8) far
#   P4: (8, 8) d=0 box [0,0,16,16] IoU 1;       (8, 24) d=16 box [0,16,16,32] IoU 0;      (60, 60) far
ATSS_ANCHORS = [[(8.0, 8.0), (14.0, 8.0), (40.0, 8.0)], [(8.0, 8.0), (8.0, 24.0), (60.0, 60.0)]]
ATSS_IOUS = [64 / 256, 48 / 272, 1.0, 0.0]


def atss_case():
    anchors = anchors_of(ATSS_ANCHORS, [8, 16])
    gt_boxes, gt_valid = torch.tensor([[GT]]), torch.tensor([[True]])
    return anchors, gt_boxes, gt_valid


def test_atss_threshold_is_mean_plus_std_of_candidate_ious():
    anchors, gt_boxes, gt_valid = atss_case()
    m = atss_match(anchors, gt_boxes, gt_valid, topk=2, anchor_scale=1.0)
    assert sorted(m.candidates[0, :, 0].tolist()) == [0, 1, 3, 4]  # 2 nearest per level
    assert sorted(m.candidate_iou[0, :, 0].tolist()) == approx(sorted(ATSS_IOUS))
    expected = statistics.mean(ATSS_IOUS) + statistics.stdev(ATSS_IOUS)  # 0.798...
    assert float(m.threshold[0, 0]) == approx(expected)
    assert m.matched[0].tolist() == [-1, -1, -1, 0, -1, -1]  # only IoU 1 >= 0.798
    assert anchor_boxes(anchors, 1.0)[1].tolist() == [10.0, 4.0, 18.0, 12.0]


def test_atss_candidate_above_threshold_but_centre_outside_is_negative():
    # one level, stride 16, side 16; GT [0,0,16,16]: (17, 8) box [9,0,25,16] IoU 112/400, centre outside
    anchors = anchors_of([[(17.0, 8.0), (8.0, 26.0), (30.0, 30.0)]], [16])
    m = atss_match(anchors, torch.tensor([[GT]]), torch.tensor([[True]]), topk=3, anchor_scale=1.0)
    ious = [112 / 400, 0.0, 0.0]
    assert float(m.threshold[0, 0]) == approx(statistics.mean(ious) + statistics.stdev(ious))
    assert ious[0] >= float(m.threshold[0, 0]) and m.matched[0].tolist() == [-1, -1, -1]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_atss_anchor_of_two_gts_takes_the_higher_iou(order):
    # anchor (10, 8), side 16: box [2,0,18,16]; IoU 224/288 with [0,0,16,16], 224/352 with [4,0,24,16]
    anchors = anchors_of([[(10.0, 8.0), (100.0, 100.0)]], [16])
    boxes = [GT, [4.0, 0.0, 24.0, 16.0]]
    gt_boxes = torch.tensor([[boxes[i] for i in order]])
    m = atss_match(anchors, gt_boxes, torch.tensor([[True, True]]), topk=1, anchor_scale=1.0)
    assert m.matched[0].tolist() == [order.index(0), -1]


def test_atss_loss_hand_case():
    anchors, _, _ = atss_case()
    boxes = [[p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4] for level in ATSS_ANCHORS for p in level]
    boxes[3] = [4.0, 0.0, 16.0, 16.0]  # the positive's prediction: IoU = GIoU = 0.75
    out = outputs_of(anchors, boxes, [[0.5, 0.5]] * 6, ctr_logit=0.0)
    atss = ATSSAssigner(2, topk=2, anchor_scale=1.0)
    losses = scaled(atss, atss(out, [target(GT, labels=[1])]))
    # focal, all p = 0.5: 11 negatives alpha_t = 0.75, one positive alpha_t = 0.25, (1 - p_t)^2 = 0.25
    assert losses["loss_cls"].item() == approx((11 * 0.75 + 0.25) * 0.25 * LN(2))
    # centerness target at (8, 8) in [0,0,16,16] is 1; GIoU weighted by it over its sum, x 2
    assert losses["loss_box"].item() == approx(2.0 * 0.25)
    assert losses["loss_ctr"].item() == approx(LN(2))


# ----------------------------------------------------------------------------- GFL and VFL


def soft_case():
    """The ATSS case with scores: 0.6 for the positive (anchor 3, class 1), 0.1 elsewhere."""
    anchors, _, _ = atss_case()
    boxes = [[p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4] for level in ATSS_ANCHORS for p in level]
    boxes[3] = [4.0, 0.0, 16.0, 16.0]  # IoU 0.75 with the GT
    scores = [[0.1, 0.1] for _ in range(6)]
    scores[3][1] = 0.6
    return outputs_of(anchors, boxes, scores), [target(GT, labels=[1])]


def test_qfl_is_zero_when_score_equals_target():
    y = torch.tensor([0.0, 0.2, 0.5, 0.75, 0.9])
    logits = torch.logit(y.clamp(min=1e-6))
    assert quality_focal_loss(logits, None, y).tolist() == approx([0.0] * 5, abs=1e-6)
    # and away from it: -|y - s|^2 (y ln s + (1 - y) ln(1 - s))
    loss = quality_focal_loss(torch.logit(torch.tensor([0.6])), None, torch.tensor([0.75]))
    assert float(loss) == approx(-(0.15**2) * (0.75 * LN(0.6) + 0.25 * LN(0.4)))


def test_qfl_and_vfl_are_table1_weights_on_the_two_logs():
    s, y = torch.tensor([0.3, 0.6, 0.9]), torch.tensor([0.8, 0.5, 0.0])
    logits = torch.logit(s)
    w_pos, w_neg = TABLE1["gfl"].weights(s, y)
    expect = -(w_pos * s.log() + w_neg * (1 - s).log())
    assert quality_focal_loss(logits, None, y).tolist() == approx(expect.tolist())
    q = torch.tensor([0.8, 0.5, 0.0])
    vw_pos, vw_neg = TABLE1["vfl"].weights(s, q)
    expect_v = -(vw_pos * s.log() + vw_neg * (1 - s).log())
    expect_v[2] = -0.75 * 0.9**2 * LN(0.1)  # q = 0: alpha s^gamma (-ln(1 - s))
    assert varifocal_loss(logits, None, q).tolist() == approx(expect_v.tolist())


def test_quality_losses_reductions_and_empty_input():
    empty = torch.zeros(0, 3, requires_grad=True)
    for fn in (quality_focal_loss, varifocal_loss):
        assert fn(empty, None, torch.zeros(0, 3), reduction="sum").item() == 0.0
        assert fn(empty, None, torch.zeros(0, 3), reduction="mean").item() == 0.0
        with pytest.raises(ValueError, match="unknown reduction"):
            fn(empty, None, torch.zeros(0, 3), reduction="max")


def test_qfl_loss_hand_case():
    """GFL's QFL and GIoU terms (``qfl``; ``gfl``'s DFL is in tests/test_gfl.py)."""
    out, targets = soft_case()
    gfl = QFLAssigner(2, topk=2, anchor_scale=1.0)
    asg = gfl.assign(out, targets)
    assert asg.matched[0].tolist() == [-1, -1, -1, 0, -1, -1]
    assert asg.quality.tolist() == approx([0.75])  # y = IoU of the predicted box
    losses = scaled(gfl, gfl(out, targets))
    pos = -(0.15**2) * (0.75 * LN(0.6) + 0.25 * LN(0.4))
    neg = 11 * -(0.1**2) * LN(0.9)  # y = 0: s^2 (-ln(1 - s))
    assert losses["loss_cls"].item() == approx(pos + neg)
    # box weight = largest score of the anchor (0.6); divided by max(0.6, 1); lambda_0 = 2
    assert losses["loss_box"].item() == approx(2.0 * 0.6 * 0.25)


def test_vfl_target_is_iou_for_positives_and_zero_otherwise():
    out, targets = soft_case()
    vfl = VFLAssigner(2, topk=2, anchor_scale=1.0)
    asg = vfl.assign(out, targets)
    assert asg.quality.tolist() == approx([0.75])
    losses = scaled(vfl, vfl(out, targets))
    pos = -0.75 * (0.75 * LN(0.6) + 0.25 * LN(0.4))
    neg = 11 * -0.75 * 0.1**2 * LN(0.9)
    assert losses["loss_cls"].item() == approx(pos + neg)
    assert losses["loss_box"].item() == approx(2.0 * 0.75 * 0.25)  # q * GIoU / max(sum q, 1)


# ----------------------------------------------------------------------------- TOOD

# One GT [0,0,64,64]; 16 anchors inside on the row y = 4, predicted boxes [0,0,64,64 r] (IoU = GIoU
# = r with the GT). t = s * r^6 ranks them differently from s alone and from r alone.
TOOD_R = [0.95, 0.9, 0.88, 0.85, 0.8, 0.78, 0.75, 0.7, 0.68, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.3]
TOOD_S = [0.5, 0.6, 0.005, 0.7, 0.5, 0.6, 0.4, 0.8, 0.5, 0.9, 0.6, 0.5, 0.95, 0.7, 0.99, 0.99]
BIG_GT = [0.0, 0.0, 64.0, 64.0]


def tood_case(extra=None):
    points = [(2.0 + 3 * i, 4.0) for i in range(len(TOOD_R))]
    boxes = [[0.0, 0.0, 64.0, 64.0 * r] for r in TOOD_R]
    scores = [[s] for s in TOOD_S]
    if extra is not None:
        points.append(extra[0])
        boxes.append(extra[1])
        scores.append([extra[2]])
    return outputs_of(anchors_of([points], [8]), boxes, scores), [target(BIG_GT, labels=[0])]


def test_tood_picks_top13_by_alignment_and_normalises_to_max_iou():
    out, targets = tood_case()
    t = [s * r**6 for s, r in zip(TOOD_S, TOOD_R)]
    top = sorted(sorted(range(16), key=lambda i: -t[i])[:13])
    assert top != sorted(sorted(range(16), key=lambda i: -TOOD_S[i])[:13])  # not by score alone
    assert top != sorted(sorted(range(16), key=lambda i: -TOOD_R[i])[:13])  # not by IoU alone
    tood = TOODAssigner(1)
    m, _, _ = tood.match(out, targets)
    assert [i for i in range(16) if m.matched[0, i] == 0] == top
    assert m.metric[0, top].tolist() == approx([t[i] for i in top])
    t_max, u_max = max(t[i] for i in top), max(TOOD_R[i] for i in top)
    t_hat = [t[i] / t_max * u_max for i in top]
    assert m.target[0, top].tolist() == approx(t_hat)
    best = max(top, key=lambda i: t[i])
    assert float(m.target[0, best]) == approx(u_max)  # the best-aligned anchor gets the max IoU
    # loss: QFL on t_hat, GIoU weighted by t_hat, both over sum(t_hat)
    losses = scaled(tood, tood(out, targets))
    cls = sum(-((th - TOOD_S[i]) ** 2) * (th * LN(TOOD_S[i]) + (1 - th) * LN(1 - TOOD_S[i])) for i, th in zip(top, t_hat))
    cls += sum(-(TOOD_S[i] ** 2) * LN(1 - TOOD_S[i]) for i in range(16) if i not in top)
    norm = max(sum(t_hat), 1.0)
    assert losses["loss_cls"].item() == approx(cls / norm)
    assert losses["loss_box"].item() == approx(2.0 * sum(th * (1 - TOOD_R[i]) for i, th in zip(top, t_hat)) / norm)


def test_tood_top_candidate_outside_the_gt_is_dropped():
    # a perfect box with s 0.99 from a point outside the GT: first by t, yet not positive
    out, targets = tood_case(extra=((70.0, 4.0), BIG_GT, 0.99))
    m, _, _ = TOODAssigner(1).match(out, targets)
    assert int(m.candidates[0, 0, 0]) == 16 and int(m.matched[0, 16]) == -1
    assert int((m.matched[0] == 0).sum()) == 12  # the other 12 of the top 13


def test_tood_target_epsilon_keeps_tiny_alignments_finite():
    """Early in training t_max is tiny: t_hat = t / (t_max + 1e-7) * u_max (released code), so
    the best anchor's target is u_max * t_max / (t_max + 1e-7), not u_max."""
    scale = 1e-6
    out, targets = tood_case()
    with torch.no_grad():
        out.cls_logits.copy_(torch.logit(torch.tensor(TOOD_S) * scale)[None, :, None])
    m, _, _ = TOODAssigner(1).match(out, targets)
    t = [s * scale * r**6 for s, r in zip(TOOD_S, TOOD_R)]
    top = [i for i in range(16) if m.matched[0, i] == 0]
    assert len(top) == 13 and torch.isfinite(m.target).all()
    t_max, u_max = max(t[i] for i in top), max(TOOD_R[i] for i in top)
    assert 1e-7 < t_max < 1e-6
    assert m.target[0, top].tolist() == approx([t[i] / (t_max + 1e-7) * u_max for i in top], rel=1e-4)
    assert float(m.target[0, top].max()) == approx(u_max * t_max / (t_max + 1e-7), rel=1e-4)


def test_tood_warmup_is_atss_assignment_and_loss_then_task_aligned():
    """Released TOOD: ATSS assignment with hard targets, focal loss (on s) and centerness-weighted
    GIoU for the first ``initial_epochs``; task-aligned from then on. With the centerness
    saturated (s = sigmoid(cls)) the warm-up's terms are the ATSS assigner's."""
    out = random_outputs(2, seed=3)
    with torch.no_grad():
        out.centerness.fill_(40.0)
    targets = [target([10.0, 12.0, 50.0, 40.0], [30.0, 30.0, 60.0, 62.0], labels=[0, 2]),
               target([4.0, 4.0, 28.0, 36.0], labels=[1])]  # fmt: skip
    tood, atss = TOODAssigner(3, initial_epochs=2), ATSSAssigner(3)
    aligned = tood.assign(out, targets).matched  # never told the epoch: task-aligned
    tood.set_epoch(1)
    warm = tood.assign(out, targets)
    assert torch.equal(warm.matched, atss.match(out, targets)[0].matched)
    assert not torch.equal(warm.matched, aligned)
    assert warm.quality.tolist() == [1.0] * len(warm.quality)  # hard targets, not the IoU
    ours, ref = tood(out, targets), atss(out, targets)
    assert ours["loss_cls"].item() == approx(ref["loss_cls"].item(), rel=1e-5)
    assert ours["loss_box"].item() == approx(ref["loss_box"].item(), rel=1e-5)
    tood.set_epoch(2)
    assert torch.equal(tood.assign(out, targets).matched, aligned)
    assert tood(out, targets)["loss_cls"].item() != approx(ref["loss_cls"].item(), rel=1e-2)


def test_training_tells_the_assigner_its_epoch(tmp_path, synth_root, monkeypatch):
    seen = []
    set_epoch = TOODAssigner.set_epoch
    monkeypatch.setattr(TOODAssigner, "set_epoch", lambda self, e: (set_epoch(self, e), seen.append(self.warming_up)))
    raw = tiny_config(synth_root, assigner={"name": "tood", "tood": {"initial_epochs": 2}},
                      train={"epochs": 3, "threads": 1, "max_iters_per_epoch": 1})  # fmt: skip
    run_training(validate(raw, "t"), tmp_path / "run")
    assert seen == [True, True, False]


# ----------------------------------------------------------------------------- AutoAssign


def test_autoassign_weights_and_loss_hand_case():
    # grid 2 x 3 at stride 8: points (4,4) (12,4) (20,4) / (4,12) (12,12) (20,12); GT [0,0,16,16]
    # holds anchors 0, 1, 3, 4, each at (+-0.5, +-0.5) strides from its centre: prior exp(-0.25)
    anchors = Anchors.grid([(2, 3)], [8], 0.5, torch.device("cpu"))
    boxes = [[0, 0, 16, 12], [0, 0, 16, 8], [16, 0, 24, 8], [0, 8, 8, 16], [8, 0, 16, 16], [16, 8, 24, 16]]
    iou = {0: 0.75, 1: 0.5, 3: 0.25, 4: 0.5}  # predicted boxes inside the GT: GIoU = IoU
    s = {0: 0.6, 1: 0.3, 3: 0.5, 4: 0.2}
    scores = [[0.1, s.get(a, 0.1)] for a in range(6)]
    out = outputs_of(anchors, [[float(v) for v in b] for b in boxes], scores)
    targets = [target(GT, labels=[1])]
    aa = AutoAssignAssigner(2)
    asg = aa.assign(out, targets)
    bag = asg.anchor.tolist()
    assert sorted(bag) == [0, 1, 3, 4] and asg.prior.tolist() == approx([math.exp(-0.25)] * 4)
    # w+ = exp(P / tau) G / sum, P = s exp(-5 GIoU loss), tau = 1/3 (equal priors cancel)
    conf = {a: math.exp(3 * s[a] * math.exp(-5 * (1 - iou[a]))) for a in bag}
    w_pos = {a: conf[a] / sum(conf.values()) for a in bag}
    assert asg.w_pos.tolist() == approx([w_pos[a] for a in bag])
    # w- = 1 - minmax(1 / (1 - iou)) over the bag: 1/(1-iou) = 4, 2, 4/3, 2 -> f = 1, 1/4, 0, 1/4
    w_neg = {0: 0.0, 1: 0.75, 3: 1.0, 4: 0.75}
    assert asg.w_neg.tolist() == approx([w_neg[a] for a in bag], abs=1e-6)
    assert not any(v.requires_grad for v in vars(asg).values() if isinstance(v, torch.Tensor))
    losses = scaled(aa, aa(out, targets))
    pos_cls = sum(w_pos[a] * -LN(s[a]) for a in bag)
    pos_reg = sum(w_pos[a] * 5 * (1 - iou[a]) for a in bag)
    assert losses["loss_cls_pos"].item() == approx(0.25 * pos_cls)  # over 1 GT
    assert losses["loss_box"].item() == approx(0.25 * pos_reg)
    neg = sum(w_neg.get(a, 1.0) * sc[1] ** 2 * -LN(1 - sc[1]) + sc[0] ** 2 * -LN(1 - sc[0]) for a, sc in enumerate(scores))
    assert losses["loss_neg"].item() == approx(0.75 * neg / (4 * math.exp(-0.25)), rel=1e-4)


# ----------------------------------------------------------------------------- assignments carry no gradient


def random_outputs(batch: int, num_classes: int = 3, seed: int = 0) -> HeadOutputs:
    g = torch.Generator().manual_seed(seed)
    anchors = Anchors.grid([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], [8, 16, 32, 64, 128], 0.5, torch.device("cpu"))
    a = len(anchors)
    return HeadOutputs(
        cls_logits=(torch.randn(batch, a, num_classes, generator=g) - 2).requires_grad_(),
        centerness=torch.randn(batch, a, generator=g).requires_grad_(),
        distances=(torch.rand(batch, a, 4, generator=g) * 20 + 1).requires_grad_(),
        anchors=anchors,
    )


#: Each method's assignment tensors (targets and weights), read through its own API (the
#: contract test covers every method's terms and gradients; these APIs are each method's own).
ASSIGNMENT_FIELDS = {
    "atss": lambda a, out, t: list(a.match(out, t)[0]),
    "autoassign": lambda a, out, t: [v for v in vars(a.assign(out, t)).values() if isinstance(v, torch.Tensor)],
    "dw": lambda a, out, t: [v for v in vars(a.assign(out, t)).values() if isinstance(v, torch.Tensor)],
    "foveabox": lambda a, out, t: list(a.match(out, t)),
    "noisyanchor": lambda a, out, t: [(q := a.assign(out, t)).matched, q.soft, q.reweight, q.pos.iou],
    **{m: (lambda a, out, t: [(q := a.assign(out, t)).matched, q.quality, q.box_weight, q.pos.iou])
       for m in ("qfl", "gfl", "gflv2", "vfl", "tood")},
}  # fmt: skip


@pytest.mark.parametrize("method", list(ASSIGNMENT_FIELDS))
def test_assignment_tensors_carry_no_gradient(method):
    assigner = build_assigner(AssignerConfig(name=method), 3)
    one = target([10.0, 12.0, 50.0, 40.0], [30.0, 30.0, 60.0, 62.0], labels=[0, 2])
    for targets in ([empty_target(), empty_target()], [one, empty_target()]):
        fields = ASSIGNMENT_FIELDS[method](assigner, random_outputs(2), targets)
        assert fields and not any(f.requires_grad for f in fields)


# ----------------------------------------------------------------------------- end to end


#: Methods whose loss rises over the tiny run's dozen steps by construction, however well they
#: train: QFL's target is the IoU of the method's own boxes, so the positives' term grows as the
#: boxes improve (from the distribution head's first, wide boxes), and the GIoU and DFL terms
#: are weighted by the scores, which start at the 0.01 prior, and divided by their sum clamped
#: at 1 (``dwlab.distributed.normaliser``), so they grow with the scores (measured: the positives'
#: mean IoU 0.15 -> 0.36 in 12 steps while the loss rose 1.67 -> 2.19). For these the run must
#: raise what they train instead: the mean IoU of their positives' boxes on train images.
IOU_TRAINED = {"gfl", "gflv2"}


def positives_iou(cfg, model, assigner) -> float:
    """The mean IoU of ``assigner``'s positives' predicted boxes with their GTs, on 8 train images."""
    train, _ = build_datasets(cfg)
    images, _, targets = collate([train[i] for i in range(8)], cfg.data.size_divisor)
    with torch.no_grad():
        return float(assigner.assign(model.train()(images), targets).quality.mean())


@pytest.mark.parametrize("method", list(ASSIGNERS))
def test_trains_with_falling_loss_and_evaluates(tmp_path, synth_root, method):
    """Every registered method trains the tiny detector end to end and is evaluated."""
    raw = tiny_config(synth_root, assigner={"name": method}, train={"epochs": 4, "threads": 1, "grad_clip": 10.0})
    losses = []
    cfg = validate(raw, "t")
    result = run_training(cfg, tmp_path / "run", on_epoch_end=lambda r: losses.append(r.metrics["loss"]))
    if method in IOU_TRAINED:
        assigner = make_assigner(cfg, 6)
        seed_everything(cfg.train.seed)  # the run's initial weights
        before = positives_iou(cfg, build_detector(cfg, 6, assigner), assigner)
        last = tmp_path / "run" / "checkpoints" / "last.pt"
        after = positives_iou(cfg, model_with_weights(cfg, checkpoint.load(last), 6, last), assigner)
        assert after > 1.5 * before, (before, after, losses)
    else:
        assert losses[-1] < losses[0], losses
    assert set(result.metrics) == {"AP", "AP50", "AP75", "APs", "APm"}  # no GT over 96² px: no APl
    assert all(math.isfinite(v) for v in result.metrics.values())


def test_plot_weights_of_several_methods(tmp_path, synth_root):
    raw = tiny_config(synth_root, assigner={"name": "gfl"}, train={"threads": 1})
    run_training(validate(raw, "t"), tmp_path / "run")
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    runner = CliRunner()
    out = tmp_path / "w.png"
    res = runner.invoke(app, ["plot", "weights", "--checkpoint", ckpt, "--image", "1", "--out", str(out),
                              "--methods", "gfl,vfl,tood,dw,atss,autoassign"])  # fmt: skip
    assert res.exit_code == 0, res.output
    with Image.open(out) as img:
        assert img.size[0] > 1500  # 2 + 2 x 6 columns
    res = runner.invoke(app, ["plot", "weights", "--checkpoint", ckpt, "--image", "1", "--methods", "gfl,foo"])
    assert res.exit_code == 2 and "unknown: foo" in res.output
