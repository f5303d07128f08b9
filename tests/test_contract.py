"""The contract every registered method passes, without being named: each row of ``ASSIGNERS``
builds from its default config section, returns finite terms from the loss vocabulary with
exactly the keys of its weight table, gives finite gradients with GTs, with images without GTs
and with no GT at all, lowers its own loss over a few steps, and has the optional hooks its row
and ``base.py`` promise. A new method is tested here as soon as it has its row."""

from __future__ import annotations

import math

import pytest
import torch

from dwlab import paper
from dwlab.assign import ASSIGNERS, assigner_class, build_assigner
from dwlab.assign.base import (
    LOSS_TERMS,
    HeadInit,
    LabelAssigner,
    head_init,
    weighted_total,
)
from dwlab.config import AssignerConfig
from dwlab.data.target import Target
from dwlab.models.head import integral
from dwlab.models.outputs import Anchors, HeadOutputs

C = 3
SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64 px image on P3-P7
METHODS = list(ASSIGNERS)


def anchors() -> Anchors:
    return Anchors.grid(SIZES, [8, 16, 32, 64, 128], 0.5, torch.device("cpu"))


def outputs(batch: int, seed: int = 0, head: HeadInit | None = None) -> HeadOutputs:
    """Random head outputs, leaves with gradient: logits around a 0.1 score, boxes of 4-28 px.
    With ``head.reg_max`` n (a method that needs the distribution head), the leaf is the
    distribution's logits ``[B, A, 4, n + 1]`` and the distances their integral x stride."""
    g = torch.Generator().manual_seed(seed)
    a = len(anchors())
    cls = (torch.randn(batch, a, C, generator=g) - 2).requires_grad_()
    ctr = torch.randn(batch, a, generator=g).requires_grad_()
    if head is None or head.reg_max is None:
        return HeadOutputs(cls, ctr, (torch.rand(batch, a, 4, generator=g) * 12 + 2).requires_grad_(), anchors())
    logits = torch.randn(batch, a, 4, head.reg_max + 1, generator=g).requires_grad_()
    return with_distribution(cls, ctr, logits)


def with_distribution(cls: torch.Tensor, ctr: torch.Tensor, logits: torch.Tensor) -> HeadOutputs:
    """Head outputs of a distribution head: distances = integral(logits) x stride."""
    points = anchors()
    return HeadOutputs(cls, ctr, integral(logits) * points.strides[:, None], points, distribution=logits)


def leaf_of_boxes(out: HeadOutputs) -> torch.Tensor:
    """The leaf the boxes' gradient reaches: the distances, or the distribution's logits."""
    return out.distances if out.distribution is None else out.distribution


def gts(*boxes_and_labels) -> Target:
    if not boxes_and_labels:
        return Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    boxes, labels = zip(*boxes_and_labels)
    return Target(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels))


#: Two overlapping GTs of one class and a third of another, an image without GTs, a small GT.
BATCHES = {
    "gts": [gts(([6.0, 4.0, 40.0, 46.0], 0), ([10.0, 8.0, 44.0, 50.0], 0), ([20.0, 30.0, 60.0, 60.0], 2)),
            gts(), gts(([40.0, 40.0, 52.0, 50.0], 1))],
    "no gts": [gts(), gts(), gts()],
}  # fmt: skip


def build(method: str) -> LabelAssigner:
    return build_assigner(AssignerConfig(name=method), C)


@pytest.mark.parametrize("method", METHODS)
def test_builds_from_its_default_section_as_its_constructor_defaults(method):
    """``from_config`` reads the method's own section; the section's defaults are the
    constructor's (the paper's values), so both give the same loss; a bad value is a ValueError."""
    row, cls = ASSIGNERS[method], assigner_class(method)
    assert LabelAssigner in cls.__mro__ and row.section in AssignerConfig.model_fields
    assigner = cls.from_config(getattr(AssignerConfig(), row.section), C)
    assert isinstance(assigner, cls) and assigner.num_classes == C
    out = outputs(3, head=head_init(assigner))
    by_config, by_constructor = assigner(out, BATCHES["gts"]), cls(C)(out, BATCHES["gts"])
    assert {k: v.item() for k, v in by_config.items()} == {k: v.item() for k, v in by_constructor.items()}
    with pytest.raises(ValueError):
        cls.from_config(getattr(AssignerConfig(), row.section), 0)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("method", METHODS)
def test_terms_are_its_weight_tables_with_finite_values_and_gradients(method, batch):
    assigner = build(method)
    out = outputs(3, head=head_init(assigner))
    terms = assigner(out, BATCHES[batch])
    assert set(terms) == set(assigner.loss_weights) and set(terms) <= set(LOSS_TERMS)
    assert all(isinstance(w, float) and math.isfinite(w) and w >= 0 for w in assigner.loss_weights.values())
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values()), terms
    total = weighted_total(terms, assigner.loss_weights)
    assert total.requires_grad and total.item() > 0
    total.backward()
    grads = {"cls": out.cls_logits.grad, "ctr": out.centerness.grad, "dist": leaf_of_boxes(out).grad}
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads.values()), grads
    # negatives train the score s = sigmoid(cls) * sigmoid(ctr): through the class logits, or
    # through the objectness alone (YOLOX: an image without GTs trains only the objectness)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in (grads["cls"], grads["ctr"]))
    if batch == "gts":  # positives: the boxes get gradient
        assert grads["dist"] is not None and float(grads["dist"].abs().sum()) > 0


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_on_its_own_loss_lower_it(method):
    """Free head outputs (cls and centerness logits, log distances or the distribution's logits)
    trained by Adam on one batch."""
    assigner = build(method)
    out = outputs(3, seed=1, head=head_init(assigner))
    if out.distribution is None:
        params = [out.cls_logits, out.centerness, out.distances.detach().log().requires_grad_()]
        make = lambda: HeadOutputs(params[0], params[1], params[2].exp(), out.anchors)
    else:
        params = [out.cls_logits, out.centerness, out.distribution]
        make = lambda: with_distribution(*params)
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(8):
        terms = assigner(make(), BATCHES["gts"])
        total = weighted_total(terms, assigner.loss_weights)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize("method", METHODS)
def test_optional_hooks_are_what_base_py_and_its_row_promise(method):
    row, assigner = ASSIGNERS[method], build(method)
    assert hasattr(assigner, "weight_maps") == row.weight_maps
    assert row.paper_row is None or (row.paper_row,) in paper.TABLE6
    assert isinstance(head_init(assigner), HeadInit)
    if hasattr(assigner, "set_epoch"):
        assigner.set_epoch(0)
    if hasattr(assigner, "resolved_params"):
        assert isinstance(assigner.resolved_params(), dict)
    if row.weight_maps:
        with torch.no_grad():
            maps = assigner.weight_maps(outputs(3, head=head_init(assigner)), BATCHES["gts"], image=0)
        assert list(maps) == ["P3", "P4", "P5", "P6", "P7"]
        assert all(set(lv) == {"score", "iou", "pos", "neg"} for lv in maps.values())
        assert [tuple(lv["pos"].shape) for lv in maps.values()] == SIZES
        assert all(bool((v >= 0).all()) and bool(torch.isfinite(v).all()) for lv in maps.values() for v in lv.values())
        assert any(float(lv["pos"].max()) > 0 for lv in maps.values())
