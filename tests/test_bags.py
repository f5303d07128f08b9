"""Candidate bags of DW (paper Table 4): hand-counted cases on small known grids."""

from __future__ import annotations

import math

import pytest
import torch

from dwlab.assign.bags import candidate_prior, candidate_prior_dense
from dwlab.assign.common import inside_pairs
from dwlab.assign.grid import level_grids, split_levels
from dwlab.models.outputs import Anchors

CPU = torch.device("cpu")


def grid(sizes, strides):
    a = Anchors.grid(sizes, strides, 0.5, CPU)
    return a.points, a.strides, a.levels


def bag(points, strides, levels, boxes, **kw):
    return candidate_prior(points, strides, levels, torch.tensor(boxes, dtype=torch.float32), **kw)


# one 10x10 level of stride 8: points at 4, 12, ..., 76; GT (0, 0, 80, 80) centred at (40, 40).
# distances to the centre in strides: 4 anchors at sqrt(0.5) = 0.71, 8 at sqrt(2.5) = 1.58,
# 4 at sqrt(4.5) = 2.12, 8 at sqrt(6.5) = 2.55
@pytest.mark.parametrize("radius, count", [(1.0, 4), (1.3, 4), (1.7, 12), (2.0, 12), (2.5, 16)])
def test_threshold_bag_counts(radius, count):
    anchor, gt, prior = bag(*grid([(10, 10)], [8]), [[0, 0, 80, 80]], kind="threshold", radius=radius)
    assert len(anchor) == count
    assert torch.equal(prior, torch.ones(count))
    assert torch.equal(gt, torch.zeros(count, dtype=torch.long))


def test_threshold_bag_keeps_only_anchors_inside_the_box():
    points, strides, levels = grid([(10, 10)], [8])
    # a 20x20 box around (40, 40): only the points at 36 and 44 lie inside, however large r is
    anchor, _, _ = bag(points, strides, levels, [[30, 30, 50, 50]], kind="threshold", radius=10.0)
    assert sorted(points[anchor].tolist()) == [[36, 36], [36, 44], [44, 36], [44, 44]]
    # a point on the border is outside (strict, as min(l, t, r, b) > 0 in the released code)
    anchor, _, _ = bag(points, strides, levels, [[36, 36, 60, 60]], kind="threshold", radius=10.0)
    assert sorted(points[anchor].tolist()) == [[44, 44], [44, 52], [52, 44], [52, 52]]


def test_topk_bag_takes_exactly_k_per_level():
    points, strides, levels = grid([(10, 10), (5, 5)], [8, 16])
    anchor, gt, prior = bag(points, strides, levels, [[0, 0, 80, 80]], kind="topk", topk=9)
    assert torch.bincount(levels[anchor], minlength=2).tolist() == [9, 9]
    assert torch.equal(prior, torch.ones(18))
    # the kept ones are the nearest of their level: none dropped is nearer than one kept
    d = ((points - 40.0) ** 2).sum(-1).sqrt() / strides
    for level in (0, 1):
        kept = torch.zeros_like(d, dtype=torch.bool)
        kept[anchor] = True
        on = levels == level
        assert d[on & kept].max() <= d[on & ~kept].min()
    # P4 (stride 16): the centre anchor, its 4 neighbours and 4 diagonals, no tie
    assert sorted(points[anchor[levels[anchor] == 1]].tolist()) == sorted(
        [[x, y] for x in (24, 40, 56) for y in (24, 40, 56)]
    )


def test_topk_bag_takes_all_inside_anchors_when_fewer_than_k():
    points, strides, levels = grid([(10, 10), (5, 5)], [8, 16])
    # 4 P3 anchors and 1 P4 anchor (40, 40) inside
    anchor, _, _ = bag(points, strides, levels, [[30, 30, 50, 50]], kind="topk", topk=9)
    assert torch.bincount(levels[anchor], minlength=2).tolist() == [4, 1]


def test_soft_bag_gaussian_prior_in_stride_units():
    sigma = 1.11
    points, strides, levels = grid([(10, 10), (5, 5)], [8, 16])
    # box centred on the P3 anchor (36, 36); inside: P3 x,y in {28, 36, 44}, P4 in {24, 40}
    anchor, gt, prior = bag(points, strides, levels, [[20, 20, 52, 52]], kind="soft", sigma=sigma)
    got = {(int(levels[a]), *map(int, points[a].tolist())): float(p) for a, p in zip(anchor, prior)}
    assert len(got) == 9 + 4
    assert got[(0, 36, 36)] == pytest.approx(1.0)
    assert got[(0, 44, 36)] == pytest.approx(math.exp(-1 / (2 * sigma**2)))  # one stride away
    assert got[(0, 28, 44)] == pytest.approx(math.exp(-2 / (2 * sigma**2)))  # diagonal
    assert got[(1, 40, 40)] == pytest.approx(math.exp(-(0.25**2 * 2) / (2 * sigma**2)))  # 4 px / 16


def test_pairs_are_batched_over_gts_with_their_own_indices():
    points, strides, levels = grid([(10, 10)], [8])
    boxes = [[30, 30, 50, 50], [0, 0, 80, 80], [100, 100, 120, 120]]  # the last one is off-grid
    anchor, gt, _ = bag(points, strides, levels, boxes, kind="threshold", radius=1.0)
    assert torch.bincount(gt, minlength=3).tolist() == [4, 4, 0]
    assert torch.equal(anchor[:4], anchor[4:])  # both centred at (40, 40)


def test_grid_enumeration_equals_dense_mask_fallback():
    torch.manual_seed(0)
    points, strides, levels = grid([(12, 9), (6, 5), (3, 3)], [8, 16, 32])
    xy = torch.rand(40, 2) * 110 - 15
    boxes = torch.cat([xy, xy + torch.rand(40, 2) * 70 + 0.5], 1)  # some cross the border, some tiny
    boxes[0] = torch.tensor([36.0, 36.0, 44.0, 60.0])  # edges exactly on grid points
    fast = inside_pairs(points, strides, levels, boxes)
    perm = torch.randperm(len(points))  # shuffled points are no grid: dense fallback
    assert level_grids(points[perm], strides[perm], levels[perm]) is None
    a, g = inside_pairs(points[perm], strides[perm], levels[perm], boxes)
    a = perm[a]
    order = torch.argsort(g * len(points) + a)
    assert torch.equal(fast[0], a[order]) and torch.equal(fast[1], g[order])
    x, y = points[:, 0], points[:, 1]
    brute = (x[:, None] > boxes[:, 0]) & (y[:, None] > boxes[:, 1]) & (x[:, None] < boxes[:, 2]) & (y[:, None] < boxes[:, 3])
    assert len(fast[0]) == int(brute.sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_ranges_are_exact_at_edges_off_the_grid_and_for_non_finite_boxes(dtype):
    """The row and column ranges are searched on the grid's own coordinates with the comparisons
    of the inside test, so no pair is enumerated that the test would drop, whatever the box:
    edges on grid points or a rounding step away, outside the grid, infinite, NaN."""
    points, strides, levels = grid([(12, 9), (6, 5), (3, 3)], [8, 16, 32])
    step = 1e-5 if dtype == torch.float32 else 1e-12
    inf, nan = float("inf"), float("nan")
    boxes = torch.tensor(
        [[36, 36, 44, 60], [36 - step, 36 + step, 44 + step, 60 - step], [-50, -50, -10, -10], [200, 4, 300, 100],
         [-inf, 20, inf, 28], [-inf, -inf, inf, inf], [nan, 0, 50, 50], [0, 0, nan, 50], [0, nan, 50, 50],
         [0, 0, 50, nan], [20, 20, 20, 40], [44, 44, 36, 36]],
        dtype=dtype,
    )  # fmt: skip
    anchor, gt = inside_pairs(points, strides, levels, boxes)
    x, y = points[:, 0], points[:, 1]
    brute = (x[:, None] > boxes[:, 0]) & (y[:, None] > boxes[:, 1]) & (x[:, None] < boxes[:, 2]) & (y[:, None] < boxes[:, 3])
    g, a = brute.T.nonzero(as_tuple=True)
    assert torch.equal(anchor, a) and torch.equal(gt, g)
    assert torch.bincount(gt, minlength=len(boxes)).tolist()[5] == len(points)


def test_empty_gts_and_dense_view():
    points, strides, levels = grid([(4, 4)], [8])
    anchor, gt, prior = candidate_prior(points, strides, levels, torch.zeros(0, 4))
    assert anchor.shape == gt.shape == prior.shape == (0,)
    dense, in_bag = candidate_prior_dense(points, strides, levels, torch.tensor([[0.0, 0.0, 20.0, 20.0]]), kind="soft")
    assert dense.shape == in_bag.shape == (16, 1)
    assert int(in_bag.sum()) == 4 and bool((dense[~in_bag] == 0).all()) and bool((dense[in_bag] > 0).all())


def test_bad_bag_arguments_raise():
    points, strides, levels = grid([(4, 4)], [8])
    with pytest.raises(ValueError, match="unknown bag kind"):
        candidate_prior(points, strides, levels, torch.zeros(0, 4), kind="nearest")
    with pytest.raises(ValueError):
        candidate_prior(points, strides, levels, torch.zeros(0, 4), kind="topk", topk=0)


def test_split_levels_round_trip():
    points, strides, levels = grid([(3, 4), (2, 2)], [8, 16])
    maps = split_levels(points[:, 0], points, strides, levels)
    assert [m.shape for m in maps] == [(3, 4), (2, 2)]
    assert maps[0][1].tolist() == [4, 12, 20, 28] and maps[1][:, 1].tolist() == [24, 24]
