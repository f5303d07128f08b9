"""The two loops, ``train_one_epoch`` (of a ``TrainStep``) and ``predict``. They see tensors,
modules and callables only.

Both take batches from ``data.coco.collate``: an image that could not be read is not in the
batch but in its ``skipped`` list; the loops count those (and collect them in ``skipped``
when given) and step over a batch left without any image.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from dwlab.assign.base import LabelAssigner, weighted_total
from dwlab.data.target import check_labels, targets_to
from dwlab.distributed import all_workers
from dwlab.errors import NonFiniteLoss
from dwlab.models.postprocess import Detections, postprocess


LOG_EVERY = 20  # steps between the loss terms' reads on the host (the progress line)


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


@dataclass
class TrainStep:
    """One optimizer step on the loss ``weighted_total(assigner(model(images)), assigner.loss_weights)``:
    the forward pass under ``autocast_dtype`` (None: full precision; the assigner and the loss
    run outside autocast), then ``optimizer_step`` (``scaler`` when given: fp16).

    Host-device syncs: one per step, whether the total is finite, read after the backward pass
    and before the optimizer step (where a GradScaler reads its own inf check). Everything else
    stays on the device: the targets move in one asynchronous copy per field after their labels
    are checked on the host, and the terms are returned as device tensors."""

    model: nn.Module
    assigner: LabelAssigner
    optimizer: torch.optim.Optimizer
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    autocast_dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    grad_clip: float | None = None

    def __call__(self, images: Tensor, targets: list, lr: float, iteration: int) -> dict[str, Tensor]:
        """Step at learning rate ``lr``; returns each raw loss term and ``loss`` (the weighted
        total), detached 0-dim tensors on the device. A non-finite total raises ``NonFiniteLoss``
        naming ``iteration`` and the terms; the optimizer does not step then."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        host_targets, targets = targets, targets_to(targets, self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            outputs = self.model(images)
        check_labels(host_targets, outputs.cls_logits.shape[-1])
        losses = self.assigner(outputs, targets)
        total = weighted_total(losses, self.assigner.loss_weights)

        def check_finite() -> None:  # the step's one sync; a non-finite update is never applied
            if not torch.isfinite(total):
                weights = self.assigner.loss_weights
                terms = ", ".join(f"{k}={v.item():.4g} (x{weights[k]:g})" for k, v in losses.items())
                raise NonFiniteLoss(f"non-finite loss {total.item()} at iteration {iteration}: {terms}")

        optimizer_step(total, self.optimizer, self.model, self.scaler, self.grad_clip, before_step=check_finite)
        return {**{k: v.detach() for k, v in losses.items()}, "loss": total.detach()}


class TermSums:
    """Running sums of a step's loss terms, kept on the device in float64 (the same additions as
    summing their Python floats) and read on the host only by ``means`` (one sync)."""

    def __init__(self) -> None:
        self.keys: tuple[str, ...] = ()
        self.sums: Tensor | None = None
        self.count = 0

    def add(self, terms: dict[str, Tensor]) -> None:
        values = torch.stack([v.detach().double() for v in terms.values()])
        if self.sums is None:
            self.keys, self.sums = tuple(terms), values
        else:
            assert tuple(terms) == self.keys, (tuple(terms), self.keys)
            self.sums = self.sums + values
        self.count += 1

    def means(self) -> dict[str, float]:
        """The mean of each term over the steps added (empty before the first)."""
        if self.sums is None:
            return {}
        return {k: v / self.count for k, v in zip(self.keys, self.sums.tolist())}


def optimizer_step(total: Tensor, optimizer: torch.optim.Optimizer, model: nn.Module,
                   scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None,
                   before_step: Callable[[], None] | None = None) -> None:
    """Backward of ``total`` and one step of ``optimizer`` over ``model``'s parameters: with
    ``scaler`` (fp16) the loss is scaled and the gradient unscaled before it is clipped to
    ``grad_clip`` (None or 0: no clipping), and the scaler skips a step with inf/NaN gradients.
    ``before_step`` runs between the backward pass and the step (raising there applies no update)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if before_step is not None:
        before_step()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_one_epoch(
    step: TrainStep,
    loader: Iterable,
    lr_fn: Callable[[int], float],
    state: StepState,
    *,
    max_iters: int | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    log_every: int = LOG_EVERY,
    skipped: list | None = None,
) -> dict[str, float]:
    """One pass of ``step`` over ``loader`` (at most ``max_iters`` steps), at ``lr_fn(global
    iteration)``; returns the mean of each raw (unweighted) loss term, ``loss`` the mean of the
    total trained on, ``lr`` at the end, ``iters_per_s``, ``images`` (trained on) and
    ``skipped_images`` (unreadable, left out; each one appended to ``skipped`` when given). A
    batch without a readable image takes no step; under data parallelism no worker steps then
    (each worker must take the same steps). ``on_step`` sees each step's ``lr`` and, every
    ``log_every`` steps, the mean terms since the last time: the terms stay on the device in
    between (the only other host-device sync is the step's own finiteness check)."""
    step.model.train()
    epoch, window = TermSums(), TermSums()
    images_seen = n_skipped = 0
    lr = step.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    for batch in loader:
        if max_iters is not None and epoch.count >= max_iters:
            break
        images, _sizes, targets = batch
        dropped = getattr(batch, "skipped", ())
        n_skipped += len(dropped)
        if skipped is not None:
            skipped.extend(dropped)
        if not all_workers(len(targets) > 0, step.device):
            continue
        lr = lr_fn(state.iteration)
        step_losses = step(images, targets, lr, state.iteration)
        state.iteration += 1
        images_seen += images.shape[0]
        epoch.add(step_losses)
        if on_step is not None:
            window.add(step_losses)
            logged = window.means() if window.count >= log_every else {}
            window = TermSums() if logged else window
            on_step({**logged, "lr": lr})
    means = epoch.means()  # waits for the last step
    elapsed = time.perf_counter() - start
    means.update(lr=lr, iters_per_s=epoch.count / max(elapsed, 1e-9), images=images_seen, skipped_images=n_skipped)
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
