"""Hand-sized head outputs for the assigners' tests: anchor points placed by hand, predicted boxes
and scores given as probabilities, one GT."""

from __future__ import annotations

import torch

from dwlab.box_ops import boxes_to_distances
from dwlab.data.target import Target
from dwlab.models.outputs import Anchors, HeadOutputs

GT = [0.0, 0.0, 16.0, 16.0]


def anchors_of(levels: list[list[tuple[float, float]]], strides: list[float]) -> Anchors:
    """Anchors at arbitrary points, one list of (x, y) per level."""
    return Anchors(
        points=torch.tensor([p for level in levels for p in level], dtype=torch.float32),
        strides=torch.cat([torch.full((len(lv),), float(s)) for lv, s in zip(levels, strides)]),
        levels=torch.cat([torch.full((len(lv),), i, dtype=torch.long) for i, lv in enumerate(levels)]),
        level_sizes=tuple(len(lv) for lv in levels),
    )


def outputs_of(anchors: Anchors, boxes, scores, ctr_logit: float = 40.0) -> HeadOutputs:
    """One image: predicted boxes ``[A, 4]``, scores ``[A, C]`` (probabilities of sigmoid(cls));
    ctr_logit 40 makes sigmoid(ctr) = 1 in float32, so the joint score is sigmoid(cls)."""
    dist = boxes_to_distances(anchors.points, torch.tensor(boxes, dtype=torch.float32))
    return HeadOutputs(
        cls_logits=torch.logit(torch.tensor(scores, dtype=torch.float32))[None].requires_grad_(),
        centerness=torch.full((1, len(anchors)), ctr_logit).requires_grad_(),
        distances=dist[None].requires_grad_(),
        anchors=anchors,
    )


def one_gt(label: int = 0) -> list[Target]:
    """One image with the one GT box ``GT`` of class ``label``."""
    return [Target(torch.tensor([GT]), torch.tensor([label]))]
