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
detector), the inside pairs are enumerated from each GT's row/column range on each level, so
the cost is O(P + G * levels). Other point sets fall back to a dense boolean inside-mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dwlab.box_ops import box_centers

BAG_KINDS = ("soft", "threshold", "topk")
_MARGIN = 1e-3  # stride units; above level_grids' tolerance (1e-3 px) at any stride >= 1


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


def _inside_pairs_grid(points: Tensor, gt_boxes: Tensor, grids: list[LevelGrid]) -> tuple[Tensor, Tensor]:
    """Candidate pairs from each GT's row/column range per level (see ``inside_pairs``): the
    points strictly inside, plus any within ``_MARGIN`` strides of the border (filtered after)."""
    device, num_gts, num_levels = points.device, gt_boxes.shape[0], len(grids)
    meta = torch.tensor([[g.stride, g.x0, g.y0] for g in grids], dtype=torch.float64, device=device)
    ints = torch.tensor([[g.start, g.height, g.width] for g in grids], dtype=torch.long, device=device)
    stride, x0, y0 = meta[:, 0], meta[:, 1], meta[:, 2]  # [L]
    start, height, width = ints[:, 0], ints[:, 1], ints[:, 2]
    boxes = gt_boxes.double()[:, None, :]  # [G, 1, 4]
    # column j is inside iff x1 < x0 + j * stride < x2, i.e. floor(q1) < j < ceil(q2)
    col_lo = (torch.floor((boxes[..., 0] - x0) / stride - _MARGIN) + 1).long().clamp(min=0)  # [G, L]
    col_hi = torch.minimum((torch.ceil((boxes[..., 2] - x0) / stride + _MARGIN) - 1).long(), width - 1)
    row_lo = (torch.floor((boxes[..., 1] - y0) / stride - _MARGIN) + 1).long().clamp(min=0)
    row_hi = torch.minimum((torch.ceil((boxes[..., 3] - y0) / stride + _MARGIN) - 1).long(), height - 1)
    n_cols = (col_hi - col_lo + 1).clamp(min=0)
    sizes = (n_cols * (row_hi - row_lo + 1).clamp(min=0)).reshape(-1)  # [G * L], block = (gt, level)
    gt_of_block = torch.arange(num_gts, device=device).repeat_interleave(num_levels)
    table = torch.stack(  # one row per block, gathered once per pair
        [
            torch.cumsum(sizes, 0) - sizes,
            n_cols.reshape(-1),
            row_lo.reshape(-1),
            col_lo.reshape(-1),
            start.repeat(num_gts),
            width.repeat(num_gts),
            gt_of_block,
        ],
        dim=1,
    )
    block = torch.repeat_interleave(torch.arange(num_gts * num_levels, device=device), sizes)
    first, cols, row0, col0, level_start, level_width, gt = table.index_select(0, block).unbind(1)
    local = torch.arange(block.shape[0], device=device) - first
    row = row0 + torch.div(local, cols, rounding_mode="floor")
    col = col0 + local - (row - row0) * cols
    return level_start + row * level_width + col, gt


def inside_pairs(points: Tensor, strides: Tensor, levels: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """All (anchor, GT) pairs whose point lies strictly inside the GT box.

    points ``Tensor[A, 2]``; strides, levels ``Tensor[A]``; gt_boxes ``Tensor[G, 4]`` xyxy pixels.
    Returns anchor_idx, gt_idx ``Tensor[P]`` long, ordered by GT, then anchor index.
    """
    device = points.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if gt_boxes.shape[0] == 0 or points.shape[0] == 0:
        return empty, empty.clone()
    grids = level_grids(points, strides, levels)
    if grids is not None:
        anchor, gt = _inside_pairs_grid(points, gt_boxes, grids)
    else:  # fallback for arbitrary points: a dense boolean [G, A] mask
        gt, anchor = _inside_test(points[None, :, :], gt_boxes[:, None, :]).nonzero(as_tuple=True)
        return anchor, gt
    keep = _inside_test(points.index_select(0, anchor), gt_boxes.index_select(0, gt))
    return anchor[keep], gt[keep]  # blocks (gt, level) in order, rows then columns: sorted


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate bags as sparse pairs (paper Table 4).

    points ``Tensor[A, 2]`` (x, y) pixels; strides ``Tensor[A]`` float; levels ``Tensor[A]`` long;
    gt_boxes ``Tensor[G, 4]`` xyxy pixels.
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
    anchor, gt = inside_pairs(points, strides, levels, gt_boxes)
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
