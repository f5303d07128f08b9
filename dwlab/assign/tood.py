"""TOOD's task-aligned learning (Feng, Zhong, Gao, Scott, Huang, "TOOD: Task-aligned One-stage
Object Detection", ICCV 2021, §3.2): only the assignment and the loss. The T-head (task-aligned
head, §3.1) is a head option of the detector (``model.head: tood``, ``dwlab/models/thead.py``);
on the FCOS head (the default) this is TOOD's assignment on a conventional head, on the T-head it
is TOOD with its own head.

- Alignment metric (TOOD §3.2, "Task-aligned Sample Assignment"): t = s^alpha * u^beta with s
  the joint score on the GT's class, u the IoU of the predicted box with the GT; alpha 1, beta 6.
- Per GT, the m = 13 anchors with the largest t (over all levels) are candidates; those whose
  point lies inside the GT and whose t > 0 are positive (released code: top-m first, then the
  inside filter). An anchor positive for several GTs takes the one with the highest IoU.
- Normalised target (§3.2, "Task-aligned Loss"): t_hat = t / (max_t + 1e-7) * max_u, the maxima
  over the GT's positives, so the best-aligned anchor of each GT gets (nearly) that GT's largest
  IoU. The 1e-7 is the released code's (MMDetection ``tood_head.py``); it matters while scores
  are tiny, early in training (t_max = 2.6e-7 lowers the best anchor's target by 28%).
- Classification: the focal-style loss with t_hat as the soft label, exponent 2,
      pos: |t_hat - s|^2 BCE(s, t_hat),   neg: s^2 BCE(s, 0)
  i.e. ``dwlab.losses.quality_focal_loss`` with target t_hat.
- Box: GIoU loss weighted by t_hat, weight 2.0.
- Normalisation (released code): both terms divided by the sum of t_hat over the batch.

- Warm-up (released code, ``initial_epoch=4`` of 12): during the first ``initial_epochs`` epochs
  the assignment is ATSS's (``common.atss_match``: top-9 anchors per level, anchor boxes of side
  ``anchor_scale * stride``, IoU threshold mean + std, centre inside) and the loss is the ATSS
  head's on the joint score: focal loss with hard targets (alpha 0.25, gamma 2, on s) over the
  number of positives, and GIoU weighted by the centerness target (``common.centerness_target``)
  over the sum of those weights, weight ``box_weight``. The released code's alignment metric in
  those epochs is ATSS's box weight, 1 on every positive: a hard target, not the IoU.
  The training loop tells the assigner its epoch (``set_epoch``); an assigner never told (tests,
  plots, the benchmark) assigns task-aligned, as after the warm-up.

Score convention: as ``gfl``, the joint score s = sigmoid(cls) * sigmoid(ctr) is both the s of
the metric and the score the loss trains.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    WeightMaps,
    QualityAssignment,
    atss_positives,
    centerness_target,
    check_outputs,
    class_target,
    focus_maps,
        one_gt_per_anchor,
    pad_targets,
    pairwise_iou,
    points_inside,
    positives,
)
from dwlab.box_ops import boxes_to_distances
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import qfl_weights, quality_focal_loss
from dwlab.models.outputs import HeadOutputs

TARGET_EPS = 1e-7  # t_hat = t / (max t + 1e-7) * max u (released code)
WARMUP_FOCAL_ALPHA, WARMUP_FOCAL_GAMMA = 0.25, 2.0  # the released warm-up's focal loss (initial_loss_cls)


class TaskAlignedMatch(NamedTuple):
    """matched ``Tensor[B, A]`` (-1 = background); metric, iou, target ``Tensor[B, A]``: t, u and
    t_hat of each anchor with its matched GT (0 on background); candidates ``Tensor[B, m, G]``
    the top-m anchors of each GT. All without gradient."""

    matched: Tensor
    metric: Tensor
    iou: Tensor
    target: Tensor
    candidates: Tensor


@torch.no_grad()
def task_aligned_match(
    scores: Tensor,
    pred_boxes: Tensor,
    points: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    topk: int = 13,
    alpha: float = 1.0,
    beta: float = 6.0,
) -> TaskAlignedMatch:
    """Task-aligned assignment of a batch.

    scores ``Tensor[B, A, C]`` s; pred_boxes ``Tensor[B, A, 4]`` xyxy; points ``Tensor[A, 2]``;
    gt_boxes ``Tensor[B, G, 4]``; gt_labels, gt_valid ``Tensor[B, G]``. Dense over ``[B, A, G]``.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    b, a, _ = scores.shape
    g, device = gt_valid.shape[1], scores.device
    if g == 0 or a == 0:
        zeros = torch.zeros(b, a, device=device)
        return TaskAlignedMatch(
            torch.full((b, a), -1, dtype=torch.long, device=device), zeros, zeros.clone(), zeros.clone(),
            torch.zeros(b, 0, g, dtype=torch.long, device=device),
        )  # fmt: skip
    s = scores.float().gather(2, gt_labels[:, None, :].expand(b, a, g))  # [B, A, G]
    u = pairwise_iou(pred_boxes.float(), gt_boxes, gt_valid)  # [B, A, G]
    t = s.pow(alpha) * u.pow(beta)  # the anchor alignment metric
    cand_t, cand = t.topk(min(topk, a), dim=1)  # [B, m, G]
    inside = points_inside(points[cand], gt_boxes[:, None])  # [B, m, G]
    pos = inside & (cand_t > 0) & gt_valid[:, None]
    # several GTs: the highest IoU wins (a candidate appears once per GT column)
    matched = one_gt_per_anchor(torch.zeros_like(u, dtype=torch.bool).scatter_(1, cand, pos), u, largest=True)
    is_pos = matched >= 0
    safe = matched.clamp(min=0).unsqueeze(-1)
    zeros = torch.zeros_like(u[..., 0])
    metric = torch.where(is_pos, t.gather(2, safe).squeeze(-1), zeros)
    iou = torch.where(is_pos, u.gather(2, safe).squeeze(-1), zeros)
    # t_hat = t / (max_t + eps) * max_u over each GT's positives
    key = (torch.arange(b, device=device)[:, None] * g + matched)[is_pos]  # flat (image, GT) index
    zeros = torch.zeros(b * g, device=device)
    t_max = zeros.scatter_reduce(0, key, metric[is_pos], "amax", include_self=False)
    u_max = zeros.scatter_reduce(0, key, iou[is_pos], "amax", include_self=False)
    target = torch.zeros_like(metric)
    target[is_pos] = metric[is_pos] / (t_max[key] + TARGET_EPS) * u_max[key]
    return TaskAlignedMatch(matched, metric, iou, target, cand)


class TOODAssigner(WeightMaps, LabelAssigner):
    """Task-aligned assignment + focal-style loss on t_hat + t_hat-weighted GIoU, after
    ``initial_epochs`` epochs of ATSS assignment and loss (see the module docstring).

    Returns ``{"loss_cls", "loss_box"}``, unweighted; ``loss_weights`` gives ``loss_box`` the
    weight ``box_weight``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        topk: int = 13,
        alpha: float = 1.0,
        beta: float = 6.0,
        qfl_beta: float = 2.0,
        box_weight: float = 2.0,
        initial_epochs: int = 4,
        initial_topk: int = 9,
        anchor_scale: float = 8.0,
    ) -> None:
        check_positive(num_classes=num_classes, topk=topk, initial_topk=initial_topk, anchor_scale=anchor_scale)
        if initial_epochs < 0:
            raise ValueError(f"initial_epochs must be >= 0, got {initial_epochs}")
        self.num_classes, self.topk, self.alpha, self.beta = num_classes, topk, alpha, beta
        self.qfl_beta, self.box_weight = qfl_beta, box_weight
        self.initial_epochs = initial_epochs
        self.initial_topk, self.anchor_scale = initial_topk, anchor_scale  # the warm-up's ATSS match
        self.epoch: int | None = None  # set by the training loop; None: past the warm-up
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight}

    def set_epoch(self, epoch: int) -> None:
        """The training loop's epoch, 0-based: before ``initial_epochs`` the ATSS warm-up."""
        self.epoch = epoch

    @property
    def warming_up(self) -> bool:
        return self.epoch is not None and self.epoch < self.initial_epochs

    def match(self, outputs: HeadOutputs, targets: list[Target]) -> tuple[TaskAlignedMatch, Tensor, Tensor]:
        """``(TaskAlignedMatch, gt_boxes Tensor[B, G, 4], gt_labels Tensor[B, G])``, without gradient."""
        check_outputs(outputs, targets, self.num_classes)
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, outputs.cls_logits.device)
        with torch.no_grad():
            m = task_aligned_match(
                outputs.scores().detach(), outputs.boxes().detach(), outputs.anchors.points,
                gt_boxes, gt_labels, gt_valid, topk=self.topk, alpha=self.alpha, beta=self.beta,
            )  # fmt: skip
        return m, gt_boxes, gt_labels

    def assign(self, outputs: HeadOutputs, targets: list[Target]) -> QualityAssignment:
        """Positives with quality = box weight = t_hat; in the warm-up, ATSS positives with
        quality 1 and box weight the centerness target."""
        if self.warming_up:
            return self._warmup_assign(outputs, targets)
        m, gt_boxes, gt_labels = self.match(outputs, targets)
        pos = positives(outputs, m.matched, gt_boxes, gt_labels)
        t_hat = m.target[pos.image, pos.anchor]
        return QualityAssignment(m.matched, pos, t_hat, t_hat)

    def _warmup_assign(self, outputs: HeadOutputs, targets: list[Target]) -> QualityAssignment:
        m, pos = atss_positives(
            outputs, targets, self.num_classes, topk=self.initial_topk, anchor_scale=self.anchor_scale
        )
        with torch.no_grad():
            ctr = centerness_target(boxes_to_distances(outputs.anchors.points[pos.anchor], pos.gt_boxes))
        return QualityAssignment(m.matched, pos, torch.ones_like(ctr), ctr, m)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        asg = self.assign(outputs, targets)
        if self.warming_up:
            return self._warmup_losses(outputs, asg)
        target = class_target(outputs.cls_logits.shape, asg.pos, asg.quality)
        loss_cls = quality_focal_loss(
            outputs.cls_logits, outputs.centerness.unsqueeze(-1), target, beta=self.qfl_beta, reduction="sum"
        )
        norm = normaliser(asg.quality.sum(), outputs.cls_logits.device)
        return {"loss_cls": loss_cls / norm, "loss_box": asg.pos.weighted_giou(asg.box_weight) / norm}

    def _warmup_losses(self, outputs: HeadOutputs, asg: QualityAssignment) -> dict[str, Tensor]:
        """The ATSS head's loss on the joint score (released warm-up): focal loss with hard
        targets over the number of positives, centerness-weighted GIoU over the weights' sum.
        Focal loss is QFL with a 0/1 target times alpha_t."""
        target = class_target(outputs.cls_logits.shape, asg.pos, asg.quality)
        focal = quality_focal_loss(
            outputs.cls_logits, outputs.centerness.unsqueeze(-1), target, beta=WARMUP_FOCAL_GAMMA, reduction="none"
        )
        alpha_t = torch.where(target > 0, WARMUP_FOCAL_ALPHA, 1.0 - WARMUP_FOCAL_ALPHA)
        return asg.per_positive_terms((alpha_t * focal).sum())

    @torch.no_grad()
    def weights(self, outputs: HeadOutputs, targets: list[Target]) -> list[dict[str, Tensor]]:
        """Per-image ``Tensor[A]`` maps (task-aligned, as after the warm-up): positives
        ``qfl_weights(s, t_hat)``; others pos 0, neg s^2."""
        m, _, _ = self.match(outputs, targets)
        maps = focus_maps(outputs, targets, m.matched, outputs.scores())
        for i, d in enumerate(maps):
            d["pos"], d["neg"] = qfl_weights(d["score"], m.target[i], self.qfl_beta)
        return maps
