"""The paper's numbers (Li et al., "A Dual Weighting Label Assignment Scheme for Object
Detection", CVPR 2022), as data: the single source for ``dwlab report`` and the plots.

All values are COCO val2017 box AP in percent, FCOS ResNet-50, 1x schedule, as restored in
``shared/paper/METHOD.md`` ("The paper's numbers"). Each table is a mapping from the key that
identifies a grid point to its ``(AP, AP50, AP75)``; the key is what ``dwlab report`` reads off a
run's resolved config, so a sweep point finds its paper row without string matching:

- Table 2: ``(beta, mu)``                    from ``assigner.dw.beta``, ``assigner.dw.mu``
- Table 3: ``(gamma1, gamma2)``              from ``assigner.dw.gamma1``, ``assigner.dw.gamma2``
- Table 4: ``(bag, r or k)``                 from ``assigner.dw.bag`` and ``bag_radius`` /
  ``bag_topk`` (``("soft", None)`` for the soft prior)
- Table 5: ``(neg_variant,)``                from ``assigner.dw.neg_variant``
- Table 6: ``(paper row name,)``             from ``assigner.name`` (+ ``model.box_refine``)
  through ``METHOD_TO_TABLE6``

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


def _ap(ap: float, ap50: float, ap75: float) -> PaperAP:
    return PaperAP(ap, ap50, ap75)


#: Evaluation setting of every number in this module.
SETTING = "COCO val2017, FCOS ResNet-50, 1x (12 epochs)"

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

#: Our method name (``assigner.name``, ``+box_refine`` when ``model.box_refine``) -> the Table 6
#: row it reproduces: each method's ``paper_row`` in ``dwlab.assign.ASSIGNERS``, and DW with box
#: refinement (Eq. 9-10). A method without a paper row is left out; the report names it by its
#: sweep point's label.
#:
#: ``autoassign`` maps to "AutoAssign(weight loss)": dwlab implements AutoAssign in the form the
#: DW paper argues for ("weights detached and applied to the loss"), which the paper's
#: §4.4 reports as 36.6 AP ("we tried to detach the weights in Autoassign and assigned them to
#: loss, but only obtained 39.8 and 36.6 AP, respectively"). "AutoAssign(detach)" (39.8) keeps the
#: detached weights on the score, and "AutoAssign" (40.4) is the original with gradients through
#: the weights. ``gfl`` is GFL's Quality Focal Loss on ATSS assignment (GFL row, not GFLv2).
METHOD_TO_TABLE6: dict[str, str] = {
    **{name: method.paper_row for name, method in ASSIGNERS.items() if method.paper_row},
    "dw+box_refine": "DW + box refine",
}

TABLES: dict[str, dict] = {
    "table2": TABLE2,
    "table3": TABLE3,
    "table4": TABLE4,
    "table5": TABLE5,
    "table6": TABLE6,
}


def paper_value(table: str, key: tuple) -> PaperAP | None:
    """The paper's ``(AP, AP50, AP75)`` for ``key`` in ``table`` (e.g. ``"table2", (5, 6)``), or
    None when the paper has no such row."""
    try:
        return TABLES[table].get(key)
    except KeyError:
        raise ValueError(f"unknown table '{table}' (known: {', '.join(TABLES)})") from None


def best(table: str) -> tuple[list[tuple], float]:
    """The keys of the paper's best AP in ``table`` (ties kept, in paper order) and that AP."""
    rows = TABLES[table]
    top = max(v.AP for v in rows.values())
    return [k for k, v in rows.items() if v.AP == top], top
