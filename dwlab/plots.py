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
from matplotlib.patches import Rectangle

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
    image: object | None = None,
    boxes: object | None = None,
) -> Path:
    """Fig. 5: one image's maps as heatmaps, one row per map in ``columns`` (the names of the
    maps, kept from the per-level layout), one column per FPN level.

    per_level_maps: ``{"P3": {"score": [H, W], "iou": [H, W], "pos": [H, W], "neg": [H, W]}, ...}``
    (tensors or arrays; ``DWAssigner.weight_maps`` builds it). Each row has one colour scale and
    one colour bar: [0, 1] for scores and IoU, [0, the row's largest value] for a weight, so a
    level whose weights are near zero looks near zero. ``image`` ``[H, W, 3]`` in [0, 1] (with
    its GT ``boxes`` ``[G, 4]`` xyxy pixels) is drawn first, in a column of its own. Writes a
    PNG; returns its path.
    """
    out_path = Path(out_path)
    fig = weight_map_figure(per_level_maps, columns=columns, title=title, image=image, boxes=boxes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    return out_path


def weight_map_figure(
    per_level_maps: Mapping[str, Mapping[str, object]],
    *,
    columns: Sequence[str] = WEIGHT_MAP_COLUMNS,
    title: str | None = None,
    image: object | None = None,
    boxes: object | None = None,
) -> Figure:
    """The figure ``plot_weight_maps`` writes (same arguments, less the path)."""
    if not per_level_maps:
        raise ValueError("per_level_maps is empty")
    levels = list(per_level_maps)
    for level in levels:
        missing = [k for k in columns if k not in per_level_maps[level]]
        if missing:
            raise ValueError(f"level {level!r} has no {missing[0]!r} map (has {sorted(per_level_maps[level])})")
    first = 1 if image is not None else 0
    fig = Figure(figsize=(2.4 * (len(levels) + first) + 0.8, 2.3 * len(columns)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(columns), len(levels) + first, squeeze=False)
    if image is not None:
        _draw_input(axes[:, 0], _as_array(image), None if boxes is None else _as_array(boxes))
    for r, key in enumerate(columns):
        arrays = [_as_array(per_level_maps[level][key]) for level in levels]
        vmax = 1.0 if key in ("score", "iou") else max(max(float(a.max()) for a in arrays), 1e-12)
        for c, (level, arr) in enumerate(zip(levels, arrays)):
            ax = axes[r][c + first]
            im = ax.imshow(arr, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{level} ({arr.shape[1]}x{arr.shape[0]})")
            if c == 0:
                ax.set_ylabel(_COLUMN_TITLES.get(key, key))
        fig.colorbar(im, ax=list(axes[r][first:]), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title)
    return fig


def _draw_input(column_axes, image: np.ndarray, boxes: np.ndarray | None) -> None:
    """The input image with its GT boxes in the top axis of ``column_axes``; the rest blank."""
    top = column_axes[0]
    top.imshow(np.clip(image, 0.0, 1.0), interpolation="nearest")
    for x0, y0, x1, y1 in [] if boxes is None else boxes.tolist():
        top.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1))
    top.set_title("input, GT boxes")
    top.set_xticks([])
    top.set_yticks([])
    for ax in column_axes[1:]:
        ax.axis("off")


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
