"""The MLflow vocabulary that the sweep (the only writer) and the report (a reader) share: where
the store is, the tag names, and the filter that selects trial runs. Renaming a tag here
renames it on both sides.

Layout of a sweep in the store (see ``dwlab.sweep.tracking``): one experiment per sweep; one
parent run per ``dwlab sweep`` invocation (``Tag.KIND = SWEEP``); one nested run per
(point, seed) (``Tag.KIND = TRIAL``). A reader sees a tag ``t`` of a run as the pandas
column ``column(t)`` (MLflow's ``tags.<name>`` convention).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from unittest import mock
from urllib.parse import unquote, urlparse

DEFAULT_DIR = Path("mlruns")  # relative to the working directory, like ``mlflow ui``'s default


class Tag:
    """Tag names. Experiment: TABLE, SCALE. Both run kinds: KIND, SWEEP, TABLE, SCALE,
    SWEEP_FILE, GIT_COMMIT, VERSION, HOST. Parent runs: TRIALS, SKIPPED, WARNINGS and the
    summary counts (``dwlab.finished`` ...). Trial runs: the rest."""

    KIND = "dwlab.kind"
    SWEEP = "dwlab.sweep"
    TABLE = "dwlab.table"
    SCALE = "dwlab.scale"
    SWEEP_FILE = "dwlab.sweep_file"
    GIT_COMMIT = "dwlab.git_commit"
    VERSION = "dwlab.version"
    HOST = "dwlab.host"
    TRIALS = "dwlab.trials"
    SKIPPED = "dwlab.skipped"
    WARNINGS = "dwlab.warnings"
    PARENT = "mlflow.parentRunId"
    POINT = "dwlab.point"
    POINT_LABEL = "dwlab.point_label"
    POINT_OVERRIDES = "dwlab.point_overrides"
    SEED = "dwlab.seed"
    CONFIG_HASH = "dwlab.config_hash"
    DEVICE = "dwlab.device"
    WORKER_PID = "dwlab.worker_pid"
    DATASET = "dwlab.dataset"
    BACKBONE = "dwlab.backbone"
    ASSIGNER = "dwlab.assigner"
    WORLD_SIZE = "dwlab.world_size"
    BATCH_PER_WORKER = "dwlab.batch_per_worker"
    GLOBAL_BATCH = "dwlab.global_batch"
    LR = "dwlab.lr"
    RUN_DIR = "dwlab.run_dir"
    RESUMED = "dwlab.resumed"
    RETRIES = "dwlab.retries"
    ERROR = "dwlab.error"
    LAST_ERROR = "dwlab.last_error"
    CLOSED_REASON = "dwlab.closed_reason"


TRIAL = "trial"  # values of Tag.KIND
SWEEP = "sweep"


def kind_filter(kind: str) -> str:
    """The ``search_runs`` filter for runs of ``kind`` (TRIAL or SWEEP)."""
    return f"tags.`{Tag.KIND}` = '{kind}'"


TRIAL_FILTER = kind_filter(TRIAL)


def column(tag: str) -> str:
    """The column holding ``tag`` in a frame of runs (``report.load``): ``tags.<tag>``."""
    return f"tags.{tag}"


def default_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the sqlite database ``./mlruns/mlflow.db`` as an
    absolute path. Creates nothing (see ``prepare``)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{DEFAULT_DIR.resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:///rel`` is relative to the working
    directory, ``sqlite:////abs`` absolute, as in SQLAlchemy); None for any other store and for
    an in-memory database."""
    if urlparse(uri).scheme != "sqlite" or not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?")[0])
    return Path(path) if path and path != ":memory:" else None


def prepare(uri: str) -> None:
    """Create the directory of a sqlite store (MLflow creates the database file itself)."""
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live beside the database (``<db dir>/artifacts/<name>``);
    other stores (a tracking server) choose for themselves."""
    path = sqlite_path(uri)
    if path is None:
        return None
    return (path.parent.resolve() / "artifacts" / experiment).as_uri()


FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def fail_fast_http() -> AbstractContextManager:
    """A context in which MLflow's HTTP client gives up on a tracking server that does not
    answer after few retries and a short timeout (``FAIL_FAST_HTTP``; values the user set win)."""
    return mock.patch.dict(os.environ, {k: os.environ.get(k, v) for k, v in FAIL_FAST_HTTP.items()})
