"""GFL (Li, Wang, Wu, Chen, Hu, Li, Tang, Yang, "Generalized Focal Loss: Learning Qualified and
Distributed Bounding Boxes for Dense Object Detection", NeurIPS 2020) and GFLv2 (Li, Wang, Wu,
Hu, Tang, Yang, "Generalized Focal Loss V2: Learning Reliable Localization Quality Estimation
for Dense Object Detection", CVPR 2021); three methods:

``qfl`` (``QFLAssigner``): GFL's Quality Focal Loss alone, without the distribution branch
(dwlab's ``gfl`` before the DFL was added; its numbers are unchanged).

- Assignment: ``common.atss_match`` (top-9 per level, IoU threshold mean + std, centre inside GT),
  anchor boxes of side 8 * stride, as GFL's configuration.
- Classification: QFL (GFL §3, Eq. 2; ``dwlab.losses.quality_focal_loss``) with the soft
  target y = IoU(predicted box, GT) on the positive's GT class and y = 0 everywhere else, beta 2:
      QFL(s, y) = -|y - s|^beta * ((1 - y) ln(1 - s) + y ln s)
  summed over every (image, anchor, class) and divided by the number of positives.
- Box: GIoU loss of the positives (lambda_0 = 2), weighted by the predicted quality score (the
  largest score over classes, detached) and divided by the sum of those weights (released code).

``gfl`` (``GFLAssigner``): GFL as published, the above plus the general distribution of box
boundaries and its Distribution Focal Loss (GFL §3). It needs the head's distribution option
(``model.reg_max``, ``dwlab.models.head``) with its own bin count ``reg_max`` (n = 16, GFL's; the
CPU scales' presets divide it by 4 like the anchors): ``head_init`` asks for it, so a run of
``gfl`` builds that head with ``model.reg_max`` left null (a different ``model.reg_max`` is
refused when the detector is built); called on outputs without that distribution it raises
``ValueError``.

- Box distances: the distribution's integral (GFL Eq. 4, ``models.head.integral``), in stride
  units, times the stride; GIoU and the IoU target on the decoded boxes (in pixels: GIoU and IoU
  do not change when both boxes are divided by the stride, as the released code does).
- DFL (GFL Eq. 5, ``dwlab.losses.distribution_focal_loss``) of each side's logits against the
  target distance in stride units, ``y = d / stride`` clamped to ``[0, n - 0.1]`` (the released
  ``bbox2distance(..., max_dis=reg_max)``, eps 0.1, GFocalV2 and MMDetection 2.x):
      DFL(S, y) = -((y_{i+1} - y) ln S_i + (y - y_i) ln S_{i+1})
- Loss (GFL Eq. 7 with the released normalisers): L = L_QFL / N_pos + lambda_0 L_GIoU +
  lambda_1 L_DFL, lambda_0 = 2, lambda_1 = 1/4; L_GIoU = sum_p w_p GIoU_p / sum_p w_p and
  L_DFL = sum_p w_p mean_sides DFL_p / sum_p w_p (the released ``avg_factor=4`` over the four
  sides), w_p the detached largest score of positive p over classes; sum_p w_p averaged over
  workers and clamped at 1 (``dwlab.distributed.normaliser``, as MMDetection's ``gfl_head``;
  GFocalV2 divides by the unclamped sum).

``gflv2`` (``GFLv2Assigner``): GFL's loss on the score of GFLv2's Distribution-Guided Quality
Predictor (DGQP, GFLv2 §3): the head's ``dgqp`` option (``head_init`` asks for it) reads the
top-4 probabilities and their mean of each side's distribution, F = Concat(Topkm(P^w)), and
predicts the quality I = sigmoid(W_2 ReLU(W_1 F)); the score is GFLv2's decomposed joint
representation J = C x I, C = sigmoid(cls). dwlab's head puts
DGQP's logit in the centerness branch's place, so ``HeadOutputs.scores()`` (what inference ranks
by) and the QFL here are both on J; QFL is computed from the logits in float32 outside autocast
(the released head feeds the probability J to BCE under ``force_fp32``). ``sampling``: ``atss``
(DW Table 6's "ATSS+GFLv2", the released configuration) or ``fcos`` (FCOS's centre sampling and
size ranges, ``common.fcos_match``: "FCOS+GFLv2").

Which score QFL trains in ``qfl`` and ``gfl`` (decision): GFL has no centerness branch; its
classification score *is* the quality score. The shared dwlab detector keeps its centerness
logit and ranks detections by ``s = sigmoid(cls) * sigmoid(ctr)`` (``HeadOutputs.scores``), so
QFL trains that joint score s, as DW does (paper §3.5): train and test use the same score, and
the centerness logit is trained only through s (no separate centerness target). In ``gflv2``
that logit is DGQP's.

Departures a single FCOS head forces: anchor points at ``stride * (i + model.anchor_offset)``
(0.5; the released GFL anchors' centres are at ``stride * i``); the distribution head's Scale
multiplies the logits, as released.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dwlab.assign.base import HeadInit, LabelAssigner, check_positive
from dwlab.assign.common import (
    QualityAssignment,
    WeightMaps,
    atss_positives,
    check_outputs,
    class_target,
    fcos_match,
    focus_maps,
    pad_targets,
    positives,
)
from dwlab.box_ops import boxes_to_distances
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import distribution_focal_loss, qfl_weights, quality_focal_loss
from dwlab.models.head import DGQP_TOPK
from dwlab.models.outputs import HeadOutputs

REG_MAX = 16  # GFL's n: bins 0..16 per side (released ``reg_max``)
TARGET_EPS = 0.1  # DFL targets clamped to [0, n - 0.1] (released ``bbox2distance`` eps)


class QFLAssigner(WeightMaps, LabelAssigner):
    """ATSS assignment + QFL on the joint score + quality-weighted GIoU (no DFL).

    Returns ``{"loss_cls", "loss_box"}``, unweighted; ``loss_weights`` gives ``loss_box`` the
    weight ``box_weight``.
    """

    def __init__(
        self, num_classes: int, *, topk: int = 9, anchor_scale: float = 8.0, beta: float = 2.0, box_weight: float = 2.0
    ) -> None:
        check_positive(num_classes=num_classes, topk=topk, anchor_scale=anchor_scale)
        self.num_classes, self.topk, self.anchor_scale = num_classes, topk, anchor_scale
        self.beta, self.box_weight = beta, box_weight
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight}

    def assign(self, outputs: HeadOutputs, targets: list[Target]) -> QualityAssignment:
        """ATSS positives; quality = IoU of the predicted box with its GT; box weight = the
        anchor's largest joint score over classes (released code)."""
        m, pos = atss_positives(outputs, targets, self.num_classes, topk=self.topk, anchor_scale=self.anchor_scale)
        with torch.no_grad():
            box_weight = outputs.scores()[pos.image, pos.anchor].detach().float().amax(-1)
        return QualityAssignment(m.matched, pos, pos.iou, box_weight, m)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        return self.qfl_terms(outputs, self.assign(outputs, targets))

    def qfl_terms(self, outputs: HeadOutputs, asg: QualityAssignment) -> dict[str, Tensor]:
        """``loss_cls`` (QFL over the positives' count) and ``loss_box`` (score-weighted GIoU)."""
        target = class_target(outputs.cls_logits.shape, asg.pos, asg.quality)
        loss_cls = quality_focal_loss(
            outputs.cls_logits, outputs.centerness.unsqueeze(-1), target, beta=self.beta, reduction="sum"
        )
        return asg.per_positive_terms(loss_cls)

    @torch.no_grad()
    def weights(self, outputs: HeadOutputs, targets: list[Target]) -> list[dict[str, Tensor]]:
        """Per-image ``Tensor[A]`` maps: positives ``table1.gfl(s, IoU)``; others pos 0, neg s^beta."""
        asg = self.assign(outputs, targets)
        maps = focus_maps(outputs, targets, asg.matched, outputs.scores())
        for d in maps:
            s, is_pos = d["score"], d["is_pos"]
            w_pos, w_neg = qfl_weights(s, torch.where(is_pos, d["iou"], torch.zeros_like(s)), self.beta)
            d["pos"], d["neg"] = w_pos, w_neg  # on negatives (target 0): 0 and s^beta
        return maps


def dfl_targets(outputs: HeadOutputs, anchor: Tensor, gt_boxes: Tensor, reg_max: int) -> Tensor:
    """The DFL targets of P positives, ``Tensor[P, 4]``: the (l, t, r, b) distances from each
    anchor point (``anchor`` ``Tensor[P]``) to its GT box (``gt_boxes`` ``Tensor[P, 4]``) in
    stride units, clamped to ``[0, reg_max - TARGET_EPS]``; no gradient."""
    points, strides = outputs.anchors.points[anchor], outputs.anchors.strides[anchor]
    distances = boxes_to_distances(points, gt_boxes.float()) / strides[:, None]
    return distances.clamp(min=0.0, max=reg_max - TARGET_EPS).detach()


class GFLAssigner(QFLAssigner):
    """GFL as published: ATSS assignment, QFL on the joint score, score-weighted GIoU and DFL on
    the distribution head (see the module docstring).

    Returns ``{"loss_cls", "loss_box", "loss_dfl"}``, unweighted; ``loss_weights``: 1,
    ``box_weight`` (2), ``dfl_weight`` (0.25).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        topk: int = 9,
        anchor_scale: float = 8.0,
        beta: float = 2.0,
        box_weight: float = 2.0,
        dfl_weight: float = 0.25,
        reg_max: int = REG_MAX,
    ) -> None:
        super().__init__(num_classes, topk=topk, anchor_scale=anchor_scale, beta=beta, box_weight=box_weight)
        if not dfl_weight >= 0:
            raise ValueError(f"dfl_weight must be >= 0, got {dfl_weight}")
        if not reg_max >= 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        self.dfl_weight, self.reg_max = dfl_weight, reg_max
        self.head_init = HeadInit(reg_max=reg_max)  # GFL's distribution head
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight, "loss_dfl": dfl_weight}

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        """QFL over the positives' count; GIoU and DFL, each weighted by the positives' detached
        largest score and divided by the sum of those weights (released normalisers)."""
        bins = None if outputs.distribution is None else outputs.distribution.shape[-1]
        if bins != self.reg_max + 1:
            raise ValueError(
                f"{type(self).__name__} needs the distribution head of reg_max={self.reg_max} "
                f"({self.reg_max + 1} bins per side), got {bins} (model.reg_max; a run builds it from head_init)"
            )
        with torch.autocast(outputs.cls_logits.device.type, enabled=False):
            asg = self.assign(outputs, targets)
            terms = self.qfl_terms(outputs, asg)
            pos, dist = asg.pos, outputs.distribution
            target = dfl_targets(outputs, pos.anchor, pos.gt_boxes, self.reg_max)  # [P, 4]
            dfl = distribution_focal_loss(dist[pos.image, pos.anchor], target)  # [P, 4]
            weighted = (asg.box_weight[:, None] * dfl).sum() / 4.0  # released avg_factor 4: the mean over sides
            terms["loss_dfl"] = weighted / normaliser(asg.box_weight.sum(), dist.device)
        return terms


class GFLv2Assigner(GFLAssigner):
    """GFLv2: GFL's loss on the joint score J = sigmoid(cls) x DGQP's quality (the head's
    ``dgqp``), on ATSS's (``sampling="atss"``) or FCOS's (``"fcos"``) sampling.

    Returns ``{"loss_cls", "loss_box", "loss_dfl"}``, unweighted, weights as ``gfl``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        topk: int = 9,
        anchor_scale: float = 8.0,
        beta: float = 2.0,
        box_weight: float = 2.0,
        dfl_weight: float = 0.25,
        reg_max: int = REG_MAX,
        sampling: str = "atss",
        center_radius: float = 1.5,
        size_ranges: list[float] = (0.0, 64.0, 128.0, 256.0, 512.0, 1e8),
    ) -> None:
        super().__init__(
            num_classes, topk=topk, anchor_scale=anchor_scale, beta=beta, box_weight=box_weight,
            dfl_weight=dfl_weight, reg_max=reg_max,
        )  # fmt: skip
        if reg_max + 1 < DGQP_TOPK:
            raise ValueError(f"reg_max must be >= {DGQP_TOPK - 1} for DGQP's top-{DGQP_TOPK}, got {reg_max}")
        self.head_init = HeadInit(reg_max=reg_max, dgqp=True)  # and GFLv2's DGQP
        if sampling not in ("atss", "fcos"):
            raise ValueError(f"sampling must be 'atss' or 'fcos', got {sampling!r}")
        check_positive(center_radius=center_radius)
        if len(size_ranges) != 6:
            raise ValueError(f"size_ranges needs 6 bounds for P3-P7, got {list(size_ranges)}")
        self.sampling, self.center_radius, self.size_ranges = sampling, center_radius, list(size_ranges)

    def assign(self, outputs: HeadOutputs, targets: list[Target]) -> QualityAssignment:
        """ATSS's positives (``GFLAssigner.assign``) or FCOS's; quality and box weight as GFL's."""
        if self.sampling == "atss":
            return super().assign(outputs, targets)
        check_outputs(outputs, targets, self.num_classes)
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, outputs.cls_logits.device)
        matched = fcos_match(
            outputs.anchors, gt_boxes, gt_valid, center_radius=self.center_radius, size_ranges=self.size_ranges
        )
        pos = positives(outputs, matched, gt_boxes, gt_labels)
        with torch.no_grad():
            box_weight = outputs.scores()[pos.image, pos.anchor].detach().float().amax(-1)
        return QualityAssignment(matched, pos, pos.iou, box_weight)
