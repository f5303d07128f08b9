"""Count, on the CPU, the calls that would make the host wait for the device on CUDA.

A CUDA kernel launch returns at once; the host waits ("syncs") only when it needs a value or a
shape that the device computes, or when it copies pageable host memory to the device.
``SyncCounter`` (a ``TorchFunctionMode``) records every torch call of that kind made while it is
active, whatever the device, so that a CPU test can pin how many a training step makes:

- a device value read on the host: ``item``, ``tolist``, ``bool()``/``int()``/``float()``,
  ``cpu``, ``numpy``, ``allclose``, ``equal``;
- an output whose size depends on device values: ``nonzero``, ``argwhere``, ``unique``,
  ``unique_consecutive``, ``masked_select``, ``bincount``, indexing with a bool mask (read or
  write), ``repeat_interleave`` with tensor repeats and no ``output_size``;
- a host-to-device copy of Python data: ``tensor``/``as_tensor`` of a non-tensor with an
  explicit ``device`` (on CUDA a blocking copy from pageable memory).

Calls made inside a counted call are not seen (the mode is off while it runs), so each counts
once, where dwlab makes it. On the CPU every tensor is a host tensor, so reads inside the
functions of ``HOST_ONLY``, which assert that their tensors are on the host, are not counted.
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "allclose", "equal"}
SHAPES = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount"}
FROM_PYTHON = {"tensor", "as_tensor"}
HOST_ONLY = {"check_labels"}  # dwlab functions that refuse device tensors


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def syncs(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the call ``name(*args, **kwargs)`` would make the host wait on CUDA."""
    if name in READS or name in SHAPES:
        return True
    if name in ("__getitem__", "__setitem__"):
        return len(args) > 1 and _has_bool_mask(args[1])
    if name in ("index_put", "index_put_"):
        return len(args) > 1 and _has_bool_mask(tuple(args[1]))
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if name in FROM_PYTHON:
        return kwargs.get("device") is not None and not isinstance(args[0] if args else None, torch.Tensor)
    return False


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as counter: ...``; ``counter.count`` the number of syncing calls,
    ``counter.where`` a ``Counter`` of ``"name at file:line"`` (the dwlab line that made it)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if syncs(name, args, kwargs):
            frame = _caller()
            if frame is None or frame.name not in HOST_ONLY:
                where = f"{frame.filename.split('/dwlab/', 1)[1]}:{frame.lineno}" if frame else "outside dwlab"
                self.where[f"{name} at {where}"] += 1
        return func(*args, **kwargs)


def _caller() -> traceback.FrameSummary | None:
    """The innermost dwlab frame of the current stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/dwlab/" in frame.filename:
            return frame
    return None
