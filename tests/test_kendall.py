"""dwlab.report.kendall against scipy.stats.kendalltau (the report used scipy's; the bundle no
longer carries scipy), and hand-sized cases."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import kendalltau

from dwlab.report.kendall import exact_p, kendall_tau


def test_hand_sized_cases():
    # 4 values, one discordant pair of 6: tau = (5 - 1) / 6; P(C <= 1) = (1 + 3) / 24 per tail
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx((2 / 3, 2 * 4 / 24))
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx((-1.0, 2 / 6))
    assert exact_p(4, 3) == 1.0  # the middle of the distribution
    assert all(math.isnan(v) for v in kendall_tau([1], [2]))
    assert all(math.isnan(v) for v in kendall_tau([1, 1, 1], [1, 2, 3]))  # x all equal
    assert all(math.isnan(v) for v in kendall_tau([1, math.nan, 3], [1, 2, 3]))
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        kendall_tau([1, 2, 3], [1, 2])


@pytest.mark.parametrize("seed", range(40))
def test_matches_scipy_with_and_without_ties(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 3, 5, 8, 12, 20, 33, 34, 45])
    levels = rng.choice([3, 6, 1000])  # few levels: many ties (the asymptotic p-value)
    x = [rng.randrange(levels) / 10 for _ in range(n)]
    y = [v + rng.gauss(0, 0.3) if rng.random() < 0.7 else rng.randrange(levels) / 10 for v in x]
    if seed % 5 == 0:
        y = [round(v, 1) for v in y]
    got, want = kendall_tau(x, y), kendalltau(x, y)
    assert got == pytest.approx((float(want.statistic), float(want.pvalue)), rel=1e-9, abs=1e-12, nan_ok=True)


def test_exact_tail_matches_scipy_beyond_33_with_one_discordant_pair():
    x = list(range(40))
    y = [*range(40)]
    y[3], y[4] = y[4], y[3]
    got, want = kendall_tau(x, y), kendalltau(x, y)
    assert got == pytest.approx((want.statistic, want.pvalue), rel=1e-9)
