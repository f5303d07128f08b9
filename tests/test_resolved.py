"""DW's constants are resolved once, when the assigner is built: a saved run config re-run with
an override gives exactly the losses of the preset with that override, and the run records the
resolved values beside its config."""

from __future__ import annotations

import pytest
import torch
import yaml

from dwlab import TRAINING_REVISION
from dwlab.config import load_config
from dwlab.data.target import Target
from dwlab.models.outputs import Anchors, HeadOutputs
from dwlab.runner import make_assigner, resolved_record, write_run_config

C = 3
RELEASED = ("loc_score", "mu_norm", "pneg_high", "pneg_bag_minmax", "pos_scale")
OVERRIDES = (
    ["assigner.dw.mu=7"],
    ["assigner.dw.variant=official"],
    ["assigner.dw.beta=3", "assigner.dw.mu=8"],
)


def batch() -> tuple[HeadOutputs, list[Target]]:
    g = torch.Generator().manual_seed(0)
    anchors = Anchors.grid([(8, 8), (4, 4)], [8, 16], 0.5, torch.device("cpu"))
    a = len(anchors)
    outputs = HeadOutputs(torch.randn(2, a, C, generator=g), torch.randn(2, a, generator=g),
                          torch.rand(2, a, 4, generator=g) * 24 + 2, anchors)  # fmt: skip
    targets = [
        Target(torch.tensor([[6.0, 4.0, 40.0, 46.0], [10.0, 8.0, 44.0, 50.0]]), torch.tensor([0, 0])),
        Target(torch.tensor([[10.0, 8.0, 50.0, 36.0]]), torch.tensor([2])),
    ]
    return outputs, targets


def losses_of(cfg) -> dict[str, float]:
    assigner = make_assigner(cfg, C)
    terms = assigner(*batch())
    return {**{k: float(v) for k, v in terms.items()}, **{f"w.{k}": w for k, w in assigner.loss_weights.items()}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The smoke preset's run directory files, written as ``dwlab train`` writes them."""
    cfg = load_config("smoke")
    assert cfg.assigner.name == "dw"
    out = tmp_path_factory.mktemp("run")
    write_run_config(out, cfg, resolved_record(cfg, make_assigner(cfg, C), torch.device("cpu")))
    return out


def test_run_config_keeps_unset_constants_null_and_records_them_resolved(saved):
    written = yaml.safe_load((saved / "config.yaml").read_text())["assigner"]["dw"]
    assert all(written[k] is None for k in RELEASED)
    resolved = yaml.safe_load((saved / "resolved.yaml").read_text())
    dw = resolved["assigner"]["dw"]
    assert (dw["loc_score"], dw["mu_norm"], dw["pneg_high"], dw["pneg_bag_minmax"], dw["pos_scale"]) == (
        "iou_pow", 5.0, 0.95, False, 1.0)  # fmt: skip
    assert resolved["loss_weights"] == {"loss_cls_pos": 1.0, "loss_box": 5.0, "loss_neg": 1.0}
    assert resolved["training_revision"] == TRAINING_REVISION
    assert yaml.safe_load((saved / "config.yaml").read_text())["train"]["precision"] is None
    assert resolved["train"] == {  # smoke's null precision, on the CPU, whose kernels are deterministic
        "device": "cpu", "precision": "fp32", "deterministic": True, "cpu_isa": torch.backends.cpu.get_cpu_capability()}


@pytest.mark.parametrize("overrides", OVERRIDES, ids=lambda o: " ".join(o))
def test_saved_config_with_override_equals_preset_with_override(saved, overrides):
    from_saved = load_config(str(saved / "config.yaml"), overrides)
    from_preset = load_config("smoke", overrides)
    assert losses_of(from_saved) == losses_of(from_preset)  # exactly
    assert losses_of(from_saved) != losses_of(load_config(str(saved / "config.yaml")))  # the override acts


def test_overrides_resolve_the_variant_constants_anew(saved):
    def params(*overrides):
        return make_assigner(load_config(str(saved / "config.yaml"), list(overrides)), C).params

    assert params("assigner.dw.mu=7").mu_norm == 7.0
    official = params("assigner.dw.variant=official")
    assert (official.loc_score, official.mu_norm, official.pos_scale) == ("exp_giou", 3.0, 0.25)
    assert params("assigner.dw.variant=official", "assigner.dw.mu_norm=4").mu_norm == 4.0
