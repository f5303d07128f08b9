"""The anchor grid as the assigners see it: ``Anchors.grid``'s points recovered as per-level
row-major grids (``level_grids``, ``split_levels`` for plots), and as device tensors for the
sparse inside-box enumeration of ``common.inside_pairs`` (``GridLayout``), read on the host
once per feature-map shape (``anchor_layout``, keyed by ``Anchors.recipe``)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from dwlab.models.outputs import Anchors


@dataclass(frozen=True)
class LevelGrid:
    """One FPN level laid out row-major: ``points[start + i * width + j] ==
    (x0 + j * stride, y0 + i * stride)`` for ``i < height``, ``j < width``."""

    level: int
    start: int
    height: int
    width: int
    stride: float
    x0: float
    y0: float


def level_grids(
    points: Tensor, strides: Tensor, levels: Tensor, atol: float = 1e-3
) -> list[LevelGrid] | None:
    """Recover the per-level grids of ``Anchors.grid`` points, or None if they are not such grids.

    points ``Tensor[A, 2]`` (x, y) pixels; strides ``Tensor[A]``; levels ``Tensor[A]`` long,
    each level one contiguous run.
    """
    if points.shape[0] == 0:
        return []
    pts, strd, lvl = points.detach().float().cpu(), strides.detach().float().cpu(), levels.cpu()
    runs, counts = torch.unique_consecutive(lvl, return_counts=True)
    if len(set(runs.tolist())) != len(runs):
        return None  # a level split into several runs
    grids, start = [], 0
    for level, n in zip(runs.tolist(), counts.tolist()):
        p, s = pts[start : start + n], strd[start : start + n]
        stride = float(s[0])
        if stride <= 0 or not bool((s == stride).all()):
            return None
        width = int((p[:, 1] == p[0, 1]).sum())
        height = n // width
        if width * height != n:
            return None
        x0, y0 = float(p[0, 0]), float(p[0, 1])
        ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        expect = torch.stack([x0 + jj.reshape(-1) * stride, y0 + ii.reshape(-1) * stride], dim=-1)
        if not torch.allclose(expect, p, rtol=0.0, atol=atol):
            return None
        grids.append(LevelGrid(level, start, height, width, stride, x0, y0))
        start += n
    return grids


def split_levels(values: Tensor, points: Tensor, strides: Tensor, levels: Tensor) -> list[Tensor]:
    """Per-anchor ``Tensor[A, ...]`` -> one ``Tensor[H, W, ...]`` per level (P3 first)."""
    grids = level_grids(points, strides, levels)
    if grids is None:
        raise ValueError("anchor points are not row-major per-level grids (Anchors.grid)")
    tail = values.shape[1:]
    return [values[g.start : g.start + g.height * g.width].reshape(g.height, g.width, *tail) for g in grids]


@dataclass(frozen=True)
class GridLayout:
    """Anchor points that are exactly per-level grids (``Anchors.grid``'s), as device tensors for
    ``inside_pairs``: level l's point ``start[l] + i * width[l] + j`` is ``(xs[l, j], ys[l, i])``.

    grids: the levels (``level_grids``); xs ``Tensor[L, W_max]`` and ys ``Tensor[L, H_max]`` the
    points' own coordinates, strictly increasing, padded with +inf; start, width ``Tensor[L]`` long.
    """

    grids: tuple[LevelGrid, ...]
    xs: Tensor
    ys: Tensor
    start: Tensor
    width: Tensor


def grid_layout(points: Tensor, strides: Tensor, levels: Tensor) -> GridLayout | None:
    """The ``GridLayout`` of the points, or None unless every level is an exact row-major grid
    (one row of x coordinates shared by every row, one y per row, both strictly increasing).
    Reads the points on the host: cache it (``anchor_layout``)."""
    grids = level_grids(points, strides, levels)
    if grids is None or not grids:
        return None
    pts = points.detach().cpu()
    xs, ys = [], []
    for g in grids:
        p = pts[g.start : g.start + g.height * g.width].reshape(g.height, g.width, 2)
        x, y = p[0, :, 0], p[:, 0, 1]
        exact = bool((p[..., 0] == x).all()) and bool((p[..., 1] == y[:, None]).all())
        if not exact or bool((x.diff() <= 0).any()) or bool((y.diff() <= 0).any()):
            return None
        xs.append(x)
        ys.append(y)
    inf = float("inf")
    pad = lambda rows: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=inf)  # noqa: E731
    device = points.device
    ints = torch.tensor([[g.start, g.width] for g in grids], dtype=torch.long)
    start, width = ints.to(device).unbind(1)
    return GridLayout(tuple(grids), pad(xs).to(device), pad(ys).to(device), start, width)


_LAYOUTS: OrderedDict[tuple, GridLayout | None] = OrderedDict()
LAYOUT_CACHE_SIZE = 256  # distinct feature-map shapes kept (multi-size batches: one per padded size)


def anchor_layout(anchors: Anchors) -> GridLayout | None:
    """``grid_layout`` of ``anchors``, cached per ``Anchors.recipe`` (feature-map shapes,
    strides, offset, device): the points are read on the host once per shape, not every step.
    Anchors without a recipe are laid out anew on each call."""
    key = anchors.recipe
    if key is None:
        return grid_layout(anchors.points, anchors.strides, anchors.levels)
    if key in _LAYOUTS:
        _LAYOUTS.move_to_end(key)
        return _LAYOUTS[key]
    layout = _LAYOUTS[key] = grid_layout(anchors.points, anchors.strides, anchors.levels)
    if len(_LAYOUTS) > LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return layout
