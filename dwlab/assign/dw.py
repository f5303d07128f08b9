"""Dual Weighting label assignment (Li, He, Li, Zhang, "A Dual Weighting Label Assignment Scheme
for Object Detection", CVPR 2022) and its loss, on FCOS outputs.

Symbols follow the paper (the project brief's "alpha/beta" grid is the paper's beta and mu):
``s`` joint score sigmoid(cls) * sigmoid(centerness), ``t = s * iou**beta`` (Eq. 3),
``w_pos = exp(mu t) t prior / sum_bag`` (Eq. 4), ``w_neg = P_neg(iou) * s**gamma2``
(Eq. 5-8), loss Eq. 11-12 with the released code's normalisation (see ``/work/shared/paper/
METHOD.md``). ``variant="official"`` switches to the released code's constants; every constant
is resolved once, when the assigner is built (``DWParams``).

Gradient of the negative term, as in the released code (``dw_head.py`` detaches only P_neg):
over every (image, anchor, class) the term is ``factor * s**gamma2 * (-ln(1 - s))`` with the
gradient flowing through *both* factors of s, exactly like focal loss's modulating factor
(torchvision's ``sigmoid_focal_loss`` differentiates it too). Only ``factor`` is a constant:
1 outside every bag and, on a GT's class channel inside its bag, per Table 5's ``neg_variant``:
``full`` P_neg, ``no_pneg`` 1, ``one_minus_wpos`` (1 - w_pos) clamped at 0, ``pos_only`` 0,
and ``no_ineg`` P_neg with no ``s**gamma2`` at all (weight P_neg * -ln(1 - s)). Where several
pairs share one entry the smallest factor wins (s is the same for all of them). ``w_pos``,
P_neg and the normalisers are detached; ``s**gamma2`` is not (detaching it too would make the
gradient on negatives 0.33-0.48x the released code's).

The weighting math exists once, on flat (anchor, GT) pair vectors: ``pair_weights``. The dense
``dual_weights`` and the assigner both call it. The assigner never builds a dense
``[A, G]`` float matrix: pairs come sparse from ``bags.candidate_prior`` for all images at once
(GT indices offset per image), IoU/GIoU/weights are computed on those pairs only, and the
negative weights live on the ``[B, A, C]`` score tensor the focal-style term needs anyway.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from dwlab.assign.bags import BAG_KINDS, candidate_prior
from dwlab.assign.base import LabelAssigner, check_positive
from dwlab.assign.common import WeightMaps, check_outputs, concat_targets, entry_minima, pair_boxes
from dwlab.assign.grid import anchor_layout
from dwlab.box_ops import aligned_iou
from dwlab.config import DWAssignerConfig
from dwlab.data.target import Target
from dwlab.distributed import normaliser
from dwlab.losses import focal_neg_weights, weighted_joint_bce
from dwlab.models.outputs import Anchors, HeadOutputs

NEG_VARIANTS = ("full", "pos_only", "no_pneg", "no_ineg", "one_minus_wpos")
LOC_SCORES = ("iou_pow", "exp_giou")
EPS = 1e-12  # the released code's EPS in the in-bag min-max of P_neg


# ----------------------------------------------------------------------------- weights


def _pneg_curve(iou: Tensor, gamma1: float, low: float, high: float) -> Tensor:
    """``-k * iou**gamma1 + b`` unclipped, through (low, 1) and (high, 0) (Eq. 5-6)."""
    k = 1.0 / (high**gamma1 - low**gamma1)  # Eq. 6 (undetermined coefficients)
    return k * (high**gamma1 - iou**gamma1)  # Eq. 5, b = k * high**gamma1


def p_neg(iou: Tensor, gamma1: float, low: float = 0.5, high: float = 0.95) -> Tensor:
    """Probability of being a negative, ``P_neg(iou)`` (Eq. 5-6); same shape as ``iou``.

    1 for ``iou < low``, 0 for ``iou > high``, ``-k iou**gamma1 + b`` between, decreasing from
    (low, 1) to (high, 0).
    """
    if not 0.0 <= low < high:
        raise ValueError(f"need 0 <= low < high, got low={low}, high={high}")
    # the curve is decreasing in iou >= 0, > 1 below low and < 0 above high: clamping is Eq. 5
    return _pneg_curve(iou, gamma1, low, high).clamp(0.0, 1.0)


class PairWeights(NamedTuple):
    """Weights of P (anchor, GT) pairs, each ``Tensor[P]``, detached."""

    w_pos: Tensor  # Eq. 4, sums to 1 over each GT's bag (paper variant)
    w_neg: Tensor  # value of the weight of -ln(1 - s) on the GT's class channel (Eq. 8 / Table 5)
    p_neg: Tensor  # P_neg used by the normaliser (after the official in-bag min-max)
    neg_factor: Tensor  # the constant part of w_neg: w_neg = neg_factor * s**gamma2 (no_ineg: no s**gamma2)


@torch.no_grad()
def pair_weights(
    scores: Tensor, ious: Tensor, prior: Tensor, gt_idx: Tensor, num_gts: int, params: DWParams,
    giou_loss: Tensor | None = None,
) -> PairWeights:
    """Dual weights of flat pairs; the one implementation of Eq. 3-8, with the constants of
    ``params``.

    scores ``Tensor[P]`` s of the anchor on the GT's class; ious ``Tensor[P]`` IoU of the
    anchor's predicted box with the GT; prior ``Tensor[P]`` bag prior; gt_idx ``Tensor[P]`` long
    in ``[0, num_gts)`` (the bag a pair belongs to); giou_loss ``Tensor[P]`` 1 - GIoU, needed for
    ``loc_score="exp_giou"``. Every pair given is a bag member, whatever its prior.
    """
    assert scores.shape == ious.shape == prior.shape == gt_idx.shape and scores.dim() == 1
    p = params
    s, iou, prior = scores.float(), ious.float(), prior.float()
    if p.loc_score == "iou_pow":
        t = s * iou**p.beta  # Eq. 3
    else:  # released code: the IoU term as exp(-beta * GIoU loss)
        if giou_loss is None:
            raise ValueError("loc_score='exp_giou' needs giou_loss")
        t = s * torch.exp(-p.beta * giou_loss.float())
    w_pos = _positive_weights(t, prior, gt_idx, num_gts, p.mu, p.mu_norm)
    if p.pneg_bag_minmax:  # released code: curve through (low, 1), (high, 0), min-max per bag
        curve = _pneg_curve(iou, p.gamma1, p.pneg_low, p.pneg_high)
        inf = torch.full((num_gts,), float("inf"), device=s.device)
        lo = inf.scatter_reduce(0, gt_idx, curve, "amin")[gt_idx]  # at the bag's best IoU
        hi = (-inf).scatter_reduce(0, gt_idx, curve, "amax").clamp(max=1.0)[gt_idx]
        pn = (curve - lo + EPS) / (hi - lo + EPS)
        pn = torch.where(iou < p.pneg_low, torch.ones_like(pn), pn)
    else:
        pn = p_neg(iou, p.gamma1, p.pneg_low, p.pneg_high)  # Eq. 5-6
    i_neg = s**p.gamma2  # Eq. 7
    # in-bag negative weight on the GT's class channel, factor * I_neg (Eq. 8; Table 5 variants)
    if p.neg_variant in ("full", "no_ineg"):
        factor = pn  # Eq. 8
    elif p.neg_variant == "pos_only":
        factor = torch.zeros_like(s)
    elif p.neg_variant == "no_pneg":
        factor = torch.ones_like(s)
    else:  # one_minus_wpos; clamped because official w_pos (exp(5t)/sum exp(3t)) can exceed 1
        factor = (1.0 - w_pos).clamp(min=0.0)
    w_neg = factor if p.neg_variant == "no_ineg" else factor * i_neg
    return PairWeights(w_pos, w_neg, pn, factor)


def _positive_weights(t: Tensor, prior: Tensor, gt_idx: Tensor, num_gts: int, mu: float, mu_norm: float) -> Tensor:
    """Eq. 4: ``exp(mu t) t prior`` over the bag's sum of ``exp(mu_norm t) t prior`` (mu_norm = mu
    in the paper: each GT's weights sum to 1), ``Tensor[P]``."""
    numer = torch.exp(mu * t) * t * prior
    denom = _bag_sum(torch.exp(mu_norm * t) * t * prior, gt_idx, num_gts)[gt_idx]
    # a bag whose every t is 0 (all IoUs 0) would get no weight at all; it falls back to the
    # prior alone so that each GT still weighs 1 (interpretation; released code: 0)
    prior_sum = _bag_sum(prior, gt_idx, num_gts)[gt_idx]
    return torch.where(
        denom > 0, numer / denom.clamp(min=torch.finfo(denom.dtype).tiny), prior / prior_sum.clamp(min=EPS)
    )


def _bag_sum(values: Tensor, gt_idx: Tensor, num_gts: int) -> Tensor:
    return torch.zeros(num_gts, dtype=values.dtype, device=values.device).index_add_(0, gt_idx, values)


@torch.no_grad()
def dual_weights(
    scores: Tensor,
    ious: Tensor,
    prior: Tensor,
    *,
    beta: float,
    mu: float,
    gamma1: float,
    gamma2: float,
    neg_variant: str = "full",
    in_bag: Tensor | None = None,
    giou_loss: Tensor | None = None,
    **released_code_constants,
) -> tuple[Tensor, Tensor]:
    """Dense form of ``pair_weights`` (tests, plots): every argument ``Tensor[A, G]``.

    scores[a, g] the score of anchor a on GT g's class; ious[a, g]; prior[a, g] the bag prior,
    0 outside the bag (or pass ``in_bag`` ``Tensor[A, G]`` bool to give membership explicitly);
    giou_loss[a, g] for ``loc_score="exp_giou"``. ``released_code_constants``: ``loc_score``,
    ``mu_norm``, ``pneg_low``, ``pneg_high``, ``pneg_bag_minmax`` (see ``DWParams``).
    Returns ``(w_pos, w_neg)``, ``Tensor[A, G]``: w_pos 0 outside bags; w_neg the in-bag weight
    on g's class channel, and ``scores ** gamma2`` outside the bag.
    """
    assert scores.shape == ious.shape == prior.shape and scores.dim() == 2
    in_bag = prior > 0 if in_bag is None else in_bag
    a, g = in_bag.nonzero(as_tuple=True)
    params = DWParams(beta=beta, mu=mu, gamma1=gamma1, gamma2=gamma2, neg_variant=neg_variant, **released_code_constants)
    pw = pair_weights(
        scores[a, g], ious[a, g], prior[a, g], g, scores.shape[1], params,
        None if giou_loss is None else giou_loss[a, g],
    )  # fmt: skip
    w_pos = torch.zeros_like(scores, dtype=torch.float32)
    w_pos[a, g] = pw.w_pos
    w_neg = scores.float() ** gamma2  # Eq. 7 outside the bag: the plain focal negative
    w_neg[a, g] = pw.w_neg
    return w_pos, w_neg


# ----------------------------------------------------------------------------- assigner


@dataclass
class Assignment:
    """Sparse DW assignment of a batch: P (anchor, GT) bag pairs over all images, detached.

    Per pair ``Tensor[P]``: image, anchor (index into A), gt (index into the batch's GTs,
    images concatenated), label, prior, score (s on the GT's class), iou, w_pos, w_neg, p_neg.
    Per GT ``Tensor[G]``: gt_image, gt_labels; gt_boxes ``Tensor[G, 4]`` xyxy pixels.
    Per distinct in-bag (image, anchor, class) entry ``Tensor[E]``: entry (flat index into
    ``B * A * C``), entry_neg_factor and entry_p_neg, the smallest over the pairs sharing it (the
    best-matched GT decides).
    """

    image: Tensor
    anchor: Tensor
    gt: Tensor
    label: Tensor
    prior: Tensor
    score: Tensor
    iou: Tensor
    w_pos: Tensor
    w_neg: Tensor
    p_neg: Tensor
    gt_image: Tensor
    gt_labels: Tensor
    gt_boxes: Tensor
    entry: Tensor
    entry_neg_factor: Tensor
    entry_p_neg: Tensor


class LossSums(NamedTuple):
    """Unnormalised terms of a batch; ``DWAssigner.__call__`` divides them by their normalisers."""

    cls_pos: Tensor  # sum over pairs of w_pos * -ln s
    reg: Tensor  # sum over pairs of w_pos * GIoULoss
    neg: Tensor  # sum over (image, anchor, class) of w_neg * -ln(1 - s)
    num_gts: Tensor  # number of GTs in the batch
    neg_norm: Tensor  # sum over in-bag (image, anchor, class) entries of (1 - P_neg)


# the constants where the released code departs from the paper (METHOD.md, "Where the released
# code differs"); ``MU`` stands for "the value of mu"
MU = "mu"
VARIANTS: dict[str, dict[str, object]] = {
    "paper": dict(loc_score="iou_pow", mu_norm=MU, pneg_high=0.95, pneg_bag_minmax=False, pos_scale=1.0),
    "official": dict(loc_score="exp_giou", mu_norm=3.0, pneg_high=1.0, pneg_bag_minmax=True, pos_scale=0.25),
}


@dataclass(frozen=True)
class DWParams:
    """Every DW constant, with the paper's defaults; resolved once, at construction.

    The fields of ``DWAssignerConfig``. ``loc_score``, ``mu_norm``, ``pneg_high``,
    ``pneg_bag_minmax`` and ``pos_scale`` left None take ``variant``'s value from ``VARIANTS``
    (paper: ``iou_pow``, mu, 0.95, False, 1.0; official: ``exp_giou``, 3, 1.0, True, 0.25); a
    value given wins. After construction no field is None. ``DWParams(**cfg.model_dump())``
    resolves a config (``from_config``). To change a constant, resolve anew from the config
    (``dataclasses.replace`` would keep e.g. the ``mu_norm`` resolved from the old ``mu``).
    Raises ValueError on an unknown choice or inconsistent values.
    """

    variant: str = "paper"
    beta: float = 5.0  # Eq. 3: t = s * iou**beta
    mu: float = 5.0  # Eq. 4: exp(mu * t)
    gamma1: float = 2.0  # Eq. 5-6: P_neg exponent
    gamma2: float = 2.0  # Eq. 7: I_neg = s**gamma2
    neg_variant: str = "full"  # Table 5
    bag: str = "soft"  # Table 4
    bag_radius: float = 2.0
    bag_topk: int = 9
    prior_sigma: float = 1.11
    loc_score: str | None = None  # t = s * iou**beta | s * exp(-beta * GIoULoss)
    mu_norm: float | None = None  # exponent of the pos normaliser
    pneg_high: float | None = None  # IoU where P_neg reaches 0
    pneg_bag_minmax: bool | None = None  # min-max normalise P_neg within each bag
    pos_scale: float | None = None  # scale of both pos terms (loss_weights)
    pneg_low: float = 0.5  # IoU below which P_neg = 1
    neg_norm: str = "pneg"  # divisor of L_neg: in-bag sum of (1 - P_neg) | number of GTs

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r} (expected one of {tuple(VARIANTS)})")
        for key, value in VARIANTS[self.variant].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, self.mu if value == MU else value)
        choices = dict(neg_variant=NEG_VARIANTS, bag=BAG_KINDS, loc_score=LOC_SCORES, neg_norm=("pneg", "num_gts"))
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"unknown {key} {getattr(self, key)!r} (expected one of {allowed})")
        if self.bag_radius <= 0 or self.bag_topk < 1 or self.prior_sigma <= 0:
            raise ValueError(
                f"bag parameters must be positive: radius={self.bag_radius}, topk={self.bag_topk}, "
                f"sigma={self.prior_sigma}"
            )
        if not 0.0 <= self.pneg_low < self.pneg_high:
            raise ValueError(f"need 0 <= pneg_low < pneg_high, got {self.pneg_low} and {self.pneg_high}")

    @classmethod
    def from_config(cls, cfg: DWAssignerConfig) -> DWParams:
        return cls(**cfg.model_dump())


class DWAssigner(WeightMaps, LabelAssigner):
    """Dual Weighting assigner and loss (paper Eq. 3-8, 11-12), one module per method.

    ``params``: every DW constant, resolved (``DWParams``; the paper's by default). Returns
    ``{"loss_cls_pos", "loss_box", "loss_neg"}``, unweighted; ``loss_weights``: ``pos_scale``,
    ``pos_scale * beta`` (Eq. 11's beta * GIoU loss), 1.
    """

    def __init__(self, num_classes: int, params: DWParams = DWParams()) -> None:
        check_positive(num_classes=num_classes)
        self.num_classes, self.params = num_classes, params
        p = params
        self.loss_weights = {"loss_cls_pos": p.pos_scale, "loss_box": p.pos_scale * p.beta, "loss_neg": 1.0}

    @classmethod
    def from_config(cls, cfg: DWAssignerConfig, num_classes: int) -> DWAssigner:
        return cls(num_classes, DWParams.from_config(cfg))

    def resolved_params(self) -> dict[str, object]:
        """Every constant this assigner runs with (the run records it beside its config)."""
        return asdict(self.params)

    # --------------------------------------------------------------------- pairs and weights

    def _pairs(self, anchors: Anchors, targets: list[Target], device: torch.device):
        """Bag pairs of the whole batch: one ``candidate_prior`` call over all GTs."""
        gt_boxes, gt_labels, gt_image = concat_targets(targets, device)
        anchor, gt, prior = candidate_prior(
            anchors.points, anchors.strides, anchors.levels, gt_boxes,
            kind=self.params.bag, radius=self.params.bag_radius, topk=self.params.bag_topk,
            sigma=self.params.prior_sigma, layout=anchor_layout(anchors),
        )  # fmt: skip
        return anchor, gt, prior, gt_image, gt_labels, gt_boxes

    def _assign(self, outputs: HeadOutputs, targets: list[Target]) -> tuple[Assignment, Tensor]:
        """The assignment, plus the pairs' GIoU loss ``Tensor[P]`` with gradient (Eq. 11)."""
        check_outputs(outputs, targets, self.num_classes)
        b, a, c = outputs.cls_logits.shape
        device = outputs.cls_logits.device
        anchor, gt, prior, gt_image, gt_labels, gt_boxes = self._pairs(outputs.anchors, targets, device)
        pairs = pair_boxes(outputs, anchor, gt, gt_image, gt_labels, gt_boxes)
        image, label, flat, pair_gt_boxes, pred, giou_loss = pairs
        with torch.no_grad():
            cls = outputs.cls_logits.detach().float().reshape(-1)
            ctr = outputs.centerness.detach().float().reshape(-1)
            score = torch.sigmoid(cls.index_select(0, flat * c + label))
            score = score * torch.sigmoid(ctr.index_select(0, flat))  # s of the GT's class
            iou = aligned_iou(pred.detach(), pair_gt_boxes)
            pw = pair_weights(score, iou, prior, gt, gt_boxes.shape[0], self.params, giou_loss.detach())
            # several pairs on one (image, anchor, class) entry: the smallest factor / P_neg wins
            entry, (entry_neg_factor, entry_p_neg) = entry_minima(flat * c + label, pw.neg_factor, pw.p_neg)
        assignment = Assignment(
            image, anchor, gt, label, prior, score, iou, pw.w_pos, pw.w_neg, pw.p_neg,
            gt_image, gt_labels, gt_boxes, entry, entry_neg_factor, entry_p_neg,
        )  # fmt: skip
        return assignment, giou_loss

    def assign(self, outputs: HeadOutputs, targets: list[Target]) -> Assignment:
        """Sparse pairs and their dual weights, without gradient (see ``Assignment``)."""
        with torch.no_grad():
            return self._assign(outputs, targets)[0]

    def neg_weights(self, outputs: HeadOutputs, assignment: Assignment) -> Tensor:
        """Weight of ``-ln(1 - s)`` on every (image, anchor, class), ``Tensor[B, A, C]``:
        ``factor * s**gamma2`` (Eq. 7-8), factor 1 outside bags and the assignment's in-bag
        factor inside, with gradient through ``s**gamma2`` only (see the module docstring)."""
        return focal_neg_weights(
            outputs.cls_logits, outputs.centerness, assignment.entry, assignment.entry_neg_factor,
            self.params.gamma2, plain=self.params.neg_variant == "no_ineg",
        )  # fmt: skip

    # --------------------------------------------------------------------- loss

    def loss_sums(self, outputs: HeadOutputs, targets: list[Target]) -> LossSums:
        """Unnormalised loss sums of a batch (Eq. 11-12) and their normalisers, before averaging."""
        asg, giou_loss = self._assign(outputs, targets)
        b, a, c = outputs.cls_logits.shape
        w_neg = self.neg_weights(outputs, asg)
        pos_entry = (asg.image * a + asg.anchor) * c + asg.label
        cls_pos, neg = weighted_joint_bce(outputs.cls_logits, outputs.centerness, pos_entry, asg.w_pos, w_neg)
        reg = (asg.w_pos * giou_loss).sum()
        device = outputs.cls_logits.device
        num_gts = torch.full((), float(asg.gt_labels.shape[0]), device=device)
        neg_norm = (1.0 - asg.entry_p_neg).sum()
        return LossSums(cls_pos, reg, neg, num_gts, neg_norm)

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        """Loss terms of a batch (Eq. 11-12): pos terms over the number of GTs, the neg term over
        the in-bag sum of (1 - P_neg) (``neg_norm="pneg"``, the released code) or over the number
        of GTs (``"num_gts"``); both normalisers DDP-averaged and clamped to >= 1."""
        sums = self.loss_sums(outputs, targets)
        device = outputs.cls_logits.device
        n_pos = normaliser(sums.num_gts, device)
        n_neg = normaliser(sums.neg_norm.detach(), device) if self.params.neg_norm == "pneg" else n_pos
        return {
            "loss_cls_pos": sums.cls_pos / n_pos,
            "loss_box": sums.reg / n_pos,  # Eq. 11's GIoU loss; beta is in loss_weights
            "loss_neg": sums.neg / n_neg,
        }

    # --------------------------------------------------------------------- visualisation

    @torch.no_grad()
    def weights(self, outputs: HeadOutputs, targets: list[Target]) -> list[dict[str, Tensor]]:
        """Per-image maps for Fig. 5, each value ``Tensor[A]``.

        Each anchor is shown against one "focus" GT of its image: among the bags it belongs
        to, the GT with the largest w_pos; outside every bag, the GT its predicted box overlaps
        most. Keys: ``score`` (s on the focus GT's class), ``iou`` (with the focus GT), ``pos``
        (max over GTs of w_pos), ``neg`` (the applied negative weight on the focus GT's class
        channel; the largest over classes in an image without GTs), ``in_bag`` (bool),
        ``focus_gt`` (index within the image, -1 without GTs). Uses a dense ``[A, G_image]``
        IoU per image: visualisation only, not the training path.
        """
        asg = self.assign(outputs, targets)
        w_neg = self.neg_weights(outputs, asg)
        scores, boxes = outputs.scores().float(), outputs.boxes().float()
        num_anchors, device = len(outputs.anchors), boxes.device
        rows = torch.arange(num_anchors, device=device)
        maps = []
        for i in range(len(targets)):
            own = (asg.gt_image == i).nonzero()[:, 0]  # this image's GTs (a contiguous range)
            sel = asg.image == i
            anchor, w_pos = asg.anchor[sel], asg.w_pos[sel]
            pos = torch.zeros(num_anchors, device=device).scatter_reduce(0, anchor, w_pos, "amax")
            in_bag = torch.zeros(num_anchors, dtype=torch.bool, device=device)
            in_bag[anchor] = True
            if own.numel() == 0:
                zeros, none = torch.zeros(num_anchors, device=device), torch.full_like(rows, -1)
                neg = w_neg[i].amax(-1)
                maps.append(dict(score=zeros, iou=zeros, pos=pos, neg=neg, in_bag=in_bag, focus_gt=none))
                continue
            gt_boxes, gt_labels = asg.gt_boxes[own], asg.gt_labels[own]
            ious = box_iou(boxes[i], gt_boxes)  # [A, G_image], visualisation only
            key = ious - 2.0  # outside bags: highest IoU; any in-bag pair (w_pos >= 0) beats it
            key[anchor, asg.gt[sel] - own[0]] = w_pos
            focus = key.argmax(1)
            cls = gt_labels[focus]
            maps.append(
                dict(score=scores[i, rows, cls], iou=ious[rows, focus], pos=pos, neg=w_neg[i, rows, cls],
                     in_bag=in_bag, focus_gt=focus)
            )  # fmt: skip
        return maps
