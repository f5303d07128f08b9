"""FCOS label assignment (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection",
ICCV 2019, with the center sampling of FCOS-imprv) and its loss.

An anchor point is positive for GT g when
  (i)  it lies within ``center_radius * stride`` of g's centre (clipped to g's box), and
  (ii) its largest regression distance max(l, t, r, b) to g is inside its level's size range
       ``[lo, hi]``, closed at both ends (as MMDetection's FCOS);
among several such GTs it takes the one of smallest area. Loss: focal loss on the class score
(alpha 0.25, gamma 2), GIoU loss on positives' boxes, BCE on centerness targets
sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)); each summed and divided by the number of
positives (averaged over workers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import centerness_target, check_outputs, fcos_match, pad_targets
from dwlab.box_ops import boxes_to_distances
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.models.outputs import HeadOutputs


class FCOSAssigner(LabelAssigner):
    """FCOS's assignment (centre sampling, size ranges, smallest area) and loss (focal, GIoU,
    centerness BCE, each over the number of positives).

    Returns ``{"loss_cls", "loss_box", "loss_ctr"}``, unweighted, all weights 1.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        center_radius: float = 1.5,
        size_ranges: list[float] = (0.0, 64.0, 128.0, 256.0, 512.0, 1e8),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        check_positive(num_classes=num_classes, center_radius=center_radius)
        if len(size_ranges) != 6:
            raise ValueError(f"size_ranges needs 6 bounds for P3-P7, got {list(size_ranges)}")
        self.num_classes = num_classes
        self.center_radius = center_radius
        self.size_ranges = list(size_ranges)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_weights = {"loss_cls": 1.0, "loss_box": 1.0, "loss_ctr": 1.0}

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        check_outputs(outputs, targets, self.num_classes)
        device = outputs.cls_logits.device
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, device)
        matched = fcos_match(
            outputs.anchors, gt_boxes, gt_valid, center_radius=self.center_radius, size_ranges=self.size_ranges
        )  # [B, A]
        pos = matched >= 0
        batch_idx, anchor_idx = pos.nonzero(as_tuple=True)
        gt_idx = matched[batch_idx, anchor_idx]
        num_pos = normaliser(pos.sum(), device)

        cls_target = torch.zeros_like(outputs.cls_logits)
        cls_target[batch_idx, anchor_idx, gt_labels[batch_idx, gt_idx]] = 1.0
        loss_cls = sigmoid_focal_loss(
            outputs.cls_logits.float(), cls_target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )

        pos_boxes = outputs.boxes()[batch_idx, anchor_idx].float()
        target_boxes = gt_boxes[batch_idx, gt_idx]
        loss_box = generalized_box_iou_loss(pos_boxes, target_boxes, reduction="sum")
        ctr_target = centerness_target(boxes_to_distances(outputs.anchors.points[anchor_idx], target_boxes))
        loss_ctr = F.binary_cross_entropy_with_logits(
            outputs.centerness[batch_idx, anchor_idx].float(), ctr_target, reduction="sum"
        )
        return {"loss_cls": loss_cls / num_pos, "loss_box": loss_box / num_pos, "loss_ctr": loss_ctr / num_pos}
