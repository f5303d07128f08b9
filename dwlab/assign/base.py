"""The interface every label-assignment method implements.

An assigner turns the detector's raw outputs and the ground truth into loss terms. The
detector never changes between methods; only the assigner does (one module per method).
Assignment quantities (targets, weights) are computed without gradient; only the loss
terms carry gradient back into the head.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from dwlab.data.target import Target
from dwlab.models.outputs import HeadOutputs


class LabelAssigner(Protocol):
    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        """Loss terms of a batch, each a scalar already weighted; the total is their sum.

        Normalisers are averaged over workers (``dwlab.distributed.normaliser``) so that the
        loss is the same under DDP as in one process on the same global batch. Images
        without GTs contribute negatives only.
        """
        ...
