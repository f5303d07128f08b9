"""PAA (Kim, Lee, "Probabilistic Anchor Assignment with IoU Prediction for Object Detection",
ECCV 2020) on the shared FCOS head, with the released code's defaults (kkhoot/PAA ``paa_loss``,
``paa_R_50_FPN_1x.yaml``).

- Anchors (one per point, as released): a square of side ``anchor_scale * stride`` (8) around
  each point (``common.anchor_boxes``): the anchor the pre-assignment's IoU sees. The score and
  the GMM see the point's own predicted box.
- Pre-assignment (released IoU matcher): each anchor goes to the GT its anchor box overlaps
  most, if that IoU is at least ``pre_iou`` (0.1), or if it is that GT's best anchor (low-quality
  matches).
- Anchor score (Eq. 1-2, as a loss): S(a, g) = FL(cls_a, onehot(g)) summed over classes (alpha
  0.25, gamma 2, no gradient) + (1 - GIoU(box_a, g)).
- Candidates: per GT and per FPN level, its ``topk`` (9) pre-assigned anchors of lowest score.
- GMM (Eq. 3, Fig. 3c): a 2-component 1-D Gaussian mixture over each GT's candidate scores,
  fitted by ``gmm_iters`` EM steps from means (min, max), weights 1/2, variances 1 (released:
  scikit-learn, means_init = (min, max), precisions 1; variance floor 1e-6 as its reg_covar),
  all GTs of the batch at once. Component 0 (the lower mean) is the foreground; the positives
  are the candidates whose score is at most that of the foreground sample of highest mixture
  density; the other candidates and all non-candidates are negatives (no ignored anchors). A GT
  with fewer than 2 candidates, or none predicted foreground, keeps every candidate (released).
- Loss, N the number of positives, q = IoU(box_a, g) (no gradient), normalisers averaged over
  workers, at least 1:
      loss_cls = sum_all FL(cls, onehot) / N
      loss_box = sum_pos q (1 - GIoU) / sum_pos q,     weight 1.3
      loss_obj = sum_pos BCE(sigmoid(ctr), q) / N,      weight 0.5 (the IoU prediction branch)

Where the single FCOS head departs: PAA regresses offsets from its anchor box; this head
regresses distances from the point, so the score's box is the point's decoded box; the IoU
prediction branch is the centerness branch (its target the IoU of the positive's box), and the
detector ranks by sigmoid(cls) * sigmoid(iou) (PAA by its square root: the same order). The
GMM runs a fixed number of EM steps in torch (no convergence test) instead of scikit-learn on
the host.
Score voting at test time (released: sigma 0.025, box only) is an evaluation option for any
method, ``eval.score_voting`` (``dwlab/models/postprocess.py``); Table 6's sweep turns it on here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    anchor_boxes,
    check_outputs,
    class_cost,
    iou_branch_terms,
    pad_targets,
    pairwise_iou,
    positives,
)
from dwlab.box_ops import aligned_giou
from dwlab.data.target import Target
from dwlab.models.outputs import Anchors, HeadOutputs

VAR_FLOOR = 1e-6  # scikit-learn's reg_covar


class Mixture(NamedTuple):
    """A 2-component 1-D Gaussian mixture per row: means, variances, weights ``Tensor[..., 2]``."""

    mean: Tensor
    var: Tensor
    weight: Tensor

    def log_joint(self, x: Tensor) -> Tensor:
        """ln(w_k N(x | m_k, v_k)) ``Tensor[..., K, 2]`` of samples x ``Tensor[..., K]``."""
        m, v, w = (t[..., None, :] for t in self)
        return w.log() - 0.5 * (math.log(2 * math.pi) + v.log() + (x[..., None] - m) ** 2 / v)


def fit_gmm(x: Tensor, valid: Tensor, iters: int) -> Mixture:
    """EM for a 2-component 1-D GMM on each row of samples x ``Tensor[..., K]`` (``valid`` bool
    marks the real ones), from means (min, max), variances 1, weights 1/2, all rows at once."""
    x = torch.where(valid, x, 0.0)
    big = torch.finfo(x.dtype).max
    lo = torch.where(valid, x, big).amin(-1)
    hi = torch.where(valid, x, -big).amax(-1)
    mean = torch.stack([lo, hi], -1)
    var, weight = torch.ones_like(mean), torch.full_like(mean, 0.5)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    for _ in range(iters):
        resp = Mixture(mean, var, weight).log_joint(x).softmax(-1) * valid[..., None]  # E step
        nk = resp.sum(-2) + 10 * torch.finfo(x.dtype).eps  # M step (scikit-learn's 10 eps)
        mean = (resp * x[..., None]).sum(-2) / nk
        var = (resp * (x[..., None] - mean[..., None, :]) ** 2).sum(-2) / nk + VAR_FLOOR
        weight = nk / n
    return Mixture(mean, var, weight / weight.sum(-1, keepdim=True))


def gmm_positives(x: Tensor, valid: Tensor, iters: int) -> Tensor:
    """PAA's separation (Fig. 3c) of each row's candidate scores x ``Tensor[..., K]``: bool
    ``Tensor[..., K]``, the valid samples scoring at most the foreground sample of highest
    mixture density; every valid sample where the row has < 2 or no foreground sample."""
    joint = fit_gmm(x, valid, iters).log_joint(x)  # [..., K, 2]
    fg = (joint[..., 0] >= joint[..., 1]) & valid
    density = torch.where(fg, joint.logsumexp(-1), float("-inf"))
    peak = x.gather(-1, density.argmax(-1, keepdim=True))  # [..., 1]
    keep_all = (valid.sum(-1, keepdim=True) < 2) | ~fg.any(-1, keepdim=True)
    return valid & (keep_all | (x <= peak))


class PAAAssigner(LabelAssigner):
    """PAA's probabilistic anchor assignment and its released loss (module docstring).

    Returns ``{"loss_cls", "loss_box", "loss_obj"}``, unweighted; weights 1, ``box_weight``
    (1.3), ``iou_weight`` (0.5).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        anchor_scale: float = 8.0,
        pre_iou: float = 0.1,
        topk: int = 9,
        gmm_iters: int = 100,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_weight: float = 1.3,
        iou_weight: float = 0.5,
    ) -> None:
        check_positive(num_classes=num_classes, anchor_scale=anchor_scale, topk=topk, gmm_iters=gmm_iters)
        self.num_classes, self.anchor_scale, self.pre_iou, self.topk = num_classes, anchor_scale, pre_iou, topk
        self.gmm_iters, self.focal_alpha, self.focal_gamma = gmm_iters, focal_alpha, focal_gamma
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight, "loss_obj": iou_weight}

    def pre_assign(self, anchors: Anchors, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        """The IoU matcher's GT per anchor ``Tensor[B, A]`` long, -1 = none."""
        iou = pairwise_iou(anchor_boxes(anchors, self.anchor_scale)[None], gt_boxes, gt_valid, fill=-1.0)  # [B, A, G]
        best, gt = iou.max(-1)
        lowq = ((iou == iou.amax(1, keepdim=True)) & (iou > 0)).any(-1)  # some GT's best anchor
        return torch.where((best >= self.pre_iou) | lowq, gt, -1)

    def candidate_scores(self, outputs: HeadOutputs, pre: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
        """S(a, g) for each anchor pre-assigned to g, ``Tensor[B, A, G]``, +inf elsewhere."""
        cls = outputs.cls_logits.detach().float()
        focal = dict(gamma=self.focal_gamma, alpha=self.focal_alpha)
        cost = class_cost(F.logsigmoid(cls), F.logsigmoid(-cls), gt_labels, **focal)  # [B, A, G]
        gt_of = pre.clamp(min=0)
        target = gt_boxes.gather(1, gt_of[..., None].expand(-1, -1, 4))  # [B, A, 4]
        reg = 1.0 - aligned_giou(outputs.boxes().detach().float().reshape(-1, 4), target.reshape(-1, 4)).view(pre.shape)
        score = cost.gather(2, gt_of[..., None])[..., 0] + reg
        claimed = F.one_hot(gt_of, gt_boxes.shape[1]).bool() & (pre >= 0)[..., None]
        return torch.where(claimed, score[..., None], float("inf"))

    @torch.no_grad()
    def match(self, outputs: HeadOutputs, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Tensor:
        """Matched GT per anchor ``Tensor[B, A]`` long, -1 = background: gt_boxes ``Tensor[B, G,
        4]``, gt_labels and gt_valid ``Tensor[B, G]`` as ``pad_targets`` gives them."""
        b, a = outputs.cls_logits.shape[:2]
        matched = torch.full((b, a), -1, dtype=torch.long, device=gt_boxes.device)
        if gt_valid.shape[1] == 0:
            return matched
        score = self.candidate_scores(outputs, self.pre_assign(outputs.anchors, gt_boxes, gt_valid), gt_boxes, gt_labels)
        cand_idx, cand_score, start = [], [], 0
        for size in outputs.anchors.level_sizes:  # per level: the topk lowest scores of each GT
            top = score[:, start : start + size].topk(min(self.topk, size), dim=1, largest=False)
            cand_idx.append(top.indices + start)
            cand_score.append(top.values)
            start += size
        idx, x = torch.cat(cand_idx, 1).transpose(1, 2), torch.cat(cand_score, 1).transpose(1, 2)  # [B, G, K]
        valid = torch.isfinite(x)
        pos = gmm_positives(torch.where(valid, x, 0.0), valid, self.gmm_iters)
        gt_index = torch.arange(gt_valid.shape[1], device=idx.device)[None, :, None].expand_as(idx)
        img, g, k = pos.nonzero(as_tuple=True)
        matched[img, idx[img, g, k]] = gt_index[img, g, k]  # an anchor is pre-assigned to one GT
        return matched

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        check_outputs(outputs, targets, self.num_classes)
        device = outputs.cls_logits.device
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, device)
        pos = positives(outputs, self.match(outputs, gt_boxes, gt_labels, gt_valid), gt_boxes, gt_labels)
        return iou_branch_terms(outputs, pos, focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma)
