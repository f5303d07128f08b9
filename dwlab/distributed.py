"""Helpers that behave the same with and without torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def reduce_mean(value: Tensor) -> Tensor:
    """Mean of a scalar tensor over workers (a loss normaliser); the value itself alone."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def normaliser(value: Tensor | float, device: torch.device) -> Tensor:
    """A loss normaliser: averaged over workers, then clamped to at least 1 (the released DW
    code's ``reduce_mean(...).clamp(min=1)``, also DETR's). With ``W`` workers whose values sum
    to ``T``, a worker's loss sum ``s`` is divided by ``max(T / W, 1)`` and DDP averages the
    gradients: the same as one process's ``sum(s) / max(T, 1)`` when ``T / W >= 1``, larger by
    ``max(T, 1) / (W * max(T / W, 1))`` otherwise."""
    if isinstance(value, Tensor):
        value = torch.as_tensor(value, dtype=torch.float32, device=device)
    else:  # filled on the device: a copy of a Python number would make the host wait (CUDA)
        value = torch.full((), float(value), dtype=torch.float32, device=device)
    return reduce_mean(value).clamp(min=1.0)


def mean_over_workers(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Loss terms (``loss`` and ``loss_*``) averaged over workers, so every rank logs the loss
    of the global batch; other entries unchanged. The metrics themselves alone."""
    if not is_distributed():
        return metrics
    keys = sorted(k for k in metrics if k == "loss" or k.startswith("loss_"))
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values = (values / dist.get_world_size()).cpu()
    return {**metrics, **{k: float(v) for k, v in zip(keys, values)}}


def all_workers(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every worker (a collective: every rank must call it); the
    flag itself alone."""
    if not is_distributed():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def sum_over_workers(value: float, device: torch.device) -> float:
    """Sum of a number over workers (a count); the number itself alone."""
    if not is_distributed():
        return float(value)
    total = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())
