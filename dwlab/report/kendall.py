"""Kendall's tau-b between two orderings and its two-sided p-value, as ``scipy.stats.kendalltau``
computes them with its defaults (``method="auto"``, ``variant="b"``): the report's only use of
scipy, written out so that the offline bundle does not carry scipy (README, "Run on an offline
GPU host"). ``tests/test_kendall.py`` checks it against scipy.

Over the ``n (n - 1) / 2`` pairs: ``C`` concordant, ``D`` discordant, ``Tx`` tied in x (joint
ties included), ``Ty`` tied in y. Then ``tau_b = (C - D) / sqrt((P - Tx) (P - Ty))`` with ``P``
the number of pairs. The p-value is exact when neither side has ties and ``n <= 33`` (or at most
one pair is on the rarer side): the null distribution of ``C`` is that of the inversions of a
random permutation (Mahonian numbers, counted here in integers). Otherwise ``C - D`` is taken as
normal with the tie-corrected variance (Kendall 1970, eq. 4.4)::

    var = (m (2n + 5) - x1 - y1) / 18 + 2 Tx Ty / m + x0 y0 / (9 m (n - 2)),   m = n (n - 1)

where per variable, over its groups of ``t`` equal values, ``x0 = sum t (t - 1) (t - 2)`` and
``x1 = sum t (t - 1) (2t + 5)``. n < 2, a NaN, or one side all equal gives NaN, NaN.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

EXACT_MAX_N = 33  # scipy's bound for the exact p-value


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """``(tau_b, two-sided p-value)`` of the paired values ``x``, ``y`` (equal lengths)."""
    xs, ys = [float(v) for v in x], [float(v) for v in y]
    if len(xs) != len(ys):
        raise ValueError(f"kendall_tau: {len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 2 or any(math.isnan(v) for v in xs + ys):
        return math.nan, math.nan
    con = dis = xtie = ytie = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            xtie += dx == 0
            ytie += dy == 0
            con += dx * dy > 0
            dis += dx * dy < 0
    pairs = n * (n - 1) // 2
    if xtie == pairs or ytie == pairs:
        return math.nan, math.nan
    tau = max(-1.0, min(1.0, (con - dis) / math.sqrt(pairs - xtie) / math.sqrt(pairs - ytie)))
    if xtie == 0 and ytie == 0 and (n <= EXACT_MAX_N or min(dis, pairs - dis) <= 1):
        return tau, exact_p(n, con)
    x0, x1 = tie_sums(xs)
    y0, y1 = tie_sums(ys)
    m = n * (n - 1)
    var = (m * (2 * n + 5) - x1 - y1) / 18 + 2 * xtie * ytie / m + x0 * y0 / (9 * m * (n - 2))
    return tau, math.erfc(abs(con - dis) / math.sqrt(var) / math.sqrt(2))


def tie_sums(values: list[float]) -> tuple[int, int]:
    """``(sum t (t-1) (t-2), sum t (t-1) (2t+5))`` over the groups of ``t`` equal values."""
    groups = [t for t in Counter(values).values() if t > 1]
    return sum(t * (t - 1) * (t - 2) for t in groups), sum(t * (t - 1) * (2 * t + 5) for t in groups)


def exact_p(n: int, con: int) -> float:
    """Two-sided p-value of ``con`` concordant pairs among ``n`` untied values: twice the
    probability of at most ``min(con, P - con)`` inversions of a random permutation of ``n``."""
    pairs = n * (n - 1) // 2
    c = min(con, pairs - con)
    if n <= 2 or 2 * c == pairs:
        return 1.0
    counts = [1]  # counts[k]: permutations of j elements with k inversions, k <= c
    for j in range(2, n + 1):
        counts = [sum(counts[k - i] for i in range(min(k, j - 1) + 1) if k - i < len(counts)) for k in range(c + 1)]
    return min(1.0, 2 * sum(counts) / math.factorial(n))
