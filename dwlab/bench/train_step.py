"""Training step (forward + loss + backward + optimizer step) of dwlab's FCOS with DW (the
released recipe, Table 6's row), with DW + box refinement, with DW on the paper's equations, with
the FCOS assigner, with every other method of ``ASSIGNERS`` and with TOOD
and DW on TOOD's T-head, against
``torchvision.models.detection.FCOS`` built from the same backbone, FPN width, head depth and
GroupNorm groups, on the same images."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torchvision.models.detection import FCOS as TorchvisionFCOS
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead

from dwlab.assign import ASSIGNERS, build_assigner
from dwlab.config import Config
from dwlab.data.target import Target
from dwlab.data.transforms import normalize
from dwlab.engine import TrainStep, optimizer_step, param_groups
from dwlab.models.backbone import build_backbone
from dwlab.runner import build_detector, precision

GTS_PER_IMAGE = 7  # COCO train2017 has about 7.3 per image
#: every other method's step, by its name: the cost of its assignment on the same detector
METHOD_CANDIDATES = {f"dwlab {name}": name for name in ASSIGNERS if name not in ("dw", "fcos")}
#: TOOD's T-head in place of the FCOS head (``model.head: tood``): with TOOD, and with DW (DW*)
T_HEAD_CANDIDATES = {"dwlab TOOD on its T-head": "tood", "dwlab DW* (DW on the T-head)": "dw"}
#: DW's steps are Table 6's rows: the released recipe, and the paper's equations as a row of its own
DW_PAPER_EQUATIONS = "dwlab DW, paper equations"
CANDIDATES = ("dwlab DW", "dwlab DW + refine", DW_PAPER_EQUATIONS, "dwlab FCOS assigner", *METHOD_CANDIDATES,
              *T_HEAD_CANDIDATES, "torchvision FCOS")  # fmt: skip


def synthetic_images(cfg: Config, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, list[Target]]:
    """``train.batch_size`` random images of ``min_size x max_size`` (uint8 range scaled to [0, 1])
    ``Tensor[B, 3, H, W]`` and ``GTS_PER_IMAGE`` random boxes each."""
    gen = torch.Generator().manual_seed(seed)
    b, h, w = cfg.train.batch_size, cfg.data.min_size, cfg.data.max_size
    images = torch.rand(b, 3, h, w, generator=gen)
    targets = []
    for _ in range(b):
        side = torch.rand(GTS_PER_IMAGE, 2, generator=gen) * 0.4 * min(h, w) + 8
        corner = torch.rand(GTS_PER_IMAGE, 2, generator=gen) * (torch.tensor([w, h]) - side)
        boxes = torch.cat([corner, corner + side], 1)
        targets.append(Target(boxes, torch.randint(num_classes, (GTS_PER_IMAGE,), generator=gen)))
    return images, targets


def _pad(images: torch.Tensor, divisor: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    ph, pw = -h % divisor, -w % divisor
    return nn.functional.pad(images, (0, pw, 0, ph))


def torchvision_fcos(cfg: Config, num_classes: int) -> TorchvisionFCOS:
    """torchvision's FCOS on dwlab's backbone + FPN, with dwlab's head depth and GN groups."""
    m = cfg.model
    backbone = build_backbone(
        m.backbone, pretrained=False, norm=m.norm, frozen_stages=m.frozen_stages, fpn_channels=m.fpn_channels
    )
    norm = functools.partial(nn.GroupNorm, m.head_norm_groups)
    head = FCOSHead(m.fpn_channels, 1, num_classes, num_convs=m.head_convs)
    head.classification_head = FCOSClassificationHead(
        m.fpn_channels, 1, num_classes, m.head_convs, m.prior_prob, norm_layer=norm
    )
    head.regression_head = FCOSRegressionHead(m.fpn_channels, 1, m.head_convs, norm_layer=norm)
    return TorchvisionFCOS(
        backbone, num_classes, min_size=cfg.data.min_size, max_size=cfg.data.max_size, head=head,
        center_sampling_radius=cfg.assigner.fcos.center_radius,
    )  # fmt: skip


def step_fns(cfg: Config, num_classes: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """``{candidate: () -> None}``, one optimizer step each on the same batch, SGD for all (the
    paper's optimizer), at ``cfg``'s precision on ``device`` as training computes it
    (``runner.precision``: fp16 autocast with a GradScaler, bf16 without): dwlab's candidates
    are ``engine.TrainStep`` itself (forward under autocast, assigner and loss outside it);
    torchvision's FCOS computes its loss inside its forward, so the whole of it runs under
    autocast, followed by the same ``engine.optimizer_step``."""
    images, targets = synthetic_images(cfg, num_classes)
    dwlab_images = _pad(normalize(images * 255), cfg.data.size_divisor).to(device)
    dwlab_targets = [t.to(device) for t in targets]
    tv_images = [img.to(device) for img in images]
    tv_targets = [{"boxes": t.boxes.to(device), "labels": t.labels.to(device)} for t in targets]

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(param_groups(model, 1e-4), lr=1e-4, momentum=0.9)

    fns: dict[str, Callable[[], None]] = {}
    runs = [("dwlab DW", False, "dw", "fcos"), ("dwlab DW + refine", True, "dw", "fcos"),
            (DW_PAPER_EQUATIONS, False, "dw", "fcos"), ("dwlab FCOS assigner", False, "fcos", "fcos")]  # fmt: skip
    runs += [(n, False, m, "fcos") for n, m in METHOD_CANDIDATES.items()]
    runs += [(n, False, m, "tood") for n, m in T_HEAD_CANDIDATES.items()]
    for name, refine, assigner_name, head in runs:
        torch.manual_seed(0)
        assigner_cfg = cfg.assigner.model_copy(update={"name": assigner_name})
        official = assigner_name == "dw" and name != DW_PAPER_EQUATIONS  # Table 6's DW rows: as released
        if official:
            assigner_cfg = assigner_cfg.model_copy(update={"dw": assigner_cfg.dw.model_copy(update={"variant": "official"})})
        assigner = build_assigner(assigner_cfg, num_classes)
        model_cfg = cfg.model.model_copy(update={"pretrained": False, "box_refine": refine, "head": head,
                                                 **({"prior_prob": 0.02} if official else {})})  # fmt: skip
        # the method's head initialisation and learnable parameters, as in training
        model = build_detector(cfg.model_copy(update={"model": model_cfg}), num_classes, assigner)
        scaler, autocast_dtype, memory_format = precision(cfg, device)
        model = model.to(device, memory_format=memory_format).train()
        step = TrainStep(model, assigner, sgd(model), device, scaler, autocast_dtype, memory_format, cfg.train.grad_clip)
        fns[name] = functools.partial(step, dwlab_images, dwlab_targets, 1e-4, 0)
    torch.manual_seed(0)
    scaler, autocast_dtype, memory_format = precision(cfg, device)
    tv = torchvision_fcos(cfg, num_classes).to(device, memory_format=memory_format).train()
    tv_optimizer = sgd(tv)

    def tv_step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = sum(tv(tv_images, tv_targets).values())  # its own weights: 1
        optimizer_step(loss, tv_optimizer, tv, scaler, cfg.train.grad_clip)

    fns["torchvision FCOS"] = tv_step
    return fns
