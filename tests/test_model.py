import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import models

from dwlab.config import ModelConfig
from dwlab.errors import DwlabError
from dwlab.models.backbone import build_backbone
from dwlab.models.detector import build_model
from dwlab.models.outputs import Anchors
from dwlab.models.postprocess import postprocess
from dwlab.models.refine import BoxRefine

TINY = dict(backbone="resnet18", pretrained=False, norm="bn", frozen_stages=-1, fpn_channels=16,
            head_convs=1, head_norm_groups=4)


def test_outputs_cover_p3_to_p7():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), num_classes=3)
    out = model(torch.randn(2, 3, 96, 128))
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    assert out.anchors.level_sizes == tuple(h * w for h, w in sizes)
    a = sum(out.anchors.level_sizes)
    assert out.cls_logits.shape == (2, a, 3) and out.centerness.shape == (2, a) and out.distances.shape == (2, a, 4)
    assert (out.distances >= 0).all()
    # anchor points at stride * (i + 0.5); the first P4 point is (8, 8)
    assert out.anchors.points[0].tolist() == [4.0, 4.0]
    assert out.anchors.points[12 * 16].tolist() == [8.0, 8.0] and out.anchors.strides[12 * 16] == 16
    scores = out.scores()
    assert torch.allclose(scores, torch.sigmoid(out.cls_logits) * torch.sigmoid(out.centerness)[..., None])


def test_frozen_stages_and_frozen_bn():
    fpn = build_backbone("resnet18", pretrained=False, norm="frozen_bn", frozen_stages=1, fpn_channels=16)
    body = fpn.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"


def test_pretrained_from_local_state_dict(tmp_path):
    net = models.resnet18(weights=None)
    torch.nn.init.constant_(net.conv1.weight, 0.5)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    fpn = build_backbone("resnet18", pretrained=str(tmp_path / "r18.pth"), norm="bn", frozen_stages=-1, fpn_channels=16)
    assert torch.all(fpn.body.conv1.weight == 0.5)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(DwlabError, match="does not match resnet18"):
        build_backbone("resnet18", pretrained=str(tmp_path / "bad.pth"), norm="bn", frozen_stages=-1, fpn_channels=16)


def test_pretrained_torchvision_weights_from_hub_cache(tmp_path, monkeypatch):
    """``pretrained: true`` goes through torchvision's weights API; with the file in the torch
    hub cache it loads it, without network. Without it, one line says what to do."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        weights = models.ResNet18_Weights.IMAGENET1K_V1
        ckpt = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
        ckpt.parent.mkdir(parents=True)
        net = models.resnet18(weights=None)
        torch.nn.init.constant_(net.conv1.weight, 0.25)
        torch.save(net.state_dict(), ckpt)
        fpn = build_backbone("resnet18", pretrained=True, norm="frozen_bn", frozen_stages=1, fpn_channels=16)
        assert torch.all(fpn.body.conv1.weight == 0.25)
    finally:
        torch.hub.set_dir(str(Path(torch.hub._get_torch_home()) / "hub"))


def test_pretrained_unavailable_is_one_line(tmp_path):
    code = (
        "import torch; torch.hub.set_dir(%r)\n"
        "from dwlab.models.backbone import build_backbone\n"
        "build_backbone('resnet18', pretrained=True, norm='frozen_bn', frozen_stages=1, fpn_channels=16)\n"
    ) % str(tmp_path / "empty-hub")
    env = {"PATH": "/usr/bin:/bin", "no_proxy": "", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "cannot load torchvision's ImageNet weights for resnet18" in proc.stderr
    assert "resnet18-f37072fd.pth" in proc.stderr and "model.pretrained" in proc.stderr


@pytest.mark.parametrize("sampler", ["grid_sample", "deform_conv"])
def test_refinement_with_zero_offsets_keeps_a_consistent_box(sampler):
    """Every location inside a box predicting that same box (edges on anchor points, so each
    boundary point samples a location inside): zero offsets leave it unchanged (Eq. 9-10)."""
    h, w, stride = 6, 8, 8
    refine = BoxRefine(4, sampler)
    xs = (torch.arange(w) + 0.5) * stride
    ys = (torch.arange(h) + 0.5) * stride
    box = torch.tensor([12.0, 20.0, 52.0, 44.0])
    l = (xs.view(1, w) - box[0]).expand(h, w)
    t = (ys.view(h, 1) - box[1]).expand(h, w)
    r = (box[2] - xs.view(1, w)).expand(h, w)
    b = (box[3] - ys.view(h, 1)).expand(h, w)
    dist = torch.stack([l, t, r, b])[None]
    inside = (dist >= 0).all(1, keepdim=True).expand_as(dist)
    assert inside.sum() == 4 * 6 * 4
    refined = refine(torch.randn(1, 4, h, w), dist.clamp(min=0), stride)
    assert torch.allclose(refined[inside], dist[inside], atol=1e-4)


def test_refinement_samplers_agree_and_offsets_move_boxes():
    torch.manual_seed(0)
    a, b = BoxRefine(4, "grid_sample"), BoxRefine(4, "deform_conv")
    for m in (a, b):
        torch.nn.init.normal_(m.offsets.weight, std=0.3)
    b.load_state_dict(a.state_dict())
    feat, dist = torch.randn(2, 4, 5, 7), torch.rand(2, 4, 5, 7) * 30
    ra, rb = a(feat, dist, 8), b(feat, dist, 8)
    assert torch.allclose(ra, rb, atol=1e-4)
    assert not torch.allclose(ra, BoxRefine(4, "grid_sample")(feat, dist, 8))


def test_box_refine_off_imports_no_deformable_ops():
    code = (
        "import sys, torch\nfrom dwlab.config import ModelConfig\nfrom dwlab.models.detector import build_model\n"
        f"m = build_model(ModelConfig(**{TINY!r}), 3); m(torch.randn(1, 3, 64, 64))\n"
        "assert 'dwlab.models.refine' not in sys.modules\n"
        "assert not any(type(x).__name__ == 'BoxRefine' for x in m.modules())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_postprocess_thresholds_nms_and_caps():
    anchors = Anchors.grid([(4, 4)], [8], 0.5, torch.device("cpu"))
    cls = torch.full((1, 16, 2), -10.0)
    cls[0, 5, 1] = 5.0  # one confident anchor of class 1
    cls[0, 6, 1] = 4.0  # a neighbour predicting the same box: suppressed by NMS
    ctr = torch.full((1, 16), 10.0)
    dist = torch.full((1, 16, 4), 6.0)
    dist[0, 6] = torch.tensor([14.0, 6.0, -2.0, 6.0])  # same box as anchor 5 from anchor 6's point
    from dwlab.models.outputs import HeadOutputs

    out = HeadOutputs(cls, ctr, dist, anchors)
    (det,) = postprocess(out, torch.tensor([[32, 32]]), score_thresh=0.05, nms_thresh=0.6, max_dets=100)
    assert det.labels.tolist() == [1] and det.boxes.tolist() == [[6.0, 6.0, 18.0, 18.0]]
    (det,) = postprocess(out, torch.tensor([[32, 32]]), score_thresh=0.999)
    assert len(det.scores) == 0


def test_resnet10_is_resnet18_with_one_block_per_stage():
    fpn = build_backbone("resnet10", pretrained=False, norm="bn", frozen_stages=-1, fpn_channels=16)
    assert [len(getattr(fpn.body, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    with pytest.raises(DwlabError, match="no ImageNet weights for resnet10"):
        build_backbone("resnet10", pretrained=True, norm="bn", frozen_stages=-1, fpn_channels=16)
