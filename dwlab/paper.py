"""The paper's numbers (Li et al., "A Dual Weighting Label Assignment Scheme for Object
Detection", CVPR 2022), as data: the single source for ``dwlab report`` and the plots.

Tables 2-6 are COCO val2017 box AP in percent, FCOS ResNet-50, 1x schedule, as restored in
``shared/paper/METHOD.md`` ("The paper's numbers"); Table 7 is COCO test-dev2017 with larger
backbones, 2x multi-scale (``setting``). Each table is a mapping from the key that
identifies a grid point to its ``(AP, AP50, AP75)`` (Table 7: and APs, APm, APl); the key is
what ``dwlab report`` reads off a run's resolved config, so a sweep point finds its paper row
without string matching:

- Table 2: ``(beta, mu)``                    from ``assigner.dw.beta``, ``assigner.dw.mu``
- Table 3: ``(gamma1, gamma2)``              from ``assigner.dw.gamma1``, ``assigner.dw.gamma2``
- Table 4: ``(bag, r or k)``                 from ``assigner.dw.bag`` and ``bag_radius`` /
  ``bag_topk`` (``("soft", None)`` for the soft prior)
- Table 5: ``(neg_variant,)``                from ``assigner.dw.neg_variant``
- Table 6: ``(paper row name,)``             from ``assigner.name`` (+ ``model.box_refine``,
  ``model.head``) through ``METHOD_TO_TABLE6``
- Table 7: ``(paper row name, backbone)``    the method as Table 6's through ``METHOD_TO_TABLE7``,
  the backbone from ``model.backbone`` (+ ``backbone_dcn``, ``head_dcn``) through
  ``BACKBONE_TO_TABLE7``

Numeric keys compare equal whether a run logged ``5`` or ``5.0`` (``hash(5) == hash(5.0)``).
Dicts keep the paper's row order.
"""

from __future__ import annotations

from typing import NamedTuple

from dwlab.assign import ASSIGNERS

IMAGES_PER_STEP = 16  # the paper's schedule: 8 GPUs x 2 images per optimizer step (Sec. 4) ...
LR = 0.01  # ... at this learning rate


class PaperAP(NamedTuple):
    """One row of a paper table: COCO box AP, AP50, AP75 in percent."""

    AP: float
    AP50: float
    AP75: float


class PaperAPSizes(NamedTuple):
    """One row of Table 7: COCO box AP, AP50, AP75 and AP of small, medium, large objects."""

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float


def _ap(ap: float, ap50: float, ap75: float) -> PaperAP:
    return PaperAP(ap, ap50, ap75)


#: Evaluation setting of Tables 2-6.
SETTING = "COCO val2017, FCOS ResNet-50, 1x (12 epochs)"
#: Tables whose numbers were measured otherwise (``setting``).
SETTINGS = {
    "table7": "COCO test-dev2017 (the evaluation server), single-model single-scale test at 1333x800, "
    "2x (24 epochs) with multi-scale training, the backbone of each row",
}


def setting(table: str) -> str:
    """How the paper measured ``table``'s numbers."""
    return SETTINGS.get(table, SETTING)

#: The paper's defaults; the DW row of Tables 2-5 is this point.
DEFAULTS = {"beta": 5, "mu": 5, "gamma1": 2, "gamma2": 2, "bag": "soft", "neg_variant": "full"}

# Table 2: the positive weight's beta (Eq. 3) and mu (Eq. 4). Two one-dimensional sweeps that
# cross at the default (5, 5): mu in 3..8 at beta = 5, and beta in 3..7 at mu = 5.
TABLE2: dict[tuple[float, float], PaperAP] = {
    (5, 3): _ap(40.8, 59.1, 43.9),
    (5, 4): _ap(41.2, 59.7, 44.2),
    (5, 5): _ap(41.5, 59.8, 45.0),
    (5, 6): _ap(41.5, 60.1, 44.6),
    (5, 7): _ap(41.4, 59.8, 45.1),
    (5, 8): _ap(41.2, 59.6, 44.5),
    (3, 5): _ap(40.8, 59.9, 43.6),
    (4, 5): _ap(41.3, 59.9, 44.5),
    (6, 5): _ap(41.4, 59.6, 44.9),
    (7, 5): _ap(41.0, 59.0, 44.4),
}

# Table 3: the negative weight's gamma1 (P_neg, Eq. 5-6) and gamma2 (I_neg, Eq. 7).
TABLE3: dict[tuple[float, float], PaperAP] = {
    (1, 1): _ap(41.0, 59.2, 44.1),
    (1, 2): _ap(41.3, 59.7, 44.6),
    (2, 2): _ap(41.5, 59.8, 45.0),
    (3, 2): _ap(41.3, 59.7, 44.4),
    (4, 2): _ap(41.2, 59.4, 44.4),
    (5, 2): _ap(41.1, 59.5, 44.5),
    (2, 3): _ap(41.3, 59.6, 44.5),
}

# Table 4: the candidate bag. ("threshold", r): distance / stride < r; ("topk", k): k nearest
# anchors per FPN level; ("soft", None): Gaussian center prior (the default).
TABLE4: dict[tuple[str, float | None], PaperAP] = {
    ("threshold", 1.0): _ap(41.2, 59.7, 44.7),
    ("threshold", 1.3): _ap(41.3, 59.6, 44.4),
    ("threshold", 1.7): _ap(41.4, 59.5, 44.6),
    ("threshold", 2.0): _ap(41.3, 59.6, 44.4),
    ("threshold", 2.5): _ap(41.1, 59.1, 44.3),
    ("topk", 9): _ap(41.2, 59.4, 44.3),
    ("topk", 12): _ap(41.2, 59.4, 44.6),
    ("topk", 15): _ap(41.2, 59.6, 44.4),
    ("soft", None): _ap(41.5, 59.8, 45.0),
}

# Table 5: the in-bag negative weight (names are ``assigner.dw.neg_variant``; METHOD.md's
# variants table says what each one is, and which reading is ours).
TABLE5: dict[tuple[str], PaperAP] = {
    ("pos_only",): _ap(39.5, 58.6, 42.9),
    ("no_pneg",): _ap(40.5, 58.7, 43.9),
    ("no_ineg",): _ap(40.0, 58.5, 42.9),
    ("one_minus_wpos",): _ap(40.7, 59.5, 44.1),
    ("full",): _ap(41.5, 59.8, 45.0),
}

# Table 6: label-assignment methods on the same detector, every row of the paper.
TABLE6: dict[tuple[str], PaperAP] = {
    ("FoveaBox",): _ap(36.4, 55.8, 38.8),
    ("FCOS",): _ap(38.6, 57.4, 41.4),
    ("ATSS",): _ap(39.2, 57.4, 42.2),
    ("PAA",): _ap(40.4, 58.4, 43.9),
    ("OTA",): _ap(40.7, 58.4, 44.3),
    ("AutoAssign",): _ap(40.4, 59.6, 43.7),
    ("AutoAssign(detach)",): _ap(39.8, 59.6, 42.8),
    ("AutoAssign(weight loss)",): _ap(36.6, 56.2, 39.1),
    ("NoisyAnchor",): _ap(38.0, 56.9, 40.6),
    ("MAL",): _ap(39.2, 58.0, 42.3),
    ("GFL",): _ap(39.9, 58.5, 43.0),
    ("VFL",): _ap(40.2, 58.2, 44.0),
    ("FCOS+GFLv2",): _ap(40.6, 58.2, 43.9),
    ("ATSS+GFLv2",): _ap(41.1, 58.8, 44.9),
    ("MuSu",): _ap(40.6, 58.9, 44.3),
    ("TOOD",): _ap(40.3, 58.5, 43.8),
    ("DW",): _ap(41.5, 59.8, 45.0),
    ("DW + box refine",): _ap(42.2, 60.4, 45.3),
}

#: Our method name (``assigner.name``, ``+box_refine`` when ``model.box_refine``, ``+thead`` on
#: TOOD's T-head, ``model.head: tood``) -> the Table 6 row it reproduces: each method's
#: ``paper_row`` in ``dwlab.assign.ASSIGNERS``, and DW with box refinement (Eq. 9-10). A method
#: without a paper row is left out; the report names it by its sweep point's label. Every row of
#: Table 6 is a method on the conventional head: the T-head runs (``tood+thead``, ``dw+thead``,
#: the paper's DW*) have none (the paper's TOOD row, 40.3, is below TOOD with its T-head, 42.5).
#:
#: ``autoassign`` maps to "AutoAssign(weight loss)": dwlab implements AutoAssign in the form the
#: DW paper argues for ("weights detached and applied to the loss"), which the paper's
#: §4.4 reports as 36.6 AP ("we tried to detach the weights in Autoassign and assigned them to
#: loss, but only obtained 39.8 and 36.6 AP, respectively"). "AutoAssign(detach)" (39.8) keeps the
#: detached weights on the score, and "AutoAssign" (40.4) is the original with gradients through
#: the weights. ``gfl`` is GFL as published (QFL, GIoU and DFL on the distribution head: the GFL
#: row); ``qfl`` (its Quality Focal Loss alone) has no row. ``gflv2`` is "ATSS+GFLv2", and with
#: ``assigner.gflv2.sampling: fcos`` the method ``gflv2+fcos``, "FCOS+GFLv2" (its row's ``variant``).
METHOD_TO_TABLE6: dict[str, str] = {
    **{name: method.paper_row for name, method in ASSIGNERS.items() if method.paper_row},
    **{
        f"{name}+{value}": row
        for name, method in ASSIGNERS.items()
        if method.variant
        for value, row in method.variant[1].items()
    },
    "dw+box_refine": "DW + box refine",
}

# Table 7: one-stage detectors on COCO test-dev2017, 2x multi-scale (paper Sec. 4.2), in the
# paper's order: one block per backbone. The paper's "Aux." column (methods reported with their
# extra feature-learning module: GFLv2's DGQP, VFNet's star-shaped refinement, TOOD's T-head,
# DW's box refinement) lost its check marks in the text we have; the paper lists those rows
# after "DW (ours)" in each block ("we compare with them by reporting the performance w/wo this
# auxiliary module"), and TABLE7_AUX holds them by that order.
# "DW*" is the paper's "DW* (ours)": DW on TOOD's T-head (an aux. row, after DW + box refine).
R101, R101_DCN, X101 = "ResNet-101", "ResNet-101-DCN", "ResNeXt-101-64x4d"
TABLE7: dict[tuple[str, str], PaperAPSizes] = {
    ("FCOS", R101): PaperAPSizes(41.5, 60.7, 45.0, 24.4, 44.8, 51.6),
    ("ATSS", R101): PaperAPSizes(43.6, 62.1, 47.4, 26.1, 47.0, 53.6),
    ("PAA", R101): PaperAPSizes(44.8, 63.3, 48.7, 26.5, 48.8, 56.3),
    ("GFL", R101): PaperAPSizes(45.0, 63.7, 48.9, 27.2, 48.8, 54.5),
    ("OTA", R101): PaperAPSizes(45.3, 63.5, 49.3, 26.9, 48.8, 56.1),
    ("IQDet", R101): PaperAPSizes(45.1, 63.4, 49.3, 26.7, 48.5, 56.6),
    ("MuSu", R101): PaperAPSizes(44.8, 63.2, 49.1, 26.2, 47.9, 56.4),
    ("AutoAssign", R101): PaperAPSizes(44.5, 64.3, 48.4, 25.9, 47.4, 55.0),
    ("VFL", R101): PaperAPSizes(44.9, 64.1, 48.9, 27.1, 48.7, 55.1),
    ("DW", R101): PaperAPSizes(46.2, 64.8, 50.0, 27.1, 49.4, 58.5),
    ("GFLv2", R101): PaperAPSizes(46.2, 64.3, 50.5, 27.8, 49.9, 57.0),
    ("DW + box refine", R101): PaperAPSizes(46.8, 65.1, 50.5, 27.7, 49.9, 59.1),
    ("ATSS", R101_DCN): PaperAPSizes(46.3, 64.7, 50.4, 27.7, 49.8, 58.4),
    ("PAA", R101_DCN): PaperAPSizes(47.4, 65.7, 51.6, 27.9, 51.3, 60.6),
    ("GFL", R101_DCN): PaperAPSizes(47.3, 66.3, 51.4, 28.0, 51.1, 59.2),
    ("MuSu", R101_DCN): PaperAPSizes(47.4, 65.0, 51.8, 27.8, 50.5, 60.0),
    ("VFL", R101_DCN): PaperAPSizes(48.5, 67.4, 52.9, 29.1, 52.2, 61.9),
    ("DW", R101_DCN): PaperAPSizes(49.3, 67.6, 53.3, 29.2, 52.2, 63.5),
    ("GFLv2", R101_DCN): PaperAPSizes(48.3, 66.5, 52.8, 28.8, 51.9, 60.7),
    ("DW + box refine", R101_DCN): PaperAPSizes(49.5, 67.7, 53.4, 28.9, 52.2, 63.7),
    ("ATSS", X101): PaperAPSizes(45.6, 64.6, 49.7, 28.5, 48.9, 55.6),
    ("PAA", X101): PaperAPSizes(46.6, 65.6, 50.8, 28.8, 50.4, 57.9),
    ("GFL", X101): PaperAPSizes(46.0, 65.1, 50.1, 28.2, 49.6, 56.0),
    ("OTA", X101): PaperAPSizes(47.0, 65.8, 51.1, 29.2, 50.4, 57.9),
    ("DW", X101): PaperAPSizes(48.2, 67.1, 52.2, 29.6, 51.2, 60.8),
    ("VFL", X101): PaperAPSizes(48.5, 67.0, 52.6, 30.1, 51.7, 59.7),
    ("TOOD", X101): PaperAPSizes(48.3, 66.5, 52.4, 30.7, 51.3, 58.6),
    ("DW + box refine", X101): PaperAPSizes(48.7, 67.1, 52.7, 29.7, 51.6, 61.1),
    ("DW*", X101): PaperAPSizes(49.8, 67.7, 53.8, 30.4, 52.3, 63.0),
}
TABLE7_AUX = frozenset({
    ("GFLv2", R101), ("DW + box refine", R101), ("GFLv2", R101_DCN), ("DW + box refine", R101_DCN),
    ("VFL", X101), ("TOOD", X101), ("DW + box refine", X101), ("DW*", X101),
})  # fmt: skip
#: Table 7's rows on TOOD's T-head, whatever the backbone: an aux. module (Table 6's TOOD row is not)
TABLE7_T_HEAD_ROWS = frozenset({"TOOD", "DW*"})
TABLE7_BACKBONES = (R101, R101_DCN, X101)

#: Our method name -> its Table 7 row: Table 6's names, for the methods whose row in Table 7 is
#: the method dwlab runs, and the T-head rows: TOOD with its T-head (``tood+thead``, Table 7's
#: TOOD row) and DW on it (``dw+thead``, "DW*"). Left out: ``tood`` on the FCOS head (Table 7's
#: TOOD has its T-head) and ``autoassign`` (Table 7's AutoAssign is the original, with
#: gradients through its weights; dwlab's is the weight-loss form). ``vfl`` at
#: ResNeXt-101-64x4d meets VFNet with its star-shaped refinement (an aux. row), which dwlab's
#: ``vfl`` lacks: ``experiments/table7.yaml`` leaves that point out.
METHOD_TO_TABLE7: dict[str, str] = {
    **{k: v for k, v in METHOD_TO_TABLE6.items() if k in ("fcos", "atss", "gfl", "vfl", "dw", "dw+box_refine")},
    "tood+thead": "TOOD",
    "dw+thead": "DW*",
}

#: Our backbone (``model.backbone``, ``+dcn`` with ``model.backbone_dcn``, ``+head_dcn`` with
#: ``model.head_dcn``) -> Table 7's. "ResNet-101-DCN" is the released DW code's DCN detector:
#: DCNv2 in C3-C5 of the backbone and as the last conv of each head tower.
BACKBONE_TO_TABLE7: dict[str, str] = {
    "resnet101": R101,
    "resnet101+dcn+head_dcn": R101_DCN,
    "resnext101_64x4d": X101,
}

TABLES: dict[str, dict] = {
    "table2": TABLE2,
    "table3": TABLE3,
    "table4": TABLE4,
    "table5": TABLE5,
    "table6": TABLE6,
    "table7": TABLE7,
}


def paper_value(table: str, key: tuple) -> PaperAP | PaperAPSizes | None:
    """The paper's ``(AP, AP50, AP75)`` (Table 7: with APs, APm, APl) for ``key`` in ``table``
    (e.g. ``"table2", (5, 6)``), or None when the paper has no such row."""
    try:
        return TABLES[table].get(key)
    except KeyError:
        raise ValueError(f"unknown table '{table}' (known: {', '.join(TABLES)})") from None


def best(table: str) -> tuple[list[tuple], float]:
    """The keys of the paper's best AP in ``table`` (ties kept, in paper order) and that AP."""
    rows = TABLES[table]
    top = max(v.AP for v in rows.values())
    return [k for k, v in rows.items() if v.AP == top], top
