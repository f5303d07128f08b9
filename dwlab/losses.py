"""Stateless loss primitives the assigners share (torchvision ``ops/focal_loss.py`` style).

Each is a plain function of tensors: computed in float32, safe on empty input (a sum or mean of
nothing is 0), and, where it returns a loss, with a ``reduction`` argument ("none", "sum",
"mean") that rejects unknown values. Assignment (which entries are positive, with what target or
weight) stays in the method modules; these only turn scores, targets and weights into loss.

The joint score is ``s = sigmoid(cls) * sigmoid(ctr)`` (DW §3.5; the score the detector ranks
by, ``HeadOutputs.scores``); its logs are computed from the logits, stable for any logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("none", "sum", "mean")


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` ("none", "sum", "mean"; the mean of an empty tensor is 0)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    raise ValueError(f"unknown reduction {reduction!r} (expected one of {REDUCTIONS})")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r} (expected one of {REDUCTIONS})")


# ----------------------------------------------------------------------------- joint score


def log_joint_score(cls_logits: Tensor, ctr_logits: Tensor) -> Tensor:
    """``ln s`` for ``s = sigmoid(cls) * sigmoid(ctr)`` (Li et al., "A Dual Weighting Label
    Assignment Scheme for Object Detection", CVPR 2022, §3.5), stable; broadcasting shapes."""
    return F.logsigmoid(cls_logits) + F.logsigmoid(ctr_logits)


def log1m_joint_score(cls_logits: Tensor, ctr_logits: Tensor) -> Tensor:
    """``ln(1 - s)`` for ``s = sigmoid(x) * sigmoid(y)`` (DW, CVPR 2022, §3.5), stable for any
    logits: ``1 - s = sigmoid(-x) * (1 + exp(x) * sigmoid(-y))``."""
    return F.logsigmoid(-cls_logits) + F.softplus(cls_logits + F.logsigmoid(-ctr_logits))


def joint_log_scores(cls_logits: Tensor, ctr_logits: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(ln s, ln(1 - s))`` in float32, stable: ``s = sigmoid(cls) * sigmoid(ctr)`` (DW, CVPR
    2022, §3.5) with ``ctr_logits`` broadcastable to ``cls_logits`` (e.g. ``Tensor[B, A, 1]``),
    or ``s = sigmoid(cls)`` when ``ctr_logits`` is None."""
    cls = cls_logits.float()
    if ctr_logits is None:
        return F.logsigmoid(cls), F.logsigmoid(-cls)
    ctr = ctr_logits.float()
    return log_joint_score(cls, ctr), log1m_joint_score(cls, ctr)


# ----------------------------------------------------------------------------- soft-target losses


def qfl_weights(s: Tensor, target: Tensor, beta: float = 2.0) -> tuple[Tensor, Tensor]:
    """Quality Focal Loss (GFL, NeurIPS 2020, §3) as weights: ``|target - s|^beta * target`` on
    ``-ln s`` and ``|target - s|^beta * (1 - target)`` on ``-ln(1 - s)``; broadcasting shapes
    (the GFL and TOOD rows of ``dwlab.assign.table1``)."""
    scale = (target - s).abs().pow(beta)
    return scale * target, scale * (1.0 - target)


def vfl_weights(q: Tensor) -> tuple[Tensor, Tensor]:
    """VarifocalNet (CVPR 2021, Eq. 2) on a positive as weights: its loss ``q * BCE(s, q)`` is
    ``q^2 (-ln s) + q (1 - q) (-ln(1 - s))``, so ``(w_pos, w_neg) = (q^2, q (1 - q))``, neither
    depending on s (the VFL row of ``dwlab.assign.table1``)."""
    return q * q, q * (1.0 - q)


def quality_focal_loss(
    cls_logits: Tensor,
    ctr_logits: Tensor | None,
    target: Tensor,
    *,
    beta: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Quality Focal Loss (Li et al., "Generalized Focal Loss", NeurIPS 2020, §3) of the score s
    against a soft ``target`` in [0, 1]: ``-|y - s|^beta ((1 - y) ln(1 - s) + y ln s)``, i.e.
    ``w_pos (-ln s) + w_neg (-ln(1 - s))`` with ``qfl_weights``. The modulating factor
    keeps its gradient, as in the paper.

    cls_logits ``Tensor[..., C]``; ctr_logits broadcastable to it, or None (s = sigmoid(cls));
    target the shape of cls_logits, no gradient. Computed in float32.
    """
    _check_reduction(reduction)
    log_s, log1m_s = joint_log_scores(cls_logits, ctr_logits)
    w_pos, w_neg = qfl_weights(log_s.exp(), target.float(), beta)
    return reduce(-(w_pos * log_s + w_neg * log1m_s), reduction)


def varifocal_loss(
    cls_logits: Tensor,
    ctr_logits: Tensor | None,
    target: Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Varifocal Loss (Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", CVPR
    2021, Eq. 2) of the score s against the IoU-aware ``target`` q.

    q > 0: ``q * BCE(s, q)`` = ``q^2 (-ln s) + q (1 - q) (-ln(1 - s))`` (``table1.vfl``);
    q = 0: ``alpha s^gamma (-ln(1 - s))`` (the modulating factor keeps its gradient).
    cls_logits ``Tensor[..., C]``; ctr_logits broadcastable to it or None (s = sigmoid(cls));
    target the shape of cls_logits. Computed in float32.
    """
    _check_reduction(reduction)
    log_s, log1m_s = joint_log_scores(cls_logits, ctr_logits)
    q = target.float()
    w_pos, w_neg = vfl_weights(q)
    positive = q > 0
    w_neg = torch.where(positive, w_neg, alpha * log_s.exp().pow(gamma))
    w_pos = torch.where(positive, w_pos, torch.zeros_like(w_pos))
    return reduce(-(w_pos * log_s + w_neg * log1m_s), reduction)


def focal_loss(
    cls_logits: Tensor,
    ctr_logits: Tensor | None,
    target: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Eq. 5) of the
    score s against a target t in [0, 1], in the soft form of NoisyAnchor (Li et al., CVPR 2020,
    released ``soft_sigmoid_focal_loss``):

        FL(s, t) = -alpha t (1 - s)^gamma ln s - (1 - alpha) (1 - t) s^gamma ln(1 - s)

    For t in {0, 1} it is torchvision's ``sigmoid_focal_loss`` (on s = sigmoid(cls)). The
    modulating factors keep their gradient. cls_logits ``Tensor[..., C]``; ctr_logits
    broadcastable to it (the joint score s = sigmoid(cls) * sigmoid(ctr)) or None (s =
    sigmoid(cls)); target the shape of cls_logits, no gradient. Computed in float32.
    """
    _check_reduction(reduction)
    log_s, log1m_s = joint_log_scores(cls_logits, ctr_logits)
    s, t = log_s.exp(), target.float()
    loss = -alpha * t * (1.0 - s).pow(gamma) * log_s - (1.0 - alpha) * (1.0 - t) * s.pow(gamma) * log1m_s
    return reduce(loss, reduction)


# ----------------------------------------------------------------------------- distributions


def distribution_focal_loss(logits: Tensor, target: Tensor, *, reduction: str = "none") -> Tensor:
    """Distribution Focal Loss (Li et al., "Generalized Focal Loss", NeurIPS 2020, §3, Eq. 5)
    of a discrete distribution over the bins ``0..n`` against a continuous ``target`` y in
    ``[0, n)``, with y_i = floor(y) and y_{i+1} = y_i + 1 its two neighbouring bins:

        DFL(S, y) = -((y_{i+1} - y) ln S_i + (y - y_i) ln S_{i+1}),  S = softmax(logits)

    i.e. the cross-entropy against the two bins around y, weighted by closeness; it is smallest
    when the distribution's integral sum_j j S_j equals y with all mass on those two bins.
    logits ``Tensor[..., n + 1]``; target ``Tensor[...]`` (no gradient) with ``y < n`` (the
    caller clamps it: ``n - 0.1`` in the released code). Computed in float32.
    """
    _check_reduction(reduction)
    log_p = F.log_softmax(logits.float(), dim=-1)
    y = target.detach().float()
    left = y.floor()
    right_index = (left + 1).long().clamp(max=log_p.shape[-1] - 1)  # y < n: never clamps a weight > 0
    log_left = log_p.gather(-1, left.long().unsqueeze(-1)).squeeze(-1)
    log_right = log_p.gather(-1, right_index.unsqueeze(-1)).squeeze(-1)
    return reduce(-((left + 1 - y) * log_left + (y - left) * log_right), reduction)


# ----------------------------------------------------------------------------- weighted BCE


def focal_neg_weights(
    cls_logits: Tensor, centerness: Tensor, entry: Tensor, entry_factor: Tensor, gamma: float, plain: bool = False
) -> Tensor:
    """``factor * s**gamma`` on every (image, anchor, class), ``Tensor[B, A, C]`` float32: the
    negative weight of DW (CVPR 2022, Eq. 7-8) and AutoAssign's weight-loss form. Gradient flows
    through ``s**gamma`` (focal loss's modulating factor, Lin et al., "Focal Loss for Dense Object
    Detection", ICCV 2017) and not through ``factor``: 1, replaced at ``entry`` ``Tensor[E]``
    (flat indices into ``B * A * C``) by ``entry_factor`` ``Tensor[E]``. ``plain``: those entries
    get the factor alone, no ``s**gamma`` (DW Table 5's ``no_ineg``). cls_logits
    ``Tensor[B, A, C]``, centerness ``Tensor[B, A]`` logits; ``s**gamma = exp(gamma ln s)``,
    stable for any logits. A weight, not a loss: no ``reduction``."""
    cls, ctr = cls_logits.float(), centerness.float().unsqueeze(-1)
    i_neg = torch.exp(gamma * log_joint_score(cls, ctr)).reshape(-1)  # DW Eq. 7
    if plain:
        i_neg = i_neg.index_fill(0, entry, 1.0)
    factor = torch.ones_like(i_neg).index_put_((entry,), entry_factor.detach().float())
    return (factor * i_neg).reshape(cls.shape)


def weighted_joint_bce(
    cls_logits: Tensor,
    centerness: Tensor,
    pos_entry: Tensor,
    w_pos: Tensor,
    w_neg: Tensor,
    *,
    reduction: str = "sum",
) -> tuple[Tensor, Tensor]:
    """The two weighted BCE terms of DW's classification loss (Li et al., CVPR 2022, Eq. 11-12;
    also AutoAssign's weight-loss form): ``w_pos (-ln s)`` over the pairs and
    ``w_neg (-ln(1 - s))`` over every (image, anchor, class), each reduced by ``reduction``
    (the default, "sum", gives the unnormalised sums the assigners divide by their normalisers).

    cls_logits ``Tensor[B, A, C]``; centerness ``Tensor[B, A]`` logits; pos_entry ``Tensor[P]``
    long, flat index ``(b * A + a) * C + c`` of each pair; w_pos ``Tensor[P]`` (constant);
    w_neg ``Tensor[B, A, C]``, with whatever gradient it carries (``focal_neg_weights``).
    ``reduction="none"`` returns ``(Tensor[P], Tensor[B, A, C])``. Computed in float32.
    """
    _check_reduction(reduction)
    cls, ctr = cls_logits.float(), centerness.float()
    num_classes = cls.shape[-1]
    pos_logits = cls.reshape(-1).index_select(0, pos_entry)
    pos_ctr = ctr.reshape(-1).index_select(0, torch.div(pos_entry, num_classes, rounding_mode="floor"))
    pos = -(w_pos * log_joint_score(pos_logits, pos_ctr))
    neg = -(w_neg * log1m_joint_score(cls, ctr.unsqueeze(-1)))
    return reduce(pos, reduction), reduce(neg, reduction)
