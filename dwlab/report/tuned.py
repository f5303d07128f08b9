"""A table's "tuned" columns, from the final runs of search sweeps (``dwlab.sweep.search_run``).

A search sweep's final runs carry a role (``Tag.ROLE``): ``tuned`` (the values its search chose,
``Tag.CHOSEN``, from the search run ``Tag.SEARCH_RUN``) or ``defaults`` (the method at its
defaults, on the same seeds). They are not rows of their own: each search attaches to the row
of its method at defaults (the key of its defaults runs; without them, the key of its tuned runs,
which for Table 6 is the method) and gives it:

- ``tuned_values``: the chosen values;
- ``AP_defaults_*``: the defaults runs' AP (without ``search.defaults``: the row's own runs);
- ``AP_tuned_*``: the tuned runs' AP, mean, sample std and n over seeds;
- ``tuned_gap``, ``tuned_significant``: tuned - defaults, and whether it is beyond seed noise
  (``tables.noise_threshold``).

Where a method has several searches (e.g. ASHA beside full-length random search, in two sweeps),
the row takes the latest one and ``searches`` lists them all.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from dwlab.store import ROLE_DEFAULTS, ROLE_TUNED, Tag, column
COLUMNS = ("tuned_values", "AP_defaults_mean", "AP_defaults_std", "AP_defaults_n", "AP_tuned_mean", "AP_tuned_std",
           "AP_tuned_n", "tuned_gap", "tuned_significant", "tuned_search")  # fmt: skip


def split_roles(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs that are rows of a table, a search sweep's final runs)."""
    role = runs.get(column(Tag.ROLE))
    if role is None:
        return runs, runs.iloc[0:0]
    has = role.notna() & (role != "")
    return runs[~has], runs[has]


def values_text(chosen: dict) -> str:
    """``"beta=3.21, mu=6.02"``: the last component of each key."""
    return ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in chosen.items())  # fmt: skip


def _stat(runs: pd.DataFrame) -> tuple[float, float, int]:
    v = runs.loc[runs["status"] == "FINISHED"].get("metrics.AP", pd.Series(dtype=float)).dropna().astype(float) * 100
    n = len(v)
    return (float(v.mean()) if n else math.nan, float(v.std(ddof=1)) if n >= 2 else math.nan, n)


def searches(role_runs: pd.DataFrame, key_of) -> pd.DataFrame:
    """One row per search of the table's final runs: its row key, method, sweep, description,
    chosen values, score on the tune split, AP at defaults and tuned (NaN, n=0 where not run)."""
    rows = []
    if role_runs.empty or column(Tag.SEARCH_RUN) not in role_runs:
        return pd.DataFrame()
    tuned = role_runs[role_runs[column(Tag.ROLE)] == ROLE_TUNED]
    for (experiment, search_run), group in tuned.groupby(["experiment", column(Tag.SEARCH_RUN)], sort=False):
        first = group.iloc[0]
        method = first.get(column(Tag.SEARCH))
        mates = role_runs[(role_runs["experiment"] == experiment) & (role_runs[column(Tag.ROLE)] == ROLE_DEFAULTS)
                          & (role_runs[column(Tag.SEARCH)] == method)]  # fmt: skip
        key = key_of(mates.iloc[0]) if len(mates) else key_of(first)
        score = pd.to_numeric(first.get(column(Tag.TUNE_SCORE)), errors="coerce")
        d_mean, d_std, d_n = _stat(mates)
        t_mean, t_std, t_n = _stat(group)
        rows.append({
            "key": key, "method": method, "experiment": experiment, "search_run": search_run,
            "description": first.get(column(Tag.SEARCH_DESC), ""), "chosen": json.loads(first.get(column(Tag.CHOSEN)) or "{}"),
            "tune_score": float(score) * 100 if pd.notna(score) else math.nan, "started": group["start_time"].min(),
            "AP_defaults_mean": d_mean, "AP_defaults_std": d_std, "AP_defaults_n": d_n,
            "AP_tuned_mean": t_mean, "AP_tuned_std": t_std, "AP_tuned_n": t_n,
        })  # fmt: skip
    return pd.DataFrame(rows)


def attach(rows: pd.DataFrame, found: pd.DataFrame, noise) -> pd.DataFrame:
    """``rows`` (a table's layout) with the ``COLUMNS`` of each row's latest search; ``noise`` is
    ``tables.noise_threshold`` at the table's scale. Searches' defaults without runs of their
    own take the row's AP."""
    rows = rows.copy()
    for name in COLUMNS:
        rows[name] = None if name in ("tuned_values", "tuned_significant", "tuned_search") else math.nan
    if found.empty:
        return rows
    latest = found.sort_values("started").groupby("key", sort=False).tail(1)
    for _, s in latest.iterrows():
        for i in rows.index[rows["key"] == s["key"]]:
            mean, std, n = s["AP_defaults_mean"], s["AP_defaults_std"], s["AP_defaults_n"]
            if n == 0:
                mean, std, n = rows.at[i, "AP_mean"], rows.at[i, "AP_std"], rows.at[i, "AP_n"]
            gap = s["AP_tuned_mean"] - mean
            thr = noise(s["AP_tuned_std"], s["AP_tuned_n"], std, n) if s["AP_tuned_n"] and n else None
            rows.loc[i, ["AP_defaults_mean", "AP_defaults_std", "AP_defaults_n"]] = [mean, std, n]
            rows.loc[i, ["AP_tuned_mean", "AP_tuned_std", "AP_tuned_n"]] = [s["AP_tuned_mean"], s["AP_tuned_std"], s["AP_tuned_n"]]
            rows.at[i, "tuned_values"] = values_text(s["chosen"])
            rows.at[i, "tuned_search"] = s["experiment"]
            rows.at[i, "tuned_gap"] = gap
            rows.at[i, "tuned_significant"] = None if thr is None or math.isnan(gap) else bool(abs(gap) >= thr and abs(gap) > 1e-9)
    return rows
