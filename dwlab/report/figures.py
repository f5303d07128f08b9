"""The report's figures: matplotlib PNGs of a fixed size (``FIGSIZE`` at ``DPI``).

Ours and the paper's numbers are measured at different scales (smoke vs COCO), so every
"paper vs ours" figure puts ours on the left axis (blue, mean ± std over seeds) and the paper on
a twin right axis (orange). Uses ``matplotlib.figure.Figure`` directly: no pyplot state, no GUI.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

FIGSIZE = (10.0, 5.0)  # inches
DPI = 100  # -> 1000 x 500 pixels
OURS, PAPER = "tab:blue", "tab:orange"
LINES, MARKERS = ("-", "--", ":"), ("o", "s", "^")  # the curves' styles past tab10's 10 colours


def _figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _std(values: pd.Series) -> np.ndarray:
    return values.fillna(0.0).to_numpy(dtype=float)


def _twin(ax, scale: str):
    ax2 = ax.twinx()
    ax.set_ylabel(f"AP ours (%, {scale} scale)", color=OURS)
    ax2.set_ylabel("AP paper (%, COCO)", color=PAPER)
    ax.tick_params(axis="y", colors=OURS)
    ax2.tick_params(axis="y", colors=PAPER)
    return ax2


def _line_panel(ax, part: pd.DataFrame, x: str, title: str, scale: str) -> None:
    part = part.drop_duplicates("label").sort_values(x)
    ours = part[part["AP_n"] > 0]
    ref = part[part["AP_paper"].notna()]
    ax2 = _twin(ax, scale)
    h1 = ax.errorbar(ours[x], ours["AP_mean"], yerr=_std(ours["AP_std"]), fmt="o-", color=OURS,
                     capsize=4, label="ours (mean ± std)")
    (h2,) = ax2.plot(ref[x], ref["AP_paper"], "s--", color=PAPER, label="paper")
    ax.set_xlabel(x)
    ax.set_xticks(sorted(set(part[x].dropna())))
    ax.set_title(title)
    ax.legend(handles=[h1, h2], loc="lower center", fontsize=8)


def table2_figure(rows: pd.DataFrame, scale: str, path: Path, beta: float = 5, mu: float = 5) -> Path:
    """AP vs mu at beta = 5 (left) and AP vs beta at mu = 5 (right)."""
    fig, (left, right) = _figure(2)
    _line_panel(left, rows[rows["beta"] == beta], "mu", f"Table 2: AP vs mu (beta = {beta:g})", scale)
    _line_panel(right, rows[rows["mu"] == mu], "beta", f"Table 2: AP vs beta (mu = {mu:g})", scale)
    return _save(fig, path)


def _zoom(ax, values: list[float]) -> None:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    pad = max(0.2 * (hi - lo), 0.5)
    ax.set_ylim(lo - pad, hi + pad)


def bars_figure(rows: pd.DataFrame, title: str, scale: str, path: Path) -> Path:
    """One bar pair per point we ran: ours (left axis, error bar = std) and the paper (right)."""
    part = rows[rows["n_runs"] > 0].drop_duplicates("label").reset_index(drop=True)
    fig, (ax,) = _figure()
    ax2 = _twin(ax, scale)
    x, w = np.arange(len(part)), 0.38
    mean, std = part["AP_mean"].to_numpy(dtype=float), _std(part["AP_std"])
    ax.bar(x - w / 2, np.nan_to_num(mean), w, yerr=std, capsize=4, color=OURS, label="ours (mean ± std)")
    ax2.bar(x + w / 2, part["AP_paper"].fillna(0.0), w, color=PAPER, alpha=0.85, label="paper")
    _zoom(ax, list(mean - std) + list(mean + std))
    _zoom(ax2, list(part["AP_paper"]))
    for i, r in part.iterrows():
        if r["AP_n"] == 0:
            ax.annotate("no finished run", (x[i] - w / 2, 0.02), xycoords=("data", "axes fraction"),
                        rotation=90, ha="center", va="bottom", fontsize=8)
        if math.isnan(r["AP_paper"]):
            ax2.annotate("not in paper", (x[i] + w / 2, 0.02), xycoords=("data", "axes fraction"),
                         rotation=90, ha="center", va="bottom", fontsize=8)
    rotation = 0 if len(part) <= 4 else 20 if len(part) <= 12 else 45  # 45: Table 6's 23 long labels
    ax.set_xticks(x, part["label"], rotation=rotation, ha="right" if rotation else "center",
                  rotation_mode="anchor", fontsize=8 if len(part) <= 12 else 7)
    ax.set_title(title + " (y axes zoomed)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    return _save(fig, path)


def line_style(i: int) -> dict:
    """The ``i``-th curve's colour, line and marker: the 10 colours of ``tab10``, then the same
    colours dashed with squares, then dotted with triangles, so that Table 6's 23 curves stay
    apart (``tab20``'s light shades read as their dark twins beside them)."""
    palette = matplotlib.colormaps["tab10"].colors
    k = (i // len(palette)) % len(LINES)
    return {"color": palette[i % len(palette)], "linestyle": LINES[k], "marker": MARKERS[k]}


def curves_figure(history: pd.DataFrame, labels: dict[str, str], title: str, path: Path) -> Path:
    """AP (percent) and loss per epoch, mean over the finished seeds of each point.

    ``history``: long rows ``run_id, key, step, value``; ``labels``: run_id -> point label
    (runs not in it are left out).
    """
    fig, (ax_ap, ax_loss) = _figure(2)
    data = history[history["run_id"].isin(labels)].copy()
    data["point"] = data["run_id"].map(labels)
    for i, point in enumerate(dict.fromkeys(labels.values())):
        style = line_style(i)
        for ax, key, scale in ((ax_ap, "AP", 100.0), (ax_loss, "loss", 1.0)):
            curve = data[(data["point"] == point) & (data["key"] == key)].groupby("step")["value"].mean()
            if len(curve):
                ax.plot(curve.index, curve.to_numpy() * scale, markersize=3, label=point if key == "loss" else None, **style)
    steps = data["step"]
    for ax in (ax_ap, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(steps):
            ax.set_xlim(steps.min() - 0.5, steps.max() + 0.5)
    evals = data[data["key"] == "AP"].groupby("run_id")["step"].nunique()
    once = len(evals) > 0 and evals.max() < 2  # a dot per run, not a curve: say why
    ax_ap.set(xlabel="epoch", ylabel="AP (%)",
              title=f"{title}: AP per epoch" + ("\n(evaluated at the end only; eval.every=N for a curve)" if once else ""))
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: training loss")
    if ax_loss.get_legend_handles_labels()[0]:
        fig.legend(loc="outside right upper", fontsize=7)
    return _save(fig, path)


def pneg_figure(path: Path, gamma1s: tuple[float, ...] = (1, 2, 3, 4, 5)) -> Path:
    """Fig. 3: P_neg vs IoU, one curve per gamma1 (Table 3's values), drawn by
    ``dwlab.plots.plot_pneg`` (its own size: 750 x 540 pixels)."""
    from dwlab.plots import plot_pneg  # imports torch: only here

    return plot_pneg(path, gamma1s)
