"""The shared loss primitives (``dwlab.losses``): reduction, empty input, float32, known cases;
and the assign package's one-way structure (method modules share only the toolkit and ``losses``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import dwlab.assign
from dwlab.assign import ASSIGNERS
from dwlab.losses import focal_neg_weights, quality_focal_loss, reduce, varifocal_loss, weighted_joint_bce

METHOD_MODULES = {method.module for method in ASSIGNERS.values()}
SHARED = {"dwlab.assign", "dwlab.assign.base", "dwlab.assign.common", "dwlab.assign.grid"}  # the toolkit
C = 3


def _soft_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cls, ctr = torch.randn(2, 5, C, generator=g), torch.randn(2, 5, 1, generator=g)
    target = torch.zeros(2, 5, C)
    target[0, 1, 2], target[1, 4, 0] = 0.7, 0.3
    return cls, ctr, target


def _bce_args(b: int, a: int, p: int):
    cls, ctr = torch.zeros(b, a, C, requires_grad=True), torch.zeros(b, a, requires_grad=True)
    return cls, ctr, torch.arange(p, dtype=torch.long), torch.ones(p), torch.ones(b, a, C)


@pytest.mark.parametrize("reduction", ["avg", "", "SUM"])
def test_unknown_reduction_is_refused(reduction):
    cls, ctr, target = _soft_target()
    with pytest.raises(ValueError, match="reduction"):
        quality_focal_loss(cls, ctr, target, reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        varifocal_loss(cls, ctr, target, reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        weighted_joint_bce(*_bce_args(1, 2, 1), reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        reduce(torch.ones(2), reduction)


@pytest.mark.parametrize("loss", [quality_focal_loss, varifocal_loss])
def test_reductions_agree(loss):
    cls, ctr, target = _soft_target()
    none = loss(cls, ctr, target, reduction="none")
    assert none.shape == cls.shape
    assert float(loss(cls, ctr, target, reduction="sum")) == pytest.approx(float(none.sum()))
    assert float(loss(cls, ctr, target, reduction="mean")) == pytest.approx(float(none.mean()))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empty_input_gives_zero_with_gradient(reduction):
    cls = torch.zeros(0, C, requires_grad=True)
    for loss in (quality_focal_loss, varifocal_loss):
        value = loss(cls, None, torch.zeros(0, C), reduction=reduction)
        assert value.dtype == torch.float32 and float(value.detach()) == 0.0
        value.backward()
        assert cls.grad is not None and cls.grad.shape == cls.shape
    args = _bce_args(0, 4, 0)
    pos, neg = weighted_joint_bce(*args, reduction=reduction)
    assert float(pos.detach()) == float(neg.detach()) == 0.0
    (pos + neg).backward()
    assert args[0].grad is not None


def test_half_inputs_are_computed_in_float32():
    cls, ctr, target = _soft_target()
    for loss in (quality_focal_loss, varifocal_loss):
        assert loss(cls.half(), ctr.half(), target, reduction="none").dtype == torch.float32
    entry = torch.tensor([0, 5])
    assert focal_neg_weights(cls.half(), ctr[..., 0].half(), entry, torch.zeros(2), 2.0).dtype == torch.float32


def test_qfl_with_hard_targets_and_alpha_is_focal_loss():
    """On s = sigmoid(cls) with a 0/1 target, QFL (beta = gamma) times alpha_t is focal loss."""
    cls, _, target = _soft_target()
    hard = (target > 0).float()
    alpha_t = torch.where(hard > 0, 0.25, 0.75)
    qfl = (alpha_t * quality_focal_loss(cls, None, hard, beta=2.0)).sum()
    assert float(qfl) == pytest.approx(float(sigmoid_focal_loss(cls, hard, reduction="sum")), rel=1e-5)


def test_varifocal_loss_by_hand():
    """q = 0.5 at s = 0.5: q * BCE(s, q) = 0.5 ln 2; q = 0 at s = 0.5: alpha s^2 ln 2."""
    logits, target = torch.zeros(2), torch.tensor([0.5, 0.0])
    value = varifocal_loss(logits, None, target, alpha=0.75, gamma=2.0)
    ln2 = torch.log(torch.tensor(2.0))
    assert value.tolist() == pytest.approx([float(0.5 * ln2), float(0.75 * 0.25 * ln2)])


def test_weighted_joint_bce_none_is_per_entry():
    cls, ctr = torch.randn(1, 4, C), torch.randn(1, 4)
    pos_entry, w_pos, w_neg = torch.tensor([1, 7]), torch.tensor([0.5, 2.0]), torch.rand(1, 4, C)
    pos, neg = weighted_joint_bce(cls, ctr, pos_entry, w_pos, w_neg, reduction="none")
    assert pos.shape == (2,) and neg.shape == (1, 4, C)
    s = torch.sigmoid(cls) * torch.sigmoid(ctr)[..., None]
    assert pos.tolist() == pytest.approx((-w_pos * s.reshape(-1)[pos_entry].log()).tolist(), rel=1e-5)
    expected = -w_neg * torch.log1p(-s)
    assert torch.allclose(neg, expected, rtol=1e-5)
    assert float(F.binary_cross_entropy(s, torch.zeros_like(s), reduction="sum")) == pytest.approx(
        float(weighted_joint_bce(cls, ctr, pos_entry[:0], w_pos[:0], torch.ones_like(s))[1]), rel=1e-5
    )


def _dwlab_imports(path: Path) -> set[str]:
    """Every ``dwlab...`` module a file imports, anywhere in it (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("dwlab")}


def _assign_imports(module: str) -> set[str]:
    """The ``dwlab.assign`` modules ``module`` imports (names imported from one count as it)."""
    path = Path(dwlab.assign.__file__).parent / f"{module.rsplit('.', 1)[1]}.py"
    package = {f"dwlab.assign.{p.stem}" for p in path.parent.glob("*.py")} | {"dwlab.assign"}
    names = {n if n in package else n.rsplit(".", 1)[0] for n in _dwlab_imports(path) if n.startswith("dwlab.assign")}
    return names & package


@pytest.mark.parametrize("module", sorted(METHOD_MODULES))
def test_no_method_module_imports_another_or_its_helpers(module):
    """The assign package is a star: method modules share the toolkit (``base``, ``common``,
    ``grid``) and ``dwlab.losses``; any other module of the package one of them imports is that
    method's own (DW's ``bags``), imported by no other method module."""
    own = _assign_imports(module) - SHARED - {module}
    assert not own & METHOD_MODULES, f"{module} imports {sorted(own & METHOD_MODULES)}"
    for helper in own:  # nor through a helper (as vfl did through table1, which imports dw)
        reached = _assign_imports(helper) & (METHOD_MODULES - {module})
        assert not reached, f"{module} imports {helper}, which imports {sorted(reached)}"
    for other in METHOD_MODULES - {module}:
        shared = own & _assign_imports(other)
        assert not shared, f"{module} and {other} both import {sorted(shared)}: move what they share to common"
