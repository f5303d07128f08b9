"""VarifocalNet's loss (Zhang, Wang, Dayoub, Sünderhauf, "VarifocalNet: An IoU-aware Dense Object
Detector", CVPR 2021) on ATSS assignment.

- Assignment: ``common.atss_match`` (top-9 per level, mean + std IoU threshold, centre inside GT),
  as VFNet's ATSS configuration.
- IoU-aware classification target (VFNet §3): q = IoU(predicted box, GT) on a positive's GT
  class, q = 0 on every other (image, anchor, class) entry.
- Varifocal Loss (VFNet Eq. 2, ``dwlab.losses.varifocal_loss``), alpha 0.75, gamma 2:
      VFL(s, q) = -q (q ln s + (1 - q) ln(1 - s))   if q > 0
                = -alpha s^gamma ln(1 - s)           if q = 0
  summed and divided by the number of positives. A positive's IoU is clamped to >= 1e-6 so that
  it stays on the q > 0 branch (released code).
- Box: GIoU loss of the positives weighted by q, divided by the sum of q (released code), weight
  2.0 (VFNet's lambda for the box whose IoU is the target; dwlab has one box stage, no star-shaped
  refinement).

Score convention: as ``gfl``, VFL trains the joint score s = sigmoid(cls) * sigmoid(ctr) that
inference ranks by; the centerness logit has no target of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import QualityAssignment, WeightMaps, atss_positives, class_target, focus_maps
from dwlab.data.target import Target
from dwlab.losses import varifocal_loss, vfl_weights
from dwlab.models.outputs import HeadOutputs

MIN_IOU = 1e-6  # positives' IoU target floor (released code), keeps them on the q > 0 branch


class VFLAssigner(WeightMaps, LabelAssigner):
    """ATSS assignment + Varifocal Loss on the joint score + IoU-weighted GIoU.

    Returns ``{"loss_cls", "loss_box"}``, unweighted; ``loss_weights`` gives ``loss_box`` the
    weight ``box_weight``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        topk: int = 9,
        anchor_scale: float = 8.0,
        alpha: float = 0.75,
        gamma: float = 2.0,
        box_weight: float = 2.0,
    ) -> None:
        check_positive(num_classes=num_classes, topk=topk, anchor_scale=anchor_scale)
        self.num_classes, self.topk, self.anchor_scale = num_classes, topk, anchor_scale
        self.alpha, self.gamma, self.box_weight = alpha, gamma, box_weight
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight}

    def assign(self, outputs: HeadOutputs, targets: list[Target]) -> QualityAssignment:
        """ATSS positives; quality q = IoU of the predicted box with its GT (>= 1e-6), also the box weight."""
        m, pos = atss_positives(outputs, targets, self.num_classes, topk=self.topk, anchor_scale=self.anchor_scale)
        q = pos.iou.clamp(min=MIN_IOU)
        return QualityAssignment(m.matched, pos, q, q, m)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        asg = self.assign(outputs, targets)
        target = class_target(outputs.cls_logits.shape, asg.pos, asg.quality)
        loss_cls = varifocal_loss(
            outputs.cls_logits, outputs.centerness.unsqueeze(-1), target,
            alpha=self.alpha, gamma=self.gamma, reduction="sum",
        )  # fmt: skip
        return asg.per_positive_terms(loss_cls)

    @torch.no_grad()
    def weights(self, outputs: HeadOutputs, targets: list[Target]) -> list[dict[str, Tensor]]:
        """Per-image ``Tensor[A]`` maps: positives ``losses.vfl_weights`` (q^2, q (1 - q)); others pos 0,
        neg alpha s^gamma."""
        asg = self.assign(outputs, targets)
        maps = focus_maps(outputs, targets, asg.matched, outputs.scores())
        for d in maps:
            s, is_pos = d["score"], d["is_pos"]
            w_pos, w_neg = vfl_weights(d["iou"].clamp(min=MIN_IOU))
            d["pos"] = torch.where(is_pos, w_pos, torch.zeros_like(s))
            d["neg"] = torch.where(is_pos, w_neg, self.alpha * s.pow(self.gamma))
        return maps
