"""Candidate bags of Dual Weighting (paper §3, "candidate bag"; Table 4), as sparse pairs.

A bag ``B_g`` holds anchors whose point lies strictly inside GT box g (the released code's
``min(l, t, r, b) > 0``); a ``prior`` in [0, 1] comes with each member. Three kinds:

- ``threshold``: prior 1 where ``d / stride < radius`` (d: Euclidean distance from the anchor
  point to g's centre);
- ``topk``: prior 1 for the ``topk`` anchors nearest to g's centre on each FPN level;
- ``soft`` (paper default): every inside anchor, prior ``exp(-(dx^2 + dy^2) / (2 sigma^2))``
  with per-axis distances in stride units (released code: sigma 1.11, mean 0).

Everything is returned as P (anchor, GT) pairs, never as a dense ``Tensor[A, G]``. When the
anchor points form the row-major per-level grids of ``Anchors.grid`` (always, for the
detector), the inside pairs are enumerated from each GT's exact row/column range on each level
(``GridLayout``: the grid's own coordinates, searched on the device), so the cost is
O(P + G * levels) and the only host-device sync is the number of pairs P. The layout is read
from the points once per feature-map shape (``anchor_layout``, keyed by ``Anchors.recipe``).
Other point sets fall back to a dense boolean inside-mask.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from dwlab.box_ops import box_centers
from dwlab.models.outputs import Anchors

BAG_KINDS = ("soft", "threshold", "topk")


@dataclass(frozen=True)
class LevelGrid:
    """One FPN level laid out row-major: ``points[start + i * width + j] ==
    (x0 + j * stride, y0 + i * stride)`` for ``i < height``, ``j < width``."""

    level: int
    start: int
    height: int
    width: int
    stride: float
    x0: float
    y0: float


def level_grids(
    points: Tensor, strides: Tensor, levels: Tensor, atol: float = 1e-3
) -> list[LevelGrid] | None:
    """Recover the per-level grids of ``Anchors.grid`` points, or None if they are not such grids.

    points ``Tensor[A, 2]`` (x, y) pixels; strides ``Tensor[A]``; levels ``Tensor[A]`` long,
    each level one contiguous run.
    """
    if points.shape[0] == 0:
        return []
    pts, strd, lvl = points.detach().float().cpu(), strides.detach().float().cpu(), levels.cpu()
    runs, counts = torch.unique_consecutive(lvl, return_counts=True)
    if len(set(runs.tolist())) != len(runs):
        return None  # a level split into several runs
    grids, start = [], 0
    for level, n in zip(runs.tolist(), counts.tolist()):
        p, s = pts[start : start + n], strd[start : start + n]
        stride = float(s[0])
        if stride <= 0 or not bool((s == stride).all()):
            return None
        width = int((p[:, 1] == p[0, 1]).sum())
        height = n // width
        if width * height != n:
            return None
        x0, y0 = float(p[0, 0]), float(p[0, 1])
        ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        expect = torch.stack([x0 + jj.reshape(-1) * stride, y0 + ii.reshape(-1) * stride], dim=-1)
        if not torch.allclose(expect, p, rtol=0.0, atol=atol):
            return None
        grids.append(LevelGrid(level, start, height, width, stride, x0, y0))
        start += n
    return grids


def split_levels(values: Tensor, points: Tensor, strides: Tensor, levels: Tensor) -> list[Tensor]:
    """Per-anchor ``Tensor[A, ...]`` -> one ``Tensor[H, W, ...]`` per level (P3 first)."""
    grids = level_grids(points, strides, levels)
    if grids is None:
        raise ValueError("anchor points are not row-major per-level grids (Anchors.grid)")
    tail = values.shape[1:]
    return [values[g.start : g.start + g.height * g.width].reshape(g.height, g.width, *tail) for g in grids]


@dataclass(frozen=True)
class GridLayout:
    """Anchor points that are exactly per-level grids (``Anchors.grid``'s), as device tensors for
    ``inside_pairs``: level l's point ``start[l] + i * width[l] + j`` is ``(xs[l, j], ys[l, i])``.

    grids: the levels (``level_grids``); xs ``Tensor[L, W_max]`` and ys ``Tensor[L, H_max]`` the
    points' own coordinates, strictly increasing, padded with +inf; start, width ``Tensor[L]`` long.
    """

    grids: tuple[LevelGrid, ...]
    xs: Tensor
    ys: Tensor
    start: Tensor
    width: Tensor


def grid_layout(points: Tensor, strides: Tensor, levels: Tensor) -> GridLayout | None:
    """The ``GridLayout`` of the points, or None unless every level is an exact row-major grid
    (one row of x coordinates shared by every row, one y per row, both strictly increasing).
    Reads the points on the host: cache it (``anchor_layout``)."""
    grids = level_grids(points, strides, levels)
    if grids is None or not grids:
        return None
    pts = points.detach().cpu()
    xs, ys = [], []
    for g in grids:
        p = pts[g.start : g.start + g.height * g.width].reshape(g.height, g.width, 2)
        x, y = p[0, :, 0], p[:, 0, 1]
        exact = bool((p[..., 0] == x).all()) and bool((p[..., 1] == y[:, None]).all())
        if not exact or bool((x.diff() <= 0).any()) or bool((y.diff() <= 0).any()):
            return None
        xs.append(x)
        ys.append(y)
    inf = float("inf")
    pad = lambda rows: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=inf)  # noqa: E731
    device = points.device
    ints = torch.tensor([[g.start, g.width] for g in grids], dtype=torch.long)
    return GridLayout(tuple(grids), pad(xs).to(device), pad(ys).to(device), ints[:, 0].to(device), ints[:, 1].to(device))


_LAYOUTS: OrderedDict[tuple, GridLayout | None] = OrderedDict()
LAYOUT_CACHE_SIZE = 256  # distinct feature-map shapes kept (multi-size batches: one per padded size)


def anchor_layout(anchors: Anchors) -> GridLayout | None:
    """``grid_layout`` of ``anchors``, cached per ``Anchors.recipe`` (feature-map shapes,
    strides, offset, device): the points are read on the host once per shape, not every step.
    Anchors without a recipe are laid out anew on each call."""
    key = anchors.recipe
    if key is None:
        return grid_layout(anchors.points, anchors.strides, anchors.levels)
    if key in _LAYOUTS:
        _LAYOUTS.move_to_end(key)
        return _LAYOUTS[key]
    layout = _LAYOUTS[key] = grid_layout(anchors.points, anchors.strides, anchors.levels)
    if len(_LAYOUTS) > LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return layout


def _index_range(coords: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """First and last index of the coordinates strictly between ``lo`` and ``hi``: coords
    ``Tensor[L, N]`` increasing (+inf padded), lo and hi ``Tensor[G]`` -> two ``Tensor[G, L]``
    (first > last when there is none). Exact: the same comparisons as ``_inside_test``."""
    num_levels = coords.shape[0]
    first = torch.searchsorted(coords, lo[None].expand(num_levels, -1).contiguous(), right=True)
    last = torch.searchsorted(coords, hi[None].expand(num_levels, -1).contiguous(), right=False) - 1
    return first.T, last.T


def _inside_pairs_grid(gt_boxes: Tensor, layout: GridLayout) -> tuple[Tensor, Tensor]:
    """The pairs of ``inside_pairs``, enumerated from each GT's exact row and column range on
    each level: O(P + G * levels), no dense mask and no filtering afterwards."""
    device, num_gts, num_levels = gt_boxes.device, gt_boxes.shape[0], len(layout.grids)
    dtype = torch.promote_types(layout.xs.dtype, gt_boxes.dtype)  # _inside_test's comparison
    boxes, xs, ys = gt_boxes.to(dtype), layout.xs.to(dtype), layout.ys.to(dtype)
    col_lo, col_hi = _index_range(xs, boxes[:, 0], boxes[:, 2])  # [G, L]
    row_lo, row_hi = _index_range(ys, boxes[:, 1], boxes[:, 3])
    n_cols = (col_hi - col_lo + 1).clamp(min=0)
    n_rows = (row_hi - row_lo + 1).clamp(min=0)
    no_nan = ~boxes.isnan().any(-1, keepdim=True)  # a NaN edge holds no point (comparisons fail)
    sizes = (n_cols * n_rows * no_nan).reshape(-1)  # [G * L], block = (gt, level)
    gt_of_block = torch.arange(num_gts, device=device).repeat_interleave(num_levels)
    table = torch.stack(  # one row per block, gathered once per pair
        [
            torch.cumsum(sizes, 0) - sizes,
            n_cols.reshape(-1),
            row_lo.reshape(-1),
            col_lo.reshape(-1),
            layout.start.repeat(num_gts),
            layout.width.repeat(num_gts),
            gt_of_block,
        ],
        dim=1,
    )
    block = torch.repeat_interleave(torch.arange(num_gts * num_levels, device=device), sizes)  # P: one sync
    first, cols, row0, col0, level_start, level_width, gt = table.index_select(0, block).unbind(1)
    local = torch.arange(block.shape[0], device=device) - first
    row = row0 + torch.div(local, cols, rounding_mode="floor")
    col = col0 + local - (row - row0) * cols
    return level_start + row * level_width + col, gt


def inside_pairs(
    points: Tensor, strides: Tensor, levels: Tensor, gt_boxes: Tensor, layout: GridLayout | None = None
) -> tuple[Tensor, Tensor]:
    """All (anchor, GT) pairs whose point lies strictly inside the GT box.

    points ``Tensor[A, 2]``; strides, levels ``Tensor[A]``; gt_boxes ``Tensor[G, 4]`` xyxy pixels;
    layout: the points' ``GridLayout`` (``anchor_layout``, cached), found here when not given.
    Returns anchor_idx, gt_idx ``Tensor[P]`` long, ordered by GT, then anchor index.
    """
    device = points.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if gt_boxes.shape[0] == 0 or points.shape[0] == 0:
        return empty, empty.clone()
    layout = grid_layout(points, strides, levels) if layout is None else layout
    if layout is not None:
        return _inside_pairs_grid(gt_boxes, layout)  # blocks (gt, level) in order, rows then columns: sorted
    # fallback for arbitrary points: a dense boolean [G, A] mask
    gt, anchor = _inside_test(points[None, :, :], gt_boxes[:, None, :]).nonzero(as_tuple=True)
    return anchor, gt


def _inside_test(points: Tensor, boxes: Tensor) -> Tensor:
    """``min(l, t, r, b) > 0`` elementwise over broadcast ``[..., 2]`` points and ``[..., 4]`` boxes."""
    x, y = points[..., 0], points[..., 1]
    return (x > boxes[..., 0]) & (y > boxes[..., 1]) & (x < boxes[..., 2]) & (y < boxes[..., 3])


def candidate_prior(
    points: Tensor,
    strides: Tensor,
    levels: Tensor,
    gt_boxes: Tensor,
    *,
    kind: str = "soft",
    radius: float = 2.0,
    topk: int = 9,
    sigma: float = 1.11,
    layout: GridLayout | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate bags as sparse pairs (paper Table 4).

    points ``Tensor[A, 2]`` (x, y) pixels; strides ``Tensor[A]`` float; levels ``Tensor[A]`` long;
    gt_boxes ``Tensor[G, 4]`` xyxy pixels; layout: the points' ``GridLayout`` (``anchor_layout``:
    pass it from a training step, so that the points are not read on the host each time).
    Returns ``(anchor_idx[P], gt_idx[P], prior[P])``, GT-major. Hard bags (threshold, topk) hold
    only their members (prior 1). The soft bag holds every inside anchor, including those whose
    Gaussian prior underflows to 0 in float32 (far from the centre of a large GT): like the
    released code, they stay in the bag for the negative weight (P_neg, its normaliser).
    """
    if kind not in BAG_KINDS:
        raise ValueError(f"unknown bag kind {kind!r} (expected one of {BAG_KINDS})")
    if radius <= 0 or sigma <= 0 or topk < 1:
        raise ValueError(f"bag parameters must be positive (radius={radius}, sigma={sigma}, topk={topk})")
    assert points.dim() == 2 and points.shape[1] == 2, points.shape
    assert strides.shape == levels.shape == points.shape[:1], (strides.shape, levels.shape)
    assert gt_boxes.dim() == 2 and gt_boxes.shape[1] == 4, gt_boxes.shape
    anchor, gt = inside_pairs(points, strides, levels, gt_boxes, layout)
    centres = box_centers(gt_boxes.to(points.dtype))
    offset = points.index_select(0, anchor) - centres.index_select(0, gt)
    offset = offset / strides.index_select(0, anchor)[:, None]  # (dx, dy) in stride units  [P, 2]
    dist2 = (offset**2).sum(-1)  # squared distance to the GT centre, stride units  [P]
    if kind == "soft":
        prior = torch.exp(-dist2 / (2 * sigma**2))
        return anchor, gt, prior
    if kind == "threshold":
        keep = dist2 < radius**2  # d / stride < r
    else:  # topk: rank within each (GT, level) block by distance; stable, so ties go to lower index
        num_levels = int(levels.max()) + 1 if levels.numel() else 1
        block = gt * num_levels + levels[anchor]
        by_dist = torch.argsort(dist2, stable=True)
        order = by_dist[torch.argsort(block[by_dist], stable=True)]
        sorted_block = block[order]
        sizes = torch.bincount(sorted_block, minlength=int(block.max()) + 1 if block.numel() else 0)
        first = torch.cumsum(sizes, 0) - sizes
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=order.device) - first[sorted_block]
        keep = rank < topk
    anchor, gt = anchor[keep], gt[keep]
    return anchor, gt, torch.ones(anchor.shape[0], dtype=points.dtype, device=points.device)


def candidate_prior_dense(
    points: Tensor, strides: Tensor, levels: Tensor, gt_boxes: Tensor, **kwargs
) -> tuple[Tensor, Tensor]:
    """Dense view for tests and plots: ``prior Tensor[A, G]`` and ``in_bag Tensor[A, G]`` bool."""
    anchor, gt, prior = candidate_prior(points, strides, levels, gt_boxes, **kwargs)
    shape = (points.shape[0], gt_boxes.shape[0])
    dense = torch.zeros(shape, dtype=points.dtype, device=points.device)
    in_bag = torch.zeros(shape, dtype=torch.bool, device=points.device)
    dense[anchor, gt] = prior
    in_bag[anchor, gt] = True
    return dense, in_bag
