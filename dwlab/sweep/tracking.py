"""MLflow bookkeeping of sweeps: one writer (the sweep driver), one experiment per sweep.

Layout of the store (tag names and the store's URI rules: ``dwlab.store``):

- experiment ``<sweep name>`` (``<name>-paper`` at the paper scale), tag ``dwlab.table``;
- one parent run per ``dwlab sweep`` invocation (tag ``dwlab.kind=sweep``);
- one nested run per (point, seed) (tags ``dwlab.kind=trial``, ``mlflow.parentRunId``,
  ``dwlab.point``, ``dwlab.seed``, ``dwlab.config_hash``, ...), params = the flattened
  config plus, under ``resolved.``, what the trial resolved beyond it (its first report's
  ``resolved`` record: e.g. ``resolved.assigner.dw.mu_norm``, ``resolved.loss_weights.loss_box``),
  metrics per epoch at ``step=epoch``, artifacts = config.yaml, resolved.yaml, eval.json,
  metrics.jsonl and (optionally) the final checkpoint.

The (point, seed, config hash) tags make a sweep idempotent: a FINISHED run with the same
hash is never run again, and a run left RUNNING by a killed driver is reopened (``--resume``)
or closed as KILLED.

A search sweep adds, under its parent run, one run per method's search (``dwlab.kind=search``:
its space, algorithm and budget; once done, the chosen values and counts) with its tuning
trials nested under it (``dwlab.kind=tune_trial``, the trial's sampled values as
``dwlab.point_overrides``, metrics as for a trial but scored on the tune split). A FINISHED
search run with the same search hash is not run again: its chosen values are reused.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwlab import TRAINING_REVISION, __version__
from dwlab.config import flatten
from dwlab.errors import DwlabError
from dwlab.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    SEARCH,
    SWEEP,
    TRIAL,
    TUNE_TRIAL,
    Tag,
    artifact_location,
    connect,
    default_uri,
    is_local,
    kind_filter,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from dwlab.sweep.search_spec import MethodSearch
    from dwlab.sweep.spec import Plan, Trial

FINAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
UNFINISHED = ("RUNNING", "SCHEDULED")
EXPERIMENTS_PER_SEARCH = 100  # the most experiments one MLflow search_runs takes


UI_HOST = "127.0.0.1"  # the MLflow UI has no authentication: this machine only, unless asked


def runs_url(uri: str, experiment_id: str, *, port: int = 5000) -> str:
    """The browser address of an experiment's runs table in the training view: the tracking
    server's for a server, ``dwlab ui``'s default for a local store. (MLflow 3 opens an
    experiment in its GenAI view unless the address says ``workflowType=machine_learning``;
    the experiment's ``mlflow.experimentKind`` tag alone did not change that in 3.17.)"""
    base = uri.rstrip("/") if not is_local(uri) else f"http://{UI_HOST}:{port}"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_args(uri: str, *, host: str = UI_HOST, port: int = 5000) -> list[str]:
    """The arguments of ``mlflow`` that serve the store ``uri`` in a browser."""
    return ["ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def ui_command(uri: str | None = None) -> str:
    """How to see the store in a browser: the command that serves a local store (bound to
    127.0.0.1), or the tracking server's own address."""
    uri = uri or default_uri()
    if not is_local(uri):
        return f"open {uri} in a browser (the tracking server's UI)"
    return "mlflow " + " ".join(ui_args(uri))


def git_commit() -> str:
    """The commit of the checkout dwlab is imported from (read from ``.git``, no subprocess), or
    the one ``dwlab bundle`` recorded in the package (an offline host has no ``.git``)."""
    package = Path(__file__).resolve().parents[1]
    if (package / "COMMIT").is_file():
        return (package / "COMMIT").read_text().strip()
    git = package.parent / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").exists() else None
        for root in [git] + ([git / common] if common else []):
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
            packed = root / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        pass
    return "unknown"


def dataset_tag(cfg) -> str:
    if cfg.data.root is not None:
        return str(cfg.data.root)
    s = cfg.data.synth
    return f"synth:n_train={s.n_train},n_val={s.n_val},seed={s.seed},image_size={s.image_size}"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Existing:
    """What the store already holds for one (point, seed)."""

    finished: bool = False  # a FINISHED run with the same config hash
    reopen: str | None = None  # the unfinished run to reopen (--resume)
    parent: str | None = None  # that run's parent


@dataclass
class SearchState:
    """What the store holds for one method's search."""

    chosen: dict[str, Any] | None = None  # a FINISHED search run's chosen values (same hash)
    run_id: str | None = None  # that run, or the unfinished one to reopen (--resume)
    finished: bool = False
    score: float | None = None  # the chosen trial's AP on the tune split


class SweepTracker:
    """The driver's MLflow writer for one sweep invocation."""

    def __init__(self, plan: Plan, uri: str):
        self.plan = plan
        self.uri = uri
        self.client: MlflowClient = connect(self.uri, create=True)
        self.parent_id: str | None = None
        self.run_ids: dict[str, str] = {}  # trial key -> run id
        self._logged_steps: dict[str, int] = {}
        self._where: dict[str, dict] = {}  # host, device, pid of each trial's current attempt
        self._resolved: set[str] = set()  # trials whose resolved.* params are logged
        try:
            self.experiment_id = self._experiment()
        except DwlabError:
            raise
        except Exception as err:  # an unreachable server, a broken database
            raise DwlabError(f"MLflow store {self.uri}: {' '.join(str(err).split())[:300]}") from None

    # ------------------------------------------------------------------ setup

    def _experiment(self) -> str:
        name = self.plan.name
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise DwlabError(
                    f"MLflow experiment '{name}' is deleted in {self.uri}: restore it "
                    f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or rename the sweep"
                )
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older dwlab
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        tags = {Tag.TABLE: self.plan.table or "", Tag.SCALE: self.plan.scale, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        return self.client.create_experiment(
            name, artifact_location=artifact_location(self.uri, name), tags=tags
        )

    def _search(self, filter_string: str) -> list:
        from mlflow.entities import ViewType

        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string, ViewType.ACTIVE_ONLY, 1000, ["attributes.start_time ASC"], token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def reconcile(self, *, resume: bool, trials: list[Trial] | None = None, parents: bool = True) -> dict[str, Existing]:
        """Look up earlier runs of each trial (default: the plan's) by its (point, seed) tags.

        A FINISHED run with the same config hash and number of workers (the global batch)
        marks the trial done. Runs left RUNNING or
        SCHEDULED by a killed driver are reopened with ``resume`` (same hash, the latest one)
        and closed as KILLED otherwise, as are those of points no longer in the sweep file
        and (with ``parents``) dangling parent runs: nothing is left RUNNING.
        """
        trials = self.plan.trials if trials is None else trials
        trial_runs = self._search(kind_filter(TRIAL))
        by_key: dict[tuple[str, str], list] = {}
        for run in trial_runs:
            tags = run.data.tags
            by_key.setdefault((tags.get(Tag.POINT, ""), tags.get(Tag.SEED, "")), []).append(run)
        out: dict[str, Existing] = {}
        for trial in trials:
            runs = by_key.get((trial.point.id, str(trial.seed)), [])
            same = [r for r in runs if r.data.tags.get(Tag.CONFIG_HASH) == trial.config_hash
                    and r.data.tags.get(Tag.WORLD_SIZE, str(trial.workers)) == str(trial.workers)]  # fmt: skip
            state = Existing(finished=any(r.info.status == "FINISHED" for r in same))
            candidates = [r for r in same if r.info.status in UNFINISHED]
            if resume and not state.finished and candidates:
                state.reopen = candidates[-1].info.run_id  # runs are sorted by start time
                state.parent = candidates[-1].data.tags.get(Tag.PARENT)
            out[trial.key] = state
        reopened = {s.reopen for s in out.values() if s.reopen}
        kept_parents = {s.parent for s in out.values() if s.reopen and s.parent}
        for run in trial_runs:
            if run.info.status in UNFINISHED and run.info.run_id not in reopened:
                self.close(run.info.run_id, "KILLED", "left unfinished by an interrupted sweep")
        if parents:
            self.close_parents(kept_parents)
        return out

    def finished_elsewhere(self, trials: list[Trial]) -> dict[str, Any]:
        """Trial key -> a FINISHED trial run of another experiment in the store with the same
        config hash, workers and device kind (cpu / cuda) and an AP, for the ``trials`` that have
        one: the latest, so that a code fix which leaves the hash alone is in it. Copies are not
        sources.

        Runs are reproducible from their config (README, "Reproducible runs"), so such a run is
        this trial's result: a point two tables share (Table 5's full DW is Table 2's beta=5,
        mu=5) trains once."""
        from mlflow.entities import ViewType

        wanted = {(t.config_hash, str(t.workers), _device_kind(self.trial_tags(t)[Tag.DEVICE])): t.key for t in trials}
        if not wanted:
            return {}
        others = [e.experiment_id for e in self.client.search_experiments(ViewType.ACTIVE_ONLY)
                  if e.experiment_id != self.experiment_id]  # fmt: skip
        found: dict[str, Any] = {}
        for i in range(0, len(others), EXPERIMENTS_PER_SEARCH):
            token = None
            while True:
                page = self.client.search_runs(
                    others[i : i + EXPERIMENTS_PER_SEARCH], f"{kind_filter(TRIAL)} and attributes.status = 'FINISHED'",
                    ViewType.ACTIVE_ONLY, 1000, ["attributes.start_time DESC"], token,
                )  # fmt: skip
                for run in page:
                    tags = run.data.tags
                    key = wanted.get((tags.get(Tag.CONFIG_HASH), tags.get(Tag.WORLD_SIZE), _device_kind(tags.get(Tag.DEVICE))))
                    if key is None or Tag.COPIED_FROM in tags or "AP" not in run.data.metrics:
                        continue
                    if key not in found or run.info.start_time > found[key].info.start_time:  # across blocks
                        found[key] = run
                token = page.token
                if not token:
                    break
        return found

    def copy_run(self, trial: Trial, source) -> tuple[str, str | None]:
        """A FINISHED run of ``trial`` in this experiment holding ``source``'s params, metric
        histories, artifacts, times, commit and run directory (``finished_elsewhere``); returns
        its id and, when the source's artifacts could not be read, why (the numbers are copied).
        On any error the half-made copy (run and directory) is removed and the error raised: the
        caller trains the trial instead."""
        import mlflow
        from mlflow.entities import Metric, Param

        src = source.info.run_id
        kept = (Tag.HOST, Tag.NODE, Tag.DEVICE, Tag.WORKER_PID, Tag.GIT_COMMIT, Tag.VERSION, Tag.RESOURCES, Tag.REVISION)
        where = {k: source.data.tags[k] for k in kept if k in source.data.tags}  # where and by what code it ran
        src_dir = Path(source.data.tags[Tag.RUN_DIR]) if source.data.tags.get(Tag.RUN_DIR) else None
        staged = trial.run_dir.with_name(trial.run_dir.name + ".copying")
        run_id, swapped = None, False
        try:
            run = self.client.create_run(self.experiment_id, source.info.start_time,
                                         tags={**self.trial_tags(trial), **where, Tag.COPIED_FROM: src}, run_name=trial.key)  # fmt: skip
            run_id = self.run_ids[trial.key] = run.info.run_id
            params = [Param(k, v) for k, v in source.data.params.items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i : i + 100])
            history = [Metric(m.key, m.value, m.timestamp, m.step)
                       for key in source.data.metrics for m in self.client.get_metric_history(src, key)]  # fmt: skip
            for i in range(0, len(history), 500):
                self.client.log_batch(run_id, metrics=history[i : i + 500])
            missing = None
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = mlflow.artifacts.download_artifacts(run_id=src, tracking_uri=self.uri, dst_path=tmp)
                except Exception as err:  # a store copied without its artifacts: the numbers still hold
                    missing = f"its artifacts were not copied ({' '.join(str(err).split())[:200]})"
                else:
                    self.client.log_artifacts(run_id, local)
            if src_dir is None or src_dir.resolve() != trial.run_dir.resolve():
                shutil.rmtree(staged, ignore_errors=True)
                if src_dir is not None and src_dir.is_dir():
                    shutil.copytree(src_dir, staged)  # staged, then swapped in: never half a directory
                shutil.rmtree(trial.run_dir, ignore_errors=True)  # an earlier attempt's files go either way
                if staged.is_dir():
                    staged.rename(trial.run_dir)
                    swapped = True
            self.client.set_terminated(run_id, "FINISHED", source.info.end_time)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            if swapped:  # the source's files under this trial's name, without a FINISHED run
                shutil.rmtree(trial.run_dir, ignore_errors=True)
            if run_id is not None:
                self.client.delete_run(run_id)
                self.run_ids.pop(trial.key, None)
            raise
        return run_id, missing

    def close_parents(self, keep: set[str]) -> None:
        """Close the unfinished parent runs of interrupted invocations, but those in ``keep``."""
        for run in self._search(kind_filter(SWEEP)):
            if run.info.status in UNFINISHED and run.info.run_id not in keep:
                self.close(run.info.run_id, "KILLED", "sweep driver was interrupted")

    def unfinished_parent(self) -> str | None:
        """The latest unfinished parent run (an interrupted invocation's), if any."""
        runs = [r for r in self._search(kind_filter(SWEEP)) if r.info.status in UNFINISHED]
        return runs[-1].info.run_id if runs else None

    def close(self, run_id: str, status: str, reason: str) -> None:
        self.client.set_tag(run_id, Tag.CLOSED_REASON, reason)
        self.client.set_terminated(run_id, status, _now_ms())

    # ------------------------------------------------------------------ runs

    def common_tags(self) -> dict[str, str]:
        plan = self.plan
        return {
            Tag.SWEEP: plan.name,
            Tag.TABLE: plan.table or "",
            Tag.SCALE: plan.scale,
            Tag.SWEEP_FILE: str(plan.file),
            Tag.RESOURCES: plan.resources.record,
            Tag.GIT_COMMIT: git_commit(),
            Tag.VERSION: __version__,
            Tag.REVISION: str(TRAINING_REVISION),
        }

    def start_parent(self, reuse: str | None, n_trials: int, n_skipped: int) -> str:
        tags = {
            **self.common_tags(),
            Tag.KIND: SWEEP,
            Tag.HOST: socket.gethostname(),
            Tag.TRIALS: str(n_trials),
            Tag.SKIPPED: str(n_skipped),
            Tag.WARNINGS: " | ".join(self.plan.warnings),
        }
        if reuse is not None:
            self.client.update_run(reuse, status="RUNNING")
            self.parent_id = reuse
            self.client.log_batch(reuse, tags=_tags(tags))
        else:
            # one name per invocation: the sweep's, and when it started
            run_name = f"{self.plan.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
            self.parent_id = run.info.run_id
            try:
                self.client.log_text(self.parent_id, Path(self.plan.file).read_text(), "sweep.yaml")
            except OSError:
                pass
        return self.parent_id

    def recount_trials(self, n_trials: int) -> None:
        """Correct the parent's trial count (``start_parent`` counted trials whose copy then failed
        and which now train)."""
        self.client.set_tag(self.parent_id, Tag.TRIALS, str(n_trials))

    def trial_tags(self, trial: Trial) -> dict[str, str]:
        plan, cfg = self.plan, trial.config
        world = plan.world_size
        tags = {
            **self.common_tags(),
            Tag.PARENT: self.parent_id or "",
            Tag.KIND: trial.kind,
            Tag.POINT: trial.point.id,
            Tag.POINT_OVERRIDES: json.dumps(trial.point.overrides, sort_keys=True, default=str),
            Tag.SEED: str(trial.seed),
            Tag.CONFIG_HASH: trial.config_hash,
            Tag.HOST: socket.gethostname(),  # the driver's, replaced by the trial's on its first report
            Tag.DEVICE: "cuda" if plan.resources.gpus_per_trial else "cpu",
            Tag.DATASET: dataset_tag(cfg),
            Tag.BACKBONE: cfg.model.backbone,
            Tag.ASSIGNER: cfg.assigner.name,
            Tag.WORLD_SIZE: str(world),
            Tag.BATCH_PER_WORKER: str(cfg.train.batch_size),
            Tag.GLOBAL_BATCH: str(world * cfg.train.batch_size),
            Tag.LR: str(cfg.train.lr),
            Tag.RUN_DIR: str(trial.run_dir),
        }
        if trial.point.label:
            tags[Tag.POINT_LABEL] = trial.point.label
        return {**tags, **trial.tags}

    def reopen_trial(self, trial: Trial, run_id: str) -> None:
        """Take over ``run_id``, the trial's unfinished run of an interrupted sweep (status
        SCHEDULED until the trial starts again)."""
        self.client.update_run(run_id, status="SCHEDULED")
        self.client.log_batch(run_id, tags=_tags({**self.trial_tags(trial), Tag.RESUMED: "true"}))
        self.run_ids[trial.key] = run_id

    def started(self, trial: Trial, attempt: int) -> str:
        """The trial's run, RUNNING from now: created here on the first start (so that its
        start time and duration leave out the time it queued), reopened or retried otherwise.
        Returns its id."""
        from mlflow.entities import Param

        run_id = self.run_ids.get(trial.key)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, tags=self.trial_tags(trial), run_name=trial.key)
            run_id = self.run_ids[trial.key] = run.info.run_id
            params = [Param(k, _param(v)) for k, v in flatten(trial.config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        if attempt:
            self.client.set_tag(run_id, Tag.RETRIES, str(attempt))
        return run_id

    def log_result(self, key: str, result: dict[str, Any]) -> None:
        """One trial report: per-epoch metrics at ``step=epoch``; host and device tags and the
        ``resolved.*`` params once."""
        from mlflow.entities import Metric, Param

        run_id = self.run_ids[key]
        step = int(result.get("epoch", 0))
        where = {Tag.HOST: result.get("host"), Tag.NODE: result.get("node"), Tag.DEVICE: result.get("device"),
                 Tag.WORKER_PID: result.get("pid")}  # fmt: skip
        if result.get("host") and self._where.get(key) != where:  # once per attempt
            self.client.log_batch(run_id, tags=_tags(where))
            self._where[key] = where
        if result.get("resolved") and key not in self._resolved:  # a reopened run may have them
            have = self.client.get_run(run_id).data.params
            params = {k: _param(v) for k, v in flatten(result["resolved"], "resolved.").items() if k not in have}
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            self._resolved.add(key)
        metrics = result.get("metrics") or {}
        if result.get("final"):  # final AP*: only what the epoch report at that step lacked
            if self._logged_steps.get(key) == step:
                return
            metrics = {k: v for k, v in metrics.items() if k in FINAL_KEYS}
        now = _now_ms()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)
        self._logged_steps[key] = step

    def backfill(self, key: str, run_dir: Path) -> int:
        """Log the epochs of a kept run directory's ``metrics.jsonl`` (with their
        ``timing.jsonl`` lines) that the run lacks (a driver killed between a checkpoint and its
        record); returns how many were logged."""
        from mlflow.entities import Metric

        rows = _epoch_rows(run_dir / "metrics.jsonl")
        if not rows:
            return 0
        timing = _epoch_rows(run_dir / "timing.jsonl")
        run_id = self.run_ids[key]
        have = {m.step for m in self.client.get_metric_history(run_id, "loss")}
        batch, added = [], 0
        for step, row in rows.items():
            if step < 1 or step in have:
                continue
            row = {**row, **timing.get(step, {})}
            batch.extend(Metric(k, float(v), _now_ms(), step) for k, v in row.items() if _is_number(v))
            added += 1
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i : i + 500])
        return added

    def finish(self, trial: Trial, final_metrics: dict[str, float]) -> None:
        run_id = self.run_ids[trial.key]
        self._log_artifacts(run_id, trial, final_metrics)
        self.client.set_terminated(run_id, "FINISHED", _now_ms())

    def fail(self, key: str, error: str) -> None:
        run_id = self.run_ids[key]
        self.client.set_tag(run_id, Tag.ERROR, error[:5000])
        self.client.set_terminated(run_id, "FAILED", _now_ms())

    def kill(self, key: str, reason: str) -> None:
        self.close(self.run_ids[key], "KILLED", reason)

    def end_parent(self, status: str, summary: dict[str, Any]) -> None:
        if self.parent_id is None:
            return
        self.client.log_batch(self.parent_id, tags=_tags({f"dwlab.{k}": v for k, v in summary.items()}))
        self.client.set_terminated(self.parent_id, status, _now_ms())

    # ------------------------------------------------------------------ searches

    def search_states(self, *, resume: bool) -> dict[str, SearchState]:
        """Each planned search's earlier runs (by its method id and search hash): a FINISHED
        one gives its chosen values; with ``resume`` the latest interrupted one (left RUNNING by
        a killed driver, or KILLED by Ctrl-C) is reopened.
        Every other unfinished search run is closed KILLED, with its unfinished tuning trials."""
        runs = self._search(kind_filter(SEARCH))
        out = {}
        for search in self.plan.searches:
            mine = [r for r in runs if r.data.tags.get(Tag.SEARCH) == search.id
                    and r.data.tags.get(Tag.SEARCH_HASH) == search.digest]  # fmt: skip
            done = [r for r in mine if r.info.status == "FINISHED" and Tag.CHOSEN in r.data.tags]
            left = [r for r in mine if r.info.status in (*UNFINISHED, "KILLED")]  # killed driver or Ctrl-C
            if done:
                run = done[-1]
                out[search.id] = SearchState(json.loads(run.data.tags[Tag.CHOSEN]), run.info.run_id, True,
                                             run.data.metrics.get("tune_AP"))  # fmt: skip
            else:
                out[search.id] = SearchState(run_id=left[-1].info.run_id if resume and left else None)
        keep = {s.run_id for s in out.values() if s.run_id and not s.finished}
        for run in runs:
            if run.info.status in UNFINISHED and run.info.run_id not in keep:
                self.close(run.info.run_id, "KILLED", "search left unfinished by an interrupted sweep")
        for run in self._search(kind_filter(TUNE_TRIAL)):
            if run.info.status in UNFINISHED and run.data.tags.get(Tag.PARENT) not in keep:
                self.close(run.info.run_id, "KILLED", "left unfinished by an interrupted sweep")
        return out

    def start_search(self, search: MethodSearch, reopen: str | None) -> str:
        """The method's search run, RUNNING from now (``reopen``: an interrupted one's); returns its id."""
        from mlflow.entities import Param

        space = {k: str(p) for k, p in search.space.items()}
        tags = {**self.common_tags(), Tag.KIND: SEARCH, Tag.PARENT: self.parent_id or "", Tag.SEARCH: search.id,
                Tag.SEARCH_HASH: search.digest, Tag.SEARCH_DESC: search.describe(),
                Tag.SEARCH_SPACE: json.dumps(space), Tag.ASSIGNER: search.config.assigner.name,
                Tag.POINT_LABEL: search.label or search.id, Tag.DATASET: dataset_tag(search.config)}  # fmt: skip
        if reopen is not None:
            self.client.update_run(reopen, status="RUNNING")
            self.client.log_batch(reopen, tags=_tags({**tags, Tag.RESUMED: "true"}))
            return reopen
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"search {search.id}")
        params = [Param(k, _param(v)) for k, v in flatten(search.config).items()]
        params += [Param(f"space.{k}", _param(v)) for k, v in space.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def tune_trial_runs(self, search_run: str) -> dict[str, Any]:
        """The tuning trials' runs of a search run, by their Ray trial id."""
        runs = self._search(f"{kind_filter(TUNE_TRIAL)} and tags.`{Tag.PARENT}` = '{search_run}'")
        return {r.data.tags.get(Tag.RAY_TRIAL_ID, ""): r for r in runs}

    def end_search(self, run_id: str, status: str, tags: dict[str, Any], metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _is_number(v)]
        self.client.log_batch(run_id, metrics=batch, tags=_tags(tags))
        self.client.set_terminated(run_id, status, now)

    def _log_artifacts(self, run_id: str, trial: Trial, final_metrics: dict[str, float]) -> None:
        from dwlab.config import dump_yaml

        run_dir = trial.run_dir
        config_file = run_dir / "config.yaml"
        if config_file.is_file():
            self.client.log_artifact(run_id, str(config_file))
        else:  # the run directory is on another node: the driver knows the config anyway
            self.client.log_text(run_id, dump_yaml(trial.config), "config.yaml")
        eval_file = run_dir / "eval.json"
        if eval_file.is_file():
            self.client.log_artifact(run_id, str(eval_file))
        elif final_metrics:
            self.client.log_dict(run_id, final_metrics, "eval.json")
        if (run_dir / "resolved.yaml").is_file():
            self.client.log_artifact(run_id, str(run_dir / "resolved.yaml"))
        for name in ("metrics.jsonl", "timing.jsonl", "detections.json"):
            if (run_dir / name).is_file():
                self.client.log_artifact(run_id, str(run_dir / name))
        ckpt = run_dir / "checkpoints" / "last.pt"
        if self.plan.checkpoint_artifact and trial.kind == TRIAL and ckpt.is_file():
            self.client.log_artifact(run_id, str(ckpt), "checkpoints")


def _epoch_rows(path: Path) -> dict[int, dict[str, Any]]:
    """``{epoch: row without "epoch"}`` of a per-epoch JSON-lines file (absent: empty; a torn
    last line, left by a killed writer, is skipped)."""
    rows: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows[int(row.pop("epoch", 0))] = row
    return rows


def _tags(mapping: dict[str, Any]):
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in mapping.items()]


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _device_kind(device: str | None) -> str:
    """'cpu' or 'cuda' of a DEVICE tag: a trial's first report names the GPU ('cuda:NVIDIA H200')."""
    return (device or "").split(":")[0]
