"""GFL's distribution head and DFL, GFLv2's DGQP, and the methods qfl / gfl / gflv2 on hand-sized
cases (``dwlab.models.head``, ``dwlab.losses.distribution_focal_loss``, ``dwlab.assign.gfl``)."""

from __future__ import annotations

import math

import pytest
import torch

from dwlab import paper
from dwlab.assign import ASSIGNERS, build_assigner
from dwlab.assign.base import HeadInit, head_init
from dwlab.assign.common import atss_match, fcos_match, pad_targets
from dwlab.assign.gfl import GFLAssigner, GFLv2Assigner, QFLAssigner, dfl_targets
from dwlab.config import AssignerConfig, ModelConfig, validate
from dwlab.data.target import Target
from dwlab.errors import DwlabError
from dwlab.losses import distribution_focal_loss
from dwlab.models.detector import build_model
from dwlab.models.head import FCOSHead, dgqp_features, integral
from dwlab.models.outputs import Anchors, HeadOutputs
from dwlab.report.tables import _table6_row_key, method_name
from dwlab.runner import build_detector, make_assigner, resolved_record
from tests.conftest import tiny_config

LN = math.log
GT = [0.0, 0.0, 16.0, 16.0]
TINY = {
    "backbone": "resnet18", "pretrained": False, "norm": "bn", "frozen_stages": -1, "fpn_channels": 32,
    "head_convs": 1, "head_norm_groups": 8,
}  # fmt: skip


def approx(x, rel=1e-5, abs=1e-7):
    return pytest.approx(x, rel=rel, abs=abs)


def probs_logits(*p: float) -> torch.Tensor:
    """Logits whose softmax is ``p``."""
    return torch.tensor(p).log()


# ----------------------------------------------------------------------------- DFL and Integral


def test_dfl_of_a_target_between_two_bins_is_their_weighted_cross_entropy():
    logits = probs_logits(0.2, 0.5, 0.3)  # bins 0, 1, 2
    # y = 0.25: bins 0 and 1, weights 0.75 and 0.25
    assert distribution_focal_loss(logits, torch.tensor(0.25)).item() == approx(-(0.75 * LN(0.2) + 0.25 * LN(0.5)))
    # y = 1.6: bins 1 and 2, weights 0.4 and 0.6
    assert distribution_focal_loss(logits, torch.tensor(1.6)).item() == approx(-(0.4 * LN(0.5) + 0.6 * LN(0.3)))
    # on a bin: its cross-entropy alone (the right bin's weight is 0, also at the last bin)
    assert distribution_focal_loss(logits, torch.tensor(1.0)).item() == approx(-LN(0.5))
    batch = torch.stack([logits, logits])
    assert distribution_focal_loss(batch, torch.tensor([0.25, 1.0]), reduction="sum").item() == approx(
        -(0.75 * LN(0.2) + 0.25 * LN(0.5)) - LN(0.5)
    )
    with pytest.raises(ValueError, match="reduction"):
        distribution_focal_loss(logits, torch.tensor(0.5), reduction="bad")


def test_dfl_is_smallest_at_the_two_bin_distribution_of_the_target():
    """GFL §3.3: DFL pushes the mass onto the two bins around y, in proportion to closeness."""
    y = torch.tensor(1.3)
    best = distribution_focal_loss(probs_logits(1e-6, 0.7, 0.3, 1e-6), y)
    for other in [(0.25, 0.25, 0.25, 0.25), (0.1, 0.6, 0.3, 1e-6), (1e-6, 0.8, 0.2, 1e-6), (1e-6, 0.6, 0.4, 1e-6)]:
        assert distribution_focal_loss(probs_logits(*other), y) > best
    logits = torch.zeros(4, requires_grad=True)
    distribution_focal_loss(logits, y).backward()
    assert logits.grad.tolist() == approx([0.25, 0.25 - 0.7, 0.25 - 0.3, 0.25])  # softmax - target


def test_integral_is_the_distributions_expectation_in_bins():
    assert integral(probs_logits(0.2, 0.5, 0.3)).item() == approx(0.0 * 0.2 + 1 * 0.5 + 2 * 0.3)
    assert integral(torch.zeros(2, 4, 17)).flatten().tolist() == approx([8.0] * 8)  # uniform over 0..16
    assert integral(torch.tensor([0.0, 0.0, 30.0])).item() == approx(2.0, rel=1e-4)
    assert integral(torch.zeros(3, dtype=torch.bfloat16)).dtype == torch.float32


def test_dgqp_features_are_each_sides_top4_and_their_mean():
    sides = torch.stack(
        [
            probs_logits(0.1, 0.4, 0.2, 0.05, 0.25),
            probs_logits(0.2, 0.2, 0.2, 0.2, 0.2),
            probs_logits(0.6, 0.1, 0.1, 0.1, 0.1),
            probs_logits(0.05, 0.05, 0.1, 0.1, 0.7),
        ]
    )[None]  # [1, 4 sides, 5 bins]
    features = dgqp_features(sides)
    assert features.shape == (1, 20)
    expected = [[0.4, 0.25, 0.2, 0.1, 0.2375], [0.2] * 5, [0.6, 0.1, 0.1, 0.1, 0.225], [0.7, 0.1, 0.1, 0.05, 0.2375]]
    assert features[0].tolist() == approx([v for side in expected for v in side])


# ----------------------------------------------------------------------------- the head options


def features(channels: int = 16, sizes=((4, 4), (2, 2)), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, h, w, generator=g) for h, w in sizes]


def test_distribution_head_decodes_the_integral_times_the_stride():
    torch.manual_seed(0)
    head = FCOSHead(16, 3, (8, 16), num_convs=1, norm_groups=4, reg_max=4)
    assert head.bbox_pred.out_channels == 4 * 5 and float(head.bbox_pred.bias.detach().abs().max()) == 0.0
    _, ctr, dist, logits = head(features())
    for level, stride in enumerate((8, 16)):
        b, _, h, w = logits[level].shape
        sides = logits[level].reshape(b, 4, 5, h, w).movedim(2, -1)
        assert torch.equal(dist[level], integral(sides) * stride)
        assert logits[level].dtype == torch.float32 and ctr[level].shape == (2, 1, h, w)
    # logits start near 0: a near-uniform distribution, distances near n / 2 strides
    assert dist[0].mean().item() == approx(2.0 * 8, rel=0.05)


def test_dgqp_takes_the_centerness_branchs_place_and_reads_the_distribution():
    torch.manual_seed(0)
    head = FCOSHead(16, 3, (8, 16), num_convs=1, norm_groups=4, reg_max=4, dgqp=True, centerness_bias=0.5)
    assert not hasattr(head, "centerness") and head.quality[-1].bias.item() == 0.5
    shapes = [tuple(m.weight.shape) for m in head.quality if isinstance(m, torch.nn.Conv2d)]
    assert shapes == [(64, 20, 1, 1), (1, 64, 1, 1)]  # 20 statistics -> 64 -> 1
    _, ctr, _, logits = head(features())
    b, _, h, w = logits[0].shape
    stats = dgqp_features(logits[0].reshape(b, 4, 5, h, w).permute(0, 3, 4, 1, 2))  # [B, H, W, 20]
    assert torch.allclose(ctr[0], head.quality(stats.permute(0, 3, 1, 2)), atol=1e-6)
    # the quality gets gradient from the distribution (no detach, as released)
    ctr[0].sum().backward()
    assert float(head.bbox_pred.weight.grad.abs().sum()) > 0


def test_the_detectors_score_is_sigmoid_cls_times_the_dgqp_quality():
    """Inference ranks by ``HeadOutputs.scores()``: with DGQP, GFLv2's J = C x I."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), 3, reg_max=4, dgqp=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
        assert out.distribution.shape == (1, len(out.anchors), 4, 5)
        quality = model.head.quality(dgqp_features(out.distribution)[..., None, None].flatten(0, 1)).reshape(1, -1)
        assert torch.allclose(
            out.scores(), torch.sigmoid(out.cls_logits) * torch.sigmoid(quality)[..., None], atol=1e-6
        )
        strides = out.anchors.strides[None, :, None]
        assert torch.allclose(out.distances, integral(out.distribution) * strides)


def test_without_the_options_the_head_is_fcoss_parameter_for_parameter():
    """The option off leaves the head's modules (and so its seeded initialisation) as before."""
    head = FCOSHead(16, 3, (8, 16), num_convs=1, norm_groups=4)
    assert [(k, tuple(v.shape)) for k, v in head.state_dict().items()] == [
        ("scales", (2,)), ("cls_tower.0.weight", (16, 16, 3, 3)), ("cls_tower.0.bias", (16,)), ("cls_tower.1.weight", (16,)),
        ("cls_tower.1.bias", (16,)), ("reg_tower.0.weight", (16, 16, 3, 3)), ("reg_tower.0.bias", (16,)),
        ("reg_tower.1.weight", (16,)), ("reg_tower.1.bias", (16,)), ("cls_logits.weight", (3, 16, 3, 3)),
        ("cls_logits.bias", (3,)), ("bbox_pred.weight", (4, 16, 3, 3)), ("bbox_pred.bias", (4,)),
        ("centerness.weight", (1, 16, 3, 3)), ("centerness.bias", (1,)),
    ]  # fmt: skip
    assert head(features())[3] is None
    model = build_model(ModelConfig(**TINY), 3)
    assert model(torch.randn(1, 3, 64, 64)).distribution is None


def test_bad_head_options_are_refused():
    with pytest.raises(ValueError, match="dgqp needs reg_max"):
        FCOSHead(16, 3, (8,), num_convs=1, norm_groups=4, dgqp=True)
    with pytest.raises(ValueError, match="box_refine"):
        FCOSHead(16, 3, (8,), num_convs=1, norm_groups=4, reg_max=4, box_refine=True)
    with pytest.raises(ValueError, match="reg_max"):
        ModelConfig(**TINY, reg_max=0)
    with pytest.raises(ValueError, match="box_refine"):
        ModelConfig(**TINY, reg_max=8, box_refine=True)
    with pytest.raises(ValueError, match="dgqp needs reg_max"):
        HeadInit(dgqp=True)


# ----------------------------------------------------------------------------- the methods' heads


def config(method: str, **model):
    raw = tiny_config(None, assigner={"name": method}, model=model)
    return validate(raw, "t")


@pytest.mark.parametrize(("method", "reg_max", "dgqp"), [("qfl", None, False), ("gfl", 16, False), ("gflv2", 16, True)])
def test_each_method_builds_the_head_it_needs_through_head_init(method, reg_max, dgqp):
    cfg = config(method)
    assigner = make_assigner(cfg, 3)
    assert (head_init(assigner).reg_max, head_init(assigner).dgqp) == (reg_max, dgqp)
    model = build_detector(cfg, 3, assigner)
    out = model(torch.randn(1, 3, 64, 64))
    assert (None if out.distribution is None else out.distribution.shape[-1] - 1) == reg_max
    assert (model.head.quality is not None) == dgqp
    record = resolved_record(cfg, assigner, torch.device("cpu"))
    assert record.get("model") == (None if reg_max is None else {"reg_max": reg_max, "dgqp": dgqp})
    terms = assigner(out, [Target(torch.tensor([GT]), torch.tensor([1]))])
    assert set(terms) == set(assigner.loss_weights)


def test_a_model_reg_max_that_contradicts_the_method_is_one_line():
    cfg = config("gfl", reg_max=8)
    with pytest.raises(DwlabError, match=r"model.reg_max=8 but the method's head needs reg_max=16"):
        build_detector(cfg, 3, make_assigner(cfg, 3))
    cfg = config("dw", dgqp=True)
    with pytest.raises(DwlabError, match="dgqp needs reg_max"):
        build_detector(cfg, 3, make_assigner(cfg, 3))
    cfg = config("gfl", reg_max=16)  # the same value: fine
    assert build_detector(cfg, 3, make_assigner(cfg, 3)).head.reg_max == 16


def test_any_method_trains_on_the_distribution_head_through_its_distances():
    cfg = config("dw", reg_max=4)
    assigner = make_assigner(cfg, 3)
    out = build_detector(cfg, 3, assigner)(torch.randn(1, 3, 64, 64))
    assert out.distribution.shape[-1] == 5
    terms = assigner(out, [Target(torch.tensor([GT]), torch.tensor([1]))])
    sum(assigner.loss_weights[k] * v for k, v in terms.items()).backward()


# ----------------------------------------------------------------------------- the losses by hand

# Two levels, anchors as in test_assign_baselines' ATSS case (anchor_scale 1, topk 2): the one
# positive is anchor 3, (8, 8) on the stride-16 level, for GT [0, 0, 16, 16] of class 1.
ANCHORS = [[(8.0, 8.0), (14.0, 8.0), (40.0, 8.0)], [(8.0, 8.0), (8.0, 24.0), (60.0, 60.0)]]
SIDE = (0.5, 0.3, 0.2)  # every side's distribution over bins 0, 1, 2 (reg_max 2): integral 0.7


def anchors() -> Anchors:
    return Anchors(
        points=torch.tensor([p for level in ANCHORS for p in level]),
        strides=torch.tensor([8.0] * 3 + [16.0] * 3),
        levels=torch.tensor([0] * 3 + [1] * 3),
        level_sizes=(3, 3),
    )


def dist_case() -> tuple[HeadOutputs, list[Target]]:
    """Scores 0.6 on the positive's class, 0.1 elsewhere; joint score = sigmoid(cls) (ctr logit
    40); every anchor predicts the distribution SIDE on each side: 0.7 strides."""
    a = anchors()
    scores = torch.full((1, 6, 2), 0.1)
    scores[0, 3, 1] = 0.6
    logits = probs_logits(*SIDE).expand(1, 6, 4, 3).clone().requires_grad_()
    out = HeadOutputs(
        torch.logit(scores).requires_grad_(), torch.full((1, 6), 40.0).requires_grad_(),
        integral(logits) * a.strides[None, :, None], a, distribution=logits,
    )  # fmt: skip
    return out, [Target(torch.tensor([GT]), torch.tensor([1]))]


def test_gfl_loss_hand_case():
    out, targets = dist_case()
    gfl = GFLAssigner(2, topk=2, anchor_scale=1.0, reg_max=2)
    asg = gfl.assign(out, targets)
    assert asg.matched[0].tolist() == [-1, -1, -1, 0, -1, -1]
    # the positive's box: 0.7 x 16 = 11.2 px each side of (8, 8), [-3.2, -3.2, 19.2, 19.2],
    # containing the GT: IoU = GIoU = 256 / 22.4^2
    iou = 256 / 22.4**2
    assert asg.quality.tolist() == approx([iou])
    terms = gfl(out, targets)
    pos = -((0.6 - iou) ** 2) * (iou * LN(0.6) + (1 - iou) * LN(0.4))
    neg = 11 * -(0.1**2) * LN(0.9)
    assert terms["loss_cls"].item() == approx(pos + neg)
    # box weight 0.6 (the largest score), the normaliser max(0.6, 1) = 1
    assert terms["loss_box"].item() == approx(0.6 * (1 - iou))
    # DFL: targets 8 / 16 = 0.5 strides on each side, between bins 0 and 1; mean over the sides
    assert terms["loss_dfl"].item() == approx(0.6 * -(0.5 * LN(0.5) + 0.5 * LN(0.3)))
    assert gfl.loss_weights == {"loss_cls": 1.0, "loss_box": 2.0, "loss_dfl": 0.25}
    # the DFL's gradient reaches the positive's distribution only
    terms["loss_dfl"].backward()
    grad = out.distribution.grad[0].abs().sum((-1, -2))
    assert float(grad[3]) > 0 and float(grad.sum() - grad[3]) == 0.0


def test_dfl_targets_are_stride_units_clamped_below_reg_max():
    a = anchors()
    gt = torch.tensor([[0.0, 0.0, 100.0, 16.0], [4.0, 4.0, 12.0, 12.0]])
    target = dfl_targets(HeadOutputs(None, None, None, a), torch.tensor([0, 3]), gt, reg_max=4)
    # (8, 8) stride 8 in [0, 0, 100, 16]: 1, 1, 11.5 -> 3.9 (n - 0.1, released), 1
    # (8, 8) stride 16 in [4, 4, 12, 12]: 0.25 each
    assert target.flatten().tolist() == approx([1.0, 1.0, 3.9, 1.0] + [0.25] * 4)


def test_gfl_without_its_distribution_head_is_refused():
    out, targets = dist_case()
    plain = HeadOutputs(out.cls_logits, out.centerness, out.distances, out.anchors)
    with pytest.raises(ValueError, match="needs the distribution head of reg_max=2"):
        GFLAssigner(2, topk=2, anchor_scale=1.0, reg_max=2)(plain, targets)
    with pytest.raises(ValueError, match="needs the distribution head of reg_max=16"):
        GFLAssigner(2)(out, targets)  # 3 bins, not 17
    with pytest.raises(ValueError, match="reg_max must be >= 3"):
        GFLv2Assigner(2, reg_max=2)
    with pytest.raises(ValueError, match="sampling"):
        GFLv2Assigner(2, sampling="paa")


def test_qfl_is_gfl_without_its_dfl():
    """qfl (the former gfl) gives GFL's QFL and GIoU terms on the same outputs, no DFL."""
    out, targets = dist_case()
    qfl = QFLAssigner(2, topk=2, anchor_scale=1.0)(out, targets)
    gfl = GFLAssigner(2, topk=2, anchor_scale=1.0, reg_max=2)(out, targets)
    assert set(qfl) == {"loss_cls", "loss_box"} and set(gfl) == {"loss_cls", "loss_box", "loss_dfl"}
    assert all(torch.equal(qfl[k], gfl[k]) for k in qfl)
    assert "qfl" in ASSIGNERS and ASSIGNERS["qfl"].paper_row is None


def test_gflv2_samples_as_atss_or_fcos():
    g = torch.Generator().manual_seed(0)
    a = Anchors.grid([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], [8, 16, 32, 64, 128], 0.5, torch.device("cpu"))
    n = len(a)
    logits = torch.randn(2, n, 4, 17, generator=g)
    out = HeadOutputs(
        torch.randn(2, n, 3, generator=g), torch.randn(2, n, generator=g),
        integral(logits) * a.strides[:, None], a, distribution=logits,
    )  # fmt: skip
    targets = [Target(torch.tensor([[6.0, 4.0, 40.0, 46.0], [20.0, 30.0, 60.0, 60.0]]), torch.tensor([0, 2])),
               Target(torch.tensor([[40.0, 40.0, 52.0, 50.0]]), torch.tensor([1]))]  # fmt: skip
    boxes, _, valid = pad_targets(targets, torch.device("cpu"))
    ranges = [0.0, 16.0, 32.0, 64.0, 128.0, 1e8]
    by_fcos = GFLv2Assigner(3, sampling="fcos", size_ranges=ranges).assign(out, targets).matched
    assert torch.equal(by_fcos, fcos_match(a, boxes, valid, center_radius=1.5, size_ranges=ranges))
    by_atss = GFLv2Assigner(3).assign(out, targets).matched
    assert torch.equal(by_atss, atss_match(a, boxes, valid, topk=9, anchor_scale=8.0).matched)
    assert not torch.equal(by_fcos, by_atss)
    # the same loss otherwise: GFL's, on the DGQP score
    for sampling in ("atss", "fcos"):
        terms = GFLv2Assigner(3, sampling=sampling, size_ranges=ranges)(out, targets)
        assert set(terms) == {"loss_cls", "loss_box", "loss_dfl"} and all(torch.isfinite(v) for v in terms.values())


def test_gfl_box_weight_is_the_detached_largest_score():
    out, targets = dist_case()
    asg = GFLAssigner(2, topk=2, anchor_scale=1.0, reg_max=2).assign(out, targets)
    assert asg.box_weight.tolist() == approx([0.6]) and not asg.box_weight.requires_grad


# ----------------------------------------------------------------------------- Table 6 rows


def test_table6_rows_gfl_is_the_papers_gfl_and_gflv2s_sampling_picks_its_row():
    assert ASSIGNERS["gfl"].paper_row == "GFL" and paper.TABLE6[("GFL",)].AP == 39.9
    rows = {
        "qfl": {"assigner.name": "qfl"},
        "gfl": {"assigner.name": "gfl"},
        "gflv2": {"assigner.name": "gflv2", "assigner.gflv2.sampling": "atss"},
        "gflv2+fcos": {"assigner.name": "gflv2", "assigner.gflv2.sampling": "fcos"},
    }
    assert {k: method_name(p) for k, p in rows.items()} == {k: k for k in rows}
    assert method_name({"assigner.name": "dw", "assigner.gflv2.sampling": "fcos"}) == "dw"
    keys = {k: _table6_row_key(p)[0] for k, p in rows.items()}
    assert keys == {"qfl": "qfl", "gfl": "GFL", "gflv2": "ATSS+GFLv2", "gflv2+fcos": "FCOS+GFLv2"}
    assert paper.TABLE6[("ATSS+GFLv2",)].AP == 41.1 and paper.TABLE6[("FCOS+GFLv2",)].AP == 40.6


def test_default_sections_are_the_published_constants():
    gfl = build_assigner(AssignerConfig(name="gfl"), 3)
    assert (gfl.topk, gfl.anchor_scale, gfl.beta, gfl.reg_max) == (9, 8.0, 2.0, 16)
    assert gfl.loss_weights == {"loss_cls": 1.0, "loss_box": 2.0, "loss_dfl": 0.25}
    v2 = build_assigner(AssignerConfig(name="gflv2"), 3)
    assert (v2.sampling, v2.reg_max, head_init(v2)) == ("atss", 16, HeadInit(reg_max=16, dgqp=True))
