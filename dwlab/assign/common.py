"""Pieces shared by the comparison assigners (ATSS, GFL, VFL, TOOD, AutoAssign).

Notation as in ``dwlab.models.outputs``: B images, A anchor points, C classes, G GTs per image
(padded to the batch's largest, see ``fcos.pad_targets``). Boxes are xyxy pixels.

- ``check_outputs``: the invariants every assigner asserts at entry.
- ``Positives`` / ``positives``: the pairs of a hard assignment (``matched`` ``Tensor[B, A]``,
  -1 = background), with the predicted boxes (gradient) and their IoU with the GT (no gradient).
- ``reduce``: the ``reduction`` argument of the loss functions.
- ``focus_maps`` / ``level_maps``: per-anchor score / IoU / pos / neg maps for
  ``dwlab plot weights`` (visualisation only: dense per-image IoU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss

from dwlab.assign.bags import split_levels
from dwlab.box_ops import aligned_iou
from dwlab.data.target import Target
from dwlab.models.outputs import Anchors, HeadOutputs

REDUCTIONS = ("none", "sum", "mean")
INSIDE_EPS = 0.01  # pixels: "centre inside GT" is min(l, t, r, b) > 0.01 (released ATSS / TOOD code)


def check_outputs(outputs: HeadOutputs, targets: list[Target], num_classes: int) -> None:
    b, a, c = outputs.cls_logits.shape
    assert c == num_classes, f"cls_logits has {c} classes, the assigner {num_classes}"
    assert outputs.centerness.shape == (b, a), outputs.centerness.shape
    assert outputs.distances.shape == (b, a, 4), outputs.distances.shape
    assert len(outputs.anchors) == a, (len(outputs.anchors), a)
    assert len(targets) == b, f"{len(targets)} targets for {b} images"
    for t in targets:
        assert t.boxes.reshape(-1, 4).shape[0] == t.labels.numel(), (t.boxes.shape, t.labels.shape)
    labels = torch.cat([t.labels.reshape(-1) for t in targets]) if targets else torch.zeros(0)
    assert labels.numel() == 0 or (0 <= int(labels.min()) and int(labels.max()) < num_classes), labels


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` ("none", "sum", "mean"; the mean of an empty tensor is 0)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    raise ValueError(f"unknown reduction {reduction!r} (expected one of {REDUCTIONS})")


def points_inside(points: Tensor, boxes: Tensor, eps: float = INSIDE_EPS) -> Tensor:
    """``min(l, t, r, b) > eps`` for broadcast ``[..., 2]`` points and ``[..., 4]`` xyxy boxes."""
    x, y = points[..., 0], points[..., 1]
    return (
        (x - boxes[..., 0] > eps) & (y - boxes[..., 1] > eps) & (boxes[..., 2] - x > eps) & (boxes[..., 3] - y > eps)
    )


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
    gt_labels ``Tensor[B, G]`` as padded by ``fcos.pad_targets``."""
    image, anchor = (matched >= 0).nonzero(as_tuple=True)
    gt = matched[image, anchor]
    boxes = gt_boxes[image, gt]
    pred = outputs.boxes()[image, anchor].float()
    with torch.no_grad():
        iou = aligned_iou(pred.detach(), boxes)
    return Positives(image, anchor, gt, gt_labels[image, gt], boxes, pred, iou)


def class_target(shape: torch.Size, pos: Positives, values: Tensor) -> Tensor:
    """``Tensor[B, A, C]`` of zeros with ``values`` ``Tensor[P]`` at each positive's (image,
    anchor, label) entry; a new tensor, without gradient."""
    target = torch.zeros(shape, device=values.device)
    target[pos.image, pos.anchor, pos.label] = values.detach().float()
    return target


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
