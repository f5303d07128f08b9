"""GFL (Li, Wang, Wu, Chen, Hu, Li, Tang, Yang, "Generalized Focal Loss: Learning Qualified and
Distributed Bounding Boxes for Dense Object Detection", NeurIPS 2020): ATSS assignment and the
Quality Focal Loss (``dwlab.losses.quality_focal_loss``).

- Assignment: ``common.atss_match`` (top-9 per level, IoU threshold mean + std, centre inside GT),
  anchor boxes of side 8 * stride, as GFL's configuration.
- Classification: QFL (GFL §3, "Quality Focal Loss") with the soft target y = IoU(predicted box,
  GT) on the positive's GT class and y = 0 everywhere else, beta 2:
      QFL(s, y) = -|y - s|^beta * ((1 - y) ln(1 - s) + y ln s)
  summed over every (image, anchor, class) and divided by the number of positives.
- Box: GIoU loss of the positives (lambda_0 = 2), weighted by the predicted quality score (the
  largest score over classes, detached) and divided by the sum of those weights (released code).

Which score QFL trains (decision): GFL has no centerness branch; its classification score *is*
the quality score. The shared dwlab detector keeps its centerness logit and ranks detections by
``s = sigmoid(cls) * sigmoid(ctr)`` (``HeadOutputs.scores``), so QFL trains that joint score s,
as DW does (paper §3.5): train and test use the same score, and the centerness logit is trained
only through s (no separate centerness target).

Left out: the Distribution Focal Loss branch of GFL (the general distribution of box
boundaries, lambda_1 = 1/4) needs a different regression head; dwlab's head regresses (l, t, r,
b) directly, so only QFL and the GIoU term are implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import QualityAssignment, WeightMaps, atss_positives, class_target, focus_maps
from dwlab.data.target import Target
from dwlab.losses import qfl_weights, quality_focal_loss
from dwlab.models.outputs import HeadOutputs


class GFLAssigner(WeightMaps, LabelAssigner):
    """ATSS assignment + QFL on the joint score + quality-weighted GIoU (no DFL).

    Returns ``{"loss_cls", "loss_box"}``, unweighted; ``loss_weights`` gives ``loss_box`` the
    weight ``box_weight``.
    """

    def __init__(
        self, num_classes: int, *, topk: int = 9, anchor_scale: float = 8.0, beta: float = 2.0, box_weight: float = 2.0
    ) -> None:
        check_positive(num_classes=num_classes, topk=topk, anchor_scale=anchor_scale)
        self.num_classes, self.topk, self.anchor_scale = num_classes, topk, anchor_scale
        self.beta, self.box_weight = beta, box_weight
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight}

    def assign(self, outputs: HeadOutputs, targets: list[Target]) -> QualityAssignment:
        """ATSS positives; quality = IoU of the predicted box with its GT; box weight = the
        anchor's largest joint score over classes (released code)."""
        m, pos = atss_positives(outputs, targets, self.num_classes, topk=self.topk, anchor_scale=self.anchor_scale)
        with torch.no_grad():
            box_weight = outputs.scores()[pos.image, pos.anchor].detach().float().amax(-1)
        return QualityAssignment(m.matched, pos, pos.iou, box_weight, m)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        asg = self.assign(outputs, targets)
        target = class_target(outputs.cls_logits.shape, asg.pos, asg.quality)
        loss_cls = quality_focal_loss(
            outputs.cls_logits, outputs.centerness.unsqueeze(-1), target, beta=self.beta, reduction="sum"
        )
        return asg.per_positive_terms(loss_cls)

    @torch.no_grad()
    def weights(self, outputs: HeadOutputs, targets: list[Target]) -> list[dict[str, Tensor]]:
        """Per-image ``Tensor[A]`` maps: positives ``table1.gfl(s, IoU)``; others pos 0, neg s^beta."""
        asg = self.assign(outputs, targets)
        maps = focus_maps(outputs, targets, asg.matched, outputs.scores())
        for d in maps:
            s, is_pos = d["score"], d["is_pos"]
            w_pos, w_neg = qfl_weights(s, torch.where(is_pos, d["iou"], torch.zeros_like(s)), self.beta)
            d["pos"], d["neg"] = w_pos, w_neg  # on negatives (target 0): 0 and s^beta
        return maps
