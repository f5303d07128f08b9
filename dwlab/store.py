"""The MLflow vocabulary that the sweep (the only writer) and the report (a reader) share: where
the store is, the tag names, and the filter that selects trial runs. Renaming a tag here
renames it on both sides.

Layout of a sweep in the store (see ``dwlab.sweep.tracking``): one experiment per sweep; one
parent run per ``dwlab sweep`` invocation (``Tag.KIND = SWEEP``); one nested run per
(point, seed) (``Tag.KIND = TRIAL``). A search sweep adds, under the parent, one run per
method's search (``SEARCH``) with one nested run per tuning trial (``TUNE_TRIAL``); its final
runs are TRIAL runs with a ``Tag.ROLE``. A reader sees a tag ``t`` of a run as the pandas
column ``column(t)`` (MLflow's ``tags.<name>`` convention).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from unittest import mock
from urllib.parse import unquote, urlparse

from dwlab.errors import DwlabError

DEFAULT_DIR = Path("mlruns")  # relative to the working directory, like ``mlflow ui``'s default


class Tag:
    """Tag names. Experiment: TABLE, SCALE. Both run kinds: KIND, SWEEP, TABLE, SCALE,
    SWEEP_FILE, GIT_COMMIT, VERSION, REVISION, HOST, RESOURCES. Parent runs: TRIALS, SKIPPED, WARNINGS and the
    summary counts (``dwlab.finished`` ...). Trial runs: the rest."""

    KIND = "dwlab.kind"
    SWEEP = "dwlab.sweep"
    TABLE = "dwlab.table"
    SCALE = "dwlab.scale"
    SWEEP_FILE = "dwlab.sweep_file"
    GIT_COMMIT = "dwlab.git_commit"
    VERSION = "dwlab.version"
    REVISION = "dwlab.training_revision"  # dwlab.TRAINING_REVISION; absent: 1
    HOST = "dwlab.host"
    NODE = "dwlab.node"  # the Ray node that ran the trial's (last) attempt: "<ip> <node id>"
    TRIALS = "dwlab.trials"
    SKIPPED = "dwlab.skipped"
    WARNINGS = "dwlab.warnings"
    RESOURCES = "dwlab.resources"  # per trial, as this invocation ran them (the file's or --*-per-trial)
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
    COPIED_FROM = "dwlab.copied_from"  # a trial run copied from a FINISHED run of the same config: its run id
    # a search sweep: its search runs, their tuning trials and its final runs
    SEARCH = "dwlab.search"  # the method's id in the sweep file (search, tuning trial and final runs)
    SEARCH_HASH = "dwlab.search_hash"  # search runs: what makes two searches the same one
    SEARCH_DESC = "dwlab.search_desc"  # algorithm, seed, budget, scheduler in words
    SEARCH_SPACE = "dwlab.search_space"  # the keys and their ranges (json)
    SEARCH_RUN = "dwlab.search_run"  # final tuned runs: the search run that chose their values
    CHOSEN = "dwlab.chosen"  # the chosen values (json): search runs and final tuned runs
    CHOSEN_TRIAL = "dwlab.chosen_trial"  # search runs: the tuning trial whose values were chosen
    TUNE_SCORE = "dwlab.tune_score"  # final tuned runs: the chosen trial's AP on the tune split
    RAY_TRIAL_ID = "dwlab.ray_trial_id"  # tuning trials: Ray Tune's trial id (stable on restore)
    TUNE_OUTCOME = "dwlab.tune_outcome"  # tuning trials: complete, stopped (by the scheduler), failed, lost
    ROLE = "dwlab.role"  # final runs of a search sweep: defaults or tuned


#: MLflow 3 opens an experiment on the view its kind names (the GenAI "Traces" page when unset)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the "Model training" view: runs, metrics, compare

TRIAL = "trial"  # values of Tag.KIND
SWEEP = "sweep"
SEARCH = "search"
TUNE_TRIAL = "tune_trial"
ROLE_DEFAULTS, ROLE_TUNED = "defaults", "tuned"  # values of Tag.ROLE


def kind_filter(kind: str) -> str:
    """The ``search_runs`` filter for runs of ``kind`` (TRIAL, SWEEP, SEARCH or TUNE_TRIAL)."""
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


def is_local(uri: str) -> bool:
    """A store this process opens itself (a database or a directory), not a tracking server."""
    return urlparse(uri).scheme not in ("http", "https", "databricks")


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


FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def fail_fast_http() -> AbstractContextManager:
    """A context in which MLflow's HTTP client gives up on a tracking server that does not
    answer after few retries and a short timeout (``FAIL_FAST_HTTP``; values the user set win)."""
    return mock.patch.dict(os.environ, {k: os.environ.get(k, v) for k, v in FAIL_FAST_HTTP.items()})


def connect(uri: str, *, create: bool = False):
    """An ``MlflowClient`` on ``uri`` once the store has answered one request (within about
    25 s for a tracking server that is down: ``fail_fast_http``); else a one-line
    ``DwlabError`` naming ``uri``. With ``create``, a sqlite store is made if missing, under a
    lock file beside it: MLflow builds (or migrates) the database on its first request, and
    two sweeps started at once must not both do that. MLflow's artifact progress bars stay off
    (a row of bars for every copied run or checkpoint in a piped log) unless the user set them."""
    from mlflow import MlflowClient
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    os.environ.setdefault(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false")

    path = sqlite_path(uri) if create else None
    try:
        with _creation_lock(path), fail_fast_http():
            client = MlflowClient(tracking_uri=uri)  # may build the database already
            client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        lines = str(err).strip().splitlines()
        raise DwlabError(f"cannot reach the MLflow store {uri}: {(lines[0] if lines else type(err).__name__)[:200]}") from None
    return client


@contextmanager
def _creation_lock(db: Path | None):
    """Hold ``<db>.lock`` (an exclusive ``flock``, released by the OS even on SIGKILL); no-op
    for None."""
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
