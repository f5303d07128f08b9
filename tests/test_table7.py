"""Table 7's detectors: ResNet-101, ResNet-101-DCN and ResNeXt-101-64x4d trunks (torchvision's
definitions and weights, DCNv2 on torchvision's ``DeformConv2d``), the 2x multi-scale preset,
its sweep file and the test-dev results file of ``dwlab eval --images-only``.

Every detector runs on the CPU at 64 px from random init; torchvision's ImageNet weights are
stood in for by files of the right keys and shapes whose tensors are expanded scalars (a few
hundred kB), put where torchvision's weights API looks (the torch hub cache): no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from torch import nn
from torchvision import models
from typer.testing import CliRunner

from dwlab.assign import build_assigner
from dwlab.assign.base import weighted_total
from dwlab.cli import app
from dwlab.config import AssignerConfig, ModelConfig, load_config, validate
from dwlab.data.coco import CocoDetection
from dwlab.data.target import Target
from dwlab.errors import DwlabError
from dwlab.models.backbone import build_backbone
from dwlab.models.dcn import ModulatedDeformConv2d
from dwlab.models.detector import build_model
from dwlab.sweep.spec import load_plan
from tests.conftest import tiny_config, write_json, write_yaml

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
DETECTORS = {  # id: (model.backbone, DCN in the backbone and the head)
    "resnet101": ("resnet101", False),
    "resnet101-dcn": ("resnet101", True),
    "resnext101_64x4d": ("resnext101_64x4d", False),
}
R101_DCN_BLOCKS = 4 + 23 + 3  # bottlenecks in C3, C4, C5


# ----------------------------------------------------------------------------- DCNv2


def _conv_and_dcn() -> tuple[nn.Conv2d, ModulatedDeformConv2d, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    return conv, ModulatedDeformConv2d.from_conv(conv), torch.randn(2, 4, 9, 11)


def test_new_dcn_is_the_plain_conv_at_half_modulation():
    """Zero offsets sample the regular grid; every mask is sigmoid(0) = 0.5 (mmcv's DCNv2 at init)."""
    conv, dcn, x = _conv_and_dcn()
    bias = conv.bias[None, :, None, None]
    assert torch.allclose(dcn(x), 0.5 * (conv(x) - bias) + bias, atol=1e-5)
    assert torch.equal(dcn.weight, conv.weight) and not dcn.conv_offset.weight.any()


def test_dcn_offsets_are_dy_dx_per_tap_and_the_mask_follows():
    """Every tap moved one pixel right (dx = 1) with mask 1: the conv of the input shifted one
    pixel left (zero padding where the taps leave the padded input)."""
    conv, dcn, x = _conv_and_dcn()
    taps = 9
    with torch.no_grad():
        dcn.conv_offset.bias[2 * taps :] = 40.0  # sigmoid -> 1
        dcn.conv_offset.bias[1 : 2 * taps : 2] = 1.0  # (dy, dx) per tap: dx = 1
    shifted = F.pad(F.pad(x, (1, 1, 1, 1))[..., 1:], (0, 1))
    assert torch.allclose(dcn(x), F.conv2d(shifted, conv.weight, conv.bias, stride=2), atol=1e-5)


def test_dcn_runs_under_cpu_bf16_autocast():
    """torchvision's deformable conv has no bf16 CPU kernel: the DCN computes it in fp32 and
    returns the autocast dtype (``train.cpu_bf16``)."""
    _, dcn, x = _conv_and_dcn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcn(x.bfloat16())  # what the layer before it gives under autocast
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), dcn(x), atol=0.05, rtol=0.02)


# ----------------------------------------------------------------------------- the detectors


def _tiny(backbone: str, dcn: bool) -> ModelConfig:
    return ModelConfig(backbone=backbone, backbone_dcn=dcn, head_dcn=dcn, pretrained=False, norm="bn",
                       frozen_stages=1, fpn_channels=16, head_convs=1, head_norm_groups=4)  # fmt: skip


def _torchvision_trunk_params(backbone: str) -> tuple[int, int]:
    """(torchvision's model without its classifier, the DCN offset convs it would gain in C3-C5)."""
    with torch.device("meta"):
        net = getattr(models, backbone)(weights=None)
    trunk = sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in net.fc.parameters())
    blocks = [b for stage in (net.layer2, net.layer3, net.layer4) for b in stage]
    offsets = sum(3 * 9 * (b.conv2.in_channels * 9 + 1) for b in blocks)  # conv 3x3 -> 27 channels, + bias
    return trunk, offsets


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_detector_matches_torchvision_and_trains_two_steps(detector):
    """The trunk has torchvision's parameter count (plus the offset convs with DCN); two SGD
    steps of DW at 64 px from random init give finite losses and move the weights, the
    DCN offset convs too."""
    backbone, dcn = DETECTORS[detector]
    torch.manual_seed(0)
    model = build_model(_tiny(backbone, dcn), num_classes=3)
    trunk, offsets = _torchvision_trunk_params(backbone)
    body = model.backbone.body
    assert sum(p.numel() for p in body.parameters()) == trunk + (offsets if dcn else 0)
    dcns = [m for m in body.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(dcns) == (R101_DCN_BLOCKS if dcn else 0)
    assert sum(isinstance(m, ModulatedDeformConv2d) for m in model.head.modules()) == (2 if dcn else 0)
    assigner = build_assigner(AssignerConfig(name="dw"), num_classes=3)
    images = torch.randn(1, 3, 64, 64)
    targets = [Target(torch.tensor([[8.0, 10.0, 40.0, 50.0], [30.0, 4.0, 60.0, 28.0]]), torch.tensor([0, 2]))]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    before = [p.detach().clone() for p in params]
    model.train()
    for _ in range(2):
        loss = weighted_total(assigner(model(images), targets), assigner.loss_weights)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params) if p.grad is not None and p.grad.any())
    assert not torch.equal(before[0], params[0])
    if dcn:  # the offsets start at zero and learn
        assert all(d.conv_offset.weight.any() for d in dcns)


def _fake_imagenet_file(tmp_path: Path, backbone: str, values: dict[str, float]) -> None:
    """torchvision's file name for ``backbone``'s IMAGENET1K_V1 weights in a torch hub cache under
    ``tmp_path``: every key of its state_dict, each tensor a scalar (``values``, else 0)
    expanded to its shape."""
    weights = models.get_model_weights(backbone).IMAGENET1K_V1
    with torch.device("meta"):
        state = getattr(models, backbone)(weights=None).state_dict()
    tiny = {k: torch.tensor(values.get(k, 0.0), dtype=v.dtype).expand(v.shape) for k, v in state.items()}
    path = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny, path)
    assert path.stat().st_size < 400_000


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_pretrained_loads_torchvision_imagenet_weights(detector, tmp_path, monkeypatch):
    """``pretrained: true`` loads torchvision's ImageNet file; with DCN the 3x3 convs keep its
    weights and only the offset convs are new (zero)."""
    backbone, dcn = DETECTORS[detector]
    _fake_imagenet_file(tmp_path, backbone, {"conv1.weight": 0.25, "layer3.5.conv2.weight": 0.5})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        fpn = build_backbone(backbone, pretrained=True, norm="frozen_bn", frozen_stages=1, fpn_channels=16, dcn=dcn)
    finally:
        torch.hub.set_dir(str(Path(torch.hub._get_torch_home()) / "hub"))
    body = fpn.body
    assert torch.all(body.conv1.weight == 0.25) and torch.all(body.layer3[5].conv2.weight == 0.5)
    assert not body.layer3[4].conv2.weight.any()
    assert isinstance(body.layer3[5].conv2, ModulatedDeformConv2d) == dcn
    if dcn:
        assert not body.layer3[5].conv2.conv_offset.weight.any() and body.layer3[5].conv2.weight.requires_grad


def test_config_refuses_dcn_where_it_does_not_go():
    with pytest.raises(DwlabError, match="backbone_dcn needs a bottleneck backbone .* not resnet18"):
        validate({"model": {"backbone": "resnet18", "backbone_dcn": True}}, "c.yaml")
    with pytest.raises(DwlabError, match="head_dcn needs head_convs >= 1"):
        validate({"model": {"head_dcn": True, "head_convs": 0}}, "c.yaml")
    with pytest.raises(DwlabError, match=r"c.yaml: data.train_min_size_range: .*16 <= lo <= hi \(got \[900, 800\]\)"):
        validate({"data": {"train_min_size_range": [900, 800]}}, "c.yaml")


# ----------------------------------------------------------------------------- multi-scale data


def _shorter_sides(dataset: CocoDetection) -> list[int]:
    return [min(dataset[i][0].shape[1:]) for i in range(len(dataset))]


def test_multiscale_draws_each_shorter_side_from_the_seeded_rng(synth_root):
    """Each item's shorter side is a draw from lo..hi; the same seed draws the same sides, the
    boxes follow the image, and without a range every side is min_size."""
    ann, images = synth_root / "instances_train.json", synth_root / "train"
    ms = CocoDetection(ann, images, min_size=128, max_size=128, min_size_range=(48, 96))
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(_shorter_sides(ms))
    assert draws[0] == draws[1] != draws[2]
    assert all(48 <= s <= 96 for s in draws[0] + draws[2]) and len(set(draws[0])) > 3
    torch.manual_seed(0)
    image, target = ms[0]
    assert target.scale == pytest.approx(min(image.shape[1:]) / min(target.orig_size), abs=0.01)
    fixed = CocoDetection(ann, images, min_size=64, max_size=128)
    assert set(_shorter_sides(fixed)) == {64}


def test_train_split_is_multiscale_and_val_is_not_and_loader_workers_repeat_their_draws(synth_root):
    """Through the training loader with a worker process (the paper presets' path), the
    loader's seeded generator fixes the draws."""
    from dwlab.runner import build_datasets, make_loader

    cfg = validate(tiny_config(synth_root, data={"train_min_size_range": [64, 96], "num_workers": 1}), "t")
    train, val = build_datasets(cfg)
    assert train.min_size_range == (64, 96) and val.min_size_range is None

    def sides(seed: int) -> list[int]:
        loader = make_loader(train, 4, cfg, train=True, generator=torch.Generator().manual_seed(seed))
        return [round(t.scale * min(t.orig_size)) for _, _, targets in loader for t in targets]

    first = sides(0)
    assert first == sides(0) != sides(1) and all(64 <= s <= 96 for s in first)


# ----------------------------------------------------------------------------- preset, sweep file


def test_paper_2x_ms_preset_and_table7_points():
    cfg = load_config("paper-2x-ms")
    assert (cfg.train.epochs, cfg.train.lr_steps, cfg.data.train_min_size_range) == (24, [16, 22], (480, 960))
    assert (cfg.data.min_size, cfg.data.max_size, cfg.model.backbone) == (800, 1333, "resnet101")
    plan = load_plan(EXPERIMENTS / "table7.yaml", all_points=True)
    assert plan.scale == "paper" and plan.base.endswith("paper-2x-ms.yaml") and not plan.warnings
    rows = [(c.assigner.name, c.model.box_refine, c.model.backbone, c.model.backbone_dcn, c.model.head_dcn, c.model.head)
            for c in (t.config for t in plan.trials)]  # fmt: skip
    assert len(rows) == 17 and len(set(rows)) == 17
    assert ("dw", True, "resnet101", True, True, "fcos") in rows
    assert ("atss", False, "resnext101_64x4d", False, False, "fcos") in rows
    # TOOD with its T-head and DW on it (DW*), the released 6 stacked convs
    assert {r for r in rows if r[-1] == "tood"} == {("tood", False, "resnext101_64x4d", False, False, "tood"),
                                                    ("dw", False, "resnext101_64x4d", False, False, "tood")}
    assert all(t.config.model.thead_convs == 6 for t in plan.trials)
    assert all(t.config.train.epochs == 24 for t in plan.trials)
    dw = [t.config for t in plan.trials if t.config.assigner.name == "dw"]
    assert all(c.assigner.dw.variant == "official" and c.model.prior_prob == 0.02 for c in dw)
    assert [p.id for p in load_plan(EXPERIMENTS / "table7.yaml").points] == [
        "dw,r101", "dw+refine,r101", "dw,r101-dcn", "dw+refine,r101-dcn", "dw,x101", "dw+refine,x101"]
    smoke = load_plan(EXPERIMENTS / "table7.yaml", scale="smoke")
    assert smoke.base.endswith("smoke.yaml") and len(smoke.trials) == 17
    assert all(t.config.train.max_iters_per_epoch == 2 and t.config.data.min_size == 128 for t in smoke.trials)


def test_a_per_scale_base_names_its_scale_when_wrong(tmp_path):
    f = write_yaml(tmp_path / "s.yaml", {"base": {"paper": "nope"}, "points": [{"train.epochs": 1}]})
    assert load_plan(f).base.endswith("smoke.yaml")  # smoke: not given, the scale's preset
    with pytest.raises(DwlabError, match=r"s.yaml: base.paper: config 'nope' is neither a file nor a preset"):
        load_plan(f, scale="paper")


# ----------------------------------------------------------------------------- test-dev results


@pytest.fixture(scope="module")
def tiny_checkpoint(synth_root, tmp_path_factory):
    """A tiny ResNet-18 detector's weights in a checkpoint, and its config file."""
    d = tmp_path_factory.mktemp("ckpt")
    config = write_yaml(d / "tiny.yaml", tiny_config(synth_root, eval={"score_thresh": 0.0, "max_dets": 20}))
    torch.manual_seed(0)
    model = build_model(load_config(str(config)).model, num_classes=6)
    torch.save({"model": model.state_dict()}, d / "last.pt")
    return config, d / "last.pt"


def test_eval_images_only_writes_the_servers_results_file(synth_root, tiny_checkpoint, tmp_path):
    """An image-info json (no ``annotations``, as COCO's image_info_test-dev2017.json) gives a
    results json in COCO's format with the same detections ``dwlab eval`` writes on the
    labelled split, which pycocotools loads against the split's ground truth."""
    config, ckpt = tiny_checkpoint
    val = json.loads((synth_root / "instances_val.json").read_text())
    info = write_json(tmp_path / "image_info_test-dev2017.json", {k: val[k] for k in ("images", "categories")})
    res = CliRunner().invoke(app, ["eval", str(config), "--checkpoint", str(ckpt), "--images-only", str(info),
                                   "--image-dir", str(synth_root / "val")])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = ckpt.parent / "detections_test-dev2017_dwlab_results.json"
    assert f"to {out}" in res.output
    results = json.loads(out.read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["image_id"] for r in results} <= {im["id"] for im in val["images"]}
    res = CliRunner().invoke(app, ["eval", str(config), "--checkpoint", str(ckpt), "--out", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "detections.json").read_text()) == results
    gt = COCO(str(synth_root / "instances_val.json"))
    assert len(gt.loadRes(str(out)).anns) == len(results)


def test_eval_images_only_errors_are_one_line(synth_root, tiny_checkpoint, tmp_path):
    config, ckpt = tiny_checkpoint
    base = ["eval", str(config), "--checkpoint", str(ckpt)]
    res = CliRunner().invoke(app, [*base, "--images-only", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and res.output.strip() == (
        "error: --images-only and --image-dir go together (the image-info json and its image folder)")
    bad = write_json(tmp_path / "bad.json", {"images": []})
    res = CliRunner().invoke(app, [*base, "--images-only", str(bad), "--image-dir", str(tmp_path)])
    assert res.exit_code == 2 and res.output.strip() == (
        f"error: {bad}: not a COCO image-info file (needs lists 'images', 'categories')")
