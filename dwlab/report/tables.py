"""Trial runs -> the paper's tables: seed aggregation, layouts, agreement, markdown and CSV.

A table's rows come from the runs' ``dwlab.table`` tag. Runs are grouped by
``(table, dwlab.point)``; each group's key for the paper (``dwlab.paper``) is read off its
resolved config (the logged params, then ``dwlab.point_overrides``). Every paper row appears,
with "not run" when no run has its key; points the paper does not have come after it.

Numbers are COCO AP in percent (the runs log [0, 1]). ``std`` is the sample std over seeds
(ddof 1), so it needs n >= 2.

Seed noise (the agreement line and the "gap to best" column): the gap between two of our
points is *not significant* when it is smaller than ``2 * sqrt((std_a**2 + std_b**2) / 2)``
(twice their pooled seed std) or, at paper scale, smaller than 0.3 AP. At other scales with
fewer than 2 finished seeds on either side it is reported as unknown. A gap between one and two
pooled stds is *undecided*: another seed of the point and of the best could move it either way,
so the report names those points and the ``dwlab sweep --point`` command that adds the seed.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from dwlab import paper
from dwlab.assign import ASSIGNERS
from dwlab.report import tuned
from dwlab.report.kendall import kendall_tau
from dwlab.report.markdown import render_table
from dwlab.store import Tag, column

METRICS = ("AP", "AP50", "AP75")
SIZE_METRICS = ("APs", "APm", "APl")
FINISHED = {"FINISHED"}
RUNNING = {"RUNNING", "SCHEDULED"}
FAILED = {"FAILED", "KILLED"}  # a killed trial counts as failed
NOISE_STDS = 2.0
PAPER_SCALE_FLOOR = 0.3  # AP; below this a gap is seed noise at paper scale (COCO, R-50 1x)


# ----------------------------------------------------------------------------- table specs


def _number(x) -> str:
    """A number as short as it reads: 5.0 -> "5", 1.3 -> "1.3"; anything else as ``str``."""
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _truthy(x: str) -> bool:
    return str(x).strip().lower() in {"true", "1", "yes"}


# row keys: a run's resolved params (dotted, strings) -> the paper's key of its table row


def _beta_mu_key(p: dict) -> tuple:
    return (float(p["assigner.dw.beta"]), float(p["assigner.dw.mu"]))


def _gammas_key(p: dict) -> tuple:
    return (float(p["assigner.dw.gamma1"]), float(p["assigner.dw.gamma2"]))


def _bag_key(p: dict) -> tuple:
    bag = p["assigner.dw.bag"]
    if bag == "threshold":
        return ("threshold", float(p["assigner.dw.bag_radius"]))
    if bag == "topk":
        return ("topk", float(p["assigner.dw.bag_topk"]))
    return (bag, None)


PAPER_EQUATIONS = "paper equations"  # DW's variant=paper: a row of its own beside the released recipe's


def _neg_variant_key(p: dict) -> tuple:
    """The paper's Table 5 rows are the released recipe (``variant: official``); a run of the
    paper's equations (the config's default variant) is a row of its own, with no paper number."""
    variant = p.get("assigner.dw.variant", "paper")
    neg = p["assigner.dw.neg_variant"]
    return (neg,) if variant == "official" else (f"{neg}, {PAPER_EQUATIONS}",)


T_HEAD = "+thead"  # a method name's suffix on TOOD's T-head


def method_name(p: dict) -> str:
    """``assigner.name``, with ``+<value>`` when its ``ASSIGNERS`` row has a ``variant`` field
    set to one of the variant's values (``gflv2+fcos``), ``+box_refine`` when ``model.box_refine``
    is on and ``+thead`` on TOOD's T-head (``model.head: tood``; a run logged before the key had
    the FCOS head)."""
    name = p["assigner.name"]
    method = ASSIGNERS.get(name)
    if method is not None and method.variant is not None:
        value = p.get(f"assigner.{method.section}.{method.variant[0]}")
        name = f"{name}+{value}" if value in method.variant[1] else name
    name += "+box_refine" if _truthy(p.get("model.box_refine", "false")) else ""
    return name + (T_HEAD if p.get("model.head", "fcos") == "tood" else "")


def on_t_head(key: tuple) -> bool:
    """A Table 6 / 7 row key of a run on TOOD's T-head: not the paper's FCOS detector (every
    paper row of Table 6 is), so the claims about that detector leave it out."""
    return str(key[0]).endswith(T_HEAD)


def _table6_row_key(p: dict) -> tuple:
    """The method's paper row. DW's rows are the released recipe (``variant: official``, as
    Table 5's); DW trained on the paper's equations is a row of its own, with no paper number."""
    name = method_name(p)
    row = paper.METHOD_TO_TABLE6.get(name, name)
    if p["assigner.name"] == "dw" and p.get("assigner.dw.variant", "paper") != "official":
        return (f"{row}, {PAPER_EQUATIONS}",)
    return (row,)


def table7_backbone(p: dict) -> str:
    """``model.backbone`` with ``+dcn`` (``model.backbone_dcn``) and ``+head_dcn`` (``model.head_dcn``)."""
    name = p["model.backbone"]
    name += "+dcn" if _truthy(p.get("model.backbone_dcn", "false")) else ""
    return name + ("+head_dcn" if _truthy(p.get("model.head_dcn", "false")) else "")


def _table7_row_key(p: dict) -> tuple:
    name, backbone = method_name(p), table7_backbone(p)
    return (paper.METHOD_TO_TABLE7.get(name, name), paper.BACKBONE_TO_TABLE7.get(backbone, backbone))


_OURS_BY_TABLE7_ROW = {v: k for k, v in paper.METHOD_TO_TABLE7.items()}


def _table7_row_label(k: tuple) -> str:
    """``"DW + box refine, ResNet-101 [aux.] (ours: dw+box_refine)"``: unique across blocks."""
    aux = " [aux.]" if k in paper.TABLE7_AUX else ""
    ours = _OURS_BY_TABLE7_ROW.get(k[0])
    return f"{k[0]}, {k[1]}{aux}" + (f" (ours: {ours})" if ours else "")


def _backbone_blocks(keys: list[tuple]) -> list[tuple[str, list[tuple]]]:
    """Table 7: one block per backbone (the paper's three first), rows in the paper's order."""
    every = _by_order(list(paper.TABLE7), keys)
    backbones = list(dict.fromkeys([*paper.TABLE7_BACKBONES, *(k[1] for k in every)]))
    return [(b, [k for k in every if k[1] == b]) for b in backbones]


def _bag_label(k: tuple) -> str:
    kind, value = k
    return {"threshold": f"threshold r={_number(value)}", "topk": f"top-k k={_number(value)}"}.get(
        kind, "soft prior" if kind == "soft" else f"{kind} {_number(value)}"
    )


_OURS_BY_TABLE6_ROW = {v: k for k, v in paper.METHOD_TO_TABLE6.items()}


def _table6_row_label(k: tuple) -> str:
    ours = _OURS_BY_TABLE6_ROW.get(k[0])
    return f"{k[0]} (ours: {ours})" if ours else k[0]


def _by_order(order: list[tuple], keys: list[tuple]) -> list[tuple]:
    """Paper rows in paper order, then the rest sorted."""
    extra = sorted((k for k in keys if k not in order), key=lambda k: tuple(map(str, k)))
    return order + extra


# row blocks: a table's row keys -> its (block title, rows in order) sections


def _beta_mu_blocks(keys: list[tuple]) -> list[tuple[str, list[tuple]]]:
    """Table 2: the mu line at the paper's beta, the beta line at its mu, then any other points."""
    b, m = paper.DEFAULTS["beta"], paper.DEFAULTS["mu"]
    every = set(paper.TABLE2) | set(keys)
    mu_line = sorted(k for k in every if k[0] == b)
    beta_line = sorted(k for k in every if k[1] == m)
    other = sorted(k for k in every if k[0] != b and k[1] != m)
    blocks = [(f"beta = {b}, mu varied", mu_line), (f"mu = {m}, beta varied", beta_line)]
    return blocks + ([("other points", other)] if other else [])


def _bag_blocks(keys: list[tuple]) -> list[tuple[str, list[tuple]]]:
    """Table 4: one block per bag kind, rows by the kind's parameter."""
    every = list(paper.TABLE4) + [k for k in keys if k not in paper.TABLE4]
    titles = {"threshold": "threshold bag (distance / stride < r)", "topk": "top-k bag (k per level)",
              "soft": "soft center prior"}
    kinds = list(dict.fromkeys(k[0] for k in every))
    return [
        (titles.get(kind, kind), sorted((k for k in every if k[0] == kind), key=lambda k: k[1] or 0))
        for kind in kinds
    ]


def _one_block_in_paper_order(order: list[tuple]) -> Callable[[list[tuple]], list[tuple[str, list[tuple]]]]:
    """Tables 3, 5, 6: one untitled block, the paper's rows in its order, then the rest sorted."""
    return lambda keys: [("", _by_order(list(order), keys))]


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    key_names: tuple[str, ...]  # CSV columns for the key
    row_header: str  # markdown header of the label column
    key: Callable[[dict], tuple]  # resolved params (dotted, strings) -> paper key
    label: Callable[[tuple], str]
    blocks: Callable[[list[tuple]], list[tuple[str, list[tuple]]]]
    metrics: tuple[str, ...] = METRICS  # the columns with the paper's number beside ours
    varied: tuple[str, ...] = ()  # header settings the rows differ in by design (not "mixed")
    note: str = ""  # printed under the header
    sweep_labels: bool = False  # a row the paper does not list is named by its sweep point's label
    step_time: bool = False  # a "train ms/step" column (methods differ in cost; a grid's points do not)


SPECS: dict[str, TableSpec] = {
    "table2": TableSpec(
        "table2", "Table 2: beta and mu of the positive weight (Eq. 3-4)", ("beta", "mu"),
        "beta, mu", _beta_mu_key, lambda k: f"beta={_number(k[0])}, mu={_number(k[1])}", _beta_mu_blocks,
    ),
    "table3": TableSpec(
        "table3", "Table 3: gamma1 (P_neg) and gamma2 (I_neg) of the negative weight (Eq. 5-7)",
        ("gamma1", "gamma2"), "gamma1, gamma2", _gammas_key,
        lambda k: f"gamma1={_number(k[0])}, gamma2={_number(k[1])}", _one_block_in_paper_order(list(paper.TABLE3)),
    ),
    "table4": TableSpec(
        "table4", "Table 4: the candidate bag", ("bag", "bag_param"), "bag", _bag_key, _bag_label, _bag_blocks,
    ),
    "table5": TableSpec(
        "table5", "Table 5: the in-bag negative weight", ("neg_variant",), "neg variant", _neg_variant_key,
        lambda k: f"{k[0]} (DW)" if k[0] == "full" else k[0], _one_block_in_paper_order(list(paper.TABLE5)),
    ),
    "table6": TableSpec(
        "table6", "Table 6: label-assignment methods on the same FCOS detector", ("method",),
        "method (paper row)", _table6_row_key, _table6_row_label, _one_block_in_paper_order(list(paper.TABLE6)),
        sweep_labels=True, step_time=True,
    ),
    "table7": TableSpec(
        "table7", "Table 7: one-stage detectors with larger backbones, 2x multi-scale", ("method", "backbone"),
        "method, backbone (paper row)", _table7_row_key, _table7_row_label, _backbone_blocks,
        METRICS + SIZE_METRICS, varied=("backbone",),
        note="**Ours: COCO val2017; the paper's: test-dev2017.** A sweep evaluates on the config's val "
        "split (labelled); test-dev's labels are not public, so its numbers come from COCO's "
        "evaluation server: `dwlab eval --images-only` writes the file to submit (README \"Test-dev\").",
    ),
}


# ----------------------------------------------------------------------------- aggregation


def _params(run: pd.Series) -> dict:
    """The run's resolved config as ``{dotted: str}``: its params, else its point overrides."""
    out = {}
    raw = run.get(column(Tag.POINT_OVERRIDES))
    if isinstance(raw, str) and raw:
        try:
            out.update({k: str(v) for k, v in json.loads(raw).items()})
        except (ValueError, AttributeError):
            pass
    out.update({k[len("params."):]: v for k, v in run.items() if k.startswith("params.") and isinstance(v, str)})
    return out


def run_key(spec: TableSpec, run: pd.Series) -> tuple | None:
    try:
        return spec.key(_params(run))
    except (KeyError, ValueError, TypeError):
        return None


def _stat(values: pd.Series) -> tuple[float, float, int]:
    v = values.dropna().astype(float) * 100.0
    n = len(v)
    return (float(v.mean()) if n else math.nan, float(v.std(ddof=1)) if n >= 2 else math.nan, n)


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per ``(table, point)``: run counts and, over the FINISHED seeds, mean / std / n
    of every AP metric (percent) and the mean images seen. ``key`` is the paper key."""
    runs = runs.copy()
    if column(Tag.POINT) not in runs:
        runs[column(Tag.POINT)] = None
    runs[column(Tag.POINT)] = runs[column(Tag.POINT)].fillna(runs["run_id"])
    rows = []
    for (table, point), group in runs.groupby([column(Tag.TABLE), column(Tag.POINT)], sort=False):
        spec = SPECS.get(table)
        key = run_key(spec, group.iloc[0]) if spec else None
        done = group[group["status"].isin(FINISHED)]
        row = {
            "table": table, "point": point, "key": key if key is not None else ("?", point),
            "n_runs": len(group), "n_finished": len(done),
            "n_running": int(group["status"].isin(RUNNING).sum()),
            "n_failed": int(group["status"].isin(FAILED).sum()),
            "seeds": ",".join(sorted(str(s) for s in group.get(column(Tag.SEED), pd.Series()).dropna())),
            "point_label": next(iter(group.get(column(Tag.POINT_LABEL), pd.Series()).dropna()), None),
        }
        for m in METRICS + SIZE_METRICS:
            col = done.get(f"metrics.{m}", pd.Series(dtype=float))
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = _stat(col)
        seen = done.get("metrics.images_seen", pd.Series(dtype=float)).dropna()
        row["images_seen"] = float(seen.mean()) if len(seen) else math.nan
        rate = done.get("metrics.iters_per_s", pd.Series(dtype=float)).dropna().astype(float)
        row["step_ms"] = float((1000.0 / rate).mean()) if len(rate) else math.nan  # last epoch's, seed mean
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- one table


@dataclass
class TableResult:
    name: str
    title: str
    header: dict[str, str]
    rows: pd.DataFrame  # one row per table line, layout order; the CSV
    agreement: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings printed under the header
    markdown: str = ""
    searches: pd.DataFrame = field(default_factory=pd.DataFrame)  # tuned.searches: every search of the table

    @property
    def paper_scale(self) -> bool:
        return self.header.get("scale") == "paper"


def noise_threshold(std_a: float, n_a: int, std_b: float, n_b: int, paper_scale: bool) -> float | None:
    """The smallest gap between two points that is not seed noise (None: cannot tell)."""
    floor = PAPER_SCALE_FLOOR if paper_scale else 0.0
    if n_a >= 2 and n_b >= 2:
        return max(NOISE_STDS * math.sqrt((std_a**2 + std_b**2) / 2.0), floor)
    return floor if paper_scale else None


def _values(series: pd.Series | None, fmt: Callable = str) -> str:
    if series is None:
        return "unknown"
    vals = list(dict.fromkeys(fmt(v) for v in series.dropna()))
    if not vals:
        return "unknown"
    return vals[0] if len(vals) == 1 else f"{', '.join(vals)} (mixed)"


def _initialisation(pretrained) -> str:
    """The backbone's starting point, from the ``model.pretrained`` param."""
    text = str(pretrained)
    names = {
        "True": "ImageNet (torchvision's weights)",
        "False": "random (trained from scratch)",
        "synth": "domain-pretrained: a classifier of generated shape crops (dwlab pretrain)",
    }
    return names.get(text, f"weights from {text}")


def header_info(runs: pd.DataFrame) -> dict[str, str]:
    """What the table was measured on, from its runs' tags, params and metrics."""
    get = runs.get
    backbone = get(column(Tag.BACKBONE))
    if backbone is None:
        backbone = get("params.model.backbone")
    epochs = _values(get("params.train.epochs"))
    batch, workers = _values(get("params.train.batch_size")), _values(get(column(Tag.WORLD_SIZE)))
    seen = runs.loc[runs["status"].isin(FINISHED)].get("metrics.images_seen", pd.Series(dtype=float)).dropna()
    if len(seen) == 0:
        images = "unknown (no finished run logged images_seen)"
    elif seen.min() == seen.max():
        images = f"{seen.iloc[0]:,.0f} per run"
    else:
        images = f"{seen.min():,.0f} to {seen.max():,.0f} per run (median {seen.median():,.0f})"
    counts = runs["status"]
    parts = [f"{int(counts.isin(s).sum())} {w}" for s, w in ((FINISHED, "finished"), (RUNNING, "running"), (FAILED, "failed"))]
    return {
        "dataset": _values(get(column(Tag.DATASET))),
        "scale": _values(get(column(Tag.SCALE))),
        "backbone": _values(backbone),
        "initialisation": _values(get("params.model.pretrained"), _initialisation),
        "schedule": f"{epochs} epoch{'' if epochs == '1' else 's'}, batch {batch} x {workers} worker(s)",
        "images seen": images,
        "runs": f"{len(runs)} ({', '.join(parts)})",
        "dwlab": (f"{_values(get(column(Tag.VERSION)))}, training revision {_values(get(column(Tag.REVISION), pd.Series('1', index=runs.index)).fillna('1'))} "
                  f"at commit {_values(get(column(Tag.GIT_COMMIT)), lambda c: str(c)[:10])}"),
        "experiments": _values(runs["experiment"]),
    }


def _empty_row(table: str, key: tuple) -> dict:
    row = {"table": table, "point": "", "key": key, "n_runs": 0, "n_finished": 0, "n_running": 0,
           "n_failed": 0, "seeds": "", "images_seen": math.nan, "step_ms": math.nan}
    for m in METRICS + SIZE_METRICS:
        row.update({f"{m}_mean": math.nan, f"{m}_std": math.nan, f"{m}_n": 0})
    return row


def layout(spec: TableSpec, agg: pd.DataFrame) -> pd.DataFrame:
    """The table's lines in the paper's layout: blocks of keys, the points we ran at each key
    (a "not run" line for a paper key with none), with the paper's numbers and the differences."""
    groups = agg[agg["table"] == spec.name] if len(agg) else agg
    by_key: dict[tuple, list[dict]] = {}
    for rec in groups.to_dict("records"):
        by_key.setdefault(rec["key"], []).append(rec)
    unknown = [k for k in by_key if k[0] == "?"]
    blocks = spec.blocks([k for k in by_key if k[0] != "?"])
    if unknown:
        blocks.append(("points whose config could not be read", unknown))
    lines = []
    for block, keys in blocks:
        for key in keys:
            recs = by_key.get(key) or [_empty_row(spec.name, key)]
            ref = paper.paper_value(spec.name, key)
            for rec in recs:
                line = dict(rec, block=block)
                label = spec.label(key) if key[0] != "?" else str(key[1])
                if spec.sweep_labels and ref is None and rec.get("point_label"):
                    label = rec["point_label"]
                line["label"] = label if len(recs) == 1 else f"{label} [{rec['point']}]"
                for name, value in zip(spec.key_names, key if key[0] != "?" else (None,) * len(spec.key_names)):
                    line[name] = value
                for m in spec.metrics:
                    line[f"{m}_paper"] = getattr(ref, m) if ref else math.nan
                    line[f"{m}_diff"] = line[f"{m}_mean"] - line[f"{m}_paper"]
                lines.append(line)
    return pd.DataFrame(lines)


def _mark_gaps(rows: pd.DataFrame, paper_scale: bool) -> tuple[pd.DataFrame, int | None]:
    """Add ``gap_to_best``, ``gap_threshold``, ``significant`` (vs our best AP) and
    ``undecided`` (a gap between one and two pooled stds)."""
    rows = rows.copy()
    rows["gap_to_best"], rows["gap_threshold"], rows["significant"] = math.nan, math.nan, None
    rows["undecided"] = False
    rows["is_best"] = False
    have = rows[rows["AP_n"] > 0]
    if have.empty or not (have["AP_mean"] > 0).any():  # nothing learnt: no point is best
        return rows, None
    ibest = int(have["AP_mean"].idxmax())
    best = rows.loc[ibest]
    for i, r in have.iterrows():
        rows.at[i, "gap_to_best"] = r["AP_mean"] - best["AP_mean"]
        if r["label"] == best["label"]:  # the best point (Table 2 shows (5, 5) in both blocks)
            rows.at[i, "is_best"] = True
            continue
        thr = noise_threshold(r["AP_std"], r["AP_n"], best["AP_std"], best["AP_n"], paper_scale)
        if thr is not None:
            rows.at[i, "gap_threshold"] = thr
            gap = abs(r["AP_mean"] - best["AP_mean"])
            rows.at[i, "significant"] = bool(gap >= thr and gap > 1e-9)
            rows.at[i, "undecided"] = bool(thr / NOISE_STDS <= gap < thr)
    return rows, ibest


def third_seed_command(rows: pd.DataFrame, runs: pd.DataFrame) -> str | None:
    """The ``dwlab sweep`` command that adds a seed to the undecided points and the best one
    (None: no undecided gap, or the runs do not name one sweep file)."""
    undecided = rows[rows["undecided"].astype(bool)]
    files = runs.get(column(Tag.SWEEP_FILE), pd.Series(dtype=object)).dropna().unique()
    if undecided.empty or len(files) != 1:
        return None
    best = rows[rows["is_best"].astype(bool)]
    points = list(dict.fromkeys([*best["point"], *undecided["point"]]))
    seeds = int(max(undecided["AP_n"].max(), best["AP_n"].max())) + 1
    return shlex.join(
        ["dwlab", "sweep", str(files[0]), "--seeds", str(seeds), "--resume", *[f"--point={p}" for p in points]]
    )


def agreement(spec: TableSpec, rows: pd.DataFrame, ibest: int | None) -> dict:
    """Kendall tau of our AP ordering vs the paper's, our best vs the paper's best, and the
    points within seed noise of our best."""
    both = rows[(rows["AP_n"] > 0) & rows["AP_paper"].notna()].drop_duplicates("label")
    tau = p = math.nan
    if len(both) >= 2:
        tau, p = kendall_tau(both["AP_mean"], both["AP_paper"])
    paper_keys, paper_top = paper.best(spec.name)
    out = {
        "tau": tau, "p": p, "n_tau": len(both),
        "paper_best": [spec.label(k) for k in paper_keys], "paper_best_ap": paper_top,
        "best": None, "best_ap": math.nan, "paper_best_here": [], "within_noise": [], "unknown": [],
        "undecided": [], "third_seed": None,
    }
    if ibest is None:
        return out
    out["best"], out["best_ap"] = rows.at[ibest, "label"], rows.at[ibest, "AP_mean"]
    for _, r in rows[rows["AP_n"] > 0].drop_duplicates("label").iterrows():
        if r["is_best"]:
            continue
        if r["key"] in paper_keys:
            out["paper_best_here"].append((r["label"], r["AP_mean"], r["gap_to_best"], r["significant"]))
        if r["undecided"]:
            out["undecided"].append(r["label"])
        if r["significant"] is False:
            out["within_noise"].append(r["label"])
        elif r["significant"] is None:
            out["unknown"].append(r["label"])
    return out


def build_table(spec: TableSpec, agg: pd.DataFrame, runs: pd.DataFrame, older: int = 0) -> TableResult:
    """One table: layout, header, gaps, agreement, the tuned columns (``tuned``) and its
    markdown. ``agg`` aggregates the runs that are rows (``tuned.split_roles``); ``older``: how
    many runs of an earlier training revision were left out (``load.latest_revision``)."""
    runs = runs[runs[column(Tag.TABLE)] == spec.name]
    header = header_info(runs)
    for key in spec.varied:  # differs between rows on purpose: not a "mixed" warning
        header[key] = header[key].replace(" (mixed)", " (by row)")
    paper_scale = header["scale"] == "paper"
    rows, ibest = _mark_gaps(layout(spec, agg), paper_scale)
    found = tuned.searches(tuned.split_roles(runs)[1], lambda run: run_key(spec, run))
    rows = tuned.attach(rows, found, lambda sa, na, sb, nb: noise_threshold(sa, na, sb, nb, paper_scale))
    result = TableResult(spec.name, spec.title, header, rows, agreement(spec, rows, ibest), searches=found)
    result.agreement["third_seed"] = third_seed_command(rows, runs)
    if header["scale"] != "paper":
        result.notes.append(
            f"**Not a COCO reproduction.** Measured at scale '{header['scale']}' on dataset "
            f"'{header['dataset']}'; the paper's numbers are {paper.setting(spec.name)}. Absolute values and "
            "differences are not comparable; compare orderings (Kendall tau) only."
        )
    if spec.note:
        result.notes.append(spec.note)
    if older:
        result.notes.append(
            f"**{older} run(s) of an earlier training revision left out**: the same configs train to other "
            f"numbers at this revision ({header['dwlab']}; `dwlab.TRAINING_REVISION`)."
        )
    mixed = [k for k in ("dataset", "scale", "backbone", "schedule") if "(mixed)" in header[k]]
    if mixed:
        result.notes.append(
            f"**Mixed settings** ({', '.join(mixed)}): runs measured differently are pooled here; "
            "report their experiments separately with --experiment."
        )
    result.markdown = render_table(spec, result)
    return result


def csv_frame(result: TableResult) -> pd.DataFrame:
    """The CSV: every number of the markdown table, unrounded."""
    spec = SPECS[result.name]
    cols = ["table", "block", "label", "point", *spec.key_names, "n_runs", "n_finished", "n_running",
            "n_failed", "seeds"]
    for m in spec.metrics:
        cols += [f"{m}_mean", f"{m}_std", f"{m}_n", f"{m}_paper", f"{m}_diff"]
    for m in (m for m in SIZE_METRICS if m not in spec.metrics):
        cols += [f"{m}_mean", f"{m}_std"]
    cols += ["images_seen", *(["step_ms"] if spec.step_time else []), "gap_to_best", "gap_threshold", "significant", "undecided"]
    if result.rows["tuned_values"].notna().any():
        cols += list(tuned.COLUMNS)
    return result.rows.reindex(columns=cols)


def run_labels(result: TableResult, runs: pd.DataFrame, statuses: set[str] = FINISHED) -> dict[str, str]:
    """run_id -> the label of its table line, for the table's runs with one of ``statuses``."""
    by_point = dict(zip(result.rows["point"], result.rows["label"]))
    part = runs[(runs[column(Tag.TABLE)] == result.name) & runs["status"].isin(statuses)]
    points = part[column(Tag.POINT)] if column(Tag.POINT) in part else part["run_id"]
    return {rid: by_point.get(p, str(p)) for rid, p in zip(part["run_id"], points.fillna(part["run_id"]))}
