"""Label-assignment methods, one module each, all behind ``LabelAssigner`` (see base.py)."""

from __future__ import annotations

from dwlab.assign.base import LabelAssigner
from dwlab.config import AssignerConfig


def build_assigner(cfg: AssignerConfig, num_classes: int) -> LabelAssigner:
    """The assigner named by ``cfg.name``, built from its own section of the config."""
    if cfg.name == "fcos":
        from dwlab.assign.fcos import FCOSAssigner

        return FCOSAssigner.from_config(cfg.fcos, num_classes)
    if cfg.name == "atss":
        from dwlab.assign.atss import ATSSAssigner

        return ATSSAssigner.from_config(cfg.atss, num_classes)
    if cfg.name == "gfl":
        from dwlab.assign.gfl import GFLAssigner

        return GFLAssigner.from_config(cfg.gfl, num_classes)
    if cfg.name == "vfl":
        from dwlab.assign.vfl import VFLAssigner

        return VFLAssigner.from_config(cfg.vfl, num_classes)
    if cfg.name == "tood":
        from dwlab.assign.tood import TOODAssigner

        return TOODAssigner.from_config(cfg.tood, num_classes)
    if cfg.name == "autoassign":
        from dwlab.assign.autoassign import AutoAssignAssigner

        return AutoAssignAssigner.from_config(cfg.autoassign, num_classes)
    if cfg.name == "dw":
        from dwlab.assign.dw import DWAssigner

        return DWAssigner.from_config(cfg.dw, num_classes)
    raise ValueError(f"unknown assigner {cfg.name!r}")
