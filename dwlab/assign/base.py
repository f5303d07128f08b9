"""The interface every label-assignment method implements.

An assigner turns the detector's raw outputs and the ground truth into loss terms. The
detector never changes between methods; only the assigner does (one module per method).
Assignment quantities (targets, weights) are computed without gradient; only the loss
terms carry gradient back into the head.

What a method is: a class ``LabelAssigner`` describes (subclass it to inherit ``from_config``),
its config section (a field of ``config.AssignerConfig`` named like the method) and its row of
``dwlab.assign.ASSIGNERS``. ``build_assigner`` calls ``cls.from_config(section, num_classes)``;
the training step calls the assigner on each batch and trains on
``weighted_total(terms, assigner.loss_weights)``.

Required (``LabelAssigner``):

- ``from_config(cfg, num_classes)``: the assigner from its config section (default:
  ``cls(num_classes, **cfg.model_dump())``, so the constructor's keyword arguments are the
  section's fields, with the paper's values as defaults). Raises ``ValueError`` on a bad value
  (``num_classes < 1`` included); the runner turns it into a one-line error naming the section.
- ``num_classes``: the number of classes C of the head's logits.
- ``loss_weights``: the weight of each term ``__call__`` returns, the same keys.
- ``__call__(outputs, targets)``: the loss terms of a batch (below).

Optional hooks (an assigner has them or not; the code that uses one checks with ``hasattr``):

- ``resolved_params() -> dict``: every constant the assigner resolved beyond its config (DW's
  variant-dependent ones); the runner records it beside the config (``resolved.yaml``).
- ``weight_maps(outputs, targets, image=0) -> {"P3": {"score", "iou", "pos", "neg": Tensor[H, W]},
  ...}``: the per-anchor positive and negative weights of one image for ``dwlab plot weights``
  (Fig. 5); the method's ``ASSIGNERS`` row says ``weight_maps=True``.
- ``set_epoch(epoch: int)``: called by the training loop before each epoch (0-based), e.g. for
  TOOD's ATSS warm-up epochs.
- ``head_init: HeadInit``: how the method wants the shared head initialised (YOLOX-style
  objectness prior on the centerness branch) and the head options it needs (GFL's distribution
  head, ``reg_max``; GFLv2's quality predictor, ``dgqp``): ``runner.build_detector`` builds the
  head so, whatever ``model.*`` says (a set ``model.reg_max`` wins over the method's bin count);
  without it the detector's default.
- ``learnable: torch.nn.Module``: the method's own learnable parameters (AutoAssign's per-class
  centre prior), trained with the detector: ``runner.build_detector`` registers the module on the
  detector as ``model.assigner``, so the optimiser, gradient clipping, checkpoints, ``.to(device)``
  and DDP carry it (``Module.to`` moves parameters in place: the assigner's reference stays
  valid). Inference never reads it. A method that has it adds ``0 * sum(parameters)`` to a term
  when a batch leaves them without gradient (DDP waits for every parameter's gradient).

Loss vocabulary. Every assigner returns normalised, *unweighted* terms, each a scalar, named
from one list (``LOSS_TERMS``), and declares its weight table ``loss_weights`` with exactly the
keys it returns; the training loss is ``weighted_total(losses, loss_weights)`` (DETR's
``weight_dict``). So a term's curve means the same thing across a sweep of a weight (e.g. DW's
``loss_box`` across beta, Table 2).

- ``loss_cls``: the whole classification term, negatives included (focal loss, QFL, VFL).
- ``loss_cls_pos``: the positive classification term alone (DW, AutoAssign: ``w_pos * -ln s``).
- ``loss_neg``: the negative classification term alone (DW, AutoAssign: ``w_neg * -ln(1 - s)``).
- ``loss_box``: the box regression term (GIoU loss, weighted per anchor by the method).
- ``loss_dfl``: GFL's Distribution Focal Loss on the distribution head's bin logits.
- ``loss_ctr``: the centerness BCE against a geometric target (FCOS, ATSS).
- ``loss_obj``: an objectness or quality term on the centerness branch with a learned target
  (YOLOX's objectness BCE, PAA's and OTA's IoU prediction).
- ``loss_prior``: a term on the method's own ``learnable`` parameters alone (AutoAssign's
  centre-prior loss, number of GTs over the sum of the prior inside the boxes).

Normalisers follow the released code's rule (``dwlab.distributed.normaliser``): averaged over
workers, then clamped to at least 1. Under DDP the loss then equals one process's on the same
global batch whenever that per-worker mean is at least 1; below 1 (a batch with almost no
positives, a box-weight sum under 1 early in GFL/TOOD training) the clamp applies per worker and
the two differ (``tests/test_distributed_rule.py`` pins by how much). Kept as released, so that
runs compare with the paper's code. Images without GTs contribute negatives only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from dwlab.data.target import Target
from dwlab.models.outputs import HeadOutputs

LOSS_TERMS = ("loss_cls", "loss_cls_pos", "loss_neg", "loss_box", "loss_dfl", "loss_ctr", "loss_obj", "loss_prior")


@dataclass(frozen=True)
class HeadInit:
    """How a method wants the shared head initialised, and the head options it needs; None
    (False) keeps the detector's default.

    centerness_prior: the starting probability of the centerness (objectness) branch, its bias
    set to ``log(p / (1 - p))`` (YOLOX: 0.01). None: bias 0, probability 0.5 (FCOS).
    reg_max: the method needs GFL's distribution head with bins ``0..reg_max``
    (``model.reg_max``; a set ``model.reg_max`` wins). None: the head of ``model.reg_max``.
    dgqp: the method needs GFLv2's distribution-guided quality predictor as the centerness
    branch (``model.dgqp``); it needs a distribution head.
    """

    centerness_prior: float | None = None
    reg_max: int | None = None
    dgqp: bool = False

    def __post_init__(self) -> None:
        p = self.centerness_prior
        if p is not None and not 0.0 < p < 1.0:
            raise ValueError(f"centerness_prior must be in (0, 1), got {p}")
        if self.reg_max is not None and self.reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {self.reg_max}")
        if self.dgqp and self.reg_max is None:
            raise ValueError("dgqp needs reg_max (the quality predictor reads the box distribution)")

    @property
    def centerness_bias(self) -> float | None:
        p = self.centerness_prior
        return None if p is None else math.log(p / (1.0 - p))


class LabelAssigner(Protocol):
    """The required part of an assigner (the module docstring lists the optional hooks)."""

    num_classes: int
    loss_weights: dict[str, float]
    """The weight of each term ``__call__`` returns (same keys): the method's loss weights."""

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> LabelAssigner:
        """The assigner from its config section: ``cls(num_classes, **cfg.model_dump())``."""
        return cls(num_classes, **cfg.model_dump())

    def __call__(self, outputs: HeadOutputs, targets: list[Target]) -> dict[str, Tensor]:
        """Loss terms of a batch, each a normalised, unweighted scalar named from ``LOSS_TERMS``;
        the loss is ``weighted_total(terms, self.loss_weights)``. ``targets`` holds one
        ``Target`` per image, on the outputs' device; an image may have no GT."""
        ...


def check_positive(**values: float) -> None:
    """``ValueError`` naming the first of ``values`` that is not > 0 (constructor checks)."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def head_init(assigner: object) -> HeadInit:
    """The assigner's ``head_init`` hook, or the detector's default."""
    return getattr(assigner, "head_init", HeadInit())


def weighted_total(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """``sum_k weights[k] * losses[k]``; losses and weights must name the same terms."""
    if set(losses) != set(weights):
        raise ValueError(f"loss terms {sorted(losses)} and weights {sorted(weights)} differ")
    return sum(weights[k] * losses[k] for k in losses)
