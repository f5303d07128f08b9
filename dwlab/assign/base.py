"""The interface every label-assignment method implements.

An assigner turns the detector's raw outputs and the ground truth into loss terms. The
detector never changes between methods; only the assigner does (one module per method).
Assignment quantities (targets, weights) are computed without gradient; only the loss
terms carry gradient back into the head.

Loss vocabulary. Every assigner returns normalised, *unweighted* terms, each a scalar, named
from one list (``LOSS_TERMS``), and declares its weight table ``loss_weights`` with exactly the
keys it returns; the training loss is ``weighted_total(losses, loss_weights)`` (DETR's
``weight_dict``). So a term's curve means the same thing across a sweep of a weight (e.g. DW's
``loss_box`` across beta, Table 2).

- ``loss_cls``: the whole classification term, negatives included (focal loss, QFL, VFL).
- ``loss_cls_pos``: the positive classification term alone (DW, AutoAssign: ``w_pos * -ln s``).
- ``loss_neg``: the negative classification term alone (DW, AutoAssign: ``w_neg * -ln(1 - s)``).
- ``loss_box``: the box regression term (GIoU loss, weighted per anchor by the method).
- ``loss_ctr``: the centerness BCE (FCOS, ATSS).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from dwlab.data.target import Target
from dwlab.models.outputs import HeadOutputs

LOSS_TERMS = ("loss_cls", "loss_cls_pos", "loss_neg", "loss_box", "loss_ctr")


class LabelAssigner(Protocol):
    loss_weights: dict[str, float]
    """The weight of each term ``__call__`` returns (same keys): the method's loss weights."""

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        """Loss terms of a batch, each a normalised, unweighted scalar named from ``LOSS_TERMS``;
        the loss is ``weighted_total(terms, self.loss_weights)``.

        Normalisers follow the released code's rule (``dwlab.distributed.normaliser``): averaged
        over workers, then clamped to at least 1. Under DDP the loss then equals one process's
        on the same global batch whenever that per-worker mean is at least 1; below 1 (a
        batch with almost no positives, a box-weight sum under 1 early in GFL/TOOD training)
        the clamp applies per worker and the two differ (``tests/test_distributed_rule.py``
        pins by how much). Kept as released, so that runs compare with the paper's code.
        Images without GTs contribute negatives only.

        Optional: ``set_epoch(epoch: int)`` (0-based), which the training loop calls before
        each epoch on an assigner that has it (e.g. TOOD's ATSS warm-up epochs).
        """
        ...


def weighted_total(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """``sum_k weights[k] * losses[k]``; losses and weights must name the same terms."""
    if set(losses) != set(weights):
        raise ValueError(f"loss terms {sorted(losses)} and weights {sorted(weights)} differ")
    return sum(weights[k] * losses[k] for k in losses)
