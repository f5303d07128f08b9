"""Label-assignment methods, one module each, all behind ``LabelAssigner`` (see base.py).

``ASSIGNERS`` is the one table of methods: adding a method is its module, its config section
(a field of ``AssignerConfig`` named like the method, and the name in its ``name`` Literal) and
its row here. ``build_assigner``, the weight-map methods (``WEIGHT_METHODS``, ``dwlab plot
weights``) and the CLI's method list read it. Method modules (they import torch) are imported
only when an assigner is built, so the CLI can list the methods without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from dwlab.assign.base import LabelAssigner
    from dwlab.config import AssignerConfig


class Method(NamedTuple):
    """A row of ``ASSIGNERS``: the assigner class ``module.cls``, built by
    ``cls.from_config(getattr(cfg, section), num_classes)``; ``weight_maps``: the class draws
    per-anchor weight maps (``weight_maps``, Fig. 5)."""

    module: str
    cls: str
    section: str
    weight_maps: bool


#: Every method, name -> its row, in Table 6 order.
ASSIGNERS: dict[str, Method] = {
    "fcos": Method("dwlab.assign.fcos", "FCOSAssigner", "fcos", weight_maps=False),
    "atss": Method("dwlab.assign.atss", "ATSSAssigner", "atss", weight_maps=True),
    "autoassign": Method("dwlab.assign.autoassign", "AutoAssignAssigner", "autoassign", weight_maps=True),
    "gfl": Method("dwlab.assign.gfl", "GFLAssigner", "gfl", weight_maps=True),
    "vfl": Method("dwlab.assign.vfl", "VFLAssigner", "vfl", weight_maps=True),
    "tood": Method("dwlab.assign.tood", "TOODAssigner", "tood", weight_maps=True),
    "dw": Method("dwlab.assign.dw", "DWAssigner", "dw", weight_maps=True),
}

#: Methods whose assigner draws per-anchor weight maps, in Table 6 order.
WEIGHT_METHODS = tuple(name for name, method in ASSIGNERS.items() if method.weight_maps)


def assigner_class(name: str) -> type:
    """The assigner class of method ``name`` (imports its module)."""
    if name not in ASSIGNERS:
        raise ValueError(f"unknown assigner {name!r} (expected one of {tuple(ASSIGNERS)})")
    method = ASSIGNERS[name]
    return getattr(importlib.import_module(method.module), method.cls)


def build_assigner(cfg: AssignerConfig, num_classes: int) -> LabelAssigner:
    """The assigner named by ``cfg.name``, built from its own section of the config."""
    return assigner_class(cfg.name).from_config(getattr(cfg, ASSIGNERS[cfg.name].section), num_classes)
