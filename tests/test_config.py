import pytest
import torch

from dwlab.config import apply_overrides, flatten, load_config, to_dict, validate, validate_stored
from dwlab.errors import DwlabError
from tests.conftest import write_yaml


def test_presets_load_and_differ():
    smoke, paper = load_config("smoke"), load_config("paper")
    assert smoke.model.backbone == "resnet18" and paper.model.backbone == "resnet50"
    assert paper.model.fpn_channels == 256 and paper.model.head_convs == 4
    assert (paper.data.min_size, paper.data.max_size) == (800, 1333)
    assert paper.train.epochs == 12 and paper.train.lr_steps == [8, 11]
    assert smoke.data.root is None  # the embedded dataset


def test_overrides_apply_and_yaml_typed():
    cfg = load_config("smoke", ["train.epochs=2", "assigner.name=fcos", "assigner.dw.beta=3.5", "train.grad_clip=null"])
    assert cfg.train.epochs == 2 and cfg.assigner.name == "fcos"
    assert cfg.assigner.dw.beta == 3.5 and cfg.train.grad_clip is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=2", "unknown key 'epoch' in train"),
        ("trian.epochs=2", "unknown key 'trian' in the top level"),
        ("train.epochs.x=2", "'epochs' is a value, not a section"),
        ("train.epochs", "expected dotted.key=value"),
        ("eval.score_voting_sigma=0", r"eval.score_voting_sigma: Input should be greater than 0 \(got 0\)"),
    ],
)
def test_bad_override_is_one_line(override, message):
    with pytest.raises(DwlabError, match=message) as err:
        load_config("smoke", [override])
    assert "\n" not in str(err.value)


def test_wrong_type_and_unknown_key_name_the_file_and_key(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": "many"}})
    with pytest.raises(DwlabError, match=r"c.yaml: train.epochs: .*integer.*'many'"):
        load_config(str(path))
    path = write_yaml(tmp_path / "d.yaml", {"model": {"depth": 50}})
    with pytest.raises(DwlabError, match=r"d.yaml: unknown key 'model.depth'"):
        load_config(str(path))
    with pytest.raises(DwlabError, match="neither a file nor a preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_a_removed_key_is_dropped_from_a_stored_config_and_refused_in_a_written_one(tmp_path):
    """Checkpoints written before ``train.log_every`` was removed still load (``plot weights``,
    the report's Fig. 5); a config a user writes may not name it."""
    stored = to_dict(load_config("smoke"))
    stored["train"]["log_every"] = 20
    assert validate_stored(stored, "ckpt") == load_config("smoke")
    assert stored["train"]["log_every"] == 20  # the caller's mapping is left as it is
    with pytest.raises(DwlabError, match="unknown key 'train.log_every'"):
        validate(stored, "c.yaml")


@pytest.mark.parametrize("old", [{"amp": True}, {"amp": False}, {"cpu_bf16": True}, {"cpu_bf16": False},
                                 {"amp": True, "cpu_bf16": True}, {"amp": False, "cpu_bf16": True},
                                 {"amp": False, "cpu_bf16": False}, {"amp": True, "cpu_bf16": False}])  # fmt: skip
def test_old_precision_keys_load_as_what_they_computed_on_each_device(old):
    """``train.amp`` (fp16 on CUDA, default true) and ``train.cpu_bf16`` (bf16 on the CPU) become
    the ``precision`` that computes the same on each device; the one exception, both true, is
    bf16 on CUDA too (``LEGACY_PRECISION``)."""
    from dwlab.runner import resolve_precision

    train = validate({"train": old}, "old.yaml").train
    amp, cpu_bf16 = old.get("amp", True), old.get("cpu_bf16", False)
    assert resolve_precision(train, torch.device("cpu")) == ("bf16" if cpu_bf16 else "fp32")
    assert resolve_precision(train, torch.device("cuda")) == ("bf16" if cpu_bf16 else "fp16" if amp else "fp32")
    assert "amp" not in to_dict(validate({"train": old}, "old.yaml"))["train"]


@pytest.mark.parametrize("preset, old", [("smoke", {"amp": True, "cpu_bf16": False}), ("mini", {"amp": True, "cpu_bf16": True}),
                                         ("paper", {"amp": True, "cpu_bf16": False})])  # fmt: skip
def test_configs_written_before_the_precision_key_load_as_the_presets(tmp_path, preset, old):
    """A checkpoint's stored config and a run's ``config.yaml`` held every key, ``amp`` and
    ``cpu_bf16`` included, and no ``precision``."""
    stored = to_dict(load_config(preset))
    stored["train"] = {**{k: v for k, v in stored["train"].items() if k != "precision"}, **old}
    assert validate_stored(stored, "ckpt") == load_config(preset)
    assert load_config(str(write_yaml(tmp_path / "config.yaml", stored))) == load_config(preset)


def test_old_and_new_precision_keys_that_disagree_are_one_line():
    with pytest.raises(DwlabError, match=r"^c.yaml: train: .*precision=bf16 contradicts the old keys amp=False "
                                         r"\(they mean precision=fp32\); keep precision only$"):  # fmt: skip
        validate({"train": {"amp": False, "precision": "bf16"}}, "c.yaml")
    with pytest.raises(DwlabError, match=r"contradicts the old keys amp=True, cpu_bf16=False \(they mean precision=null\)"):
        validate({"train": {"amp": True, "cpu_bf16": False, "precision": "fp16"}}, "c.yaml")
    assert validate({"train": {"cpu_bf16": True, "precision": "bf16"}}, "c.yaml").train.precision == "bf16"
    with pytest.raises(DwlabError, match=r"^c.yaml: train: .*amp: expected true or false, got 'yes please'"):
        validate({"train": {"amp": "yes please"}}, "c.yaml")
    with pytest.raises(DwlabError, match=r"^override 'train.cpu_bf16': replaced by train.precision \(fp32 \| fp16 \| bf16\)$"):
        load_config("mini", ["train.cpu_bf16=false"])
    with pytest.raises(DwlabError, match=r"c.yaml: train.precision: Input should be 'fp32', 'fp16' or 'bf16' \(got 'fp8'\)"):
        validate({"train": {"precision": "fp8"}}, "c.yaml")


def test_dw_variant_constants_stay_null_in_the_config_and_resolve_in_dwparams():
    from dwlab.assign.dw import DWParams

    released = ("loc_score", "mu_norm", "pneg_high", "pneg_bag_minmax", "pos_scale")
    cfg = validate({"assigner": {"dw": {"mu": 6}}}, "x").assigner.dw
    assert all(getattr(cfg, k) is None for k in released)
    paper = DWParams.from_config(cfg)
    assert (paper.loc_score, paper.mu_norm, paper.pneg_high, paper.pneg_bag_minmax, paper.pos_scale) == (
        "iou_pow", 6.0, 0.95, False, 1.0)
    official = DWParams.from_config(validate({"assigner": {"dw": {"variant": "official"}}}, "x").assigner.dw)
    assert (official.loc_score, official.mu_norm, official.pneg_high, official.pneg_bag_minmax, official.pos_scale) == (
        "exp_giou", 3.0, 1.0, True, 0.25)
    mixed = DWParams.from_config(validate({"assigner": {"dw": {"variant": "official", "pos_scale": 1.0}}}, "x").assigner.dw)
    assert mixed.pos_scale == 1.0 and mixed.mu_norm == 3.0  # each constant overridable


def test_dw_pneg_range_is_one_line_in_the_config_and_at_the_builder():
    from dwlab.runner import make_assigner

    with pytest.raises(DwlabError, match=r"x: assigner.dw: .*pneg_low=0.9 must be below pneg_high=0.8"):
        validate({"assigner": {"dw": {"pneg_low": 0.9, "pneg_high": 0.8}}}, "x")
    cfg = validate({"assigner": {"dw": {"pneg_low": 0.96}}}, "x")  # paper's pneg_high 0.95: known when built
    with pytest.raises(DwlabError, match=r"^assigner.dw: need 0 <= pneg_low < pneg_high, got 0.96 and 0.95$"):
        make_assigner(cfg, 3)
    official = validate({"assigner": {"dw": {"pneg_low": 0.96, "variant": "official"}}}, "x")
    assert make_assigner(official, 3).params.pneg_high == 1.0


def test_flatten_and_overrides_from_mapping():
    raw = apply_overrides({}, {"assigner.dw.beta": 4, "train.lr": 0.02})
    flat = flatten(validate(raw, "x"))
    assert flat["assigner.dw.beta"] == 4 and flat["train.lr"] == 0.02 and "model.backbone" in flat
