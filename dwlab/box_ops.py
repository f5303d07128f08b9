"""Small pure box functions. Boxes are xyxy in pixels everywhere inside dwlab.

Pairwise functions (``Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M]``) come from torchvision;
the ones here are *aligned*: row i of the first argument against row i of the second, which
is what the sparse (anchor, GT) pair code needs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def distances_to_boxes(points: Tensor, distances: Tensor) -> Tensor:
    """(x, y) points ``Tensor[..., 2]`` and (l, t, r, b) ``Tensor[..., 4]`` -> xyxy ``Tensor[..., 4]``."""
    x, y = points.unbind(-1)
    l, t, r, b = distances.unbind(-1)
    return torch.stack([x - l, y - t, x + r, y + b], dim=-1)


def boxes_to_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """(x, y) ``Tensor[..., 2]`` and xyxy ``Tensor[..., 4]`` -> (l, t, r, b) ``Tensor[..., 4]``
    (negative where the point lies outside the box)."""
    x, y = points.unbind(-1)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1)


def aligned_iou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]``: xyxy ``Tensor[N, 4]`` twice -> ``Tensor[N]``.

    Leading dimensions broadcast: ``aligned_iou(p[:, :, None], g[:, None])`` with ``p``
    ``Tensor[B, N, 4]`` and ``g`` ``Tensor[B, M, 4]`` is the batched pairwise ``Tensor[B, N, M]``.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + eps)


def aligned_giou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalised IoU of ``a[i]`` with ``b[i]``: ``Tensor[N, 4]`` twice -> ``Tensor[N]`` in [-1, 1]."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    iou = inter / (union + eps)
    return iou - (hull - union) / (hull + eps)


def box_centers(boxes: Tensor) -> Tensor:
    """xyxy ``Tensor[..., 4]`` -> centres ``Tensor[..., 2]``."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO (x, y, w, h) ``Tensor[..., 4]`` -> xyxy."""
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """xyxy ``Tensor[..., 4]`` -> COCO (x, y, w, h)."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)
