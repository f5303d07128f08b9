"""Host-device syncs of a training step, counted on the CPU (``tests/syncs.py``): a DW step makes
three (the number of bag pairs, the number of distinct (image, anchor, class) entries, the
finiteness check), an epoch one more (its mean terms); the anchor layout is read once per
feature-map shape; a non-finite loss still stops the run before any update."""

from __future__ import annotations

import pytest
import torch

from dwlab.assign import assigner_class
from dwlab.assign.grid import anchor_layout
from dwlab.config import AssignerConfig, validate
from dwlab.data.target import Target, check_labels, targets_to
from dwlab.engine import StepState, TrainStep, train_one_epoch
from dwlab.errors import NonFiniteLoss
from dwlab.models.detector import build_model
from dwlab.models.outputs import Anchors, HeadOutputs
from dwlab.runner import make_optimizer
from tests.syncs import SyncCounter

C = 3
CPU = torch.device("cpu")
MODEL = {"backbone": "resnet10", "pretrained": False, "norm": "bn", "frozen_stages": -1, "fpn_channels": 16,
         "head_convs": 1, "head_norm_groups": 4}  # fmt: skip


def targets() -> list[Target]:
    return [
        Target(torch.tensor([[6.0, 4.0, 40.0, 46.0], [10.0, 8.0, 44.0, 50.0]]), torch.tensor([0, 0])),
        Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        Target(torch.tensor([[10.0, 8.0, 50.0, 36.0]]), torch.tensor([2])),
    ]


def head_outputs(sizes=((8, 8), (4, 4), (2, 2), (1, 1), (1, 1)), offset: float = 0.5) -> HeadOutputs:
    g = torch.Generator().manual_seed(0)
    anchors = Anchors.grid(list(sizes), [8, 16, 32, 64, 128], offset, CPU)
    a = len(anchors)
    return HeadOutputs(torch.randn(3, a, C, generator=g), torch.randn(3, a, generator=g),
                       torch.rand(3, a, 4, generator=g) * 24 + 2, anchors)  # fmt: skip


def kinds(counter: SyncCounter) -> dict[str, int]:
    """Syncing calls by name and file, without line numbers."""
    out: dict[str, int] = {}
    for where, n in counter.where.items():
        key = where.rsplit(":", 1)[0]
        out[key] = out.get(key, 0) + n
    return out


def dw_step(assigner: str = "dw", grad_clip: float | None = 10.0):
    cfg = validate({"model": MODEL, "assigner": {"name": assigner}, "train": {"grad_clip": grad_clip}}, "t")
    torch.manual_seed(0)
    model = build_model(cfg.model, C)
    step = TrainStep(model, assigner_class(assigner).from_config(getattr(cfg.assigner, assigner), C),
                     make_optimizer(model, cfg), CPU, grad_clip=cfg.train.grad_clip)  # fmt: skip
    batch = (torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([[64, 64]] * 3),
             targets())  # fmt: skip (64 px: the GTs above lie inside)
    return step, batch


@pytest.mark.parametrize("method", ["dw", "autoassign"])
def test_a_bag_assigner_syncs_only_on_its_pair_and_entry_counts(method):
    """DW and AutoAssign share the bags: per call, one sync for the number of bag pairs
    (``repeat_interleave``) and one for the distinct entries (``unique``); none on the labels,
    the anchor points (cached layout) or the normalisers."""
    assigner = assigner_class(method).from_config(getattr(AssignerConfig(), method), C)
    assigner(head_outputs(), targets())  # the first call of a shape lays the anchors out
    with SyncCounter() as counter:
        assigner(head_outputs(), targets())
    expected = {"repeat_interleave at assign/common.py": 1, "unique at assign/common.py": 1}
    assert kinds(counter) == expected, counter.where


def test_a_dw_training_step_syncs_three_times_and_an_epoch_once_more():
    step, batch = dw_step()
    train_one_epoch(step, [batch], lambda _: 0.01, StepState())  # lays the shape out
    with SyncCounter() as counter:
        train_one_epoch(step, [batch] * 2, lambda _: 0.01, StepState())
    assert kinds(counter) == {
        "__bool__ at engine.py": 2,  # is the total finite, before each optimizer step
        "repeat_interleave at assign/common.py": 2,
        "unique at assign/common.py": 2,
        "tolist at engine.py": 1,  # the epoch's mean terms
    }, counter.where


def test_the_progress_callback_reads_the_terms_every_log_every_steps():
    step, batch = dw_step()
    seen = []
    with SyncCounter() as counter:
        means = train_one_epoch(step, [batch] * 3, lambda _: 0.01, StepState(), on_step=seen.append, log_every=1)
    assert [sorted(s) for s in seen] == [sorted(seen[0])] * 3
    assert set(seen[0]) == {"loss", "loss_cls_pos", "loss_box", "loss_neg", "lr"} <= set(means) | {"lr"}
    assert kinds(counter)["tolist at engine.py"] == 4  # three windows of one step and the epoch
    with SyncCounter() as counter:
        train_one_epoch(step, [batch] * 3, lambda _: 0.01, StepState(), on_step=seen.append, log_every=2)
    assert ["loss" in s for s in seen[3:]] == [False, True, False] and kinds(counter)["tolist at engine.py"] == 2


def test_the_anchor_layout_is_read_once_per_shape():
    sizes = ((7, 11), (4, 6), (2, 3), (1, 2), (1, 1))  # a shape no other test uses
    with SyncCounter() as counter:
        layout = anchor_layout(head_outputs(sizes).anchors)
    assert layout is not None and counter.count >= 1  # read on the host: the first time of this shape
    assert [(g.height, g.width) for g in layout.grids] == list(sizes)
    with SyncCounter() as counter:
        again = anchor_layout(head_outputs(sizes).anchors)  # new Anchors, same feature-map shapes
    assert again is layout and counter.count == 0
    other = anchor_layout(head_outputs(sizes, offset=0.0).anchors)  # same shapes, other points
    assert other is not layout and torch.equal(other.xs[0], torch.arange(11.0) * 8)
    assert torch.equal(layout.xs[0], torch.arange(11.0) * 8 + 4)
    assert torch.equal(layout.xs[1, 6:], torch.full((5,), float("inf")))  # padding


def test_targets_move_in_one_copy_per_field_and_labels_are_checked_on_the_host():
    moved = targets_to(targets(), CPU)
    for before, after in zip(targets(), moved):
        assert torch.equal(before.boxes.reshape(-1, 4), after.boxes) and torch.equal(before.labels, after.labels)
    assert moved[0].boxes.untyped_storage().data_ptr() == moved[2].boxes.untyped_storage().data_ptr()
    check_labels(targets(), 3)
    with pytest.raises(AssertionError):
        check_labels(targets(), 2)  # label 2 of 2 classes
    step, (images, sizes, tgts) = dw_step()
    tgts[2].labels[0] = 7
    with pytest.raises(AssertionError):
        step(images, tgts, 0.01, 0)


class NaNAfter:
    """The assigner's terms, times NaN from call ``n`` on (0-based)."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls = inner, n, 0
        self.loss_weights = inner.loss_weights

    def __call__(self, outputs, targets):
        terms = self.inner(outputs, targets)
        self.calls += 1
        return {k: v * float("nan") for k, v in terms.items()} if self.calls > self.n else terms


@pytest.mark.parametrize("grad_clip", [None, 10.0])
def test_a_non_finite_loss_stops_before_the_optimizer_steps(grad_clip):
    step, batch = dw_step(grad_clip=grad_clip)
    step.assigner = NaNAfter(step.assigner, 1)
    train_one_epoch(step, [batch], lambda _: 0.01, StepState())  # one finite step: a momentum buffer
    params = [p.detach().clone() for p in step.model.parameters()]
    momentum = [s["momentum_buffer"].clone() for s in step.optimizer.state.values()]
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss nan at iteration 7: loss_cls_pos=nan \(x1\), "
                                            r"loss_box=nan \(x5\), loss_neg=nan \(x1\)$"):  # fmt: skip
        train_one_epoch(step, [batch] * 2, lambda _: 0.01, StepState(iteration=7))
    assert all(torch.equal(p, q) for p, q in zip(params, step.model.parameters()))
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in zip(momentum, step.optimizer.state.values()))
