"""One loss interface: every assigner returns unweighted terms from one vocabulary and declares
their weights; ``weighted_total`` gives the loss each method trained on before the split."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from dwlab.assign import ASSIGNERS, WEIGHT_METHODS, assigner_class, build_assigner
from dwlab.assign.base import weighted_total
from dwlab.assign.dw import DWAssigner, DWParams
from dwlab.box_ops import distances_to_boxes
from dwlab.config import AssignerConfig
from dwlab.data.target import Target
from dwlab.models.outputs import Anchors, HeadOutputs

C = 3


def batch(seed: int = 0) -> tuple[HeadOutputs, list[Target]]:
    """Two 64 px images, random head outputs, three GTs (two overlapping, same class)."""
    g = torch.Generator().manual_seed(seed)
    anchors = Anchors.grid([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], [8, 16, 32, 64, 128], 0.5, torch.device("cpu"))
    a = len(anchors)
    outputs = HeadOutputs(
        torch.randn(2, a, C, generator=g) - 1, torch.randn(2, a, generator=g), torch.rand(2, a, 4, generator=g) * 24 + 2,
        anchors,
    )
    targets = [
        Target(torch.tensor([[6.0, 4.0, 40.0, 46.0], [10.0, 8.0, 44.0, 50.0]]), torch.tensor([0, 0])),
        Target(torch.tensor([[10.0, 8.0, 50.0, 36.0]]), torch.tensor([2])),
    ]
    return outputs, targets


#: The methods that existed before the terms were split (unweighted terms + weight table), and
#: the sum of the terms as each one returned them then (pre-weighted). Methods added later have
#: no "before" to compare with; the contract test (``test_contract.py``) covers them.
OLD_TOTALS = {
    "fcos": lambda a, t: t["loss_cls"] + t["loss_box"] + t["loss_ctr"],
    "atss": lambda a, t: t["loss_cls"] + a.box_weight * t["loss_box"] + t["loss_ctr"],
    "qfl": lambda a, t: t["loss_cls"] + a.box_weight * t["loss_box"],  # the former gfl (QFL only)
    "vfl": lambda a, t: t["loss_cls"] + a.box_weight * t["loss_box"],
    "tood": lambda a, t: t["loss_cls"] + a.box_weight * t["loss_box"],
    # loss_pos_cls, loss_pos_reg (lambda inside), loss_neg
    "autoassign": lambda a, t: a.pos_weight * t["loss_cls_pos"] + a.pos_weight * a.loc_lambda * t["loss_box"]
    + a.neg_weight * t["loss_neg"],
    # loss_cls_pos, loss_reg = pos_scale * beta * GIoU, loss_neg
    "dw": lambda a, t: a.params.pos_scale * t["loss_cls_pos"] + a.params.pos_scale * a.params.beta * t["loss_box"]
    + t["loss_neg"],
}


@pytest.mark.parametrize("method", list(OLD_TOTALS))
def test_weighted_total_is_the_total_before_the_split(method):
    assert method in ASSIGNERS, f"{method} left ASSIGNERS: drop its OLD_TOTALS entry"
    assigner = build_assigner(AssignerConfig(name=method), C)
    outputs, targets = batch()
    terms = assigner(outputs, targets)
    total = weighted_total(terms, assigner.loss_weights)
    assert float(total) == pytest.approx(float(OLD_TOTALS[method](assigner, terms)), rel=1e-6)


def test_weighted_total_refuses_mismatched_terms():
    with pytest.raises(ValueError, match="differ"):
        weighted_total({"loss_cls": torch.tensor(1.0)}, {"loss_cls": 1.0, "loss_box": 2.0})
    assert float(weighted_total({"loss_cls": torch.tensor(1.5), "loss_box": torch.tensor(2.0)},
                                {"loss_cls": 1.0, "loss_box": 0.5})) == 2.5  # fmt: skip


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("beta", [3.0, 7.0])
def test_dw_loss_box_is_the_wpos_weighted_giou_and_beta_is_its_weight(variant, beta):
    """Table 2 varies beta: the raw ``loss_box`` is sum w_pos GIoULoss / number of GTs (beta
    acts only through w_pos), and beta is in the weight table, ``pos_scale * beta``."""
    dw = DWAssigner(C, DWParams(variant=variant, beta=beta))
    outputs, targets = batch()
    asg = dw.assign(outputs, targets)
    pred = distances_to_boxes(outputs.anchors.points[asg.anchor], outputs.distances[asg.image, asg.anchor])
    giou = generalized_box_iou_loss(pred, asg.gt_boxes[asg.gt], reduction="none")
    terms = dw(outputs, targets)
    assert float(terms["loss_box"]) == pytest.approx(float((asg.w_pos * giou).sum() / 3), rel=1e-5)
    scale = {"paper": 1.0, "official": 0.25}[variant]
    assert dw.loss_weights == {"loss_cls_pos": scale, "loss_box": scale * beta, "loss_neg": 1.0}


def test_the_method_table_the_config_names_and_the_config_sections_agree():
    """``ASSIGNERS`` is the one list of methods: the config's ``name`` Literal, its sections and
    the table name the same methods; each row's class builds from its section and has weight
    maps exactly when the row says so."""
    literal = set(typing.get_args(AssignerConfig.model_fields["name"].annotation))
    sections = set(AssignerConfig.model_fields) - {"name"}
    assert literal == sections == set(ASSIGNERS)
    for name, method in ASSIGNERS.items():
        assert method.section in sections
        cls = assigner_class(name)
        assert isinstance(build_assigner(AssignerConfig(name=name), C), cls)
        assert hasattr(cls, "weight_maps") == method.weight_maps == (name in WEIGHT_METHODS)
    with pytest.raises(ValueError, match="unknown assigner"):
        assigner_class("retina")


def test_the_method_table_is_read_without_importing_torch():
    """The CLI lists the methods from the table; importing it (and the CLI) stays torch-free."""
    code = "import sys, dwlab.cli, dwlab.assign; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
