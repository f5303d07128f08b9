"""What the detector returns and what the assigners read: anchor points and raw head outputs.

Notation: B images, A anchor points over all FPN levels (P3 first), C classes, G GTs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dwlab.box_ops import distances_to_boxes


@dataclass(frozen=True)
class Anchors:
    """Anchor points of one padded batch, shared by its images.

    points: ``Tensor[A, 2]`` (x, y) in pixels, ``stride * (i + offset)``.
    strides: ``Tensor[A]`` stride of each point's level, float.
    levels: ``Tensor[A]`` level index (0 = P3), long.
    level_sizes: number of points per level, P3 first; sums to A.
    recipe: what ``grid`` made the points from (feature sizes, strides, offset, device), so
        that equal recipes mean equal points (a cache key: ``dwlab.assign.grid.anchor_layout``);
        None for points made otherwise.
    """

    points: Tensor
    strides: Tensor
    levels: Tensor
    level_sizes: tuple[int, ...]
    recipe: tuple | None = None

    @staticmethod
    def grid(
        feature_sizes: list[tuple[int, int]], strides: list[int], offset: float, device: torch.device
    ) -> Anchors:
        """Points of every level's (H, W) feature map, row-major, P3 first."""
        points, stride_list, levels = [], [], []
        for level, ((h, w), stride) in enumerate(zip(feature_sizes, strides)):
            ys = (torch.arange(h, device=device, dtype=torch.float32) + offset) * stride
            xs = (torch.arange(w, device=device, dtype=torch.float32) + offset) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
            stride_list.append(torch.full((h * w,), float(stride), device=device))
            levels.append(torch.full((h * w,), level, device=device, dtype=torch.long))
        return Anchors(
            points=torch.cat(points),
            strides=torch.cat(stride_list),
            levels=torch.cat(levels),
            level_sizes=tuple(h * w for h, w in feature_sizes),
            recipe=(tuple((int(h), int(w)) for h, w in feature_sizes), tuple(strides), float(offset), str(device)),
        )

    def __len__(self) -> int:
        return self.points.shape[0]


@dataclass
class HeadOutputs:
    """Raw per-anchor predictions of a batch, levels concatenated (P3 first).

    cls_logits: ``Tensor[B, A, C]`` classification logits.
    centerness: ``Tensor[B, A]`` centerness (quality) logits; with the head's ``dgqp`` option,
        GFLv2's distribution-guided quality logit.
    distances: ``Tensor[B, A, 4]`` (l, t, r, b) in pixels, >= 0; the refined ones when
        box refinement is on (paper Eq. 9-10); with a distribution head, its integral x stride.
    anchors: the batch's anchor points.
    distribution: with the head's ``reg_max`` n (GFL's general distribution), the logits
        ``Tensor[B, A, 4, n + 1]`` float32 over the bins ``0..n`` (stride units) of each side
        (l, t, r, b), from which ``distances`` were decoded; None without it.
    """

    cls_logits: Tensor
    centerness: Tensor
    distances: Tensor
    anchors: Anchors
    distribution: Tensor | None = None

    def boxes(self) -> Tensor:
        """Decoded boxes ``Tensor[B, A, 4]``, xyxy pixels."""
        return distances_to_boxes(self.anchors.points.unsqueeze(0), self.distances)

    def scores(self) -> Tensor:
        """Joint score ``Tensor[B, A, C]`` = sigmoid(cls) * sigmoid(centerness) (paper §3.5)."""
        return torch.sigmoid(self.cls_logits) * torch.sigmoid(self.centerness).unsqueeze(-1)
