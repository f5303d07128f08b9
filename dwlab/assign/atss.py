"""ATSS label assignment (Zhang, Chi, Yao, Lei, Li, "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020) and its loss.

ATSS ranks anchor *boxes*; the FCOS detector has points. Each point gets one square anchor box
of side ``anchor_scale * stride`` centred on it (anchor_scale 8, one scale and one aspect ratio:
the ATSS paper's setting). Then, per GT g (paper Alg. 1):

1. on each FPN level, the ``topk`` (9) anchors whose centre is nearest to g's centre (L2) are
   candidates C_g;
2. t_g = mean + std of the IoUs of C_g's anchor boxes with g (std unbiased, as the released
   code's ``torch.std``);
3. a candidate with IoU >= t_g whose centre lies inside g (by more than 0.01 px) is positive;
4. an anchor positive for several GTs takes the one with the highest IoU.

Loss (released ATSS code): focal loss on the class logits (alpha 0.25, gamma 2) over the number
of positives; GIoU loss of the predicted boxes weighted by the centerness targets and divided by
their sum (weight 2.0); BCE of the centerness logits against the centerness targets
(``common.centerness_target`` from the anchor point) over the number of positives. The matched
GT index per anchor, ``Tensor[B, A]`` (-1 = background), is the boundary between assignment
and loss, as in ``common.fcos_match``. The matching itself, ``common.atss_match``, is shared with
GFL, VFL and TOOD's warm-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    WeightMaps,
    ATSSMatch,
    atss_match,
    centerness_target,
    check_outputs,
    focus_maps,
        pad_targets,
    positives,
)
from dwlab.box_ops import boxes_to_distances
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.models.outputs import HeadOutputs


class ATSSAssigner(WeightMaps, LabelAssigner):
    """ATSS assignment with the FCOS-style loss of the ATSS paper (focal, GIoU, centerness).

    Returns ``{"loss_cls", "loss_box", "loss_ctr"}``, unweighted; ``loss_weights`` gives
    ``loss_box`` the weight ``box_weight``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        topk: int = 9,
        anchor_scale: float = 8.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_weight: float = 2.0,
    ) -> None:
        check_positive(num_classes=num_classes, topk=topk, anchor_scale=anchor_scale)
        self.num_classes = num_classes
        self.topk, self.anchor_scale = topk, anchor_scale
        self.focal_alpha, self.focal_gamma, self.box_weight = focal_alpha, focal_gamma, box_weight
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight, "loss_ctr": 1.0}

    @torch.no_grad()
    def match(self, outputs: HeadOutputs, targets: list[Target]) -> tuple[ATSSMatch, Tensor, Tensor]:
        """``(ATSSMatch, gt_boxes Tensor[B, G, 4], gt_labels Tensor[B, G])``, without gradient."""
        check_outputs(outputs, targets, self.num_classes)
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, outputs.cls_logits.device)
        m = atss_match(outputs.anchors, gt_boxes, gt_valid, topk=self.topk, anchor_scale=self.anchor_scale)
        return m, gt_boxes, gt_labels

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        m, gt_boxes, gt_labels = self.match(outputs, targets)
        device = outputs.cls_logits.device
        pos = positives(outputs, m.matched, gt_boxes, gt_labels)
        num_pos = normaliser(float(pos.image.numel()), device)

        cls_target = torch.zeros_like(outputs.cls_logits, dtype=torch.float32)
        cls_target[pos.image, pos.anchor, pos.label] = 1.0
        loss_cls = sigmoid_focal_loss(
            outputs.cls_logits.float(), cls_target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        with torch.no_grad():
            ctr_target = centerness_target(boxes_to_distances(outputs.anchors.points[pos.anchor], pos.gt_boxes))
        loss_box = pos.weighted_giou(ctr_target)
        loss_ctr = F.binary_cross_entropy_with_logits(
            outputs.centerness[pos.image, pos.anchor].float(), ctr_target, reduction="sum"
        )
        return {
            "loss_cls": loss_cls / num_pos,
            "loss_box": loss_box / normaliser(ctr_target.sum(), device),
            "loss_ctr": loss_ctr / num_pos,
        }

    # --------------------------------------------------------------------- visualisation

    @torch.no_grad()
    def weights(self, outputs: HeadOutputs, targets: list[Target]) -> list[dict[str, Tensor]]:
        """Per-image ``Tensor[A]`` maps (``common.focus_maps``): ``score`` is sigmoid(cls), the
        score ATSS trains; ``pos`` = alpha (1 - p)^gamma on positives (focal loss on -ln p), ``neg``
        = (1 - alpha) p^gamma on the others (on -ln(1 - p))."""
        m, _, _ = self.match(outputs, targets)
        maps = focus_maps(outputs, targets, m.matched, torch.sigmoid(outputs.cls_logits.float()))
        for d in maps:
            p, is_pos = d["score"], d["is_pos"]
            d["pos"] = torch.where(is_pos, self.focal_alpha * (1 - p).pow(self.focal_gamma), torch.zeros_like(p))
            d["neg"] = torch.where(is_pos, torch.zeros_like(p), (1 - self.focal_alpha) * p.pow(self.focal_gamma))
        return maps
