"""MuSu, Mutual Supervision (Gao, Wang, Wu, "Mutual Supervision for Dense Object Detection", ICCV
2021) on the shared FCOS head.

No official code exists (the paper's footnote names MCG-NJU/MuSu-Detection; no copy of it can be
had and public code search finds none: ``/work/shared/notes/pitfalls-methods.md`` §6), and the
paper's equations could not be read here (only its abstract and the caption of its Fig. 2).
What follows the paper, and what is this module's reading, is marked [paper] and [reading]:

- [paper] The two heads get different training samples: the classification head's samples and
  soft targets are chosen by the regression head's localisation score (the IoU of its predicted
  box with the GT), the regression head's samples and loss weights by the classification head's
  score. Soft targets act by weighting the base loss at each location (Fig. 2). Samples are
  chosen inside a candidate bag per GT, over the FPN levels.
- [reading] Candidate bag B_g: the anchor points strictly inside GT g (by 0.01 px, as ATSS),
  over all levels (DW's bag; a GT that holds no point has no sample, as in FCOS and DW).
- [reading] Localisation score u_ag = IoU(box_a, g) of the predicted box; classification score
  s_ag = the joint score s = sigmoid(cls) * sigmoid(ctr) (the score dwlab ranks detections by,
  as for GFL and TOOD) on g's class. Both without gradient.
- [reading] Classification samples: per GT, the ``cls_topk`` (9, ATSS's k) anchors of B_g with
  the largest u_ag; soft target y_a = u_ag (the IoU, as GFL's), 0 on every other entry; loss:
  Quality Focal Loss (beta 2) over the number of classification samples,
      loss_cls = sum_all -|y - s|^2 ((1 - y) ln(1 - s) + y ln s) / N_cls.
- [reading] Regression samples: per GT, the ``reg_topk`` (9) anchors of B_g with the largest
  s_ag; weight w_a = s_ag / max_{a' in R_g} s_a'g (the most confident sample of each GT weighs
  1, so the weights do not vanish while scores are small); loss: weighted GIoU,
      loss_box = sum_reg w_a (1 - GIoU(box_a, g)) / sum_reg w_a,       weight ``box_weight`` 2
  (the GIoU weight of FCOS, ATSS, GFL, TOOD on this head; MuSu's own loss weights are not known
  here).
- [reading] An anchor chosen by several GTs for one head keeps the GT its predicted box overlaps
  most (TOOD's and ATSS's rule; in the warm-up, the GT its anchor box overlaps most), for each
  head separately.
- [reading] Early training. Both selections rank by the other head's early predictions, which
  are noise at initialisation. For the first ``warmup_epochs`` (1) epochs, both heads' samples
  are ranked by a geometric prior instead: the IoU of the point's square anchor of side
  ``anchor_scale * stride`` (8, ATSS's) with the GT. Targets and weights are the mutual ones
  throughout (y = u, w = s / max s). The epoch reaches the assigner through ``set_epoch`` (as
  TOOD's ATSS warm-up); an assigner never told (tests, plots, the benchmark) ranks mutually. The
  paper reports that mutual supervision converges; whether it used such a warm-up is not known.

Left out: the paper's finding that tiling more anchors per location helps needs an anchor head;
this head has one point per location.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    anchor_boxes,
    check_outputs,
    class_target,
    one_gt_per_anchor,
    pad_targets,
    pairwise_iou,
    points_inside,
    positives,
)
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import quality_focal_loss
from dwlab.models.outputs import HeadOutputs


class MutualMatch(NamedTuple):
    """The two heads' samples, without gradient. cls_matched, reg_matched ``Tensor[B, A]`` long:
    the GT of each anchor's classification / regression sample, -1 = none; iou ``Tensor[B, A, G]``
    u_ag; score ``Tensor[B, A, G]`` s_ag (0 on padded GTs)."""

    cls_matched: Tensor
    reg_matched: Tensor
    iou: Tensor
    score: Tensor


def top_in_bag(key: Tensor, bag: Tensor, k: int) -> Tensor:
    """Per GT column, the ``k`` anchors of its bag with the largest ``key`` (ties: lower anchor
    index first), bool ``Tensor[B, A, G]``: key ``Tensor[B, A, G]``, bag bool ``Tensor[B, A, G]``.
    A bag smaller than k gives all of it."""
    masked = torch.where(bag, key, float("-inf"))
    top = masked.topk(min(k, key.shape[1]), dim=1).indices  # [B, k, G]
    return torch.zeros_like(bag).scatter_(1, top, bag.gather(1, top))


@torch.no_grad()
def mutual_match(
    scores: Tensor,
    pred_boxes: Tensor,
    bag: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    cls_topk: int,
    reg_topk: int,
    prior: Tensor | None = None,
) -> MutualMatch:
    """Mutual selection of a batch: classification samples by u, regression samples by s (by
    ``prior`` for both, a ``Tensor[B, A, G]`` geometric key, in the warm-up).

    scores ``Tensor[B, A, C]`` s; pred_boxes ``Tensor[B, A, 4]`` xyxy; bag bool ``Tensor[B, A, G]``
    B_g (padded GTs excluded); gt_boxes ``Tensor[B, G, 4]``; gt_labels, gt_valid ``Tensor[B, G]``.
    Dense over ``[B, A, G]``.
    """
    b, a, _ = scores.shape
    g = gt_valid.shape[1]
    u = pairwise_iou(pred_boxes.float(), gt_boxes, gt_valid)  # [B, A, G]
    s = scores.float().gather(2, gt_labels[:, None, :].expand(b, a, g)) * gt_valid[:, None]
    cls_key, reg_key, tie = (u, s, u) if prior is None else (prior, prior, prior)
    cls_sel = top_in_bag(cls_key, bag, cls_topk)  # the regression head's quality chooses
    reg_sel = top_in_bag(reg_key, bag, reg_topk)  # the classification head's score chooses
    cls_matched = one_gt_per_anchor(cls_sel, tie, largest=True)
    reg_matched = one_gt_per_anchor(reg_sel, tie, largest=True)
    return MutualMatch(cls_matched, reg_matched, u, s)


def per_gt_max_ratio(values: Tensor, image: Tensor, gt: Tensor, num_images: int, num_gts: int) -> Tensor:
    """``values[p] / max`` of the values sharing p's (image, GT), ``Tensor[P]``: values, image, gt
    ``Tensor[P]`` (gt indexes the image's padded GTs, ``num_gts`` per image). 0 / 0 gives 0."""
    key = image * num_gts + gt
    top = values.new_zeros(num_images * num_gts).scatter_reduce(0, key, values, "amax", include_self=False)
    return values / top[key].clamp(min=torch.finfo(values.dtype).tiny)


class MuSuAssigner(LabelAssigner):
    """Mutual supervision: QFL on samples chosen by the predicted boxes' IoU, score-weighted GIoU
    on samples chosen by the scores, after a geometric warm-up (module docstring).

    Returns ``{"loss_cls", "loss_box"}``, unweighted; ``loss_weights`` gives ``loss_box`` the
    weight ``box_weight``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        cls_topk: int = 9,
        reg_topk: int = 9,
        qfl_beta: float = 2.0,
        box_weight: float = 2.0,
        warmup_epochs: int = 1,
        anchor_scale: float = 8.0,
    ) -> None:
        check_positive(num_classes=num_classes, cls_topk=cls_topk, reg_topk=reg_topk, anchor_scale=anchor_scale)
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.num_classes, self.cls_topk, self.reg_topk = num_classes, cls_topk, reg_topk
        self.qfl_beta, self.warmup_epochs, self.anchor_scale = qfl_beta, warmup_epochs, anchor_scale
        self.epoch: int | None = None  # set by the training loop; None: past the warm-up
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight}

    def set_epoch(self, epoch: int) -> None:
        """The training loop's epoch, 0-based: before ``warmup_epochs`` the geometric ranking."""
        self.epoch = epoch

    @property
    def warming_up(self) -> bool:
        return self.epoch is not None and self.epoch < self.warmup_epochs

    def match(self, outputs: HeadOutputs, targets: list[Target]) -> tuple[MutualMatch, Tensor, Tensor]:
        """``(MutualMatch, gt_boxes Tensor[B, G, 4], gt_labels Tensor[B, G])``, without gradient."""
        check_outputs(outputs, targets, self.num_classes)
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, outputs.cls_logits.device)
        anchors = outputs.anchors
        with torch.no_grad():
            bag = points_inside(anchors.points[None, :, None], gt_boxes[:, None]) & gt_valid[:, None]
            prior = None
            if self.warming_up:
                prior = pairwise_iou(anchor_boxes(anchors, self.anchor_scale)[None], gt_boxes, gt_valid)
            m = mutual_match(
                outputs.scores().detach(), outputs.boxes().detach(), bag, gt_boxes, gt_labels, gt_valid,
                cls_topk=self.cls_topk, reg_topk=self.reg_topk, prior=prior,
            )  # fmt: skip
        return m, gt_boxes, gt_labels

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        m, gt_boxes, gt_labels = self.match(outputs, targets)
        device = outputs.cls_logits.device
        cls_pos = positives(outputs, m.cls_matched, gt_boxes, gt_labels)
        target = class_target(outputs.cls_logits.shape, cls_pos, cls_pos.iou)  # y = u
        loss_cls = quality_focal_loss(
            outputs.cls_logits, outputs.centerness.unsqueeze(-1), target, beta=self.qfl_beta, reduction="sum"
        )
        reg_pos = positives(outputs, m.reg_matched, gt_boxes, gt_labels)
        with torch.no_grad():
            s = m.score[reg_pos.image, reg_pos.anchor, reg_pos.gt]
            w = per_gt_max_ratio(s, reg_pos.image, reg_pos.gt, *gt_boxes.shape[:2])
        return {
            "loss_cls": loss_cls / normaliser(float(cls_pos.image.numel()), device),
            "loss_box": reg_pos.weighted_giou(w) / normaliser(w.sum(), device),
        }
