"""Figures of the DW paper from plain tensors: Fig. 3 (P_neg vs IoU), Fig. 5 (weight maps) and
Table 1 (pos / neg weights of the soft methods).

Matplotlib's object API with the Agg canvas (PNG), so the global backend is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dwlab.assign.dw import p_neg

WEIGHT_MAP_COLUMNS = ("score", "iou", "pos", "neg")
_COLUMN_TITLES = {"score": "cls score", "iou": "IoU", "pos": "pos weight", "neg": "neg weight"}


def plot_pneg(
    out_path: str | Path, gamma1s: Sequence[float] = (1, 2, 3, 4, 5), *, num: int = 501, **kw
) -> Path:
    """Fig. 3: ``P_neg(iou)`` (Eq. 5-6) against IoU, one curve per gamma1.

    ``kw`` goes to ``dwlab.assign.dw.p_neg`` (``low``, ``high``). Writes a PNG; returns its path.
    """
    out_path = Path(out_path)
    iou = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for gamma1 in gamma1s:
        ax.plot(iou.numpy(), p_neg(iou, gamma1, **kw).numpy(), label=f"$\\gamma_1$ = {gamma1:g}")
    ax.set_xlabel("IoU")
    ax.set_ylabel(r"$P_{neg}$(IoU)")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Probability of being a negative (Eq. 5-6)")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=150)
    return out_path


def _as_array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def plot_weight_maps(
    per_level_maps: Mapping[str, Mapping[str, object]],
    out_path: str | Path,
    *,
    columns: Sequence[str] = WEIGHT_MAP_COLUMNS,
    title: str | None = None,
) -> Path:
    """Fig. 5: one image's maps as heatmaps, rows = FPN levels, columns = ``columns``.

    per_level_maps: ``{"P3": {"score": [H, W], "iou": [H, W], "pos": [H, W], "neg": [H, W]}, ...}``
    (tensors or arrays; ``DWAssigner.weight_maps`` builds it). Scores and IoU share the [0, 1]
    colour range; each weight map gets its own range (pos weights are small and sum to 1 per
    GT). Writes a PNG; returns its path.
    """
    if not per_level_maps:
        raise ValueError("per_level_maps is empty")
    out_path = Path(out_path)
    levels = list(per_level_maps)
    fig = Figure(figsize=(3.0 * len(columns), 2.6 * len(levels)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(levels), len(columns), squeeze=False)
    for r, level in enumerate(levels):
        for c, key in enumerate(columns):
            if key not in per_level_maps[level]:
                raise ValueError(f"level {level!r} has no {key!r} map (has {sorted(per_level_maps[level])})")
            arr = _as_array(per_level_maps[level][key])
            vmin, vmax = (0.0, 1.0) if key in ("score", "iou") else (0.0, max(float(arr.max()), 1e-12))
            ax = axes[r][c]
            im = ax.imshow(arr, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_COLUMN_TITLES.get(key, key))
            if c == 0:
                ax.set_ylabel(level)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path


def plot_table1(
    out_path: str | Path,
    *,
    ious: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
    scores: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    methods: Sequence[str] | None = None,
    num: int = 201,
) -> Path:
    """Table 1 as curves: for each soft method (rows), w_pos and w_neg against the score at fixed
    IoUs, and against the IoU at fixed scores (``dwlab.assign.table1``, paper defaults).

    DW's and AutoAssign's w_pos are drawn before their per-GT bag normalisation; TOOD's t is not
    normalised per GT. Writes a PNG; returns its path.
    """
    from dwlab.assign.table1 import TABLE1

    methods = list(TABLE1) if methods is None else list(methods)
    unknown = [m for m in methods if m not in TABLE1]
    if unknown or not methods:
        raise ValueError(f"unknown Table 1 methods {unknown} (known: {', '.join(TABLE1)})")
    out_path = Path(out_path)
    grid = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
    fig = Figure(figsize=(14, 2.6 * len(methods)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(methods), 4, squeeze=False)
    for r, name in enumerate(methods):
        row = TABLE1[name]
        panels = [
            ("score", ious, "IoU", lambda v: row.weights(grid, torch.tensor(v, dtype=torch.float64))),
            ("IoU", scores, "s", lambda v: row.weights(torch.tensor(v, dtype=torch.float64), grid)),
        ]
        for p, (xlabel, fixed, fixed_name, fn) in enumerate(panels):
            for value in fixed:
                w_pos, w_neg = fn(value)
                for k, w in enumerate((w_pos, w_neg)):
                    w = w.expand_as(grid)
                    axes[r][2 * p + k].plot(grid.numpy(), w.numpy(), label=f"{fixed_name}={value:g}")
            for k, (which, formula) in enumerate((("w_pos", row.w_pos_formula), ("w_neg", row.w_neg_formula))):
                ax = axes[r][2 * p + k]
                ax.set_xlabel(xlabel)
                ax.set_xlim(0, 1)
                ax.grid(alpha=0.3)
                ax.set_title(f"{row.paper}: {which} = {formula}", fontsize=8)
                if k == 0:  # one legend per pair of panels
                    ax.legend(fontsize=6)
        axes[r][0].set_ylabel(f"{row.paper}\nt = {row.t}", fontsize=8)
    fig.suptitle("Table 1: pos / neg loss weights of a positive anchor vs score and IoU")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path


def read_curve(run_dir: str | Path) -> dict[str, np.ndarray]:
    """A run's learning curve from its ``metrics.jsonl``: ``images_seen`` and val ``AP`` (percent)
    at each evaluated epoch."""
    import json

    text = (Path(run_dir) / "metrics.jsonl").read_text()
    rows = [row for row in map(json.loads, filter(str.strip, text.splitlines())) if "AP" in row]
    return {
        "images_seen": np.array([row["images_seen"] for row in rows], dtype=float),
        "AP": np.array([100.0 * row["AP"] for row in rows]),
    }


def plot_learning_curves(out_path: str | Path, curves: Mapping[str, Mapping[str, np.ndarray]], *, title: str = "") -> Path:
    """Val AP (%) against images seen (thousands), one line per labelled curve (``read_curve``
    output). Writes a PNG; returns its path."""
    out_path = Path(out_path)
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ax.plot(curve["images_seen"] / 1000.0, curve["AP"], "o-", markersize=3, label=label)
    ax.set_xlabel("training images seen (thousands)")
    ax.set_ylabel("val AP (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=150)
    return out_path
