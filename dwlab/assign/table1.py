"""Table 1 of the DW paper as code: the (pos, neg) loss weights of the soft label-assignment
methods as vectorised functions of the predicted score ``s`` and the ``iou`` of the predicted box
with its GT.

The paper writes the classification loss of a positive anchor on its GT's class channel as
(its Eq. 2)

    L_cls = w_pos * (-ln s) + w_neg * (-ln(1 - s))

and Table 1 lists, per method, a consistency ``t`` between the two heads and the ``w_pos`` /
``w_neg`` built from it. The seed text lost the table's cells; the rows below are read off each
method's own loss (interpretation), with the paper's defaults:

| method | t | w_pos | w_neg |
|---|---|---|---|
| gfl  | IoU | \\|s - t\\|^beta * t | \\|s - t\\|^beta * (1 - t) |
| vfl  | IoU | t * t | t * (1 - t) |
| tood | s^alpha * IoU^beta, normalised per GT to t_hat | \\|s - t_hat\\|^2 * t_hat | \\|s - t_hat\\|^2 * (1 - t_hat) |
| autoassign | s * exp(-lambda * (1 - IoU)) | exp(t / tau) * prior (/ bag sum) | (1 - f(1 / (1 - IoU))) * s^2 |
| dw   | s * IoU^beta | exp(mu * t) * t * prior (/ bag sum) | P_neg(IoU) * s^gamma2 |

The paper's Table 1 has MuSu where this module has AutoAssign: dwlab compares AutoAssign, in
the "weights detached and applied to the loss" form of ``dwlab.assign.autoassign``. AutoAssign's
localisation term uses the GIoU loss; as a function of IoU alone, 1 - IoU stands in for it.
``w_pos`` of AutoAssign and DW is returned before the per-GT bag normalisation (a positive
factor common to a GT's bag), with ``prior`` 1 unless given.

Anchors that are not positive get ``w_pos = 0`` and a focal-style ``w_neg``: ``s^beta`` (GFL,
TOOD), ``alpha * s^gamma`` (VFL), ``s^gamma`` (AutoAssign outside every bag), ``s^gamma2``
(DW outside every bag). The assigners use these same functions: ``quality_focal_loss`` (GFL,
TOOD) and ``varifocal_loss`` (VFL) are ``w_pos * -ln s + w_neg * -ln(1 - s)`` with these weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dwlab.assign.dw import p_neg
from dwlab.losses import qfl_weights, vfl_weights

EPS = 1e-12  # the released AutoAssign code's EPS in its min-max normalisation


def _tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.get_default_dtype())


def gfl(s: Tensor, iou: Tensor, *, beta: float = 2.0) -> tuple[Tensor, Tensor]:
    """GFL (Li et al., NeurIPS 2020): QFL with the IoU as the soft target, ``t = IoU``;
    ``w_pos = |s - t|^beta t``, ``w_neg = |s - t|^beta (1 - t)``. Both vanish at ``s = t``."""
    return qfl_weights(s, iou, beta)


def vfl(s: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
    """VFL (Zhang et al., CVPR 2021): a positive's loss is ``q * BCE(s, q)`` with ``q = IoU``,
    so ``w_pos = q^2``, ``w_neg = q (1 - q)``; neither depends on ``s``."""
    return vfl_weights(iou + torch.zeros_like(s))  # broadcast to the common shape


def tood(
    s: Tensor,
    iou: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 6.0,
    qfl_beta: float = 2.0,
    t_max: Tensor | float | None = None,
    iou_max: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """TOOD (Feng et al., ICCV 2021): alignment ``t = s^alpha IoU^beta``, normalised per GT to
    ``t_hat = t / t_max * iou_max`` (the GT's largest t and IoU among its positives; without them
    ``t_hat = t``), then QFL-style: ``w_pos = |s - t_hat|^2 t_hat``, ``w_neg = |s - t_hat|^2 (1 - t_hat)``."""
    t = s.pow(alpha) * iou.pow(beta)
    if t_max is not None:
        if iou_max is None:
            raise ValueError("t_max needs iou_max")
        t = t / _tensor(t_max) * _tensor(iou_max)
    return qfl_weights(s, t, qfl_beta)


def autoassign(
    s: Tensor,
    iou: Tensor,
    *,
    tau: float = 1.0 / 3.0,
    loc_lambda: float = 5.0,
    gamma: float = 2.0,
    prior: Tensor | float = 1.0,
    iou_lo: float = 0.0,
    iou_hi: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """AutoAssign (Zhu et al., 2020) with its weights detached and applied to the loss.

    Confidence ``t = s * exp(-lambda (1 - IoU))`` (P_cls * P_loc, the GIoU loss replaced by
    1 - IoU); ``w_pos = exp(t / tau) * prior`` before dividing by the GT's bag sum;
    ``w_neg = (1 - f(1 / (1 - IoU))) * s^gamma``, where f min-max normalises over the GT's bag,
    whose smallest and largest IoU are ``iou_lo`` and ``iou_hi`` here (f clipped to [0, 1]).
    """
    t = s * torch.exp(-loc_lambda * (1.0 - iou))
    w_pos = torch.exp(t / tau) * _tensor(prior)
    inv = 1.0 / (1.0 - iou).clamp(min=EPS)
    lo, hi = 1.0 / max(1.0 - iou_lo, EPS), 1.0 / max(1.0 - iou_hi, EPS)
    f = ((inv - lo + EPS) / (hi - lo + EPS)).clamp(0.0, 1.0)
    return w_pos + torch.zeros_like(f), (1.0 - f) * s.pow(gamma)


def dw(
    s: Tensor,
    iou: Tensor,
    *,
    beta: float = 5.0,
    mu: float = 5.0,
    gamma1: float = 2.0,
    gamma2: float = 2.0,
    prior: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor]:
    """DW (Li et al., CVPR 2022): ``t = s IoU^beta`` (Eq. 3), ``w_pos = exp(mu t) t prior``
    before the bag normalisation (Eq. 4), ``w_neg = P_neg(IoU) * s^gamma2`` (Eq. 5-8)."""
    t = s * iou.pow(beta)
    return torch.exp(mu * t) * t * _tensor(prior), p_neg(iou, gamma1) * s.pow(gamma2)


@dataclass(frozen=True)
class Table1Row:
    """One method: its consistency ``t`` and weights as formulas (for tables and legends) and
    ``fn(s, iou, **params) -> (w_pos, w_neg)``."""

    method: str
    paper: str
    t: str
    w_pos_formula: str
    w_neg_formula: str
    fn: Callable[..., tuple[Tensor, Tensor]]

    def weights(self, s, iou, **params) -> tuple[Tensor, Tensor]:
        """``(w_pos, w_neg)`` of a positive anchor, broadcasting ``s`` and ``iou``."""
        return self.fn(_tensor(s), _tensor(iou), **params)

    def w_pos(self, s, iou, **params) -> Tensor:
        return self.weights(s, iou, **params)[0]

    def w_neg(self, s, iou, **params) -> Tensor:
        return self.weights(s, iou, **params)[1]


TABLE1: dict[str, Table1Row] = {
    "gfl": Table1Row("gfl", "GFL", "IoU", "|s-t|^2 t", "|s-t|^2 (1-t)", gfl),
    "vfl": Table1Row("vfl", "VFL", "IoU", "t^2", "t (1-t)", vfl),
    "tood": Table1Row("tood", "TOOD", "s IoU^6 (t_hat)", "|s-t|^2 t", "|s-t|^2 (1-t)", tood),
    "autoassign": Table1Row(
        "autoassign", "AutoAssign (weight loss)", "s exp(-5 (1-IoU))", "exp(3t) (/ bag)", "(1-f(1/(1-IoU))) s^2",
        autoassign,
    ),
    "dw": Table1Row("dw", "DW", "s IoU^5", "exp(5t) t (/ bag)", "P_neg(IoU) s^2", dw),
}
METHODS = tuple(TABLE1)
