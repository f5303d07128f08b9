"""MAL, Multiple Anchor Learning (Ke, Zhang, Huang, Ye, Liu, Huang, "Multiple Anchor Learning for
Visual Object Detection", CVPR 2020) on the shared FCOS head: FreeAnchor's bag likelihood with
MAL's anchor selection; **without** MAL's anchor depression.

MAL is built on FreeAnchor (Zhang et al., NeurIPS 2019); its released code (DeLightCMU/MAL,
``free_anchor_loss_IA.py``, ``configs/mal_R-50-FPN.yaml``) is FreeAnchor's loss with MAL's
constants. Per image, with s_aj the score of anchor a on class j (here the joint score
s = sigmoid(cls) * sigmoid(ctr), the score dwlab ranks detections by):

- Bag A_i of GT i (released: the top-40 of RetinaNet's 9 anchors per location by IoU):
  the ``bag_size`` anchors whose anchor box (a square of side ``anchor_scale * stride``, 8, one
  per point: dwlab's ATSS and PAA anchor) overlaps GT i most, over all levels, whatever the IoU.
  Scaled for one anchor per location by keeping the bag's *locations*: on RetinaNet's anchors
  (octave base 4, 3 scales x 3 ratios, P3-P7, an 800 px image) a GT's top-40 anchors lie on 17
  distinct locations on average (16, 11, 19, 20, 19 for GT sides 16, 32, 64, 128, 256 px, aspect
  ratios 0.5-2, 50 GTs each; measured once for this module), so ``bag_size`` is 17, not 40 / 9.
- Anchor confidence (FreeAnchor's P_ij^cls P_ij^loc, MAL's anchor confidence): x_ai = P_cls * P_loc, P_cls = s_a on
  i's class and P_loc = exp(-``loc_lambda`` * (1 - GIoU(box_a, b_i))), both with gradient.
  Released P_loc is exp(-0.75 smooth-L1) of RetinaNet's encoded deltas (weights 10, 10, 5, 5,
  beta 0.11); this head regresses distances with a GIoU loss, and ``loc_lambda`` 4 is chosen so
  that a box off by 10% of its side in position or in size gets about the released P_loc
  (lambda 3.9 and 3.5 for the two; interpretation).
- Positive bag loss (FreeAnchor's "Mean-max" bag likelihood; MAL's over the selected anchors):
      L+ = sum_i -ln MeanMax({x_ai : a in S_i}),  MeanMax(X) = sum_x x / (1 - x) / sum_x 1 / (1 - x)
  over the number of GTs. The weights 1 / (1 - x) keep their gradient and 1 - x is clipped at
  1e-12 with the gradient passed straight through (released ``Clip``).
- MAL's anchor selection (the selection half of its selection-depression optimisation): S_i
  holds the k_t anchors of A_i with the largest x_ai (no gradient); k_t shrinks linearly with the
  epoch from the whole bag to 1 at epoch ``select_epochs - 1`` (0-based), so that training starts
  from all the bag's anchors and ends on the single most representative one; 0 turns the
  selection off (FreeAnchor's loss). The schedule's shape (linear, per epoch) is this module's
  reading of the paper's description; the released loss (``free_anchor_loss_IA.py``) keeps the
  fixed top-40 bag and has no selection. The epoch reaches the assigner through ``set_epoch``;
  one never told (tests, plots, the benchmark) keeps the whole bag.
- Negatives (FreeAnchor's P{a_j in A_-}, released): P{a -> i} = clip((IoU(box_a, b_i) - t1) / (t2_i - t1),
  0, 1) with t1 = ``bbox_threshold`` 0.6 and t2_i = max(max_a IoU(box_a, b_i), t1 + 1e-12),
  predicted boxes, no gradient; P+_aj = max over GTs i of class j; over every (anchor, class):
      L- = sum_aj FL(s_aj (1 - P+_aj)),   FL(p) = -p^gamma ln(1 - p), gamma 2,
  over ``neg_norm`` x the number of GTs. Released: over 40 x the number of GTs, with 9 anchors
  (9 negatives) per location; one per location gives 1/9 the negatives, so ``neg_norm`` is 40 / 9
  to keep the per-location weight of the negatives.
- Weights (released FOCAL_LOSS_ALPHA 0.5): ``alpha`` on L+ (``loss_cls_pos``, which carries
  the localisation through P_loc), 1 - alpha on L- (``loss_neg``). ln s and ln(1 - s (1 - P+))
  are computed from the logits (stable, fp32). The released config starts the class logits at a
  0.02 prior (``model.prior_prob``, a detector field; its default 0.01 is FCOS's).

Left out: MAL's anchor depression. The released code perturbs the FPN features before the
head: from a class activation map per level (the features weighted by their channel means) it
zeroes the share ``ratio`` of most active locations in a mask m and feeds (3 f m + f) / 4 to
the head, ``ratio`` scheduled by iteration 0 -> 0.5 -> 0 (``IA_TYPE`` 5, ``detector/retinanet.py``),
so the most activated locations are depressed and other anchors must explain the object. It
acts on the detector's features, inside the forward pass, not on the head's outputs: an
assigner sees only ``HeadOutputs``, so depression would be a head option of its own (a
``model.*`` field and a masked feature pass), not part of this method's assignment. What this
module trains is therefore FreeAnchor's loss with MAL's scheduled anchor selection.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import anchor_boxes, check_outputs, pad_targets, pairwise_iou
from dwlab.box_ops import aligned_giou
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import joint_log_scores
from dwlab.models.outputs import HeadOutputs

RELEASED_BAG, RETINANET_ANCHORS = 40, 9  # configs/mal_R-50-FPN.yaml: PRE_ANCHOR_TOPK; 3 scales x 3 ratios
CLIP_MIN = 1e-12  # 1 - x clipped below (released Clip)
T2_EPS = 1e-12  # t2 >= t1 + 1e-12 (released)


def straight_through_clamp(x: Tensor, min: float) -> Tensor:
    """``x.clamp(min=min)`` forward, the identity's gradient backward (released ``Clip``)."""
    return x + (x.clamp(min=min) - x).detach()


def mean_max(x: Tensor, keep: Tensor, dim: int = -1) -> Tensor:
    """FreeAnchor's Mean-max of the probabilities ``x`` over ``dim``, counting only ``keep``
    (bool, same shape): ``sum x w / sum w`` with ``w = 1 / (1 - x)`` (1 - x clipped at 1e-12,
    gradient straight through; the weights keep their gradient). Near the mean for small x,
    near the max as the largest x approaches 1. A row without kept entries gives 0."""
    w = keep / straight_through_clamp(1.0 - x, CLIP_MIN)
    return (w * x).sum(dim) / w.sum(dim).clamp(min=CLIP_MIN)


def selection_size(bag_size: int, epoch: int | None, select_epochs: int) -> int:
    """k_t, the anchors kept per bag at ``epoch``: ``bag_size`` at epoch 0 (or never told, or
    ``select_epochs`` 0), 1 from epoch ``select_epochs - 1`` on, linear between (rounded)."""
    if epoch is None or select_epochs == 0:
        return bag_size
    frac = min(epoch / (select_epochs - 1), 1.0) if select_epochs > 1 else 1.0
    return max(1, round(bag_size - (bag_size - 1) * frac))


class Bags(NamedTuple):
    """The bags of a batch. anchor ``Tensor[B, K, G]`` long: A_i's anchors (K = bag size);
    conf ``Tensor[B, K, G]`` x_ai with gradient; selected bool ``Tensor[B, K, G]`` S_i."""

    anchor: Tensor
    conf: Tensor
    selected: Tensor


class MALAssigner(LabelAssigner):
    """FreeAnchor's bag likelihood with MAL's scheduled anchor selection (module docstring).

    Returns ``{"loss_cls_pos", "loss_neg"}``, unweighted; weights ``alpha`` and 1 - ``alpha``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        bag_size: int = 17,
        anchor_scale: float = 8.0,
        loc_lambda: float = 4.0,
        bbox_threshold: float = 0.6,
        alpha: float = 0.5,
        gamma: float = 2.0,
        neg_norm: float = RELEASED_BAG / RETINANET_ANCHORS,
        select_epochs: int = 12,
    ) -> None:
        check_positive(num_classes=num_classes, bag_size=bag_size, anchor_scale=anchor_scale, neg_norm=neg_norm)
        if not 0.0 <= bbox_threshold < 1.0:
            raise ValueError(f"bbox_threshold must be in [0, 1), got {bbox_threshold}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if select_epochs < 0:
            raise ValueError(f"select_epochs must be >= 0, got {select_epochs}")
        self.num_classes, self.bag_size, self.anchor_scale = num_classes, bag_size, anchor_scale
        self.loc_lambda, self.bbox_threshold, self.gamma = loc_lambda, bbox_threshold, gamma
        self.neg_norm, self.select_epochs = neg_norm, select_epochs
        self.epoch: int | None = None  # set by the training loop; None: the whole bag
        self.loss_weights = {"loss_cls_pos": alpha, "loss_neg": 1.0 - alpha}

    def set_epoch(self, epoch: int) -> None:
        """The training loop's epoch, 0-based: sets the selection size k_t."""
        self.epoch = epoch

    @property
    def selection(self) -> int:
        return selection_size(self.bag_size, self.epoch, self.select_epochs)

    def bags(self, outputs: HeadOutputs, log_s: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Bags:
        """Each GT's bag (top ``bag_size`` anchor IoU), its confidences and its selection.
        log_s ``Tensor[B, A, C]`` ln s; gt_* as ``pad_targets`` gives them."""
        b, a, c = log_s.shape
        g = gt_valid.shape[1]
        with torch.no_grad():
            anchor_iou = pairwise_iou(anchor_boxes(outputs.anchors, self.anchor_scale)[None], gt_boxes, gt_valid)
            anchor = anchor_iou.topk(min(self.bag_size, a), dim=1).indices  # [B, K, G]
        k = anchor.shape[1]
        entry = anchor * c + gt_labels[:, None, :]  # (anchor, GT's class) in A * C
        p_cls = log_s.reshape(b, a * c).gather(1, entry.reshape(b, -1)).exp()  # [B, K * G]
        pred = outputs.boxes().float().gather(1, anchor.reshape(b, -1, 1).expand(-1, -1, 4))  # [B, K * G, 4]
        target = gt_boxes[:, None].expand(b, k, g, 4).reshape(b, -1, 4)
        giou_loss = 1.0 - aligned_giou(pred.reshape(-1, 4), target.reshape(-1, 4)).view(b, -1)
        conf = (p_cls * torch.exp(-self.loc_lambda * giou_loss)).view(b, k, g)
        with torch.no_grad():
            keep = min(self.selection, k)
            top = conf.detach().topk(keep, dim=1).indices
            selected = torch.zeros_like(conf, dtype=torch.bool).scatter_(1, top, True) & gt_valid[:, None]
        return Bags(anchor, conf, selected)

    @torch.no_grad()
    def positive_probability(self, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Tensor:
        """P+ ``Tensor[B, A, C]``: max over GTs of class j of clip((IoU - t1) / (t2 - t1), 0, 1)
        (FreeAnchor's negatives), IoU of the predicted boxes ``Tensor[B, A, 4]``; 0 without GTs."""
        b, a, _ = pred_boxes.shape
        iou = pairwise_iou(pred_boxes.float(), gt_boxes, gt_valid)  # [B, A, G], 0 on padding
        t1 = self.bbox_threshold
        t2 = iou.amax(1, keepdim=True).clamp(min=t1 + T2_EPS)  # [B, 1, G]
        prob = ((iou - t1) / (t2 - t1)).clamp(0.0, 1.0) * gt_valid[:, None]
        out = torch.zeros(b, a, self.num_classes, device=iou.device)
        return out.scatter_reduce(2, gt_labels[:, None, :].expand_as(prob), prob, "amax")

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        check_outputs(outputs, targets, self.num_classes)
        device = outputs.cls_logits.device
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, device)
        num_gts = float(sum(len(t.labels) for t in targets))  # known on the host
        log_s, log1m_s = joint_log_scores(outputs.cls_logits, outputs.centerness.unsqueeze(-1))
        bags = self.bags(outputs, log_s, gt_boxes, gt_labels, gt_valid)
        bag_prob = mean_max(bags.conf, bags.selected, dim=1)  # [B, G]
        nll = -torch.log(bag_prob.clamp(min=torch.finfo(torch.float32).tiny))
        positive = torch.where(gt_valid, nll, 0.0).sum()
        # negatives: x = s (1 - P+); ln(1 - x) = ln((1 - s) + s P+), stable from the logits
        p_plus = self.positive_probability(outputs.boxes().detach(), gt_boxes, gt_labels, gt_valid)
        log_x = log_s + torch.log1p(-p_plus)
        log1m_x = torch.logaddexp(log1m_s, log_s + torch.log(p_plus))
        negative = -(torch.exp(self.gamma * log_x) * log1m_x).sum()
        return {
            "loss_cls_pos": positive / normaliser(num_gts, device),
            "loss_neg": negative / normaliser(num_gts * self.neg_norm, device),
        }
