"""The assignment toolkit: the non-loss pieces the assigners share; with ``dwlab.losses``, the
only code method modules share (no method module imports another). A new method builds its
candidates, costs and matching from these small blocks (each with hand-sized tests in
``tests/test_toolkit.py``), then writes one short matching function of its own.

Notation as in ``dwlab.models.outputs``: B images, A anchor points, C classes, G GTs per image
(padded to the batch's largest, see ``pad_targets``), P (anchor, GT) pairs. Boxes are xyxy
pixels. Everything is vectorised over images and GTs; no Python loop over anchors or GTs.

Inputs
- ``check_outputs``: the invariants every assigner asserts at entry.
- ``pad_targets`` / ``concat_targets``: a batch's GTs padded to ``[B, G]`` or concatenated.

Candidate regions
- ``points_inside``: anchor points inside GT boxes by a margin (dense, broadcasting).
- ``centre_region``: points within ``radius`` strides of a GT's centre, optionally clipped to
  the box (FCOS's centre sampling; OTA's and SimOTA's centre prior; dense).
- ``inside_pairs``: the (anchor, GT) pairs with the point inside the box, sparse ``[P]``
  (DW's bags, AutoAssign), enumerated on the anchor grid (``dwlab.assign.grid``);
  ``centre_offsets`` / ``gaussian_prior``: their offsets from the GT centre in strides and a
  Gaussian centre prior (DW's soft bag, AutoAssign); ``pair_boxes``: each pair's predicted box
  and GIoU loss, with gradient; ``per_gt``: a sum, min or max of pair values per GT;
  ``bag_neg_weights``: AutoAssign's IoU-based negative weight of each bag pair.

Costs and matching
- ``class_cost``: each anchor's (focal) BCE cost for each GT's class, ``[B, A, G]`` (OTA, SimOTA).
- ``pairwise_iou``: IoU of each predicted box with each GT of its image, padding masked (TOOD,
  AutoAssign, OTA, SimOTA).
- ``dynamic_k`` / ``smallest_k``: OTA's and SimOTA's k per GT from its top-q IoUs, and the k
  cheapest anchors of every GT at once.
- ``sinkhorn``: the entropic optimal-transport plan of a cost matrix (OTA).
- ``one_gt_per_anchor``: an anchor claimed by several GTs keeps the one with the largest or
  smallest key (ATSS, TOOD: IoU; FCOS: area; SimOTA: cost).
- ``entry_minima``: the smallest value per (image, anchor, class) entry (DW, AutoAssign).

Hard assignments and their losses
- ``centerness_target``: FCOS's centerness target (FCOS, ATSS, TOOD's warm-up).
- ``anchor_boxes`` / ``ATSSMatch`` / ``atss_match``: ATSS's assignment (ATSS, GFL, VFL, TOOD's
  warm-up).
- ``fcos_match``: FCOS's assignment (centre sampling, size ranges, smallest GT; FCOS, GFLv2's
  FCOS sampling).
- ``Positives`` / ``positives``: the pairs of a hard assignment (``matched`` ``Tensor[B, A]``,
  -1 = background), with the predicted boxes (gradient) and their IoU with the GT (no gradient).
- ``atss_positives``: inputs checked, ATSS's match and its positives (GFL, VFL, TOOD's warm-up).
- ``class_target``: the ``[B, A, C]`` soft classification target of a hard assignment.
- ``QualityAssignment``: a hard assignment with a soft target per positive (GFL, VFL, TOOD), and
  ``per_positive_terms``, its loss terms normalised by the positives (GFL, VFL, TOOD's warm-up).
- ``iou_branch_terms``: focal loss, IoU-weighted GIoU and an IoU-prediction BCE on the
  centerness branch of a hard assignment (OTA, PAA).

Visualisation
- ``focus_maps`` / ``level_maps``: per-anchor score / IoU / pos / neg maps for
  ``dwlab plot weights`` (visualisation only: dense per-image IoU); ``WeightMaps``: the
  ``weight_maps`` hook from a method's per-anchor ``weights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from dwlab.assign.grid import GridLayout, grid_layout, split_levels
from dwlab.box_ops import aligned_giou, aligned_iou, box_centers, boxes_to_distances, distances_to_boxes
from dwlab.data.target import Target, check_labels
from dwlab.distributed import normaliser
from dwlab.models.outputs import Anchors, HeadOutputs

INSIDE_EPS = 0.01  # pixels: "centre inside GT" is min(l, t, r, b) > 0.01 (released ATSS / TOOD code)


def check_outputs(outputs: HeadOutputs, targets: list[Target], num_classes: int) -> None:
    """The invariants every assigner asserts at entry: shapes, and label ranges of targets on
    the host (device labels are left to ``TrainStep``, which checks them on the host before the
    transfer: reading them here would make the host wait for the device)."""
    b, a, c = outputs.cls_logits.shape
    assert c == num_classes, f"cls_logits has {c} classes, the assigner {num_classes}"
    assert outputs.centerness.shape == (b, a), outputs.centerness.shape
    assert outputs.distances.shape == (b, a, 4), outputs.distances.shape
    assert len(outputs.anchors) == a, (len(outputs.anchors), a)
    assert len(targets) == b, f"{len(targets)} targets for {b} images"
    for t in targets:
        assert t.boxes.reshape(-1, 4).shape[0] == t.labels.numel(), (t.boxes.shape, t.labels.shape)
    check_labels([t for t in targets if t.labels.device.type == "cpu"], num_classes)


def pad_targets(targets: list[Target], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack GTs of a batch, padded to the largest G: boxes ``Tensor[B, G, 4]``,
    labels ``Tensor[B, G]`` and validity ``Tensor[B, G]`` (bool)."""
    g = max((len(t.labels) for t in targets), default=0)
    boxes = torch.zeros(len(targets), g, 4, device=device)
    labels = torch.zeros(len(targets), g, dtype=torch.long, device=device)
    valid = torch.zeros(len(targets), g, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t.labels)
        boxes[i, :n], labels[i, :n], valid[i, :n] = t.boxes, t.labels, True
    return boxes, labels, valid


def concat_targets(targets: list[Target], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The GTs of a batch, images concatenated: boxes ``Tensor[G, 4]`` float32, labels
    ``Tensor[G]`` long and the image of each GT ``Tensor[G]`` long (G = all GTs of the batch)."""
    gt_boxes = torch.cat([t.boxes.reshape(-1, 4) for t in targets]).to(device, torch.float32)
    gt_labels = torch.cat([t.labels.reshape(-1) for t in targets]).to(device, torch.long)
    # filled on the device from the host's counts: no copy, no wait
    gt_image = torch.cat([torch.full((len(t.labels),), i, device=device) for i, t in enumerate(targets)])
    return gt_boxes, gt_labels, gt_image


def centerness_target(distances: Tensor) -> Tensor:
    """FCOS's centerness target (Tian et al., ICCV 2019, Eq. 3): (l, t, r, b) ``Tensor[N, 4]``
    -> ``Tensor[N]`` = sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))."""
    lr, tb = distances[:, [0, 2]], distances[:, [1, 3]]
    ratio = (lr.min(-1).values / lr.max(-1).values.clamp(min=1e-6)) * (
        tb.min(-1).values / tb.max(-1).values.clamp(min=1e-6)
    )
    return ratio.clamp(min=0).sqrt()


# ----------------------------------------------------------------------------- candidate regions


def points_inside(points: Tensor, boxes: Tensor, eps: float = INSIDE_EPS) -> Tensor:
    """``min(l, t, r, b) > eps`` for broadcast ``[..., 2]`` points and ``[..., 4]`` xyxy boxes."""
    x, y = points[..., 0], points[..., 1]
    return (
        (x - boxes[..., 0] > eps) & (y - boxes[..., 1] > eps) & (boxes[..., 2] - x > eps) & (boxes[..., 3] - y > eps)
    )


def centre_region(
    points: Tensor, strides: Tensor, boxes: Tensor, radius: float, *, clip_to_box: bool = True
) -> Tensor:
    """Whether each point lies strictly inside the square of half-side ``radius * stride``
    around the box centre, clipped to the box when ``clip_to_box`` (then also inside the box):
    FCOS's centre sampling (radius 1.5, clipped), OTA's and SimOTA's centre prior. Broadcast
    points ``[..., 2]``, strides ``[...]``, boxes ``[..., 4]`` xyxy -> bool ``[...]``."""
    half = (strides * radius)[..., None]
    centres = box_centers(boxes)
    lo, hi = centres - half, centres + half
    if clip_to_box:
        lo, hi = torch.maximum(lo, boxes[..., :2]), torch.minimum(hi, boxes[..., 2:])
    return boxes_to_distances(points, torch.cat([lo, hi], dim=-1)).min(-1).values > 0


def _index_range(coords: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """First and last index of the coordinates strictly between ``lo`` and ``hi``: coords
    ``Tensor[L, N]`` increasing (+inf padded), lo and hi ``Tensor[G]`` -> two ``Tensor[G, L]``
    (first > last when there is none). Exact: the comparisons of ``points_inside(eps=0)``."""
    num_levels = coords.shape[0]
    first = torch.searchsorted(coords, lo[None].expand(num_levels, -1).contiguous(), right=True)
    last = torch.searchsorted(coords, hi[None].expand(num_levels, -1).contiguous(), right=False) - 1
    return first.T, last.T


def _inside_pairs_grid(gt_boxes: Tensor, layout: GridLayout) -> tuple[Tensor, Tensor]:
    """The pairs of ``inside_pairs``, enumerated from each GT's exact row and column range on
    each level: O(P + G * levels), no dense mask and no filtering afterwards."""
    device, num_gts, num_levels = gt_boxes.device, gt_boxes.shape[0], len(layout.grids)
    dtype = torch.promote_types(layout.xs.dtype, gt_boxes.dtype)  # points_inside's comparison
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
    gt, anchor = points_inside(points[None, :, :], gt_boxes[:, None, :], eps=0.0).nonzero(as_tuple=True)
    return anchor, gt




def centre_offsets(points: Tensor, strides: Tensor, gt_boxes: Tensor, anchor: Tensor, gt: Tensor) -> Tensor:
    """Offset (dx, dy) of each pair's anchor point from its GT's centre, in units of the anchor's
    stride, ``Tensor[P, 2]``: points ``Tensor[A, 2]``, strides ``Tensor[A]``, gt_boxes
    ``Tensor[G, 4]``, anchor and gt ``Tensor[P]`` (the pairs, e.g. of ``inside_pairs``)."""
    centres = box_centers(gt_boxes.to(points.dtype))
    offset = points.index_select(0, anchor) - centres.index_select(0, gt)
    return offset / strides.index_select(0, anchor)[:, None]


def gaussian_prior(offsets: Tensor, sigma: float | Tensor, mean: float | Tensor | None = None) -> Tensor:
    """Centre prior ``exp(-|d - mean|^2 / (2 sigma^2))`` of the offsets ``Tensor[P, 2]`` (stride
    units, ``centre_offsets``) -> ``Tensor[P]``: DW's soft bag (sigma 1.11), AutoAssign's centre
    weighting. ``sigma`` and ``mean`` scalars, or ``Tensor[P, 2]`` per pair and axis (a learnable
    per-class prior gathered by each pair's label)."""
    d = offsets if mean is None else offsets - mean
    if isinstance(sigma, Tensor):
        return torch.exp(-(d**2 / (2 * sigma**2)).sum(-1))
    return torch.exp(-(d**2).sum(-1) / (2 * sigma**2))


class PairBoxes(NamedTuple):
    """The predicted boxes of P sparse (anchor, GT) pairs of a batch (``pair_boxes``). image,
    label, flat (``image * A + anchor``) ``Tensor[P]`` long; target ``Tensor[P, 4]`` the pair's GT
    box; pred ``Tensor[P, 4]`` the anchor's decoded box and giou_loss ``Tensor[P]`` = 1 - GIoU(pred,
    target), both float32 with gradient."""

    image: Tensor
    label: Tensor
    flat: Tensor
    target: Tensor
    pred: Tensor
    giou_loss: Tensor


def pair_boxes(
    outputs: HeadOutputs, anchor: Tensor, gt: Tensor, gt_image: Tensor, gt_labels: Tensor, gt_boxes: Tensor
) -> PairBoxes:
    """Each pair's image, label, predicted box and GIoU loss (DW, AutoAssign): anchor, gt
    ``Tensor[P]`` index the anchors and the batch's GTs as ``concat_targets`` gives them (gt_image,
    gt_labels ``Tensor[G]``, gt_boxes ``Tensor[G, 4]``)."""
    image, label = gt_image.index_select(0, gt), gt_labels.index_select(0, gt)
    flat = image * outputs.cls_logits.shape[1] + anchor  # index into B * A
    points = outputs.anchors.points.index_select(0, anchor)
    distances = outputs.distances.float().reshape(-1, 4).index_select(0, flat)
    pred = distances_to_boxes(points, distances)  # [P, 4] xyxy, with gradient
    target = gt_boxes.index_select(0, gt)
    return PairBoxes(image, label, flat, target, pred, 1.0 - aligned_giou(pred, target))


def per_gt(values: Tensor, gt: Tensor, num_gts: int, how: str) -> Tensor:
    """Reduce the pairs' ``values`` ``Tensor[P]`` over each GT's pairs (``gt`` ``Tensor[P]``) by
    ``how`` ("sum", "amin", "amax") -> ``Tensor[G]``, 0 for a GT without pairs."""
    out = torch.zeros(num_gts, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, gt, values, how, include_self=False)


@torch.no_grad()
def bag_neg_weights(pairs: PairBoxes, gt: Tensor, num_gts: int, targets: list[Target], eps: float) -> tuple[Tensor, Tensor]:
    """AutoAssign's negative weight of each bag pair, ``Tensor[P]``: 1 - f(1 / (1 - iou_max)),
    iou_max the largest IoU of the pair's predicted box with any GT of its image, f a min-max
    normalisation over the GT's bag (``eps`` in both differences, released); and iou_max
    ``Tensor[P]``. No gradient. pairs: ``pair_boxes`` of the bag pairs; gt ``Tensor[P]``."""
    padded, _, valid = pad_targets(targets, pairs.pred.device)
    ious = pairwise_iou(pairs.pred.detach()[:, None], padded[pairs.image], valid[pairs.image])[:, 0]  # [P, G_max]
    iou_max = ious.amax(-1) if ious.numel() else pairs.giou_loss.detach() * 0
    inv = 1.0 / (1.0 - iou_max).clamp(min=eps)
    lo, hi = per_gt(inv, gt, num_gts, "amin")[gt], per_gt(inv, gt, num_gts, "amax")[gt]
    return 1.0 - (inv - lo + eps) / (hi - lo + eps), iou_max


# ----------------------------------------------------------------------------- costs and matching


def class_cost(
    log_p: Tensor, log1m_p: Tensor, gt_labels: Tensor, *, gamma: float = 0.0, alpha: float | None = None,
    all_classes: bool = True,
) -> Tensor:
    """Cost of each anchor for each GT's class, ``Tensor[B, A, G]`` float32: the (focal) binary
    cross-entropy of the anchor's class probabilities p against the GT's one-hot class target,
    summed over the C classes (OTA: focal, alpha 0.25, gamma 2; SimOTA: BCE on its score):

        sum_c L(p_c, [c = label]) = L+(p_label) - L-(p_label) + sum_c L-(p_c)
        L+(p) = -alpha (1 - p)^gamma ln p,   L-(p) = -(1 - alpha) p^gamma ln(1 - p)

    alpha None weighs both terms 1 (gamma 0 and alpha None: plain BCE). ``all_classes=False``
    drops the last sum, the same for every GT of an anchor (Deformable DETR's matcher). log_p,
    log1m_p ``Tensor[B, A, C]``: ln p and ln(1 - p) of whatever score the method ranks by
    (``losses.joint_log_scores`` for the joint score), computed stably from logits; gt_labels
    ``Tensor[B, G]`` long (padded GTs: any class, mask them after).
    """
    log_p, log1m_p = log_p.float(), log1m_p.float()
    b, a, _ = log_p.shape
    w_pos, w_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    p = log_p.exp()
    neg = -w_neg * p.pow(gamma) * log1m_p  # [B, A, C]
    labels = gt_labels[:, None, :].expand(b, a, gt_labels.shape[1])
    lp, p_l = log_p.gather(2, labels), p.gather(2, labels)
    cost = -w_pos * (1.0 - p_l).pow(gamma) * lp - neg.gather(2, labels)
    return cost + neg.sum(-1, keepdim=True) if all_classes else cost


def pairwise_iou(boxes: Tensor, gt_boxes: Tensor, gt_valid: Tensor | None = None, fill: float = 0.0) -> Tensor:
    """IoU of every box with every GT of its image, ``Tensor[..., A, G]``: boxes ``Tensor[..., A,
    4]`` (e.g. the predicted boxes ``Tensor[B, A, 4]``), gt_boxes ``Tensor[..., G, 4]`` xyxy;
    padded GTs (``gt_valid`` ``Tensor[..., G]`` False) get ``fill``. Dense: ``[..., A, G]``."""
    iou = aligned_iou(boxes[..., :, None, :], gt_boxes[..., None, :, :])
    return iou if gt_valid is None else torch.where(gt_valid[..., None, :], iou, fill)


def dynamic_k(ious: Tensor, q: int) -> Tensor:
    """OTA's and SimOTA's number of positives per GT, ``Tensor[..., G]`` long: the sum of its
    ``q`` largest IoUs (20 in OTA, 10 in SimOTA; at most A), floored, at least 1. ious
    ``Tensor[..., A, G]``, 0 where an anchor is no candidate."""
    if q < 1:
        raise ValueError(f"q must be >= 1, got {q}")
    top = ious.topk(min(q, ious.shape[-2]), dim=-2).values
    return top.sum(-2).long().clamp(min=1)


def smallest_k(cost: Tensor, k: Tensor) -> Tensor:
    """Per GT column, whether the anchor is among the ``k`` cheapest, ``Tensor[..., A, G]`` bool
    (ties: the lower anchor index first): cost ``Tensor[..., A, G]``, k ``Tensor[..., G]``. One
    sort for every GT at once, not a top-k per GT."""
    order = cost.argsort(dim=-2, stable=True)
    position = torch.arange(cost.shape[-2], device=cost.device).view(-1, 1).expand_as(order)
    rank = torch.empty_like(order).scatter_(-2, order, position.contiguous())
    return rank < k[..., None, :]


def one_gt_per_anchor(claims: Tensor, key: Tensor, *, largest: bool) -> Tensor:
    """An anchor claimed by several GTs keeps one: the claim with the largest (``largest``) or
    smallest key. claims ``Tensor[..., A, G]`` bool, key ``Tensor[..., A, G]`` (IoU: ATSS, TOOD;
    area: FCOS; cost: SimOTA) -> the kept GT per anchor ``Tensor[..., A]`` long, -1 where no GT
    claims it (every anchor when there are no GTs)."""
    if claims.shape[-1] == 0:
        return torch.full(claims.shape[:-1], -1, dtype=torch.long, device=claims.device)
    fill = float("-inf") if largest else float("inf")
    masked = torch.where(claims, key, fill)
    idx = masked.argmax(-1) if largest else masked.argmin(-1)
    return torch.where(claims.any(-1), idx, torch.full_like(idx, -1))


def sinkhorn(cost: Tensor, supply: Tensor, demand: Tensor, *, eps: float = 0.1, iters: int = 50) -> Tensor:
    """Entropy-regularised optimal transport plan ``pi`` ``Tensor[..., R, A]`` (Cuturi, NeurIPS
    2013): min <pi, cost> - eps H(pi) with row sums ``supply`` ``Tensor[..., R]`` and column sums
    ``demand`` ``Tensor[..., A]``, by ``iters`` log-domain Sinkhorn-Knopp updates (rows, then
    columns, each from the current potentials; OTA's released solver: eps 0.1, 50 iterations, no
    convergence test, ``ln(x + 1e-8)`` of the marginals, so a zero supply is a tiny one). float32;
    cost ``Tensor[..., R, A]`` finite."""
    cost = cost.float()
    log_mu, log_nu = torch.log(supply.float() + 1e-8), torch.log(demand.float() + 1e-8)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = eps * (log_mu - torch.logsumexp((u[..., :, None] + v[..., None, :] - cost) / eps, dim=-1)) + u
        v = eps * (log_nu - torch.logsumexp((u[..., :, None] + v[..., None, :] - cost) / eps, dim=-2)) + v
    return torch.exp((u[..., :, None] + v[..., None, :] - cost) / eps)


# ----------------------------------------------------------------------------- ATSS and hard assignments


def anchor_boxes(anchors: Anchors, anchor_scale: float) -> Tensor:
    """One square box of side ``anchor_scale * stride`` per point, ``Tensor[A, 4]`` xyxy pixels."""
    half = (anchors.strides * anchor_scale / 2)[:, None]
    return torch.cat([anchors.points - half, anchors.points + half], dim=-1)


class ATSSMatch(NamedTuple):
    """matched ``Tensor[B, A]`` long (-1 = background); threshold ``Tensor[B, G]`` t_g;
    candidates ``Tensor[B, K, G]`` anchor indices of C_g (K = sum over levels of min(topk, A_l));
    candidate_iou ``Tensor[B, K, G]``. All without gradient."""

    matched: Tensor
    threshold: Tensor
    candidates: Tensor
    candidate_iou: Tensor


@torch.no_grad()
def atss_match(
    anchors: Anchors, gt_boxes: Tensor, gt_valid: Tensor, *, topk: int = 9, anchor_scale: float = 8.0
) -> ATSSMatch:
    """ATSS assignment of a batch (Zhang et al., "Bridging the Gap Between Anchor-based and
    Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020, Alg. 1; steps in
    ``dwlab.assign.atss``'s docstring). gt_boxes ``Tensor[B, G, 4]`` xyxy; gt_valid ``Tensor[B, G]``.

    Dense over ``[B, A, G]`` (centre distances, then the IoU matrix of the positives), like the
    released code; the only Python loop is over the FPN levels.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    b, g = gt_valid.shape
    a, device = len(anchors), gt_boxes.device
    if g == 0 or a == 0:
        empty = torch.zeros(b, 0, g, dtype=torch.long, device=device)
        return ATSSMatch(
            torch.full((b, a), -1, dtype=torch.long, device=device),
            torch.zeros(b, g, device=device), empty, empty.float(),
        )  # fmt: skip
    boxes = anchor_boxes(anchors, anchor_scale)  # [A, 4]
    centres = box_centers(gt_boxes)  # [B, G, 2]
    dist = (anchors.points[None, :, None, :] - centres[:, None, :, :]).pow(2).sum(-1)  # [B, A, G]
    # Alg. 1, lines 3-6: the k nearest anchors of every level
    candidates, start = [], 0
    for size in anchors.level_sizes:
        k = min(topk, size)
        if k > 0:
            nearest = dist[:, start : start + size].topk(k, dim=1, largest=False).indices  # [B, k, G]
            candidates.append(nearest + start)
        start += size
    cand = torch.cat(candidates, dim=1)  # [B, K, G]
    num_cand = cand.shape[1]
    # line 7: IoU of the candidates' anchor boxes with g
    cand_iou = aligned_iou(
        boxes[cand.reshape(-1)], gt_boxes[:, None].expand(b, num_cand, g, 4).reshape(-1, 4)
    ).reshape(b, num_cand, g)
    # lines 8-10: t_g = m_g + v_g
    std = cand_iou.std(dim=1) if num_cand > 1 else torch.zeros_like(cand_iou[:, 0])
    threshold = cand_iou.mean(dim=1) + std  # [B, G]
    # line 11: IoU >= t_g and centre inside g
    inside = points_inside(anchors.points[cand], gt_boxes[:, None])  # [B, K, G]
    pos = (cand_iou >= threshold[:, None]) & inside & gt_valid[:, None]
    # Alg. 1's output: several GTs, the highest IoU wins (a candidate appears once per GT column)
    claims = torch.zeros(b, a, g, dtype=torch.bool, device=device).scatter_(1, cand, pos)
    iou = torch.zeros(b, a, g, device=device).scatter_(1, cand, cand_iou)
    return ATSSMatch(one_gt_per_anchor(claims, iou, largest=True), threshold, cand, cand_iou)


@torch.no_grad()
def fcos_match(
    anchors: Anchors, gt_boxes: Tensor, gt_valid: Tensor, *, center_radius: float, size_ranges: list[float]
) -> Tensor:
    """FCOS's assignment (``dwlab.assign.fcos``'s docstring: centre sampling within
    ``center_radius`` strides, per-level size ranges closed at both ends, the smallest GT):
    the matched GT index per anchor, ``Tensor[B, A]`` long, -1 = background (FCOS, GFLv2's
    FCOS sampling). gt_boxes ``Tensor[B, G, 4]`` xyxy; gt_valid ``Tensor[B, G]``.
    """
    b, g = gt_valid.shape
    if g == 0:
        return torch.full((b, len(anchors)), -1, dtype=torch.long, device=gt_boxes.device)
    points = anchors.points[None, :, None, :]  # [1, A, 1, 2]
    boxes = gt_boxes[:, None]  # [B, 1, G, 4]
    dist = boxes_to_distances(points, boxes)  # [B, A, G, 4]
    inside_box = dist.min(-1).values > 0
    # (i) center sampling: the point is inside the radius*stride square around g's centre, within g
    in_center = centre_region(points, anchors.strides[None, :, None], boxes, center_radius)
    # (ii) the level's size range
    bounds = torch.tensor(size_ranges, device=gt_boxes.device)
    lo, hi = bounds[anchors.levels][None, :, None], bounds[anchors.levels + 1][None, :, None]
    max_dist = dist.max(-1).values
    in_range = (max_dist >= lo) & (max_dist <= hi)
    match = inside_box & in_center & in_range & gt_valid[:, None, :]
    # several GTs: the one of smallest area
    area = ((gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1]))[:, None, :]
    return one_gt_per_anchor(match, area.expand_as(match), largest=False)


class Positives(NamedTuple):
    """The P positive (anchor, GT) pairs of a hard assignment, images together.

    image, anchor, gt (index into the image's GTs), label: ``Tensor[P]`` long;
    gt_boxes ``Tensor[P, 4]``; pred_boxes ``Tensor[P, 4]`` the decoded predictions, with
    gradient; iou ``Tensor[P]`` IoU(pred_boxes, gt_boxes), without gradient.
    """

    image: Tensor
    anchor: Tensor
    gt: Tensor
    label: Tensor
    gt_boxes: Tensor
    pred_boxes: Tensor
    iou: Tensor

    def weighted_giou(self, weight: Tensor) -> Tensor:
        """``sum_p weight[p] * (1 - GIoU(pred_boxes[p], gt_boxes[p]))``, with gradient through
        the predictions; weight ``Tensor[P]``. The box term of ATSS, GFL, VFL and TOOD."""
        return (weight * generalized_box_iou_loss(self.pred_boxes, self.gt_boxes, reduction="none")).sum()


def positives(outputs: HeadOutputs, matched: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> Positives:
    """Pairs of ``matched`` ``Tensor[B, A]`` (-1 = background); gt_boxes ``Tensor[B, G, 4]``,
    gt_labels ``Tensor[B, G]`` as padded by ``pad_targets``."""
    image, anchor = (matched >= 0).nonzero(as_tuple=True)
    gt = matched[image, anchor]
    boxes = gt_boxes[image, gt]
    pred = outputs.boxes()[image, anchor].float()
    with torch.no_grad():
        iou = aligned_iou(pred.detach(), boxes)
    return Positives(image, anchor, gt, gt_labels[image, gt], boxes, pred, iou)


def atss_positives(
    outputs: HeadOutputs, targets: list[Target], num_classes: int, *, topk: int, anchor_scale: float
) -> tuple[ATSSMatch, Positives]:
    """The inputs checked, ATSS's match of the batch (no gradient) and its positive pairs (the
    predicted boxes with gradient)."""
    check_outputs(outputs, targets, num_classes)
    gt_boxes, gt_labels, gt_valid = pad_targets(targets, outputs.cls_logits.device)
    m = atss_match(outputs.anchors, gt_boxes, gt_valid, topk=topk, anchor_scale=anchor_scale)
    return m, positives(outputs, m.matched, gt_boxes, gt_labels)


def class_target(shape: torch.Size, pos: Positives, values: Tensor) -> Tensor:
    """``Tensor[B, A, C]`` of zeros with ``values`` ``Tensor[P]`` at each positive's (image,
    anchor, label) entry; a new tensor, without gradient."""
    target = torch.zeros(shape, device=values.device)
    target[pos.image, pos.anchor, pos.label] = values.detach().float()
    return target


@dataclass
class QualityAssignment:
    """A hard assignment with a soft target per positive, without gradient (except
    ``pos.pred_boxes``). match: the ATSS (or task-aligned) match; pos: the positive pairs;
    quality ``Tensor[P]`` the classification target of each positive; box_weight ``Tensor[P]``."""

    matched: Tensor
    pos: Positives
    quality: Tensor
    box_weight: Tensor
    match: ATSSMatch | None = None

    def per_positive_terms(self, loss_cls_sum: Tensor) -> dict[str, Tensor]:
        """``loss_cls``: ``loss_cls_sum`` over the number of positives; ``loss_box``: the
        box-weighted GIoU loss over the sum of the box weights (each normaliser averaged over
        workers, at least 1: ``dwlab.distributed.normaliser``)."""
        device = loss_cls_sum.device
        return {
            "loss_cls": loss_cls_sum / normaliser(float(self.pos.image.numel()), device),
            "loss_box": self.pos.weighted_giou(self.box_weight) / normaliser(self.box_weight.sum(), device),
        }


def iou_branch_terms(outputs: HeadOutputs, pos: Positives, *, focal_alpha: float, focal_gamma: float) -> dict[str, Tensor]:
    """The loss of a hard assignment with an IoU-prediction branch on the centerness branch (OTA,
    PAA released): ``loss_cls`` focal loss of every anchor's class logits over the number of
    positives; ``loss_box`` the IoU-weighted GIoU loss over the sum of the positives' IoU;
    ``loss_obj`` BCE of the positives' centerness logits against their IoU, over the number of
    positives (normalisers averaged over workers, at least 1). IoU: ``pos.iou``, no gradient."""
    device = outputs.cls_logits.device
    num_pos = normaliser(float(pos.image.numel()), device)  # known on the host after nonzero
    cls_target = class_target(outputs.cls_logits.shape, pos, torch.ones_like(pos.iou))
    loss_cls = sigmoid_focal_loss(
        outputs.cls_logits.float(), cls_target, alpha=focal_alpha, gamma=focal_gamma, reduction="sum"
    )
    ctr = outputs.centerness[pos.image, pos.anchor].float()
    return {
        "loss_cls": loss_cls / num_pos,
        "loss_box": pos.weighted_giou(pos.iou) / normaliser(pos.iou.sum(), device),
        "loss_obj": F.binary_cross_entropy_with_logits(ctr, pos.iou, reduction="sum") / num_pos,
    }


def entry_minima(keys: Tensor, *values: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The distinct ``keys`` ``Tensor[E]`` (sorted) of P pairs' ``keys`` ``Tensor[P]`` and, for
    each ``Tensor[P]`` of ``values``, its smallest over the pairs sharing a key, ``Tensor[E]``."""
    entry, inverse = torch.unique(keys, return_inverse=True)
    inf = torch.full((entry.shape[0],), float("inf"), device=keys.device)
    return entry, [inf.scatter_reduce(0, inverse, v, "amin") for v in values]



# ----------------------------------------------------------------------------- visualisation


@torch.no_grad()
def focus_maps(outputs: HeadOutputs, targets: list[Target], matched: Tensor, scores: Tensor) -> list[dict[str, Tensor]]:
    """Per image, ``Tensor[A]`` maps against each anchor's "focus" GT: its matched GT when it is
    positive, otherwise the GT its predicted box overlaps most (``DWAssigner.weights``'s
    convention). Keys: ``score`` (``scores`` ``Tensor[B, A, C]`` on the focus GT's class; the
    highest class without GTs), ``iou``, ``is_pos``, ``focus_gt`` (-1 without GTs), ``cls``.
    Dense ``[A, G_image]`` IoU: visualisation only."""
    boxes = outputs.boxes().float()
    num_anchors, device = boxes.shape[1], boxes.device
    rows = torch.arange(num_anchors, device=device)
    maps = []
    for i, t in enumerate(targets):
        m = matched[i]
        if t.labels.numel() == 0:
            cls = scores[i].argmax(-1)
            focus, iou = torch.full_like(rows, -1), torch.zeros(num_anchors, device=device)
        else:
            ious = box_iou(boxes[i], t.boxes.reshape(-1, 4).to(boxes))  # [A, G_image]
            focus = torch.where(m >= 0, m, ious.argmax(1))
            cls, iou = t.labels.to(device)[focus], ious[rows, focus]
        maps.append(dict(score=scores[i, rows, cls].float(), iou=iou, is_pos=m >= 0, focus_gt=focus, cls=cls))
    return maps


class WeightMaps:
    """The ``weight_maps`` hook (``base.py``) for an assigner with a ``weights(outputs, targets)``
    method returning, per image, ``{"score", "iou", "pos", "neg": Tensor[A]}`` maps (and any
    other keys, left out of the plot)."""

    def weight_maps(self, outputs: HeadOutputs, targets: list[Target], image: int = 0) -> dict[str, dict[str, Tensor]]:
        """``weights`` of one image as ``{"P3": {"score", "iou", "pos", "neg": Tensor[H, W]}, ...}``,
        the input of ``dwlab.plots.plot_weight_maps``."""
        return level_maps(self.weights(outputs, targets)[image], outputs.anchors)


def level_maps(per_anchor: dict[str, Tensor], anchors: Anchors) -> dict[str, dict[str, Tensor]]:
    """``{"score", "iou", "pos", "neg": Tensor[A]}`` -> ``{"P3": {...: Tensor[H, W]}, ...}``, the
    input of ``dwlab.plots.plot_weight_maps``."""
    out: dict[str, dict[str, Tensor]] = {}
    for key in ("score", "iou", "pos", "neg"):
        grids = split_levels(per_anchor[key].float(), anchors.points, anchors.strides, anchors.levels)
        for level, grid in enumerate(grids):
            out.setdefault(f"P{level + 3}", {})[key] = grid.cpu()
    return out
