"""Label-assignment methods, one module each, all behind ``LabelAssigner`` (see base.py)."""

from __future__ import annotations

from dwlab.assign.base import LabelAssigner
from dwlab.config import AssignerConfig


def build_assigner(cfg: AssignerConfig, num_classes: int) -> LabelAssigner:
    """The assigner named by ``cfg.name``, built from its own section of the config."""
    if cfg.name == "fcos":
        from dwlab.assign.fcos import FCOSAssigner

        return FCOSAssigner.from_config(cfg.fcos, num_classes)
    if cfg.name == "dw":
        from dwlab.assign.dw import DWAssigner

        return DWAssigner.from_config(cfg.dw, num_classes)
    raise ValueError(f"unknown assigner {cfg.name!r}")
