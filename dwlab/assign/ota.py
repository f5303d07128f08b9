"""OTA (Ge, Liu, Li, Yoshie, Sun, "OTA: Optimal Transport Assignment for Object Detection", CVPR
2021) on the shared FCOS head, with the released FCOS-based code's defaults.

Per image, GTs are suppliers and anchor points demanders (each demands 1); a background supplier
takes what the GTs do not.

- Candidates (centre prior): points inside the GT box (by 0.01 px) and within ``center_radius``
  (2.5) strides of its centre, the square clipped to the box; any other (anchor, GT) pair costs
  ``penalty`` (1e6) more.
- Cost (Eq. 4-5): c_ga = L_cls(P_cls_a, label_g) + alpha L_reg(box_a, g) + penalty [not cand.],
  L_cls the focal loss (alpha 0.25, gamma 2) of sigmoid(cls_a) against g's one-hot class summed
  over classes (``common.class_cost``), L_reg = -ln IoU (the released cost), alpha ``reg_weight``
  1.5. Background: c_bg,a = sum_c focal loss of sigmoid(cls_ac) against 0.
- Supplies (dynamic k, §3.3): s_g = max(1, floor(sum of the ``topk_iou`` (20) largest IoUs of
  g's candidates' predicted boxes)); s_bg = A - sum_g s_g (clamped at 0 here; the released code
  takes the log of it).
- Plan: pi* = argmin <pi, c> - eps H(pi) by ``sinkhorn_iters`` (50) log-domain Sinkhorn-Knopp
  updates, eps 0.1 (``common.sinkhorn``). Each supplier's row of pi* is divided by its maximum
  and each anchor goes to its largest entry; anchors going to a GT are its positives.
- Loss (released code), N the number of positives, q_a = IoU(box_a, g) (no gradient):
      loss_cls = sum_all focal(sigmoid(cls), onehot) / N
      loss_box = sum_pos q_a (1 - GIoU(box_a, g)) / sum_pos q_a,           weight 2
      loss_obj = sum_pos BCE(sigmoid(ctr_a), q_a) / N,                      weight 0.5
  (each normaliser averaged over workers, at least 1).

Where the FCOS head departs: none in the assignment; OTA's FCOS is anchor-free and its cost sees
each anchor point's own decoded box, as here. OTA's IoU branch replaces FCOS's centerness: here
it is the centerness branch trained on the IoU target (``loss_obj``); OTA ranks detections by
sqrt(sigmoid(cls) * sigmoid(iou)), dwlab by their product (the same order). IoUs are box IoUs of
the decoded boxes (the released code computes them from ltrb distances of the same point: equal
for candidates, whose point is inside both boxes). The cost and the plan are float32 outside
autocast (the 1e6 penalty overflows fp16). The cost is dense, ``[B, G + 1, A]`` like the
released code's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    centre_region,
    check_outputs,
    class_cost,
    dynamic_k,
    iou_branch_terms,
    pad_targets,
    pairwise_iou,
    points_inside,
    positives,
    sinkhorn,
)
from dwlab.data.target import Target
from dwlab.models.outputs import HeadOutputs

IOU_EPS = torch.finfo(torch.float32).eps  # -ln IoU of a non-overlapping box: ~15.9 (released)


class OTAAssigner(LabelAssigner):
    """OTA's optimal-transport assignment and its released loss (module docstring).

    Returns ``{"loss_cls", "loss_box", "loss_obj"}``, unweighted; weights 1, ``box_weight`` (2),
    ``iou_weight`` (0.5).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        center_radius: float = 2.5,
        topk_iou: int = 20,
        reg_weight: float = 1.5,
        penalty: float = 1e6,
        sinkhorn_eps: float = 0.1,
        sinkhorn_iters: int = 50,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_weight: float = 2.0,
        iou_weight: float = 0.5,
    ) -> None:
        check_positive(
            num_classes=num_classes, center_radius=center_radius, topk_iou=topk_iou, penalty=penalty,
            sinkhorn_eps=sinkhorn_eps, sinkhorn_iters=sinkhorn_iters,
        )  # fmt: skip
        self.num_classes, self.center_radius, self.topk_iou = num_classes, center_radius, topk_iou
        self.reg_weight, self.penalty = reg_weight, penalty
        self.sinkhorn_eps, self.sinkhorn_iters = sinkhorn_eps, sinkhorn_iters
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight, "loss_obj": iou_weight}

    @torch.no_grad()
    def plan(self, outputs: HeadOutputs, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Tensor:
        """The transport plan ``Tensor[B, G + 1, A]`` (last row: the background), each supplier's
        row divided by its maximum: gt_boxes ``Tensor[B, G, 4]``, gt_labels and gt_valid
        ``Tensor[B, G]`` as ``pad_targets`` gives them."""
        anchors = outputs.anchors
        points, strides, boxes = anchors.points[None, :, None], anchors.strides[None, :, None], gt_boxes[:, None]
        candidate = points_inside(points, boxes) & centre_region(points, strides, boxes, self.center_radius)
        candidate &= gt_valid[:, None]  # [B, A, G]
        iou = pairwise_iou(outputs.boxes().detach().float(), gt_boxes, gt_valid)
        cls = outputs.cls_logits.detach().float()
        log_p, log1m_p = F.logsigmoid(cls), F.logsigmoid(-cls)
        focal = dict(gamma=self.focal_gamma, alpha=self.focal_alpha)
        cost = class_cost(log_p, log1m_p, gt_labels, **focal) - self.reg_weight * iou.clamp(min=IOU_EPS).log()
        cost = cost + self.penalty * (~candidate).float()  # [B, A, G]
        background = (-(1 - self.focal_alpha) * log_p.exp().pow(self.focal_gamma) * log1m_p).sum(-1)  # [B, A]
        k = torch.where(gt_valid, dynamic_k(iou * candidate, self.topk_iou), 0)  # [B, G]
        supply = torch.cat([k, (cost.shape[1] - k.sum(-1, keepdim=True)).clamp(min=0)], dim=-1).float()
        costs = torch.cat([cost.transpose(1, 2), background[:, None]], dim=1)  # [B, G + 1, A]
        pi = sinkhorn(costs, supply, torch.ones_like(background), eps=self.sinkhorn_eps, iters=self.sinkhorn_iters)
        pi = pi / pi.amax(-1, keepdim=True).clamp(min=1e-30)
        padded = F.pad(~gt_valid, (0, 1), value=False)  # padded GTs take nothing
        return pi.masked_fill(padded[..., None], -1.0)

    @torch.no_grad()
    def match(self, outputs: HeadOutputs, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Tensor:
        """Matched GT per anchor ``Tensor[B, A]`` long, -1 = background (the plan's argmax)."""
        best = self.plan(outputs, gt_boxes, gt_labels, gt_valid).argmax(1)  # [B, A]
        return torch.where(best < gt_valid.shape[1], best, -1)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        check_outputs(outputs, targets, self.num_classes)
        device = outputs.cls_logits.device
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, device)
        pos = positives(outputs, self.match(outputs, gt_boxes, gt_labels, gt_valid), gt_boxes, gt_labels)
        return iou_branch_terms(outputs, pos, focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma)
