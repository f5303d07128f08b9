"""Test-only fault injection, off unless ``$DWLAB_FAULTS`` is set.

The fault suite and the sweep's retry tests need a trial that raises at a given epoch and a
loss that turns NaN at a given iteration. Neither belongs in the typed config (MLflow would log
it with every run), so it is read here, from the environment, and applied by wrapping the
run's assigner. The sweep driver copies the variable into each trial's payload, so Ray
workers started before it was set (or on another node) see the same faults.

``DWLAB_FAULTS`` is a comma-separated list of ``FAULT=N`` or ``FAULT=N@NAME``:

- ``error_at_epoch=N``: raise ``RuntimeError`` when epoch N (1-based) starts;
- ``nan_at_iter=N``: multiply the loss terms by NaN at the run's N-th step (0-based, counted
  from the start of this process's training: a fresh run's global iteration);
- ``@NAME``: only in runs whose directory path has a component ``NAME`` (a sweep point's id).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dwlab.errors import DwlabError

if TYPE_CHECKING:
    from torch import Tensor

    from dwlab.assign.base import LabelAssigner

ENV = "DWLAB_FAULTS"
KINDS = ("error_at_epoch", "nan_at_iter")


@dataclass(frozen=True)
class Faults:
    error_at_epoch: int | None = None
    nan_at_iter: int | None = None

    def __bool__(self) -> bool:
        return self.error_at_epoch is not None or self.nan_at_iter is not None


def parse(spec: str, run_dir: Path) -> Faults:
    """The faults of ``spec`` (``$DWLAB_FAULTS`` syntax) that apply to ``run_dir``."""
    found: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, rest = item.partition("=")
        value, _, name = rest.partition("@")
        if kind not in KINDS or not value.strip().isdigit():
            raise DwlabError(f"${ENV}: bad entry {item!r} (expected FAULT=N[@NAME], FAULT one of {', '.join(KINDS)})")
        if not name or name in Path(run_dir).parts:
            found[kind] = int(value)
    return Faults(**found)


def from_env(run_dir: Path) -> Faults:
    return parse(os.environ.get(ENV, ""), run_dir)


class FaultyAssigner:
    """``assigner`` with ``faults`` applied; delegates everything else to it."""

    def __init__(self, assigner: LabelAssigner, faults: Faults):
        self.inner = assigner
        self.faults = faults
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def set_epoch(self, epoch: int) -> None:
        if self.faults.error_at_epoch is not None and epoch + 1 == self.faults.error_at_epoch:
            raise RuntimeError(f"injected error at the start of epoch {epoch + 1} (${ENV})")
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __call__(self, outputs, targets) -> dict[str, Tensor]:
        losses = self.inner(outputs, targets)
        if self.calls == self.faults.nan_at_iter:
            losses = {k: v * float("nan") for k, v in losses.items()}
        self.calls += 1
        return losses


def wrap(assigner: LabelAssigner, run_dir: Path) -> LabelAssigner:
    """``assigner`` itself when ``$DWLAB_FAULTS`` names no fault for ``run_dir``."""
    faults = from_env(run_dir)
    return FaultyAssigner(assigner, faults) if faults else assigner
