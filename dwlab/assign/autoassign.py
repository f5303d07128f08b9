"""AutoAssign (Zhu, Wang, Jiang, Zong, Liu, Li, Sun, "AutoAssign: Differentiable Label Assignment
for Dense Object Detection", arXiv 2007.03496, 2020) in the form the DW paper's Table 6 reports
as "AutoAssign (weight loss)": the positive and negative weights are detached and multiply the
loss, instead of multiplying the scores inside the log as in the original.

Per GT n, its bag S_n holds the anchors whose point lies inside box n (all FPN levels).

- Centre weighting: G(d) = exp(-(dx^2 + dy^2) / (2 sigma^2)), d the offset of the point from the
  GT centre in stride units. AutoAssign learns a mean and sigma per class through the weights'
  gradient; with detached weights nothing trains them, so the prior is fixed at AutoAssign's
  initial values, mean 0 and sigma 1 (``common.gaussian_prior``).
- Confidence: P_i = P_cls * P_loc with P_cls the joint score s = sigmoid(cls) * sigmoid(ctr)
  (the centerness branch plays ImpObj's part: AutoAssign's P_cls is cls * objectness) and
  P_loc = exp(-lambda * GIoULoss_i), lambda 5.
- Positive weight: w+_i = exp(P_i / tau) G_i / sum_{j in S_n} exp(P_j / tau) G_j, tau = 1/3.
- Negative weight: w-_i = 1 - f(1 / (1 - iou_i)), iou_i the largest IoU of anchor i's predicted
  box with any GT of its image, f a min-max normalisation over S_n; 1 outside every bag. It
  applies on the GT's class channel; an anchor in the bags of several GTs of one class takes
  the smallest (interpretation; the released code keeps the last GT written).
- Loss, weight-loss form: the original's
      L+_n = -ln(sum_i w+_i P_i),   L- = -sum_j FL(w-_j s_j)
  becomes
      L+_n = sum_i w+_i (-ln s_i + lambda * GIoULoss_i)      (-ln P_i, weighted)
      L-   = sum_(j, c) w-_jc * s_jc^gamma * (-ln(1 - s_jc)) (focal negative, weighted), gamma 2.
  Released code's normalisation and loss weights: L+ * 0.25 / number of GTs, L- * 0.75 / sum of
  the centre-prior weights; both normalisers averaged over workers, clamped to >= 1. The
  released code's loss on the learnable prior (number of GTs / sum of prior) has no parameter to
  train here and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    WeightMaps,
    bag_neg_weights,
    centre_offsets,
    check_outputs,
    concat_targets,
    entry_minima,
    focus_maps,
    gaussian_prior,
    inside_pairs,
    pair_boxes,
    per_gt,
)
from dwlab.assign.grid import anchor_layout
from dwlab.box_ops import aligned_iou
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import focal_neg_weights, log1m_joint_score, log_joint_score
from dwlab.models.outputs import HeadOutputs

EPS = 1e-12  # the released code's EPS


@dataclass
class AutoAssignment:
    """P (anchor, GT) bag pairs over the batch, detached. Per pair ``Tensor[P]``: image, anchor,
    gt (index into the batch's concatenated GTs), label, prior G, score s, iou (with its GT),
    iou_max (anchor's best IoU over its image's GTs), w_pos, w_neg. Per GT ``Tensor[G]``: gt_image,
    gt_labels. Per distinct in-bag (image, anchor, class) entry ``Tensor[E]``: entry (flat index
    into ``B * A * C``) and entry_w_neg (smallest over its pairs)."""

    image: Tensor
    anchor: Tensor
    gt: Tensor
    label: Tensor
    prior: Tensor
    score: Tensor
    iou: Tensor
    iou_max: Tensor
    w_pos: Tensor
    w_neg: Tensor
    gt_image: Tensor
    gt_labels: Tensor
    entry: Tensor
    entry_w_neg: Tensor


class AutoAssignAssigner(WeightMaps, LabelAssigner):
    """AutoAssign's centre prior and confidence-weighted pos / neg weights, detached, on the loss.

    Returns ``{"loss_cls_pos", "loss_box", "loss_neg"}``, unweighted: ``sum w+ (-ln s)`` and
    ``sum w+ GIoULoss`` over the number of GTs, the negative term over the sum of the prior.
    ``loss_weights``: ``pos_weight``, ``pos_weight * loc_lambda`` (-ln P_loc = lambda GIoULoss,
    so cls_pos + lambda * box is the weighted -ln P+), ``neg_weight``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        prior_sigma: float = 1.0,
        tau: float = 1.0 / 3.0,
        loc_lambda: float = 5.0,
        neg_gamma: float = 2.0,
        pos_weight: float = 0.25,
        neg_weight: float = 0.75,
    ) -> None:
        check_positive(num_classes=num_classes, prior_sigma=prior_sigma, tau=tau)
        self.num_classes, self.prior_sigma, self.tau, self.loc_lambda = num_classes, prior_sigma, tau, loc_lambda
        self.neg_gamma, self.pos_weight, self.neg_weight = neg_gamma, pos_weight, neg_weight
        self.loss_weights = {"loss_cls_pos": pos_weight, "loss_box": pos_weight * loc_lambda, "loss_neg": neg_weight}

    def _assign(self, outputs: HeadOutputs, targets: list[Target]) -> tuple[AutoAssignment, Tensor]:
        """The assignment, plus the pairs' GIoU loss ``Tensor[P]`` with gradient."""
        check_outputs(outputs, targets, self.num_classes)
        b, a, c = outputs.cls_logits.shape
        device = outputs.cls_logits.device
        gt_boxes, gt_labels, gt_image = concat_targets(targets, device)
        anchors = outputs.anchors
        points, strides = anchors.points, anchors.strides
        anchor, gt = inside_pairs(points, strides, anchors.levels, gt_boxes, anchor_layout(anchors))  # S_n
        prior = gaussian_prior(centre_offsets(points, strides, gt_boxes, anchor, gt), self.prior_sigma)  # G
        pairs = pair_boxes(outputs, anchor, gt, gt_image, gt_labels, gt_boxes)
        image, label, flat, pair_gt_boxes, pred, giou_loss = pairs
        num_gts = gt_boxes.shape[0]
        with torch.no_grad():
            score = outputs.scores().detach().float().reshape(-1)[flat * c + label]
            confidence = score * torch.exp(-self.loc_lambda * giou_loss.detach())  # P = P_cls * P_loc
            numer = torch.exp(confidence / self.tau) * prior
            w_pos = numer / per_gt(numer, gt, num_gts, "sum")[gt].clamp(min=EPS)
            # negative weight: from the best IoU of the anchor's box with any GT of its image
            w_neg, iou_max = bag_neg_weights(pairs, gt, num_gts, targets, EPS)
            entry, (entry_w_neg,) = entry_minima(flat * c + label, w_neg)
            pair_iou = aligned_iou(pred.detach(), pair_gt_boxes)
        asg = AutoAssignment(
            image, anchor, gt, label, prior, score, pair_iou, iou_max, w_pos, w_neg,
            gt_image, gt_labels, entry, entry_w_neg,
        )  # fmt: skip
        return asg, giou_loss

    def assign(self, outputs: HeadOutputs, targets: list[Target]) -> AutoAssignment:
        """Bag pairs and their weights, without gradient (see ``AutoAssignment``)."""
        with torch.no_grad():
            return self._assign(outputs, targets)[0]

    def neg_weights(self, outputs: HeadOutputs, asg: AutoAssignment) -> Tensor:
        """Weight of -ln(1 - s) on every (image, anchor, class), ``Tensor[B, A, C]``: w- * s^gamma,
        w- 1 outside bags (constant), gradient through s^gamma (focal negative)."""
        return focal_neg_weights(outputs.cls_logits, outputs.centerness, asg.entry, asg.entry_w_neg, self.neg_gamma)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        asg, giou_loss = self._assign(outputs, targets)
        b, a, c = outputs.cls_logits.shape
        device = outputs.cls_logits.device
        cls, ctr = outputs.cls_logits.float(), outputs.centerness.float()
        flat = asg.image * a + asg.anchor
        log_s = log_joint_score(cls.reshape(-1)[flat * c + asg.label], ctr.reshape(-1)[flat])
        pos_cls = (asg.w_pos * -log_s).sum()
        pos_box = (asg.w_pos * giou_loss).sum()  # -ln P_loc = lambda * GIoULoss, lambda in the weight
        neg = (self.neg_weights(outputs, asg) * -log1m_joint_score(cls, ctr.unsqueeze(-1))).sum()
        n_pos = normaliser(float(asg.gt_labels.numel()), device)
        n_neg = normaliser(asg.prior.sum(), device)
        return {
            "loss_cls_pos": pos_cls / n_pos,
            "loss_box": pos_box / n_pos,
            "loss_neg": neg / n_neg,
        }

    # --------------------------------------------------------------------- visualisation

    @torch.no_grad()
    def weights(self, outputs: HeadOutputs, targets: list[Target]) -> list[dict[str, Tensor]]:
        """Per-image ``Tensor[A]`` maps: ``pos`` the largest w+ of the anchor over its bags,
        ``neg`` the weight on -ln(1 - s) of the focus GT's class, w- * s^gamma. The focus GT of an
        in-bag anchor is the bag where its w+ is largest; outside, the GT its box overlaps most."""
        asg = self.assign(outputs, targets)
        b, a, _ = outputs.cls_logits.shape
        device = outputs.cls_logits.device
        flat = asg.image * a + asg.anchor
        best = torch.zeros(b * a, device=device).scatter_reduce(0, flat, asg.w_pos, "amax", include_self=False)
        first_gt = torch.zeros(b, dtype=torch.long, device=device)
        first_gt[1:] = torch.cumsum(torch.bincount(asg.gt_image, minlength=b), 0)[:-1]
        matched = torch.full((b * a,), -1, dtype=torch.long, device=device)
        top = asg.w_pos >= best[flat]
        matched[flat[top]] = asg.gt[top] - first_gt[asg.image[top]]  # index within the image
        maps = focus_maps(outputs, targets, matched.reshape(b, a), outputs.scores())
        w_neg = self.neg_weights(outputs, asg)
        rows = torch.arange(a, device=device)
        for i, d in enumerate(maps):
            d["pos"] = best.reshape(b, a)[i]
            d["neg"] = w_neg[i, rows, d["cls"]]
        return maps
