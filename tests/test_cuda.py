"""On CUDA what the CPU computes: the assigners' terms and gradients, the precisions, box
refinement's two samplers, postprocessing, pinned batches, a run and its resume.

Every test runs on each available device (``DEVICES``: the CPU, and CUDA where torch sees one),
so that the logic runs here too; the CUDA cases are skipped without CUDA, all for one reason
(``NO_CUDA``). A device result is compared with a CPU reference computed another way (another
call, the images one by one, the other sampler), so the CPU case checks something as well.
Exact equality is asked of the CPU only: CUDA kernels may sum in another order."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dwlab import checkpoint
from dwlab.assign import ASSIGNERS, build_assigner
from dwlab.assign.base import head_init, weighted_total
from dwlab.bench.train_step import synthetic_images
from dwlab.config import AssignerConfig, validate
from dwlab.data.coco import CocoDetection, SkippedImage
from dwlab.data.target import Target
from dwlab.engine import TrainStep
from dwlab.models.detector import build_model
from dwlab.models.head import integral
from dwlab.models.outputs import Anchors, HeadOutputs
from dwlab.models.postprocess import postprocess
from dwlab.models.refine import BoxRefine
from dwlab.runner import make_assigner, make_loader, make_optimizer, precision, run_training
from tests.conftest import tiny_config
from tests.test_data import make_coco

NO_CUDA = "no CUDA device"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
C = 3
#: every method of ``ASSIGNERS``, plus the code paths a method switches between by its config:
#: (name, its config section's changes, the epoch it is told or None)
CASES = [pytest.param(name, {}, None, id=name) for name in ASSIGNERS] + [
    pytest.param("tood", {}, 0, id="tood-warmup"),  # its ATSS warm-up (epoch 0 of 4)
    pytest.param("musu", {}, 0, id="musu-warmup"),  # its geometric warm-up (epoch 0 of 1)
    pytest.param("mal", {}, 6, id="mal-selection"),  # its bag shrunk to 8 of 17 anchors
    pytest.param("dw", {"variant": "official"}, None, id="dw-official"),
    pytest.param("dw", {"bag": "threshold"}, None, id="dw-threshold-bag"),
    pytest.param("dw", {"bag": "topk"}, None, id="dw-topk-bag"),
    pytest.param("gflv2", {"sampling": "fcos"}, None, id="gflv2-fcos-sampling"),
]


def head_batch(seed: int = 0, reg_max: int | None = None) -> tuple[HeadOutputs, list[Target]]:
    """Two 64 px images of random head outputs (P3-P7) and random GT boxes (continuous corners:
    no two anchors tie on a distance or IoU that an assigner ranks); with ``reg_max`` (a method
    that needs the distribution head) random distribution logits too."""
    g = torch.Generator().manual_seed(seed)
    anchors = Anchors.grid([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], [8, 16, 32, 64, 128], 0.5, torch.device("cpu"))
    a = len(anchors)
    outputs = HeadOutputs(torch.randn(2, a, C, generator=g) - 1, torch.randn(2, a, generator=g),
                          torch.rand(2, a, 4, generator=g) * 24 + 2, anchors)  # fmt: skip
    if reg_max is not None:
        outputs.distribution = torch.randn(2, a, 4, reg_max + 1, generator=g)
    targets = []
    for n in (3, 2):
        corner = torch.rand(n, 2, generator=g) * 30
        side = torch.rand(n, 2, generator=g) * 28 + 8
        targets.append(Target(torch.cat([corner, corner + side], 1), torch.randint(C, (n,), generator=g)))
    return outputs, targets


def on(outputs: HeadOutputs, targets: list[Target], device: str) -> tuple[HeadOutputs, list[Target]]:
    """Copies on ``device``, the head outputs as fresh leaves that collect gradients."""
    a = outputs.anchors
    anchors = Anchors(a.points.to(device), a.strides.to(device), a.levels.to(device), a.level_sizes)
    leaves = [t.detach().to(device).requires_grad_() for t in (outputs.cls_logits, outputs.centerness, outputs.distances)]
    if outputs.distribution is not None:  # the distances decoded from the distribution, the leaf
        logits = outputs.distribution.detach().to(device).requires_grad_()
        leaves[2] = integral(logits) * anchors.strides[:, None]
        return HeadOutputs(*leaves, anchors, distribution=logits), [t.to(device) for t in targets]
    return HeadOutputs(*leaves, anchors), [t.to(device) for t in targets]


def terms_and_grads(assigner, outputs: HeadOutputs, targets: list[Target]) -> dict[str, torch.Tensor]:
    """Each loss term and the gradient of their weighted total w.r.t. each head output."""
    terms = assigner(outputs, targets)
    weighted_total(terms, assigner.loss_weights).backward()
    leaves = {k: getattr(outputs, k) for k in ("cls_logits", "centerness", "distances", "distribution")}
    grads = {f"grad {k}": v.grad for k, v in leaves.items() if v is not None and v.is_leaf}
    return {**terms, **{k: v for k, v in grads.items() if v is not None}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, section, epoch", CASES)
def test_every_assigner_gives_the_cpu_terms_and_gradients(device, name, section, epoch):
    """fp32, the same assigner object: on CUDA the CPU's terms and gradients (a tensor made on
    the wrong device fails); on the CPU, a second call equals the first and no input changed."""
    cfg = AssignerConfig(name=name)
    cfg = cfg.model_copy(update={name: getattr(cfg, name).model_copy(update=section)})
    assigner = build_assigner(cfg, C)
    if epoch is not None:
        assigner.set_epoch(epoch)
    outputs, targets = head_batch(reg_max=head_init(assigner).reg_max)
    kept = [t.clone() for t in (outputs.cls_logits, outputs.centerness, outputs.distances, targets[0].boxes)]
    expected = terms_and_grads(assigner, *on(outputs, targets, "cpu"))
    got = terms_and_grads(assigner, *on(outputs, targets, device))
    assert got.keys() == expected.keys() and any(k.startswith("grad") for k in got)
    for key, value in got.items():
        assert value.device.type == device, key
        torch.testing.assert_close(value.cpu(), expected[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    now = (outputs.cls_logits, outputs.centerness, outputs.distances, targets[0].boxes)
    assert all(torch.equal(a, b) for a, b in zip(kept, now))


def tiny_cfg(device: str, prec: str | None, root=None, data=None, **train):
    """``tests.conftest.tiny_config`` with DW on ``device`` at precision ``prec``, smaller still
    (ResNet-10, 96 px, batch 2): fp16 convolutions are slow on a CPU. Not 64 px: P6 would be
    1 x 1, and torch 2.14's CPU bf16 gradient of P7's stride-2 conv over a 1 x 1 input is
    garbage (it differs from call to call)."""
    raw = tiny_config(root, data={"min_size": 96, "max_size": 96, **(data or {})}, model={"backbone": "resnet10"},
                      assigner={"name": "dw"}, train={"device": device, "precision": prec, "batch_size": 2, **train})
    return validate(raw, "t")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prec", ["fp32", "fp16", "bf16"])
def test_a_precision_means_the_same_on_every_device(device, prec):
    """fp32: no autocast; fp16: fp16 autocast and a GradScaler of the device; bf16: bf16 autocast
    and no scaler. Left null: fp16 on CUDA, fp32 on the CPU."""
    scaler, dtype, _ = precision(tiny_cfg(device, prec), torch.device(device))
    assert dtype == {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[prec]
    assert (scaler is not None) == (prec == "fp16")
    assert scaler is None or scaler.is_enabled()
    scaler, dtype, _ = precision(tiny_cfg(device, None), torch.device(device))
    assert (dtype, scaler is not None) == ((torch.float16, True) if device == "cuda" else (None, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_three_training_steps_stay_finite(device, prec):
    cfg = tiny_cfg(device, prec, batch_size=1)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg.model, C).to(dev)
    scaler, dtype, memory_format = precision(cfg, dev)
    step = TrainStep(model, make_assigner(cfg, C), make_optimizer(model, cfg), dev, scaler, dtype, memory_format, 10.0)
    images, targets = synthetic_images(cfg, C)
    for iteration in range(3):
        losses = step(images, targets, 1e-3, iteration)
        assert all(math.isfinite(v) for v in losses.values()), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert scaler is None or math.isfinite(scaler.get_scale())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_a_run_and_its_resume_keep_the_precision_and_the_scaler_state(tmp_path, synth_root, device, prec):
    """1 epoch, then a resume to 2, against 2 epochs straight: the same epochs and iterations,
    finite losses, and with fp16 the scaler's state (its scale and count of good steps)
    continued from the checkpoint: a fresh scaler would count from 0 again. One step per epoch
    on the CPU (its fp16 convolutions are slow), whole epochs (6 steps) on CUDA."""
    iters = 1 if device == "cpu" else None
    cfg = functools.partial(tiny_cfg, device, prec, synth_root, max_iters_per_epoch=iters, grad_clip=10.0)
    straight = run_training(cfg(epochs=2), tmp_path / "straight")
    run_training(cfg(epochs=1), tmp_path / "split")
    events = []
    resumed = run_training(cfg(epochs=2), tmp_path / "split", resume=True, on_epoch_end=lambda r: events.append(r.metrics["loss"]))
    assert len(events) == 1 and math.isfinite(events[0])
    train = resumed.resolved["train"]
    assert (train["device"], train["precision"], train["deterministic"]) == (device, prec, True)
    a, b = (checkpoint.load(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "split"))
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"]) == (2, 2 if iters else 12)
    assert ("scaler" in b) == (prec == "fp16")
    if prec == "fp16":
        first = checkpoint.load(tmp_path / "split" / "checkpoints" / "prev.pt")["scaler"]
        assert (first["scale"], first["_growth_tracker"]) != (65536.0, 0)  # not a fresh scaler's
        assert (b["scaler"]["scale"], b["scaler"]["_growth_tracker"]) == (a["scaler"]["scale"], a["scaler"]["_growth_tracker"])
    if device == "cpu":  # exact on the CPU only
        assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
        assert resumed.metrics == straight.metrics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_refinement_samplers_agree(device, dtype):
    """deform_conv2d gives grid_sample's refined distances: on ``device`` in fp32 those of the
    CPU; under autocast those of the same device (both sample in fp32, ``refine.py``)."""
    torch.manual_seed(0)
    grid, deform = BoxRefine(4, "grid_sample"), BoxRefine(4, "deform_conv")
    torch.nn.init.normal_(grid.offsets.weight, std=0.3)
    deform.load_state_dict(grid.state_dict())
    feat, dist = torch.randn(2, 4, 5, 7), torch.rand(2, 4, 5, 7) * 30
    ref_device = "cpu" if dtype is None else device
    with torch.autocast(ref_device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        expected = grid.to(ref_device)(feat.to(ref_device), dist.to(ref_device), 8).cpu()
    with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        got = deform.to(device)(feat.to(device), dist.to(device), 8)
    assert got.dtype == torch.float32 and got.device.type == device
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, BoxRefine(4, "grid_sample")(feat, dist, 8), atol=1e-2)  # the offsets act


@pytest.mark.parametrize("device", DEVICES)
def test_postprocess_of_a_batch_on_the_device_is_the_cpus_per_image(device):
    outputs, _ = head_batch(1)
    outputs.cls_logits[:, ::5] += 4.0  # some confident anchors, many of them overlapping
    sizes = torch.tensor([[64, 64], [50, 60]])
    expected = [postprocess(HeadOutputs(outputs.cls_logits[i : i + 1], outputs.centerness[i : i + 1],
                                        outputs.distances[i : i + 1], outputs.anchors), sizes[i : i + 1])[0]
                for i in range(2)]  # fmt: skip
    moved, _ = on(outputs, [], device)
    got = postprocess(moved, sizes.to(device))
    assert len(got) == 2 and all(len(e.scores) > 3 for e in expected)
    for g, e in zip(got, expected):
        assert g.boxes.device.type == device
        torch.testing.assert_close(g.boxes.cpu(), e.boxes, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g.scores.cpu(), e.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(g.labels.cpu(), e.labels)


@needs_cuda
def test_a_pinned_loader_keeps_the_unreadable_images(tmp_path):
    """``DataLoader(pin_memory=True)`` (the runner's on CUDA), in a worker process: each batch
    pinned, with its ``skipped``."""
    ann, img_dir = make_coco(tmp_path, annotations=[])
    (img_dir / "a.png").write_bytes(b"\x89PNG truncated")
    dataset = CocoDetection(ann, img_dir, min_size=40, max_size=60)
    cfg = tiny_cfg("cuda", None, data={"num_workers": 1})
    loader = make_loader(dataset, 2, cfg, train=False, generator=torch.Generator().manual_seed(0))
    assert loader.pin_memory
    (batch,) = list(loader)
    assert batch.images.is_pinned() and batch.images.shape[0] == 1
    assert [type(s) for s in batch.skipped] == [SkippedImage] and batch.skipped[0].image_id == 1
