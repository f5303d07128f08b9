"""AutoAssign as published (Zhu, Wang, Jiang, Zong, Liu, Li, Sun, "AutoAssign: Differentiable
Label Assignment for Dense Object Detection", arXiv 2007.03496, 2020), and its "detach" form:
Table 6's "AutoAssign" (40.4) and "AutoAssign(detach)" (39.8) rows. ``dwlab.assign.autoassign``
is the third form, "weight loss" (36.6).

Per GT n, its bag S_n holds the anchor points inside box n (all FPN levels).

- ImpObj: the centerness branch, so P_cls = s = sigmoid(cls) * sigmoid(ctr) in the positive, the
  negative and the test score (the released code multiplies cls by its objectness everywhere).
- Centre prior (§3.2): G_i = exp(-sum_{x,y} (d_i - mu_c)^2 / (2 sigma_c^2)), d_i the point's
  offset from the GT centre in its level's strides, mu, sigma ``Tensor[C, 2]`` learnable per
  class (initial 0 and 1; ``learnable``), sigma unclamped as released.
- Confidence (Eq. 3-5): P_i = s_i * exp(-lambda * GIoULoss_i), lambda 5.
- Positive weights (Eq. 6): w+_i = exp(P_i / tau) G_i / sum_{j in S_n} exp(P_j / tau) G_j,
  tau 1/3, **with gradient**; bag loss L+_n = -ln(sum_{i in S_n} w+_i P_i) (Eq. 7).
- Negative weights (Eq. 8-9): w-_i = 1 - f(1 / (1 - iou_i)), iou_i the largest IoU of anchor
  i's box with any GT of its image, f a min-max normalisation over S_n, no gradient; 1 outside
  every bag, on the GT's class channel (an anchor in several bags of one class: the smallest).
  L- = sum_{j,c} FL(w-_jc s_jc), FL(p) = -p^gamma ln(1 - p), gamma 2.
- Released normalisers and weights: L+ summed over GTs / number of GTs, x 0.25; L- / the sum of
  G over all bag pairs (no gradient), x 0.75; the prior loss (in the code, not the paper) per
  image number of GTs / sum of its G, averaged over images, x 0.75 (``loss_prior``; it keeps
  sigma from shrinking to nothing). Normalisers averaged over workers, at least 1.

``autoassign_detach`` (``AutoAssignDetachAssigner``): the same loss with w+ detached (and so the
prior, whose only gradients are through w+ and the prior loss, stays at its initial mu 0,
sigma 1: not learnable, no prior term). The DW paper's §4.4 names the row without details; this
is the reading "the weights are kept in the score, without gradient".

Where the single FCOS head departs: AutoAssign is anchor-free (one point per location) like
this head; MMDetection's port drops the half-stride point offset to match the released code,
dwlab keeps its detector's points (offset 0.5). A GT whose box holds no point has an empty bag:
the released code's -ln(0) (clamped) is a constant, left out here (it has no gradient); such a
GT still counts in the normaliser. The released ``force_topk`` option is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    PairBoxes,
    bag_neg_weights,
    centre_offsets,
    check_outputs,
    concat_targets,
    entry_minima,
    gaussian_prior,
    inside_pairs,
    pair_boxes,
    per_gt,
)
from dwlab.assign.grid import anchor_layout
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import log1m_joint_score, log_joint_score
from dwlab.models.outputs import HeadOutputs

EPS = 1e-12  # the released code's EPS


class CentrePrior(nn.Module):
    """AutoAssign's learnable per-class Gaussian centre prior: mean ``Tensor[C, 2]`` (initial 0)
    and sigma ``Tensor[C, 2]`` (initial 1), in stride units, per axis."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(num_classes, 2))
        self.sigma = nn.Parameter(torch.ones(num_classes, 2))

    def forward(self, offsets: Tensor, label: Tensor) -> Tensor:
        """G of pairs with ``offsets`` ``Tensor[P, 2]`` and class ``label`` ``Tensor[P]`` -> ``Tensor[P]``."""
        return gaussian_prior(offsets, self.sigma.index_select(0, label), mean=self.mean.index_select(0, label))


class AutoAssignPaperAssigner(LabelAssigner):
    """AutoAssign as published (module docstring): weights on the scores, with gradient, and a
    learnable centre prior.

    Returns ``{"loss_cls_pos", "loss_neg", "loss_prior"}`` (``loss_cls_pos`` is the whole
    positive bag loss, -ln of the weighted confidence, localisation included), unweighted;
    weights ``pos_weight``, ``neg_weight``, ``prior_weight``.
    """

    detach = False

    def __init__(
        self,
        num_classes: int,
        *,
        tau: float = 1.0 / 3.0,
        loc_lambda: float = 5.0,
        neg_gamma: float = 2.0,
        pos_weight: float = 0.25,
        neg_weight: float = 0.75,
        prior_weight: float = 0.75,
    ) -> None:
        check_positive(num_classes=num_classes, tau=tau)
        self.num_classes, self.tau, self.loc_lambda, self.neg_gamma = num_classes, tau, loc_lambda, neg_gamma
        self.loss_weights = {"loss_cls_pos": pos_weight, "loss_neg": neg_weight}
        if not self.detach:
            self.learnable = CentrePrior(num_classes)
            self.loss_weights["loss_prior"] = prior_weight

    def prior(self, offsets: Tensor, label: Tensor) -> Tensor:
        """The pairs' centre prior G ``Tensor[P]``: learnable, or fixed at mean 0, sigma 1 (detach)."""
        if self.detach:
            return gaussian_prior(offsets, 1.0)
        return self.learnable.to(offsets.device)(offsets, label)

    def positive_bags(self, outputs: HeadOutputs, pairs: PairBoxes, gt: Tensor, prior: Tensor, num_gts: int) -> Tensor:
        """sum_n L+_n = -sum_n ln(sum_i w+_i P_i) over the GTs with a non-empty bag (Eq. 6-7)."""
        b, a, c = outputs.cls_logits.shape
        cls, ctr = outputs.cls_logits.float().reshape(-1), outputs.centerness.float().reshape(-1)
        log_s = log_joint_score(cls.index_select(0, pairs.flat * c + pairs.label), ctr.index_select(0, pairs.flat))
        confidence = torch.exp(log_s - self.loc_lambda * pairs.giou_loss)  # P = P_cls * P_loc (Eq. 5)
        numer = torch.exp(confidence / self.tau) * prior
        if self.detach:
            numer = numer.detach()
        w_pos = numer / per_gt(numer, gt, num_gts, "sum").index_select(0, gt).clamp(min=EPS)  # Eq. 6
        bag = per_gt(w_pos * confidence, gt, num_gts, "sum")  # [G]
        has_pairs = per_gt(torch.ones_like(confidence), gt, num_gts, "sum") > 0
        return -(bag.clamp(min=EPS).log() * has_pairs).sum()

    def negatives(self, outputs: HeadOutputs, pairs: PairBoxes, w_neg: Tensor) -> Tensor:
        """L- = sum_{j,c} (w- s)^gamma * -ln(1 - w- s) over every (image, anchor, class) (Eq. 8-9)."""
        b, a, c = outputs.cls_logits.shape
        cls, ctr = outputs.cls_logits.float(), outputs.centerness.float()[..., None]
        entry, (entry_w,) = entry_minima(pairs.flat * c + pairs.label, w_neg)
        log_s = log_joint_score(cls, ctr).reshape(-1)
        log1m = log1m_joint_score(cls, ctr).reshape(-1)  # stable ln(1 - s) where w- = 1
        log_ws = log_s.index_add(0, entry, entry_w.clamp(min=EPS).log())  # ln(w- s)
        ws_entry = log_ws.index_select(0, entry).exp()
        log1m = log1m.index_put((entry,), torch.log1p(-ws_entry.clamp(max=1.0 - 1e-6)))
        return (torch.exp(self.neg_gamma * log_ws) * -log1m).sum()

    def prior_term(self, prior: Tensor, pairs: PairBoxes, gt_image: Tensor, batch: int) -> Tensor:
        """The released prior loss: per image, number of GTs / sum of its pairs' G, averaged
        over the images (0 for an image without pairs); plus 0 * the parameters, so that they
        get a (zero) gradient in every batch (DDP)."""
        device = prior.device
        prior_sum = torch.zeros(batch, device=device).index_add(0, pairs.image, prior)
        num_gts = torch.bincount(gt_image, minlength=batch).float()
        per_image = torch.where(prior_sum > 0, num_gts / prior_sum.clamp(min=EPS), 0.0)
        return per_image.mean() + 0.0 * sum(p.sum() for p in self.learnable.parameters())

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        check_outputs(outputs, targets, self.num_classes)
        device, batch = outputs.cls_logits.device, outputs.cls_logits.shape[0]
        gt_boxes, gt_labels, gt_image = concat_targets(targets, device)
        anchors, num_gts = outputs.anchors, gt_boxes.shape[0]
        anchor, gt = inside_pairs(anchors.points, anchors.strides, anchors.levels, gt_boxes, anchor_layout(anchors))
        pairs = pair_boxes(outputs, anchor, gt, gt_image, gt_labels, gt_boxes)
        prior = self.prior(centre_offsets(anchors.points, anchors.strides, gt_boxes, anchor, gt), pairs.label)
        w_neg, _ = bag_neg_weights(pairs, gt, num_gts, targets, EPS)
        terms = {
            "loss_cls_pos": self.positive_bags(outputs, pairs, gt, prior, num_gts) / normaliser(float(num_gts), device),
            "loss_neg": self.negatives(outputs, pairs, w_neg) / normaliser(prior.detach().sum(), device),
        }
        if not self.detach:
            terms["loss_prior"] = self.prior_term(prior, pairs, gt_image, batch)
        return terms


class AutoAssignDetachAssigner(AutoAssignPaperAssigner):
    """AutoAssign with its positive weights detached (Table 6's "AutoAssign(detach)"): the
    weights still multiply the scores inside the bag loss; the centre prior is fixed."""

    detach = True
