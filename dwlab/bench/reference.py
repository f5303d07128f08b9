"""A straightforward per-GT Python loop of the DW loss (paper variant, soft bag), the way the
released code walks over GTs: the benchmark's reference for ``dwlab.assign.dw.DWAssigner``.

For each image and each GT it scans all A anchors for the bag (points inside the box), so it
costs O(G * A) plus G rounds of Python; the assigner works on the in-box pairs of the whole
batch at once. Written from the equations, independently of ``dw.py`` (torchvision's IoU and
GIoU loss, no shared helpers), so that agreement of the two is a check of both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss

from dwlab.assign.dw import DWAssigner
from dwlab.data.target import Target
from dwlab.models.outputs import HeadOutputs


def dw_loss_per_gt_loop(outputs: HeadOutputs, targets: list[Target], dw: DWAssigner) -> dict[str, Tensor]:
    """The same three (unweighted) terms as ``dw(outputs, targets)`` for ``variant="paper"``, ``bag="soft"``,
    ``neg_variant="full"`` in one process (no DDP averaging)."""
    c = dw.params
    if c.variant != "paper" or c.bag != "soft" or c.neg_variant != "full" or c.neg_norm != "pneg":
        raise ValueError("the loop reference implements the paper variant with the soft bag only")
    points, strides = outputs.anchors.points, outputs.anchors.strides  # [A, 2], [A]
    k = 1.0 / (c.pneg_high**c.gamma1 - c.pneg_low**c.gamma1)  # Eq. 6
    cls_pos = reg = neg = points.new_zeros(())
    neg_norm, num_gts = 0.0, 0
    for b, target in enumerate(targets):
        cls, ctr, dist = outputs.cls_logits[b].float(), outputs.centerness[b].float(), outputs.distances[b].float()
        s_grad = torch.sigmoid(cls) * torch.sigmoid(ctr)[:, None]  # [A, C], with gradient
        s = s_grad.detach()
        in_bag_p_neg = torch.full_like(s, math.inf)  # smallest in-bag P_neg per (anchor, class)
        for box, label in zip(target.boxes.float(), target.labels.tolist()):
            num_gts += 1
            x1, y1, x2, y2 = box.tolist()
            inside = (points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2)
            idx = inside.nonzero()[:, 0]
            if idx.numel() == 0:
                continue
            centre = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2], device=points.device)
            offset = (points[idx] - centre) / strides[idx, None]
            prior = torch.exp(-(offset**2).sum(1) / (2 * c.prior_sigma**2))  # soft bag
            p, d = points[idx], dist[idx]
            pred = torch.stack([p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2], p[:, 1] + d[:, 3]], 1)
            gt = box.expand_as(pred)
            iou = box_iou(pred.detach(), box[None])[:, 0]
            score = s[idx, label]
            t = score * iou**c.beta  # Eq. 3
            e = torch.exp(c.mu * t) * t * prior  # Eq. 4
            w_pos = e / e.sum() if e.sum() > 0 else prior / prior.sum()
            p_neg = (k * (c.pneg_high**c.gamma1 - iou**c.gamma1)).clamp(0, 1)  # Eq. 5
            log_s = F.logsigmoid(cls[idx, label]) + F.logsigmoid(ctr[idx])
            cls_pos = cls_pos - (w_pos * log_s).sum()
            reg = reg + (w_pos * generalized_box_iou_loss(pred, gt, reduction="none")).sum()
            in_bag_p_neg[idx, label] = torch.minimum(in_bag_p_neg[idx, label], p_neg)
        in_bag = torch.isfinite(in_bag_p_neg)
        factor = torch.where(in_bag, in_bag_p_neg, torch.ones_like(s))  # detached P_neg, 1 outside
        w_neg = factor * s_grad**c.gamma2  # Eq. 7-8, gradient through s**gamma2 as released
        neg = neg - (w_neg * torch.log1p(-s_grad)).sum()  # Eq. 12
        neg_norm += float((1.0 - in_bag_p_neg[in_bag]).sum())
    n_pos, n_neg = max(num_gts, 1), max(neg_norm, 1.0)
    return {
        "loss_cls_pos": cls_pos / n_pos,
        "loss_box": reg / n_pos,
        "loss_neg": neg / n_neg,
    }
