"""TOOD's T-head (``dwlab/models/thead.py``, ``model.head: tood``): the aligned score's logit and
its gradient, task decomposition, box alignment, the released layer shapes, gradients, the
config, the default head left as it was, and DW / TOOD training on it end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dwlab.assign import ASSIGNERS, build_assigner
from dwlab.assign.base import head_init
from dwlab.config import AssignerConfig, ModelConfig, validate
from dwlab.data.target import Target
from dwlab.errors import DwlabError
from dwlab.models.backbone import STRIDES, build_backbone
from dwlab.models.detector import FCOS, build_model
from dwlab.models.head import FCOSHead
from dwlab.models.thead import TaskDecomposition, THead, aligned_logit
from dwlab.runner import run_training
from tests.conftest import tiny_config


def naive(z, q):
    """logit(sqrt(sigmoid(z) sigmoid(q))) by plain autograd (the released forward)."""
    return torch.logit(torch.sqrt(torch.sigmoid(z) * torch.sigmoid(q)))


# ----------------------------------------------------------------------------- the aligned score


def test_aligned_logit_hand_values():
    # sigmoid(z) = 0.2, sigmoid(q) = 0.8: M = sqrt(0.16) = 0.4, logit 0.4 = log(2/3)
    z, q = torch.tensor([math.log(0.25), 0.0]), torch.tensor([math.log(4.0), 0.0])
    out = aligned_logit(z, q)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([math.log(2 / 3), 0.0], abs=1e-6)  # both 0.5: M = 0.5, logit 0


def test_aligned_logit_gradient_is_the_analytic_one():
    """Forward and backward equal plain autograd of the naive formula where that is finite (fp64)."""
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(6, 3, 4, 5, generator=g, dtype=torch.float64) * 16 - 8).requires_grad_()
    q = (torch.rand(6, 1, 4, 5, generator=g, dtype=torch.float64) * 16 - 8).requires_grad_()  # broadcast over C
    w = torch.rand(6, 3, 4, 5, generator=g, dtype=torch.float64)
    ours = aligned_logit(z, q)
    gz, gq = torch.autograd.grad((ours * w).sum(), (z, q))
    ref = naive(z, q)
    rz, rq = torch.autograd.grad((ref * w).sum(), (z, q))
    assert ours.dtype == torch.float64 and torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(gz, rz, rtol=1e-8, atol=1e-12) and torch.allclose(gq, rq, rtol=1e-8, atol=1e-12)


def test_aligned_logit_is_finite_where_sqrt_of_sigmoids_is_not():
    """fp32 logits far from 0 (mmdetection #7747's NaN): the naive gradient is inf / NaN, ours is
    finite, in [0, 1] per input, and sigmoid(output) is still the geometric mean."""
    values = torch.tensor([-1e4, -200.0, -50.0, 0.0, 50.0, 200.0, 1e4])
    z, q = (v.reshape(-1).clone().requires_grad_() for v in torch.meshgrid(values, values, indexing="ij"))
    out = aligned_logit(z, q)
    gz, gq = torch.autograd.grad(out.sum(), (z, q))
    assert torch.isfinite(out).all() and torch.isfinite(gz).all() and torch.isfinite(gq).all()
    assert ((gz >= 0) & (gz <= 1)).all() and ((gq >= 0) & (gq <= 1)).all()
    m = torch.sqrt(torch.sigmoid(z.detach().double()) * torch.sigmoid(q.detach().double()))
    assert torch.allclose(torch.sigmoid(out.double()), m, rtol=1e-5, atol=1e-30)
    zn, qn = (t.detach().clone().requires_grad_() for t in (z, q))
    nz, _ = torch.autograd.grad(naive(zn, qn).sum(), (zn, qn))
    assert not torch.isfinite(nz).all()  # what the analytic backward is for


# ----------------------------------------------------------------------------- decomposition, alignment


def test_task_decomposition_folds_the_layer_attention_into_the_reduction_conv():
    """conv1x1(concat_k w_k X_k) with the weights folded per image equals scaling each layer."""
    torch.manual_seed(0)
    td = TaskDecomposition(8, 3, norm_groups=2)
    torch.nn.init.normal_(td.layer_attention[2].weight, std=1.0)  # attention far from 0.5 everywhere
    inter = torch.randn(2, 24, 5, 6)
    pooled = F.adaptive_avg_pool2d(inter, 1)
    w = td.layer_attention(pooled)  # [B, 3, 1, 1]
    scaled = torch.cat([w[:, k : k + 1] * inter[:, 8 * k : 8 * (k + 1)] for k in range(3)], 1)
    expected = F.relu(td.norm(td.reduction(scaled)))
    assert torch.allclose(td(inter, pooled), expected, atol=1e-5)
    assert td.layer_attention[0].out_channels == 1  # la_down_rate = 8 N: 24 / 24


def box_head(anchor_offset: float = 0.5) -> THead:
    return THead(8, 2, (8,), stacked_convs=1, norm_groups=2, anchor_offset=anchor_offset)


def test_zero_offsets_keep_every_box():
    dist = torch.rand(2, 4, 3, 5) * 3
    out = box_head().align_boxes(dist, torch.zeros(2, 8, 3, 5))
    assert torch.allclose(out, dist, atol=1e-6)


def test_offsets_resample_each_coordinate_from_its_own_location():
    """One row of 4 cells (stride units, points at 0.5 .. 3.5), each box (l, t, r, b) = (1, 1, 1, 1)
    except cell 2's, (0.5, 1, 2, 1): cell 1 samples x2 one cell to the right (dx = +1), so its x2
    becomes cell 2's 2.5 + 2 = 4.5 and its r 4.5 - 1.5 = 3; the other coordinates stay."""
    dist = torch.ones(1, 4, 1, 4)
    dist[0, :, 0, 2] = torch.tensor([0.5, 1.0, 2.0, 1.0])
    offsets = torch.zeros(1, 8, 1, 4)
    offsets[0, 5, 0, 1] = 1.0  # (dy, dx) of x2 (offset group 2) at cell 1
    out = box_head().align_boxes(dist, offsets)
    expected = dist.clone()
    expected[0, 2, 0, 1] = 3.0
    assert torch.allclose(out, expected, atol=1e-6)
    # half a cell: bilinear between cells 1 and 2, x2 = (2.5 + 4.5) / 2 = 3.5, r = 2
    offsets[0, 5, 0, 1] = 0.5
    assert box_head().align_boxes(dist, offsets)[0, 2, 0, 1].item() == pytest.approx(2.0, abs=1e-6)


def test_an_invalid_sampled_box_falls_back_to_the_unsampled_one():
    """Cell 0 samples x1 from cell 3 (x1 = 3.5 - 1 = 2.5), right of its own x2 = 1.5: x1 > x2, so the
    whole box stays cell 0's own (mmdetection PR #7567). Without the fallback r would be clamped
    to 0 and l to 0: a box of zero width."""
    dist = torch.ones(1, 4, 1, 4)
    offsets = torch.zeros(1, 8, 1, 4)
    offsets[0, 1, 0, 0] = 3.0  # dx of x1 at cell 0
    offsets[0, 5, 0, 0] = 0.5  # x2 moves too, half a cell (to 2.0, still < 2.5): replaced as well
    out = box_head().align_boxes(dist, offsets)
    assert torch.allclose(out, dist, atol=1e-6)


# ----------------------------------------------------------------------------- the released shapes


def test_parameter_count_at_256_channels_is_the_released_t_head_plus_the_centerness_conv():
    """TOOD's released head (tood_r50_fpn_1x_coco: 256 channels, 80 classes, 6 stacked convs,
    GN 32, 5 levels), counted from its layer shapes; dwlab adds the 3x3 centerness conv."""
    f, n, c = 256, 6, 80
    inter = n * (f * f * 9 + 2 * f)  # 3x3 conv without bias (ConvModule before GN) + GN affine
    decomposition = 2 * (
        (n * f * (f // 8) + f // 8)  # layer attention conv1: 1536 -> 32, 1x1
        + ((f // 8) * n + n)  # conv2: 32 -> 6, 1x1
        + n * f * f  # the 1x1 reduction conv, no bias
        + 2 * f  # its GN
    )
    predictors = (f * c * 9 + c) + (f * 4 * 9 + 4)  # tood_cls, tood_reg (3x3)
    cls_prob = (n * f * (f // 4) + f // 4) + ((f // 4) * 9 + 1)  # 1536 -> 64 (1x1) -> 1 (3x3)
    reg_offset = (n * f * (f // 4) + f // 4) + ((f // 4) * 8 * 9 + 8)  # 1536 -> 64 (1x1) -> 8 (3x3)
    released = inter + decomposition + predictors + cls_prob + reg_offset + 5  # + a Scale per level
    assert released == 4_823_790  # by hand: 3,542,016 + 886,220 + 193,620 + 98,945 + 102,984 + 5
    head = THead(f, c, STRIDES, stacked_convs=n, norm_groups=32)
    assert sum(p.numel() for p in head.parameters()) == released + (f * 9 + 1)


def test_initialisation_is_the_released_one():
    torch.manual_seed(0)
    head = THead(64, 3, STRIDES, stacked_convs=6, norm_groups=16, prior_prob=0.01)
    prior = math.log(0.01 / 0.99)
    assert head.cls_logits.bias.eq(prior).all() and head.cls_prob[2].bias.eq(prior).all()
    assert head.reg_offset[2].bias.eq(0).all() and head.reg_offset[2].weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert head.cls_decomp.layer_attention[0].weight.std().item() == pytest.approx(0.001, rel=0.1)
    features = [torch.randn(1, 64, s, s) for s in (8, 4, 2, 1, 1)]
    cls, _, dist, _ = head(features)
    # the aligned score starts at sqrt(p * p) = p, the distances at about one stride
    assert torch.sigmoid(cls[0]).mean().item() == pytest.approx(0.01, rel=0.05)
    assert (dist[0] / 8).mean().item() == pytest.approx(1.0, rel=0.1)


# ----------------------------------------------------------------------------- in the detector


def tiny_model_config(**update) -> ModelConfig:
    base = {"backbone": "resnet18", "pretrained": False, "norm": "bn", "frozen_stages": -1, "fpn_channels": 16,
            "head_convs": 1, "head_norm_groups": 4}  # fmt: skip
    return ModelConfig(**{**base, **update})


TARGETS = [
    Target(boxes=torch.tensor([[4.0, 4.0, 40.0, 30.0]]), labels=torch.tensor([1])),
    Target(boxes=torch.tensor([[10.0, 8.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0]]), labels=torch.tensor([0, 2])),
]


@pytest.mark.parametrize("method", ["dw", "fcos"])
def test_gradient_reaches_every_head_parameter(method):
    """A tiny detector on the T-head, one forward and backward of a method's loss: every
    parameter of the head gets a finite, non-zero gradient (FCOS: the centerness BCE trains the
    quality slot; DW: the joint score does)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(head="tood", thead_convs=2), 3)
    assert isinstance(model.head, THead)
    assigner = build_assigner(AssignerConfig(name=method), 3)
    losses = assigner(model(torch.randn(2, 3, 64, 64)), TARGETS)
    sum(assigner.loss_weights[k] * v for k, v in losses.items()).backward()
    for name, p in model.head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _needs_distribution(method: str) -> bool:
    init = head_init(build_assigner(AssignerConfig(name=method), 3))
    return init.reg_max is not None or init.dgqp


@pytest.mark.parametrize("method", [m for m in ASSIGNERS if not _needs_distribution(m)])
def test_every_assigner_runs_on_the_t_head(method):
    """Every registered method reads the T-head's outputs: its loss terms (its weight table's
    keys) are finite, with finite gradients into the head, and the joint score is in (0, 1)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(head="tood", thead_convs=2), 3)
    assigner = build_assigner(AssignerConfig(name=method), 3)
    outputs = model(torch.randn(2, 3, 64, 64))
    scores = outputs.scores()
    assert ((scores > 0) & (scores < 1)).all() and outputs.distances.ge(0).all()
    losses = assigner(outputs, TARGETS)
    assert set(losses) == set(assigner.loss_weights) and all(torch.isfinite(v) for v in losses.values())
    sum(assigner.loss_weights[k] * v for k, v in losses.items()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.head.parameters())


@pytest.mark.parametrize("method", [m for m in ASSIGNERS if _needs_distribution(m)])
def test_the_t_head_refuses_a_distribution_head(method):
    """GFL's distribution regression (gfl, gflv2) is an FCOS-head option: on the T-head, one line."""
    init = head_init(build_assigner(AssignerConfig(name=method), 3))
    with pytest.raises(ValueError, match="head=tood with a distribution head"):
        build_model(tiny_model_config(head="tood", thead_convs=2), 3, reg_max=init.reg_max, dgqp=init.dgqp)


def test_config_refuses_what_the_t_head_has_no_place_for():
    assert ModelConfig().head == "fcos" and ModelConfig().thead_convs == 6
    for key in ("box_refine", "head_dcn"):
        with pytest.raises(ValueError, match=f"{key}=true needs head=fcos"):
            tiny_model_config(head="tood", **{key: True})
    with pytest.raises(ValueError, match="head=tood: fpn_channels=20 is not divisible by head_norm_groups=8"):
        tiny_model_config(head="tood", fpn_channels=20, head_convs=0, head_norm_groups=8)
    raw = tiny_config(None, model={"head": "tood", "box_refine": True})
    with pytest.raises(DwlabError, match="box_refine=true needs head=fcos") as err:
        validate(raw, "x.yaml")
    assert "\n" not in str(err.value)
    with pytest.raises(DwlabError, match="model.head"):
        validate(tiny_config(None, model={"head": "retina"}), "x.yaml")


def test_default_head_builds_the_detector_it_built_before():
    """A config that does not name the head (any config written before the key) builds the FCOS
    head exactly as before: the same modules, weights, losses and gradients for one seed as the
    FCOS detector assembled by hand from its parts."""
    cfg = tiny_model_config(head_convs=2, box_refine=True)

    def loss_and_grads(model):
        assigner = build_assigner(AssignerConfig(name="dw"), 3)
        losses = assigner(model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))), TARGETS)
        sum(assigner.loss_weights[k] * v for k, v in losses.items()).backward()
        return [v.detach() for v in losses.values()], [p.grad for p in model.parameters()]

    torch.manual_seed(0)
    built = build_model(cfg, 3)
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", pretrained=False, norm="bn", frozen_stages=-1, fpn_channels=16, dcn=False)
    head = FCOSHead(16, 3, STRIDES, num_convs=2, norm_groups=4, prior_prob=0.01, reg_bias_init=4.0, box_refine=True,
                    refine_sampler="deform_conv", anchor_offset=0.5, centerness_bias=0.0, dcn_last=False)  # fmt: skip
    by_hand = FCOS(backbone, head, 0.5)
    assert type(built.head) is FCOSHead and built.state_dict().keys() == by_hand.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), by_hand.state_dict().values()))
    (la, ga), (lb, gb) = loss_and_grads(built), loss_and_grads(by_hand)
    assert all(torch.equal(a, b) for a, b in zip(la, lb)) and all(torch.equal(a, b) for a, b in zip(ga, gb))


@pytest.mark.parametrize(
    "assigner",
    [{"name": "dw"}, {"name": "tood", "tood": {"initial_epochs": 2}}],  # TOOD: ATSS warm-up, then aligned
    ids=["dw", "tood"],
)
def test_trains_on_the_t_head_with_falling_loss_and_evaluates(tmp_path, synth_root, assigner):
    """DW on the T-head (the paper's DW*) and TOOD with its own head train the tiny detector end
    to end: finite, falling loss, and an evaluation."""
    raw = tiny_config(synth_root, model={"head": "tood", "thead_convs": 2}, assigner=assigner,
                      train={"epochs": 4, "threads": 1, "grad_clip": 10.0})  # fmt: skip
    losses = []
    result = run_training(validate(raw, "t"), tmp_path / "run", on_epoch_end=lambda r: losses.append(r.metrics["loss"]))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert all(math.isfinite(v) for v in result.metrics.values())
