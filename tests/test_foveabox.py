"""FoveaBox's assignment and loss on hand-sized cases: a GT on two levels, the fovea's closed
shrunk box, the smaller GT winning an overlap, the log-space box term and the focal term with
its (positives + images) normaliser. The contract all methods share is tests/test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from dwlab.assign.foveabox import MIN_RATIO, FoveaBoxAssigner, fovea_match
from dwlab.box_ops import boxes_to_distances
from dwlab.config import AssignerConfig, load_config
from dwlab.data import synth
from dwlab.data.target import Target
from dwlab.models.outputs import Anchors, HeadOutputs

CPU = torch.device("cpu")
# two levels: P3 points at 4, 12, 20, ..., 44 and P4 points at 8, 24, 40 (both axes)
TWO_LEVELS = {"base_edge_list": [16.0, 32.0], "scale_ranges": [[1.0, 64.0], [32.0, 128.0]]}


def grid() -> Anchors:
    return Anchors.grid([(6, 6), (3, 3)], [8, 16], 0.5, CPU)


def positives_of(gt_boxes: list[list[float]], sigma: float = 0.4) -> dict[tuple[int, float, float], int]:
    """{(level, x, y): matched GT} of one image."""
    anchors = grid()
    ranges = torch.tensor(TWO_LEVELS["scale_ranges"])
    boxes = torch.tensor([gt_boxes])
    matched = fovea_match(anchors, boxes, torch.ones(1, len(gt_boxes), dtype=torch.bool), scale_ranges=ranges, sigma=sigma)[0]
    return {
        (int(anchors.levels[a]), *anchors.points[a].tolist()): int(matched[a]) for a in (matched >= 0).nonzero()[:, 0]
    }


def test_a_gt_within_two_scale_ranges_is_positive_on_both_levels():
    # sqrt(48 * 48) = 48 in [1, 64] (P3) and [32, 128] (P4); fovea: |x - 24| <= 0.4 * 24 = 9.6
    pos = positives_of([[0.0, 0.0, 48.0, 48.0]])
    p3 = {(0, x, y): 0 for x in (20.0, 28.0) for y in (20.0, 28.0)}
    assert pos == {**p3, (1, 24.0, 24.0): 0}


def test_a_gt_in_one_range_only_stays_on_its_level():
    # sqrt(24 * 24) = 24 < 32: P3 only; fovea |x - 12| <= 4.8 holds the point 12
    assert positives_of([[0.0, 0.0, 24.0, 24.0]]) == {(0, 12.0, 12.0): 0}


@pytest.mark.parametrize("sigma, p3_side", [(0.4, 3), (0.39, 1)])
def test_the_fovea_is_the_box_shrunk_by_sigma_edges_included(sigma, p3_side):
    # GT [0, 40]^2, centre 20: sigma 0.4 -> |x - 20| <= 8 holds 12, 20, 28 (12 and 28 on the
    # edge); sigma 0.39 -> <= 7.8 holds 20 alone. sqrt(area) 40 is also in P4's range: point 24
    pos = positives_of([[0.0, 0.0, 40.0, 40.0]], sigma=sigma)
    assert sum(1 for k in pos if k[0] == 0) == p3_side**2
    assert [k for k in pos if k[0] == 1] == [(1, 24.0, 24.0)]


def test_a_point_in_two_foveas_takes_the_smaller_gt():
    # GT 0 [0, 60]^2: P3 fovea [18, 42] (20, 28, 36), P4 (24, 40). GT 1 [8, 40]^2 (sqrt 32, on
    # both levels): P3 fovea [17.6, 30.4] (20, 28), P4 (24). The overlaps go to GT 1.
    pos = positives_of([[0.0, 0.0, 60.0, 60.0], [8.0, 8.0, 40.0, 40.0]])
    for x in (20.0, 28.0, 36.0):
        for y in (20.0, 28.0, 36.0):
            assert pos[(0, x, y)] == (1 if x < 30 and y < 30 else 0)
    assert {k: v for k, v in pos.items() if k[0] == 1} == {
        (1, 24.0, 24.0): 1, (1, 40.0, 24.0): 0, (1, 24.0, 40.0): 0, (1, 40.0, 40.0): 0
    }  # fmt: skip


def test_the_loss_by_hand():
    """One level, one GT [10, 30]^2 whose fovea holds the point (20, 20) alone (its distances
    10 each, target ln(10 / 16)); predicted distances 16, 16, 16 (smooth-L1 beyond beta) and
    10 e^0.05 (within beta); scores 0.6 there and 0.1 at the 35 other points, one class."""
    anchors = Anchors.grid([(6, 6)], [8], 0.5, CPU)
    assigner = FoveaBoxAssigner(1, base_edge_list=[16.0], scale_ranges=[[1.0, 64.0]])
    pos = 2 * 6 + 2  # (20, 20)
    scores = torch.full((36, 1), 0.1)
    scores[pos] = 0.6
    distances = torch.full((36, 4), 8.0)
    distances[pos] = torch.tensor([16.0, 16.0, 16.0, 10.0 * math.exp(0.05)])
    out = HeadOutputs(
        torch.logit(scores)[None].requires_grad_(),
        torch.full((1, 36), 40.0),  # sigmoid(40) = 1 in float32: s = sigmoid(cls)
        distances[None].requires_grad_(),
        anchors,
    )
    terms = assigner(out, [Target(torch.tensor([[10.0, 10.0, 30.0, 30.0]]), torch.tensor([0]))])
    beta, far = 0.11, math.log(16 / 10)
    assert terms["loss_box"].item() == pytest.approx(3 * (far - beta / 2) + 0.5 * 0.05**2 / beta, rel=1e-5)
    alpha, gamma = 0.4, 1.5
    focal = alpha * 0.4**gamma * -math.log(0.6) + 35 * (1 - alpha) * 0.1**gamma * -math.log(0.9)
    assert terms["loss_cls"].item() == pytest.approx(focal / (1 + 1), rel=1e-5)  # N + B images


def test_a_zero_distance_gives_a_finite_box_loss():
    anchors = Anchors.grid([(6, 6)], [8], 0.5, CPU)
    assigner = FoveaBoxAssigner(1, base_edge_list=[16.0], scale_ranges=[[1.0, 64.0]])
    distances = torch.zeros(1, 36, 4, requires_grad=True)
    out = HeadOutputs(torch.zeros(1, 36, 1), torch.zeros(1, 36), distances, anchors)
    terms = assigner(out, [Target(torch.tensor([[10.0, 10.0, 30.0, 30.0]]), torch.tensor([0]))])
    # each side: |ln(1e-3) - ln(10 / 16)| - beta / 2
    assert terms["loss_box"].item() == pytest.approx(4 * (math.log(10 / 16) - math.log(MIN_RATIO) - 0.055), rel=1e-5)
    terms["loss_box"].backward()
    assert torch.isfinite(distances.grad).all()


def test_targets_are_the_clamped_log_ratio():
    """A positive whose side exceeds 16 base edges gets ln 16 (released clamp)."""
    anchors = Anchors.grid([(1, 1)], [8], 0.5, CPU)  # one point at (4, 4)
    assigner = FoveaBoxAssigner(1, base_edge_list=[1.0], scale_ranges=[[1.0, 1e4]], sigma=1.0)
    gt = torch.tensor([[-96.0, 0.0, 104.0, 8.0]])  # distances 100, 4, 100, 4 from (4, 4)
    dist = boxes_to_distances(anchors.points, gt)  # the exact distances: loss 0 but for the clamp
    out = HeadOutputs(torch.zeros(1, 1, 1), torch.zeros(1, 1), dist[None].clone(), anchors)
    loss = assigner(out, [Target(gt, torch.tensor([0]))])["loss_box"].item()
    assert loss == pytest.approx(2 * (math.log(100) - math.log(16) - 0.055), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sigma": 1.5},
        {"base_edge_list": [16.0]},
        {"scale_ranges": [[64.0, 1.0]] * 5},
        {"base_edge_list": [16.0, 32.0, 0.0, 128.0, 256.0]},
    ],
)
def test_bad_values_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        FoveaBoxAssigner(3, **kwargs)


def test_config_section_defaults_are_the_released_config():
    cfg = AssignerConfig().foveabox
    assert cfg.base_edge_list == [16.0, 32.0, 64.0, 128.0, 256.0] and cfg.sigma == 0.4
    assert cfg.scale_ranges == [[1.0, 64.0], [32.0, 128.0], [64.0, 256.0], [128.0, 512.0], [256.0, 2048.0]]
    assert (cfg.focal_alpha, cfg.focal_gamma, cfg.smooth_l1_beta) == (0.4, 1.5, 0.11)


def _share_of_gts_with_a_positive(scale_ranges: list[list[float]], n_images: int = 200) -> float:
    """Of the GTs of the first ``n_images`` generated train images (128 px, P3-P7 grid)."""
    boxes = [[[x, y, x + w, y + h] for (x, y, w, h), _, _ in synth.render(0, synth.STREAMS["train"], i, 128)[1]]
             for i in range(n_images)]  # fmt: skip
    gt_boxes = torch.zeros(n_images, max(map(len, boxes)), 4)
    gt_valid = torch.zeros(gt_boxes.shape[:2], dtype=torch.bool)
    for i, b in enumerate(boxes):
        gt_boxes[i, : len(b)], gt_valid[i, : len(b)] = torch.tensor(b), True
    anchors = Anchors.grid([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], [8, 16, 32, 64, 128], 0.5, CPU)
    matched = fovea_match(anchors, gt_boxes, gt_valid, scale_ranges=torch.tensor(scale_ranges), sigma=0.4)
    hit = (matched[:, :, None] == torch.arange(gt_boxes.shape[1])).any(1)  # [B, G]
    return float(hit[gt_valid].float().mean())


@pytest.mark.parametrize("scale", ["smoke", "mini"])
def test_the_cpu_presets_give_most_generated_gts_a_positive(scale):
    # The presets keep the released ranges: 76 % of the GTs have a positive (the smallest, under
    # 20 px, may have none on P3). FCOS's ranges divided by 4 put a GT on a level whose stride is
    # 4x coarser beside its fovea: 40 %.
    ranges = load_config(scale).assigner.foveabox.scale_ranges
    assert _share_of_gts_with_a_positive(ranges) > 0.7
    assert _share_of_gts_with_a_positive([[lo / 4, hi / 4] for lo, hi in ranges]) < 0.5
