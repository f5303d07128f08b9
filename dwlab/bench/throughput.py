"""Training images per second per thread: a preset's whole training step (``engine.train_one_epoch``
on one fixed batch, with the preset's model, assigner, optimizer and precision) on 1 thread,
so that two presets can be compared side by side."""

from __future__ import annotations

from typing import Callable

import torch

from dwlab.assign import build_assigner
from dwlab.bench.train_step import synthetic_images
from dwlab.config import Config
from dwlab.data.synth import CATEGORIES
from dwlab.data.transforms import normalize
from dwlab.engine import StepState, TrainStep, train_one_epoch
from dwlab.runner import build_detector, make_optimizer, precision

NUM_CLASSES = len(CATEGORIES)  # the generated dataset's


def step_fn(cfg: Config, device: torch.device) -> Callable[[], None]:
    """One optimizer step of ``cfg``'s training on a fixed batch of ``train.batch_size`` random
    images of ``data.min_size x data.max_size`` (random init: the speed does not depend on it)."""
    torch.manual_seed(0)
    assigner = build_assigner(cfg.assigner, NUM_CLASSES)
    # the method's head (GFL's distribution head, a centerness prior) and learnable parameters
    model_cfg = cfg.model.model_copy(update={"pretrained": False})
    model = build_detector(cfg.model_copy(update={"model": model_cfg}), NUM_CLASSES, assigner).to(device)
    scaler, autocast_dtype, memory_format = precision(cfg, device)
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, cfg)  # its lr is set by the step's lr_fn
    images, targets = synthetic_images(cfg, NUM_CLASSES)
    batch = (normalize(images * 255), torch.tensor([images.shape[-2:]] * len(targets)), targets)
    train_step = TrainStep(model, assigner, optimizer, device, scaler, autocast_dtype, memory_format, cfg.train.grad_clip)
    state = StepState()

    def step() -> None:
        train_one_epoch(train_step, [batch], lambda _: 1e-4, state)

    return step
