"""SimOTA, YOLOX's dynamic-k assigner (Ge, Liu, Wang, Li, Sun, "YOLOX: Exceeding YOLO Series in
2021", arXiv 2107.08430, §2.2, "SimOTA"), on the shared FCOS head. Not in the DW paper's Table 6.

The score is YOLOX's ``p = sqrt(sigmoid(cls) * sigmoid(obj))`` with the centerness branch as the
objectness branch; the detector ranks by ``sigmoid(cls) * sigmoid(obj)`` = p^2 (same order).
Per image, with the released code's current form (YOLOX #1589, Jan 2023):

- Candidates: anchor points inside the square of half-side ``center_radius * stride`` (1.5)
  around a GT's centre, not clipped to the box; the candidates of the image are the union over
  its GTs. A candidate outside GT g's own square costs ``penalty`` (1e6) more for g.
- Cost (YOLOX Eq. in §2.2, c_ij = L_cls + lambda L_reg):
      c_ag = sum_c BCE(p_ac, [c = label_g]) + iou_weight * (-ln(IoU(box_a, g) + 1e-8))
             + penalty * [a outside g's square],          iou_weight (lambda) 3.
- Dynamic k: k_g = max(1, floor(sum of the ``topk_iou`` (10) largest IoUs of g's candidates));
  g takes its k_g cheapest candidates (``common.dynamic_k``, ``common.smallest_k``); an anchor
  claimed by several GTs keeps the cheapest (``common.one_gt_per_anchor``).
- Loss, each over the number of positives N (averaged over workers, at least 1):
      loss_cls = sum_pos BCE(sigmoid(cls_a), onehot(label_g) * IoU(box_a, g)) / N
      loss_obj = sum_all BCE(sigmoid(obj_a), [a positive]) / N
      loss_box = sum_pos (1 - GIoU(box_a, g)) / N,  weight ``box_weight`` (YOLOX's reg_weight 5).
  Negatives train only the objectness (YOLOX): an image without GTs gives the class logits no
  gradient.

Where the single FCOS head departs from YOLOX: YOLOX predicts one box per grid cell from the
cell centre, and so does dwlab's head (anchor offset 0.5: the same points), so the cost sees the
anchor point's own decoded box; the box loss is the head's GIoU loss instead of YOLOX's
``1 - IoU^2`` (and no L1 term, which YOLOX adds only in the last 15 epochs); the objectness bias
starts at YOLOX's 0.01 prior (``head_init``), the class bias at the detector's (also 0.01).
Costs are float32 outside autocast (the 1e6 penalty overflows fp16). If a GT has fewer
non-penalised candidates than k, it takes penalised ones (as released); an image whose GTs
leave no candidate at all has no positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from dwlab.assign.base import HeadInit, LabelAssigner, check_positive
from dwlab.assign.common import (
    centre_region,
    check_outputs,
    class_cost,
    dynamic_k,
    one_gt_per_anchor,
    pad_targets,
    pairwise_iou,
    positives,
    smallest_k,
)
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.models.outputs import HeadOutputs


def sqrt_score_logs(cls_logits: Tensor, obj_logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(ln p, ln(1 - p))`` of ``p = sqrt(sigmoid(cls) * sigmoid(obj))``, float32, ``Tensor[B,
    A, C]``: cls_logits ``Tensor[B, A, C]``, obj_logits ``Tensor[B, A]``."""
    log_p = 0.5 * (F.logsigmoid(cls_logits.float()) + F.logsigmoid(obj_logits.float())[..., None])
    return log_p, torch.log1p(-log_p.exp().clamp(max=1.0 - 1e-6))


class SimOTAAssigner(LabelAssigner):
    """SimOTA's dynamic-k matching and YOLOX's loss (module docstring).

    Returns ``{"loss_cls", "loss_obj", "loss_box"}``, unweighted; weights 1, 1, ``box_weight``.
    """

    head_init = HeadInit(centerness_prior=0.01)  # YOLOX: the objectness bias at a 0.01 prior

    def __init__(
        self,
        num_classes: int,
        *,
        center_radius: float = 1.5,
        topk_iou: int = 10,
        iou_weight: float = 3.0,
        penalty: float = 1e6,
        box_weight: float = 5.0,
    ) -> None:
        check_positive(num_classes=num_classes, center_radius=center_radius, topk_iou=topk_iou, penalty=penalty)
        self.num_classes, self.center_radius, self.topk_iou = num_classes, center_radius, topk_iou
        self.iou_weight, self.penalty = iou_weight, penalty
        self.loss_weights = {"loss_cls": 1.0, "loss_obj": 1.0, "loss_box": box_weight}

    @torch.no_grad()
    def match(self, outputs: HeadOutputs, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Tensor:
        """Matched GT per anchor ``Tensor[B, A]`` long (-1 = background): gt_boxes ``Tensor[B, G,
        4]``, gt_labels and gt_valid ``Tensor[B, G]`` as ``pad_targets`` gives them."""
        anchors = outputs.anchors
        in_square = centre_region(
            anchors.points[None, :, None], anchors.strides[None, :, None], gt_boxes[:, None], self.center_radius,
            clip_to_box=False,
        ) & gt_valid[:, None]  # [B, A, G]  # fmt: skip
        candidate = in_square.any(-1, keepdim=True) & gt_valid[:, None]  # the union of the squares, per GT column
        iou = pairwise_iou(outputs.boxes().detach().float(), gt_boxes, gt_valid) * candidate
        log_p, log1m_p = sqrt_score_logs(outputs.cls_logits.detach(), outputs.centerness.detach())
        cost = (
            class_cost(log_p, log1m_p, gt_labels)
            + self.iou_weight * -torch.log(iou + 1e-8)
            + self.penalty * (~in_square).float()
        )
        cost = torch.where(candidate, cost, float("inf"))
        k = dynamic_k(iou, self.topk_iou)  # [B, G]
        chosen = smallest_k(cost, k) & candidate
        return one_gt_per_anchor(chosen, cost, largest=False)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        check_outputs(outputs, targets, self.num_classes)
        device = outputs.cls_logits.device
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, device)
        matched = self.match(outputs, gt_boxes, gt_labels, gt_valid)
        pos = positives(outputs, matched, gt_boxes, gt_labels)
        num_pos = normaliser(float(pos.image.numel()), device)  # known on the host after nonzero
        cls_logits = outputs.cls_logits[pos.image, pos.anchor].float()  # [P, C]
        cls_target = F.one_hot(pos.label, self.num_classes).float() * pos.iou[:, None]
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, cls_target, reduction="sum")
        loss_obj = F.binary_cross_entropy_with_logits(
            outputs.centerness.float(), (matched >= 0).float(), reduction="sum"
        )
        loss_box = generalized_box_iou_loss(pos.pred_boxes, pos.gt_boxes, reduction="sum")
        return {"loss_cls": loss_cls / num_pos, "loss_obj": loss_obj / num_pos, "loss_box": loss_box / num_pos}
