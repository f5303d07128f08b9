"""The two loops: ``train_one_epoch`` and ``predict``. They see tensors and callables only.

Both take batches from ``data.coco.collate``: an image that could not be read is not in the
batch but in its ``skipped`` list; the loops count those (and collect them in ``skipped``
when given) and step over a batch left without any image.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from dwlab.assign.base import LabelAssigner, weighted_total
from dwlab.distributed import all_workers
from dwlab.errors import NonFiniteLoss
from dwlab.models.postprocess import Detections, postprocess


@dataclass
class StepState:
    """Where training stands: the global iteration counts optimizer steps over all epochs."""

    iteration: int = 0


def lr_at(iteration: int, epoch: int, *, base_lr: float, warmup_iters: int, warmup_ratio: float,
          steps: list[int], gamma: float) -> float:
    """Linear warm-up from ``warmup_ratio * base_lr`` over ``warmup_iters`` iterations, then
    ``gamma`` after each epoch in ``steps`` (``epoch`` is 0-based: step 8 applies from the 9th)."""
    lr = base_lr * gamma ** sum(epoch >= s for s in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        lr *= warmup_ratio * (1 - alpha) + alpha
    return lr


def train_one_epoch(
    model: nn.Module,
    assigner: LabelAssigner,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    lr_fn: Callable[[int], float],
    state: StepState,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    grad_clip: float | None = None,
    max_iters: int | None = None,
    nan_at_iter: int | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    skipped: list | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each raw (unweighted) loss term, ``loss``
    the mean of the total trained on, ``weighted_total(terms, assigner.loss_weights)``, ``lr``
    at the end, ``iters_per_s``, ``images`` (trained on) and ``skipped_images`` (unreadable,
    left out; each one appended to ``skipped`` when given). A batch without a readable image
    takes no step; under data parallelism no worker steps then (each worker must take the same
    steps)."""
    model.train()
    sums: dict[str, float] = defaultdict(float)
    count = images_seen = n_skipped = 0
    start = time.perf_counter()
    for batch in loader:
        if max_iters is not None and count >= max_iters:
            break
        images, _sizes, targets = batch
        dropped = getattr(batch, "skipped", ())
        n_skipped += len(dropped)
        if skipped is not None:
            skipped.extend(dropped)
        if not all_workers(len(targets) > 0, device):
            continue
        lr = lr_fn(state.iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = [t.to(device) for t in targets]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = model(images)
        losses = assigner(outputs, targets)
        total = weighted_total(losses, assigner.loss_weights)
        if nan_at_iter is not None and state.iteration == nan_at_iter:
            total = total * float("nan")  # test-only fault injection
        if not torch.isfinite(total):
            terms = ", ".join(f"{k}={v.item():.4g} (x{assigner.loss_weights[k]:g})" for k, v in losses.items())
            raise NonFiniteLoss(f"non-finite loss {total.item()} at iteration {state.iteration}: {terms}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state.iteration += 1
        count += 1
        images_seen += images.shape[0]
        step_losses = {k: v.item() for k, v in losses.items()}
        step_losses["loss"] = total.item()
        for k, v in step_losses.items():
            sums[k] += v
        if on_step is not None:
            on_step({**step_losses, "lr": lr})
    elapsed = time.perf_counter() - start
    means = {k: v / max(count, 1) for k, v in sums.items()}
    means.update(
        lr=optimizer.param_groups[0]["lr"],
        iters_per_s=count / max(elapsed, 1e-9),
        images=images_seen,
        skipped_images=n_skipped,
    )
    if not math.isfinite(means.get("loss", 0.0)):
        raise NonFiniteLoss(f"non-finite mean loss after iteration {state.iteration}")
    return means


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, device: torch.device, *, skipped: list | None = None, **post_kwargs
) -> tuple[list[Detections], list]:
    """Run inference over ``loader``; returns per-image detections (input frame, on CPU) and
    the matching targets (for image ids and resize scales). Unreadable images have neither;
    they are appended to ``skipped`` when given."""
    model.eval()
    detections: list[Detections] = []
    all_targets: list = []
    for batch in loader:
        images, sizes, targets = batch
        if skipped is not None:
            skipped.extend(getattr(batch, "skipped", ()))
        if not targets:
            continue
        outputs = model(images.to(device, non_blocking=True))
        for det in postprocess(outputs, sizes.to(device), **post_kwargs):
            detections.append(Detections(det.boxes.cpu(), det.scores.cpu(), det.labels.cpu()))
        all_targets.extend(targets)
    return detections, all_targets


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, list[Tensor] | float]]:
    """Weight decay on conv/linear weights only: none on norm layers, biases and the per-level
    scales (every parameter with fewer than 2 dimensions)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
