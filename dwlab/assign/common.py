"""Non-loss pieces shared by the assigners; with ``dwlab.losses``, the only code method modules
share (no method module imports another).

Notation as in ``dwlab.models.outputs``: B images, A anchor points, C classes, G GTs per image
(padded to the batch's largest, see ``pad_targets``). Boxes are xyxy pixels.

- ``check_outputs``: the invariants every assigner asserts at entry.
- ``pad_targets`` / ``concat_targets``: a batch's GTs padded to ``[B, G]`` or concatenated.
- ``centerness_target``: FCOS's centerness target (FCOS, ATSS, TOOD's warm-up).
- ``anchor_boxes`` / ``ATSSMatch`` / ``atss_match``: ATSS's assignment (ATSS, GFL, VFL, TOOD's
  warm-up).
- ``Positives`` / ``positives``: the pairs of a hard assignment (``matched`` ``Tensor[B, A]``,
  -1 = background), with the predicted boxes (gradient) and their IoU with the GT (no gradient).
- ``atss_positives``: inputs checked, ATSS's match and its positives (GFL, VFL, TOOD's warm-up).
- ``QualityAssignment``: a hard assignment with a soft target per positive (GFL, VFL, TOOD), and
  ``per_positive_terms``, its loss terms normalised by the positives (GFL, VFL, TOOD's warm-up).
- ``entry_minima``: the smallest value per (image, anchor, class) entry (DW, AutoAssign).
- ``focus_maps`` / ``level_maps``: per-anchor score / IoU / pos / neg maps for
  ``dwlab plot weights`` (visualisation only: dense per-image IoU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss

from dwlab.assign.bags import split_levels
from dwlab.box_ops import aligned_iou, box_centers
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


def points_inside(points: Tensor, boxes: Tensor, eps: float = INSIDE_EPS) -> Tensor:
    """``min(l, t, r, b) > eps`` for broadcast ``[..., 2]`` points and ``[..., 4]`` xyxy boxes."""
    x, y = points[..., 0], points[..., 1]
    return (
        (x - boxes[..., 0] > eps) & (y - boxes[..., 1] > eps) & (boxes[..., 2] - x > eps) & (boxes[..., 3] - y > eps)
    )


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
    # several GTs: the highest IoU wins (a candidate appears once per GT column)
    overlap = torch.full((b, a, g), -1.0, device=device)
    overlap.scatter_(1, cand, torch.where(pos, cand_iou, torch.full_like(cand_iou, -1.0)))
    best, idx = overlap.max(-1)
    matched = torch.where(best >= 0, idx, torch.full_like(idx, -1))
    return ATSSMatch(matched, threshold, cand, cand_iou)


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


def level_maps(per_anchor: dict[str, Tensor], anchors: Anchors) -> dict[str, dict[str, Tensor]]:
    """``{"score", "iou", "pos", "neg": Tensor[A]}`` -> ``{"P3": {...: Tensor[H, W]}, ...}``, the
    input of ``dwlab.plots.plot_weight_maps``."""
    out: dict[str, dict[str, Tensor]] = {}
    for key in ("score", "iou", "pos", "neg"):
        grids = split_levels(per_anchor[key].float(), anchors.points, anchors.strides, anchors.levels)
        for level, grid in enumerate(grids):
            out.setdefault(f"P{level + 3}", {})[key] = grid.cpu()
    return out
