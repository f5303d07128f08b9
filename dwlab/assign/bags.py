"""Candidate bags of Dual Weighting (paper §3, "candidate bag"; Table 4), as sparse pairs.

A bag ``B_g`` holds anchors whose point lies strictly inside GT box g (the released code's
``min(l, t, r, b) > 0``); a ``prior`` in [0, 1] comes with each member. Three kinds:

- ``threshold``: prior 1 where ``d / stride < radius`` (d: Euclidean distance from the anchor
  point to g's centre);
- ``topk``: prior 1 for the ``topk`` anchors nearest to g's centre on each FPN level;
- ``soft`` (paper default): every inside anchor, prior ``exp(-(dx^2 + dy^2) / (2 sigma^2))``
  with per-axis distances in stride units (released code: sigma 1.11, mean 0).

Everything is returned as P (anchor, GT) pairs, never as a dense ``Tensor[A, G]``: the inside
pairs come from ``common.inside_pairs`` (enumerated from each GT's row and column range on the
anchor grid), the distances from ``common.centre_offsets``, the soft prior from
``common.gaussian_prior``; this module only selects and weighs them per bag kind.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dwlab.assign.common import centre_offsets, gaussian_prior, inside_pairs
from dwlab.assign.grid import GridLayout

BAG_KINDS = ("soft", "threshold", "topk")


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
    offset = centre_offsets(points, strides, gt_boxes, anchor, gt)  # (dx, dy) in stride units  [P, 2]
    if kind == "soft":
        return anchor, gt, gaussian_prior(offset, sigma)
    dist2 = (offset**2).sum(-1)  # squared distance to the GT centre, stride units  [P]
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
