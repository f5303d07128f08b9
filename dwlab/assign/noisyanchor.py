"""NoisyAnchor (Li, Wu, Liu, Yu, "Learning from Noisy Anchors for One-stage Object Detection",
CVPR 2020) on the shared FCOS head, with the released code's rules and constants
(henrylee2570/NoisyAnchor: ``detectron2/modeling/matcher.py`` ``MatcherTopN``,
``detectron2/modeling/meta_arch/retinanet_noisy.py`` ``get_ground_truth`` and ``losses``,
``configs/COCO-Detection-NoisyAnchor/retinanet_R_50_FPN_1x_noisyanchor.yaml``).

Candidates (released ``MatcherTopN``): each point has one anchor, a square of side
``anchor_scale * stride`` (8, ATSS's one-anchor RetinaNet; ``common.anchor_boxes``). Each GT
takes the ``topn`` anchors of highest anchor IoU over all levels, whatever that IoU; an anchor
in several GTs' top-N goes to the one it overlaps most. Every other anchor is negative (no
ignored anchors).

Why ``topn`` is 12 and not the released 30: the released top-30 ranks RetinaNet's 9 anchors
per point (3 scales x 3 ratios), so several of its 30 share a point. Counted on a 1333 x 800
grid of those anchors (strides 8-128, sizes 4 x stride x 2^(k/3)) for 300 GTs of sides
log-uniform in 16-512 px and aspect ratios log-uniform in 1/3-3, the top 30 anchors lie on 12.7
distinct points on average (median 12, range 6-24). With one anchor per point, the top 12
cover as many points, so a GT gets as many positive locations as released. (30 / 9 = 3.3
would keep the fraction of anchors instead, and leave a GT 3 points.)

Cleanliness, soft labels and re-weights (the paper's three parts, in the released
``get_ground_truth``'s form), for each positive a with GT g:
loc_a = IoU(predicted box of a, g), cls_a = the predicted score of g's class at a (both
detached), alpha = 0.75, means and extrema over **all positives of the image**:

    c_a  = alpha loc_a / mean(loc) + (1 - alpha) cls_a / mean(cls)                  (cleanliness)
    y_a  = mean(loc) + (c_a - min c) (1 - mean(loc)) / (max c - min c)               (soft label)
    r_a  = alpha u_a / mean(u) + (1 - alpha) v_a / mean(v),
           u_a = 1 / (1 - loc_a),  v_a = 1 / (1 - cls_a)                             (re-weight)

y in [mean(loc), 1] is the classification target of a on g's class (released: "bounding soft
labels to [C, 1] ... C = loc_acc.mean()"); 0 everywhere else. r is mean 1 over the image's
positives. Guards where the released code gives NaN or inf: max c - min c below ``SPAN_EPS``
(one positive, or all alike) gives y = 1 for the image's positives; a mean below ``MEAN_EPS``
(every loc 0, early in training) is taken as ``MEAN_EPS``; loc and cls are clamped to at most
1 - ``Q_EPS`` inside 1 / (1 - q).

Loss (released ``losses``): r weighs every term of its anchor (all classes; 1 for negatives),
and each loss is rescaled by the detached ratio that keeps its sum, so only how it is spread
changes:

    loss_cls = K_cls sum_{a, c} r_a FL(s_ac, y_ac) / N,  K_cls = sum FL / sum r FL   (detached)
    loss_box = K_box sum_pos r_a L_box,a / N,            K_box = sum L_box / sum r L_box

FL is NoisyAnchor's soft focal loss (``losses.focal_loss``) with alpha 0.5 (released config),
gamma 2; N the number of positives (averaged over workers, at least 1).

Where the single FCOS head departs (decided, with the reason):

- One anchor per point instead of 9, and ``topn`` scaled as above.
- An anchor in the top-N of several GTs takes, among those GTs, the one of highest anchor IoU;
  the released code takes the argmax over all the image's GTs, the same GT except where the
  anchor's best GT did not select it (there, and for an anchor of IoU 0 with every GT, which
  the released argmax sends to GT 0, the released label is a GT that did not choose it).
- Box term: the detector's GIoU loss on the decoded distances (weight 2, as dwlab's
  ATSS-family methods), not RetinaNet's smooth-L1 on deltas from the anchor box: the head
  regresses distances from the point, and the anchor box serves the candidates' IoU only.
- Scores: RetinaNet has no quality branch; dwlab's detector ranks by the joint score s =
  sigmoid(cls) * sigmoid(ctr), so FL trains s (as dwlab's GFL, VFL and TOOD do) and cls_a is
  s at g's class.
- Normaliser: the number of positives of the batch, where the released code divides by an
  EMA of it (detectron2's RetinaNet, momentum 0.9, start 100: a training-loop device of the
  base detector, not of NoisyAnchor, and state an assigner would have to checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import (
    Positives,
    anchor_boxes,
    check_outputs,
    class_target,
    one_gt_per_anchor,
    pad_targets,
    pairwise_iou,
    positives,
    smallest_k,
)
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import focal_loss
from dwlab.models.outputs import Anchors, HeadOutputs

SPAN_EPS = 1e-6  # max c - min c below this: the image's positives are all alike, y = 1
MEAN_EPS = 1e-6  # floor of mean(loc) and mean(cls) as divisors
Q_EPS = 1e-6  # loc and cls at most 1 - Q_EPS inside 1 / (1 - q)


def _image_mean(values: Tensor, image: Tensor, num_images: int) -> Tensor:
    """Each pair's image mean of ``values`` ``Tensor[P]`` (image ``Tensor[P]``) -> ``Tensor[P]``."""
    total = values.new_zeros(num_images).index_add_(0, image, values)
    count = values.new_zeros(num_images).index_add_(0, image, torch.ones_like(values))
    return (total / count.clamp(min=1)).index_select(0, image)


def _image_extreme(values: Tensor, image: Tensor, num_images: int, how: str) -> Tensor:
    """Each pair's image min (``how`` "amin") or max ("amax") of ``values`` -> ``Tensor[P]``."""
    out = values.new_zeros(num_images).scatter_reduce(0, image, values, how, include_self=False)
    return out.index_select(0, image)


@torch.no_grad()
def clean_targets(loc: Tensor, cls: Tensor, image: Tensor, num_images: int, alpha: float) -> tuple[Tensor, Tensor]:
    """NoisyAnchor's soft labels y and re-weights r of P positives (module docstring): loc, cls
    ``Tensor[P]`` in [0, 1], image ``Tensor[P]`` long (the positive's image, < num_images) ->
    ``(y, r)``, two ``Tensor[P]``, finite, without gradient."""
    loc, cls = loc.float(), cls.float()
    loc_mean = _image_mean(loc, image, num_images)
    cls_mean = _image_mean(cls, image, num_images)
    c = alpha * loc / loc_mean.clamp(min=MEAN_EPS) + (1 - alpha) * cls / cls_mean.clamp(min=MEAN_EPS)
    lo = _image_extreme(c, image, num_images, "amin")
    span = _image_extreme(c, image, num_images, "amax") - lo
    spread = loc_mean + (c - lo) * (1 - loc_mean) / span.clamp(min=SPAN_EPS)
    y = torch.where(span >= SPAN_EPS, spread, torch.ones_like(c))
    u = 1 / (1 - loc.clamp(max=1 - Q_EPS))
    v = 1 / (1 - cls.clamp(max=1 - Q_EPS))
    r = alpha * u / _image_mean(u, image, num_images) + (1 - alpha) * v / _image_mean(v, image, num_images)
    return y, r


def keep_sum(loss: Tensor, weight: Tensor) -> Tensor:
    """``sum(weight * loss)`` rescaled to ``sum(loss)`` by a detached factor (released: the sum
    is kept, the weights only move the gradient between terms); 0 when ``sum(weight * loss)``
    is 0. loss and weight broadcastable, weight without gradient."""
    weighted = (loss * weight).sum()
    scale = loss.sum().detach() / weighted.detach().clamp(min=torch.finfo(torch.float32).tiny)
    return weighted * scale


@dataclass
class NoisyAssignment:
    """matched ``Tensor[B, A]`` long (-1 = background); pos: the positive pairs; soft ``Tensor[P]``
    y, the classification target of each positive; reweight ``Tensor[P]`` r. No gradient (but
    ``pos.pred_boxes``)."""

    matched: Tensor
    pos: Positives
    soft: Tensor
    reweight: Tensor


class NoisyAnchorAssigner(LabelAssigner):
    """NoisyAnchor's top-N candidates, cleanliness soft labels and re-weighting (module docstring).

    Returns ``{"loss_cls", "loss_box"}``, unweighted; ``loss_weights`` gives ``loss_box`` the
    weight ``box_weight`` (2).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        topn: int = 12,
        anchor_scale: float = 8.0,
        alpha: float = 0.75,
        focal_alpha: float = 0.5,
        focal_gamma: float = 2.0,
        box_weight: float = 2.0,
    ) -> None:
        check_positive(num_classes=num_classes, topn=topn, anchor_scale=anchor_scale)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the loc share of the cleanliness), got {alpha}")
        self.num_classes, self.topn, self.anchor_scale, self.alpha = num_classes, topn, anchor_scale, alpha
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_weights = {"loss_cls": 1.0, "loss_box": box_weight}

    @torch.no_grad()
    def match(self, anchors: Anchors, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        """Matched GT per anchor ``Tensor[B, A]`` long, -1 = background: each GT's ``topn``
        anchors by anchor IoU (ties: the lower anchor index), an anchor of several GTs to the
        one of highest IoU. gt_boxes ``Tensor[B, G, 4]``, gt_valid ``Tensor[B, G]``."""
        b, g = gt_valid.shape
        if g == 0:
            return torch.full((b, len(anchors)), -1, dtype=torch.long, device=gt_boxes.device)
        iou = pairwise_iou(anchor_boxes(anchors, self.anchor_scale)[None], gt_boxes, gt_valid)  # [B, A, G]
        k = torch.full((b, g), min(self.topn, len(anchors)), device=iou.device)
        claims = smallest_k(-iou, k) & gt_valid[:, None, :]  # each GT's top N, over all levels
        return one_gt_per_anchor(claims, iou, largest=True)

    def assign(self, outputs: HeadOutputs, targets: list[Target]) -> NoisyAssignment:
        """The batch's positives with their soft labels and re-weights."""
        check_outputs(outputs, targets, self.num_classes)
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, outputs.cls_logits.device)
        matched = self.match(outputs.anchors, gt_boxes, gt_valid)
        pos = positives(outputs, matched, gt_boxes, gt_labels)
        with torch.no_grad():
            logit = outputs.cls_logits.detach()[pos.image, pos.anchor, pos.label].float()
            cls = torch.sigmoid(logit) * torch.sigmoid(outputs.centerness.detach()[pos.image, pos.anchor].float())
            soft, reweight = clean_targets(pos.iou, cls, pos.image, len(targets), self.alpha)
        return NoisyAssignment(matched, pos, soft, reweight)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        asg = self.assign(outputs, targets)
        pos, device = asg.pos, outputs.cls_logits.device
        num_pos = normaliser(float(pos.image.numel()), device)
        target = class_target(outputs.cls_logits.shape, pos, asg.soft)
        fl = focal_loss(
            outputs.cls_logits, outputs.centerness.unsqueeze(-1), target,
            alpha=self.focal_alpha, gamma=self.focal_gamma,
        )  # fmt: skip  # [B, A, C]
        anchor_weight = torch.ones(fl.shape[:2], device=device)
        anchor_weight[pos.image, pos.anchor] = asg.reweight
        box = generalized_box_iou_loss(pos.pred_boxes, pos.gt_boxes, reduction="none")
        return {
            "loss_cls": keep_sum(fl, anchor_weight[..., None]) / num_pos,
            "loss_box": keep_sum(box, asg.reweight) / num_pos,
        }
