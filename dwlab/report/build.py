"""``build_report``: MLflow runs -> ``<out>/tableN.{md,csv}``, figures and ``<out>/README.md``."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dwlab import paper
from dwlab.errors import DwlabError
from dwlab.store import Tag, column
from dwlab.report import claims, figures, load
from dwlab.report.tuned import split_roles
from dwlab.report.tables import SPECS, TableResult, aggregate, build_table, csv_frame, run_labels


@dataclass
class Report:
    out: Path
    uri: str
    tables: dict[str, TableResult]
    files: list[Path] = field(default_factory=list)  # every file written, README last
    index: list[tuple[str, str]] = field(default_factory=list)  # (relative path, one-line reading)
    skipped: list[str] = field(default_factory=list)  # what was not produced, and why


def _number_or_na(x: float, fmt: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table_reading(t: TableResult) -> str:
    rows = t.rows.drop_duplicates("label")
    ran = rows[rows["n_runs"] > 0]
    done = int((ran["n_finished"] > 0).sum())
    agr = t.agreement
    text = (f"{done} of {len(ran)} points run have a finished seed "
            f"({t.header['scale']} scale, {t.header['dataset']}; runs: {t.header['runs']})")
    if agr["best"] is not None:
        text += (f"; best here {agr['best']} at {_number_or_na(agr['best_ap'])} AP, paper's best "
                 f"{' / '.join(agr['paper_best'])} at {agr['paper_best_ap']:.1f}")
        text += f"; Kendall tau {_number_or_na(agr['tau'], '.2f')} over {agr['n_tau']} points"
        text += f"; {len(agr['within_noise'])} point(s) within seed noise of the best"
    tuned = t.rows[t.rows["tuned_values"].notna()].drop_duplicates("label")
    if len(tuned):
        gaps = ", ".join(f"{r['label']} {r['tuned_gap']:+.1f}" for _, r in tuned.iterrows() if not math.isnan(r["tuned_gap"]))
        text += f"; {len(tuned)} method(s) tuned by a search (tuned - defaults: {gaps or 'n/a'})"
    return text + "."


def _peak(part: pd.DataFrame, col: str, label: str = "label") -> str:
    part = part[part[col].notna()]
    if part.empty:
        return "n/a"
    top = part.loc[part[col].idxmax()]
    return f"{top[label]} ({top[col]:.1f})"


def figure_reading(name: str, t: TableResult) -> str:
    rows = t.rows.drop_duplicates("label")
    if name == "table2":
        mu_line, beta_line = rows[rows["beta"] == 5], rows[rows["mu"] == 5]
        return ("AP vs mu at beta=5 and vs beta at mu=5, ours (mean ± std, left axis) and the paper "
                f"(right axis): ours peaks at {_peak(mu_line, 'AP_mean')} on the mu line and "
                f"{_peak(beta_line, 'AP_mean')} on the beta line; the paper at "
                f"{_peak(mu_line, 'AP_paper')} and {_peak(beta_line, 'AP_paper')}.")
    ran = rows[rows["n_runs"] > 0]
    return (f"bars per point we ran, ours (mean ± std, left axis) vs the paper (right axis): ours "
            f"highest at {_peak(ran, 'AP_mean')}, the paper highest among them at {_peak(ran, 'AP_paper')}.")


def curves_reading(history: pd.DataFrame, labels: dict[str, str]) -> str:
    data = history[history["run_id"].isin(labels)]
    if data.empty:
        return "AP and loss per epoch: no metric history logged by the finished runs."
    last = data.sort_values("step").groupby(["run_id", "key"]).tail(1)
    parts = []
    for key, scale, name in (("loss", 1.0, "final loss"), ("AP", 100.0, "final AP")):
        v = last[last["key"] == key]["value"] * scale
        if len(v):
            parts.append(f"{name} {v.min():.{3 if key == 'loss' else 1}f} to {v.max():.{3 if key == 'loss' else 1}f}")
    return (f"AP and loss per epoch, mean over finished seeds, {len(set(labels.values()))} points: "
            + "; ".join(parts) + " across runs.")


def _write_table(t: TableResult, out: Path) -> list[Path]:
    md, csv = out / f"{t.name}.md", out / f"{t.name}.csv"
    md.write_text(t.markdown)
    csv_frame(t).to_csv(csv, index=False, float_format="%.4f")
    return [md, csv]


def build_report(experiments: list[str] | None = None, out: Path | str = "reports",
                 tracking_uri: str | None = None) -> Report:
    """Read the trial runs of ``experiments`` (all when None) from ``tracking_uri`` (the sweep's
    store when None) and write every table found, its figures, and the README index."""
    out = Path(out)
    uri, client, runs = load.read(tracking_uri, experiments)
    runs, older = load.latest_revision(runs)
    found = list(dict.fromkeys(runs.get(column(Tag.TABLE), pd.Series(dtype=str)).dropna()))
    known = [t for t in SPECS if t in found]
    if not known:
        raise DwlabError(
            f"{len(runs)} trial run(s) at {uri}, but none tagged with a table this report knows "
            f"({', '.join(SPECS)}); {Tag.TABLE} tags found: {', '.join(map(str, found)) or 'none'}"
        )
    out.mkdir(parents=True, exist_ok=True)
    rows_runs = split_roles(runs)[0]  # a search sweep's final runs are columns, not rows
    agg = aggregate(rows_runs[rows_runs[column(Tag.TABLE)].isin(known)])
    report = Report(out, uri, {})
    report.skipped += _untabled(runs, found)
    for name in known:
        t = build_table(SPECS[name], agg, runs, older=older.get(name, 0))
        report.tables[name] = t
        report.files += _write_table(t, out)
    labels = {name: run_labels(t, runs) for name, t in report.tables.items()}
    history = load.load_histories(client, [rid for lab in labels.values() for rid in lab])
    for name, t in report.tables.items():
        report.index.append((f"{name}.md", f"{t.title}: " + table_reading(t)))
        scale = t.header["scale"]
        if name == "table2":
            fig = figures.table2_figure(t.rows, scale, out / "table2.png")
        else:
            fig = figures.bars_figure(t.rows, SPECS[name].title, scale, out / f"{name}.png")
        report.files.append(fig)
        report.index.append((fig.name, figure_reading(name, t)))
        curves = figures.curves_figure(history, labels[name], name.replace("table", "Table "),
                                       out / f"curves_{name}.png")
        report.files.append(curves)
        report.index.append((curves.name, curves_reading(history, labels[name])))
    gamma1s = tuple(sorted({k[0] for k in paper.TABLE3}))
    pneg = figures.pneg_figure(out / "fig3_pneg.png", gamma1s)
    report.files.append(pneg)
    report.index.append((pneg.name, (
        f"Fig. 3: P_neg(IoU) (Eq. 5-6) for gamma1 in {', '.join(f'{g:g}' for g in gamma1s)}: 1 below "
        "IoU 0.5, falling to 0 at 0.95; a larger gamma1 keeps P_neg higher at mid IoUs "
        f"(paper default gamma1 = {paper.DEFAULTS['gamma1']})."
    )))
    for name in report.tables:
        _weight_map_figure(name, runs, client, out, report)
    _write_reproduction(report, rows_runs)
    readme = out / "README.md"
    readme.write_text(render_index(report, experiments))
    report.files.append(readme)
    return report


def _write_reproduction(report: Report, runs: pd.DataFrame) -> None:
    """``REPRODUCTION.md``: the paper's claims, each with ours and a verdict (``claims``)."""
    path = report.out / "REPRODUCTION.md"
    path.write_text(claims.render(report.tables, runs))
    report.files.append(path)
    verdicts = [c[3] for c in claims.claims(report.tables, runs)]
    report.index.append((path.name, (
        f"the paper's {len(verdicts)} claims, each with a verdict: "
        + ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
    )))


def _untabled(runs: pd.DataFrame, found: list[str]) -> list[str]:
    """A line per ``dwlab.table`` tag of the runs that names no table this report knows."""
    out = []
    for tag in found:
        if tag not in SPECS:
            n = int((runs[column(Tag.TABLE)] == tag).sum())
            why = "their sweep names no table" if tag == "" else f"tagged {Tag.TABLE}={tag!r}, not a paper table"
            out.append(f"{n} trial run(s) in no table: {why}")
    return out


def _weight_map_figure(name: str, runs: pd.DataFrame, client, out: Path, report: Report) -> None:
    """Fig. 5 of the table's best finished run: its checkpoint (in its run directory, else its
    MLflow artifact) on the val image with the most objects."""
    from dwlab.visualize import plot_checkpoint_weights

    done = runs[(runs[column(Tag.TABLE)] == name) & (runs["status"] == "FINISHED")]
    if "metrics.AP" not in done or done["metrics.AP"].isna().all():
        report.skipped.append(f"Fig. 5 for {name}: no finished run with an AP")
        return
    best = done.loc[done["metrics.AP"].idxmax()]
    label = f"{best.get(column(Tag.POINT))}, seed {best.get(column(Tag.SEED))}"
    ckpt = Path(str(best.get(column(Tag.RUN_DIR), ""))) / "checkpoints" / "last.pt"
    with tempfile.TemporaryDirectory() as tmp:
        if not ckpt.is_file():
            try:
                ckpt = Path(client.download_artifacts(best["run_id"], "checkpoints/last.pt", tmp))
            except Exception as err:  # no artifact logged, or an artifact store out of reach
                report.skipped.append(f"Fig. 5 for {name}: no checkpoint of run {label} ({type(err).__name__})")
                return
        fig = plot_checkpoint_weights(ckpt, None, out / f"fig5_{name}.png", label=label)
    report.files.append(fig)
    report.index.append((fig.name, (
        f"Fig. 5 style maps of the best {name} run ({label}, AP {100 * best['metrics.AP']:.1f}): cls score, "
        "IoU, DW pos weight and neg weight over the anchors of the val image with the most objects, per level."
    )))


def render_index(report: Report, experiments: list[str] | None) -> str:
    args = "".join(f" --experiment {e}" for e in experiments or [])
    lines = [
        "# dwlab report",
        "",
        f"Generated by `dwlab report{args} --out {report.out}` from the trial runs in the MLflow store "
        "the sweeps wrote. Ours: COCO-style AP in percent, mean ± sample std over seeds. "
        f"The paper's numbers: {paper.SETTING}"
        + "".join(f"; {name.replace('table', 'Table ')}: {paper.setting(name)}" for name in report.tables
                  if name in paper.SETTINGS) + ".",
        "",
    ]
    scales = {t.header["scale"] for t in report.tables.values()}
    if scales != {"paper"}:
        lines += [f"> Scale: {', '.join(sorted(scales))}. Not a COCO reproduction unless the scale is "
                  "'paper'; see each table's header.", ""]
    lines += ["| file | reading |", "|---|---|"]
    lines += [f"| [{path}]({path}) | {text.replace('|', '/')} |" for path, text in report.index]
    csvs = ", ".join(f"[{n}.csv]({n}.csv)" for n in report.tables)
    lines += ["", f"The same numbers, unrounded: {csvs}.", ""]
    if report.skipped:
        lines += ["Not produced:", ""] + [f"- {s}" for s in report.skipped] + [""]
    return "\n".join(lines)
