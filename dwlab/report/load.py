"""Read the sweep's trial runs from MLflow into pandas (read-only: never creates a store).

One row per trial run (``dwlab.store.TRIAL_FILTER``), in MLflow's own column convention:
``run_id``, ``experiment``, ``status``, ``params.<dotted key>`` (strings, as logged),
``metrics.<key>`` (the last step's value), ``tags.<key>``. Metric histories are read on demand
by :func:`load_histories`.
"""

from __future__ import annotations

import pandas as pd

from dwlab.errors import DwlabError
from dwlab.store import TRIAL_FILTER, Tag, column, connect, default_uri, sqlite_path

PAGE = 1000


def open_store(uri: str):
    """An ``MlflowClient`` on ``uri``, after checking the store answers.

    A sqlite URI whose file does not exist is refused rather than created (MLflow would
    create an empty store, and the report would then say "no runs" about a mistyped path).
    """
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise DwlabError(f"cannot reach the MLflow store {uri}: no such database file")
    return connect(uri)


def find_experiments(client, uri: str, names: list[str] | None) -> list:
    """The named experiments (every name must exist), or every experiment when ``names`` is
    empty or None."""
    known = client.search_experiments()
    by_name = {e.name: e for e in known}
    if not names:
        return [e for e in known]
    missing = [n for n in names if n not in by_name]
    if missing:
        listed = ", ".join(sorted(by_name)) or "none"
        plural = "s" if len(missing) > 1 else ""
        raise DwlabError(
            f"no experiment{plural} named {', '.join(repr(m) for m in missing)} in {uri} "
            f"(experiments there: {listed})"
        )
    return [by_name[n] for n in dict.fromkeys(names)]


def load_runs(client, uri: str, experiments: list) -> pd.DataFrame:
    """Every trial run of ``experiments`` as one row; a ``DwlabError`` when there are none."""
    names = {e.experiment_id: e.name for e in experiments}
    rows: list[dict] = []
    token = None
    while True:
        page = client.search_runs(
            list(names), filter_string=TRIAL_FILTER, max_results=PAGE, page_token=token
        )
        for run in page:
            row = {
                "run_id": run.info.run_id,
                "experiment": names.get(run.info.experiment_id, run.info.experiment_id),
                "status": run.info.status,
                "start_time": run.info.start_time,
            }
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    if not rows:
        where = ", ".join(sorted(names.values())) or "no experiments"
        raise DwlabError(f"no dwlab trial runs in {where} at {uri} (run 'dwlab sweep' first)")
    return pd.DataFrame(rows).sort_values("start_time", kind="stable").reset_index(drop=True)


def load_histories(client, run_ids: list[str], keys: tuple[str, ...] = ("AP", "loss")) -> pd.DataFrame:
    """Metric histories as long rows ``run_id, key, step, value`` (one value per step: the last
    one logged)."""
    rows = [
        {"run_id": rid, "key": key, "step": m.step, "value": m.value, "timestamp": m.timestamp}
        for rid in run_ids
        for key in keys
        for m in client.get_metric_history(rid, key)
    ]
    frame = pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])
    frame = frame.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
    return frame.drop_duplicates(["run_id", "key", "step"], keep="last").drop(columns="timestamp")


def read(uri: str | None, experiments: list[str] | None) -> tuple[str, object, pd.DataFrame]:
    """``(uri, client, runs)``: open the store and load the trial runs of ``experiments``."""
    uri = uri or default_uri()
    client = open_store(uri)
    exps = find_experiments(client, uri, experiments)
    return uri, client, load_runs(client, uri, exps)


def latest_revision(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """``runs`` less, per table, the runs of a training revision older than the table's latest
    (``dwlab.TRAINING_REVISION``: the same config trained to other numbers then; a run without
    the tag is revision 1), and how many were left out per table. The latest is that of the
    table's FINISHED runs (a first run of a new revision, still training, leaves the table as it
    was), or of all its runs when none has finished. Runs without a table stay."""
    if len(runs) == 0:
        return runs, {}
    revision = pd.to_numeric(runs.get(column(Tag.REVISION), pd.Series(index=runs.index, dtype=object)), errors="coerce").fillna(1)
    table = runs.get(column(Tag.TABLE), pd.Series(index=runs.index, dtype=object))
    finished = revision.where(runs["status"] == "FINISHED")
    by_table = table.fillna("")
    latest = finished.groupby(by_table).transform("max").fillna(revision.groupby(by_table).transform("max"))
    old = table.notna() & (revision < latest)
    dropped = {str(k): int(v) for k, v in table[old].value_counts().items()}
    return runs[~old].reset_index(drop=True), dropped
