"""Markdown for one table (header, blocks of lines, agreement) and the cells' formats.

Cells: ours ``"41.5 ± 0.1 (n=3)"`` (``"41.5 (n=1)"`` with one seed), ``"— (1 running, 2 failed)"``
for a point with no finished run, ``"not run"`` for a paper row nobody ran; the paper's value
``"41.5"``; the difference ours - paper ``"+0.3"``. A table that a search sweep tuned has four
more columns (``report.tuned``): the chosen values, AP at defaults, AP tuned, tuned - defaults.
"""

from __future__ import annotations

import math

import pandas as pd

from dwlab import paper

METRICS = ("AP", "AP50", "AP75")
DASH = "—"


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def counts_text(row) -> str:
    parts = [f"{int(row[f'n_{s}'])} {s}" for s in ("running", "failed") if row[f"n_{s}"]]
    return f"({', '.join(parts)})" if parts else "(no finished run)"


def ours_cell(row, metric: str) -> str:
    if row["n_runs"] == 0:
        return "not run" if metric == "AP" else ""
    n = int(row[f"{metric}_n"])
    if n == 0:
        return f"{DASH} {counts_text(row)}" if metric == "AP" and row["n_finished"] == 0 else DASH
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return f"{mean:.1f} (n=1)" if n == 1 else f"{mean:.1f} ± {std:.1f} (n={n})"


def paper_cell(row, metric: str) -> str:
    value = row[f"{metric}_paper"]
    return DASH if _nan(value) else f"{value:.1f}"


def diff_cell(row, metric: str) -> str:
    value = row[f"{metric}_diff"]
    return "" if _nan(value) else f"{value:+.1f}"


def gap_cell(row) -> str:
    gap = row["gap_to_best"]
    if _nan(gap):
        return ""
    if row["is_best"]:
        return "best"
    word = {True: "sig.", False: "noise", None: "n<2"}[row["significant"]]
    return f"{gap:+.1f} ({word})"


def runs_cell(row) -> str:
    parts = [f"{int(row[f'n_{s}'])} {s}" for s in ("finished", "running", "failed") if row[f"n_{s}"]]
    return ", ".join(parts) or "0"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def stat_cell(mean: float, std: float, n: int) -> str:
    """``"41.5 ± 0.1 (n=3)"``, ``"41.5 (n=1)"``, or a dash without a finished seed."""
    if _nan(n) or not n:
        return DASH
    return f"{mean:.1f} (n=1)" if n == 1 else f"{mean:.1f} ± {std:.1f} (n={int(n)})"


def tuned_cells(row) -> list[str]:
    """The tuned columns of a row: chosen values, AP at defaults, AP tuned, tuned - defaults."""
    if row.get("tuned_values") is None or _nan(row.get("tuned_values")):
        return ["", "", "", ""]
    gap = row["tuned_gap"]
    word = {True: "sig.", False: "noise", None: "n<2"}[row["tuned_significant"]]
    return [row["tuned_values"], stat_cell(row["AP_defaults_mean"], row["AP_defaults_std"], row["AP_defaults_n"]),
            stat_cell(row["AP_tuned_mean"], row["AP_tuned_std"], row["AP_tuned_n"]),
            "" if _nan(gap) else f"{gap:+.1f} ({word})"]  # fmt: skip


def step_cell(row) -> str:
    ms = row.get("step_ms")
    return DASH if _nan(ms) else f"{ms:.0f}"


def lines_table(row_header: str, rows: pd.DataFrame, metrics: tuple[str, ...] = METRICS,
                tuned: bool = False, step_time: bool = False) -> list[str]:
    head = [row_header]
    for m in metrics:
        head += [f"{m} ours", f"{m} paper", f"Δ{m}"]
    head += ["gap to best here", *(["train ms/step"] if step_time else []), "runs"]
    if tuned:
        head += ["tuned values", "AP at defaults", "AP tuned", "tuned - defaults"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in rows.iterrows():
        cells = [r["label"]]
        for m in metrics:
            cells += [ours_cell(r, m), paper_cell(r, m), diff_cell(r, m)]
        cells += [gap_cell(r), *([step_cell(r)] if step_time else []), runs_cell(r)]
        cells += tuned_cells(r) if tuned else []
        out.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return out


def searches_lines(found: pd.DataFrame) -> list[str]:
    """Every search behind the tuned columns, one line each (the row shows the latest of a method's)."""
    if found.empty:
        return []
    out = ["**Tuned** (each method's search scored its trials on the tune split, never on val; the "
           "chosen values were then trained at fresh seeds and scored on val)", ""]  # fmt: skip
    for _, s in found.sort_values("started").iterrows():
        chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["chosen"].items())
        tune = "" if _nan(s["tune_score"]) else f" (AP {s['tune_score']:.1f} on the tune split)"
        defaults = stat_cell(s["AP_defaults_mean"], s["AP_defaults_std"], s["AP_defaults_n"])
        if not s["AP_defaults_n"]:
            defaults = "the table's own runs"
        out.append(f"- {s['method']} in sweep {s['experiment']}: {s['description']}; chose {chosen}{tune}; on val "
                   f"tuned {stat_cell(s['AP_tuned_mean'], s['AP_tuned_std'], s['AP_tuned_n'])}, at defaults {defaults}.")  # fmt: skip
    return out + [""]


def _num(x: float, fmt: str = ".1f") -> str:
    return "n/a" if _nan(x) else format(x, fmt)


def agreement_lines(agr: dict, paper_scale: bool) -> list[str]:
    if agr["n_tau"] >= 2 and not _nan(agr["tau"]):
        tau = f"{agr['tau']:.2f} (p = {agr['p']:.2g}) over {agr['n_tau']} points"
    else:
        tau = f"n/a ({agr['n_tau']} point(s) with both ours and the paper's, or no variation)"
    out = ["**Agreement with the paper**", "", f"- Kendall tau, our AP ordering vs the paper's: {tau}."]
    pbest = f"{' and '.join(agr['paper_best'])} at {agr['paper_best_ap']:.1f} AP"
    if agr["best"] is None:
        out.append(f"- Best here: none (no finished run with AP above 0). Paper's best: {pbest}.")
    else:
        here = "".join(
            f"; here {label} is {mean:.1f} ({gap:+.1f}, "
            f"{ {True: 'significant', False: 'within seed noise', None: 'n<2, cannot tell'}[sig] })"
            for label, mean, gap, sig in agr["paper_best_here"]
        )
        out.append(f"- Best here: {agr['best']} at {agr['best_ap']:.1f} AP. Paper's best: {pbest}{here}.")
        noise = ", ".join(agr["within_noise"]) or "none"
        out.append(f"- Within seed noise of the best here: {noise}.")
        if agr["unknown"]:
            out.append(f"- Cannot tell (fewer than 2 finished seeds): {', '.join(agr['unknown'])}.")
        if agr["undecided"]:
            cmd = f": `{agr['third_seed']}`" if agr["third_seed"] else ""
            out.append(
                f"- Undecided (gap between 1 and 2 pooled stds; one more seed here and at the best "
                f"could move it either way): {', '.join(agr['undecided'])}{cmd}."
            )
    floor = " (or under 0.3 AP at paper scale)" if paper_scale else ""
    out.append(
        f"- Rule: a gap is seed noise when smaller than 2 x the pooled seed std of the two points{floor}."
    )
    return out


def render_table(spec, result) -> str:
    """``result`` is a ``tables.TableResult``; ``spec`` its ``tables.TableSpec``."""
    h = result.header
    out = [f"# {result.title}", ""]
    out += [f"- **{k}**: {v}" for k, v in h.items()]
    out += [f"- **paper**: {paper.setting(spec.name)}", ""]
    for note in result.notes:
        out += [f"> {note}", ""]
    tuned = bool(result.rows["tuned_values"].notna().any())
    for block, part in result.rows.groupby("block", sort=False):
        if block:
            out += [f"**{block}**", ""]
        out += lines_table(spec.row_header, part, spec.metrics, tuned, spec.step_time) + [""]
    out += searches_lines(result.searches)
    out += [
        "Ours: COCO AP in percent, mean ± sample std over seeds (n finished); Δ = ours - paper; "
        "gap = our AP - our best AP."
        + (" Train ms/step: the last epoch's mean step time inside the trials, seed mean; trials share the"
           " machine, so compare it with `dwlab bench --parts train` (one method at a time) before reading"
           " small differences." if spec.step_time else ""),
        "",
    ]
    out += agreement_lines(result.agreement, result.paper_scale) + [""]
    return "\n".join(out)
