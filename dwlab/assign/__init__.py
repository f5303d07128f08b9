"""Label-assignment methods, one module each, all behind ``LabelAssigner`` (see base.py).

``ASSIGNERS`` is the one table of methods. Adding a method is four things:

1. its module, ``dwlab/assign/<name>.py``: a class that subclasses ``base.LabelAssigner``, built
   from the blocks of ``dwlab.assign.common`` (and ``dwlab.losses``), importing no other
   method's module;
2. its config section: a field of ``config.AssignerConfig`` named like the method, whose fields
   are the class's keyword arguments with the paper's values as defaults;
3. its row here;
4. its row in ``experiments/table6.yaml`` (with a ``label``: the report's name for it).

Everything else reads this table: the config's method names, ``build_assigner``, the weight-map
methods (``WEIGHT_METHODS``, ``dwlab plot weights``), the CLI's method list, the report's Table 6
rows (``paper.METHOD_TO_TABLE6``) and the tests, among them one contract every method passes
without being named (``tests/test_contract.py``). Method modules (they import torch) are
imported only when an assigner is built, so the CLI can list the methods without torch.
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
    per-anchor weight maps (``weight_maps``, Fig. 5); ``paper_row``: the row of the paper's
    Table 6 it reproduces (``paper.TABLE6``), None when the paper does not list it (the report
    then names it by its sweep point's ``label``); ``variant``: ``(field, {value: paper row})``
    when a field of the method's section selects another of the paper's rows (GFLv2's
    ``sampling``): a run with ``assigner.<section>.<field>: value`` is the method
    ``<name>+<value>`` (``paper.METHOD_TO_TABLE6``, the report's ``method_name``)."""

    module: str
    cls: str
    section: str
    weight_maps: bool
    paper_row: str | None = None
    variant: tuple[str, dict[str, str]] | None = None


#: Every method, name -> its row, in Table 6 order.
ASSIGNERS: dict[str, Method] = {
    "foveabox": Method(
        "dwlab.assign.foveabox", "FoveaBoxAssigner", "foveabox", weight_maps=False, paper_row="FoveaBox"
    ),
    "fcos": Method("dwlab.assign.fcos", "FCOSAssigner", "fcos", weight_maps=False, paper_row="FCOS"),
    "atss": Method("dwlab.assign.atss", "ATSSAssigner", "atss", weight_maps=True, paper_row="ATSS"),
    "paa": Method("dwlab.assign.paa", "PAAAssigner", "paa", weight_maps=False, paper_row="PAA"),
    "ota": Method("dwlab.assign.ota", "OTAAssigner", "ota", weight_maps=False, paper_row="OTA"),
    # AutoAssign as published: weights on the scores with gradient, learnable centre prior
    "autoassign_paper": Method(
        "dwlab.assign.autoassign_paper", "AutoAssignPaperAssigner", "autoassign_paper", weight_maps=False,
        paper_row="AutoAssign",
    ),  # fmt: skip
    # the same, its positive weights detached (still on the scores)
    "autoassign_detach": Method(
        "dwlab.assign.autoassign_paper", "AutoAssignDetachAssigner", "autoassign_detach", weight_maps=False,
        paper_row="AutoAssign(detach)",
    ),  # fmt: skip
    # AutoAssign with its weights detached and applied to the loss: the paper's "weight loss" row
    "autoassign": Method(
        "dwlab.assign.autoassign", "AutoAssignAssigner", "autoassign", weight_maps=True,
        paper_row="AutoAssign(weight loss)",
    ),  # fmt: skip
    "noisyanchor": Method(
        "dwlab.assign.noisyanchor", "NoisyAnchorAssigner", "noisyanchor", weight_maps=False, paper_row="NoisyAnchor"
    ),
    # FreeAnchor's bag likelihood with MAL's scheduled anchor selection, without anchor depression
    "mal": Method("dwlab.assign.mal", "MALAssigner", "mal", weight_maps=False, paper_row="MAL"),
    # GFL's Quality Focal Loss alone, without the distribution head and its DFL: no paper row
    "qfl": Method("dwlab.assign.gfl", "QFLAssigner", "qfl", weight_maps=True),
    # GFL as published: QFL + GIoU + DFL on the distribution head (model.reg_max, set by the method)
    "gfl": Method("dwlab.assign.gfl", "GFLAssigner", "gfl", weight_maps=True, paper_row="GFL"),
    "vfl": Method("dwlab.assign.vfl", "VFLAssigner", "vfl", weight_maps=True, paper_row="VFL"),
    # GFLv2: GFL with the DGQP quality in the score; sampling atss (default) or fcos
    "gflv2": Method(
        "dwlab.assign.gfl", "GFLv2Assigner", "gflv2", weight_maps=True, paper_row="ATSS+GFLv2",
        variant=("sampling", {"fcos": "FCOS+GFLv2"}),
    ),  # fmt: skip
    # mutual supervision, from the paper (no released code): each head's samples chosen by the other
    "musu": Method("dwlab.assign.musu", "MuSuAssigner", "musu", weight_maps=False, paper_row="MuSu"),
    "tood": Method("dwlab.assign.tood", "TOODAssigner", "tood", weight_maps=True, paper_row="TOOD"),
    # YOLOX's dynamic-k assigner: not in the paper's Table 6
    "simota": Method("dwlab.assign.simota", "SimOTAAssigner", "simota", weight_maps=False),
    "dw": Method("dwlab.assign.dw", "DWAssigner", "dw", weight_maps=True, paper_row="DW"),
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
