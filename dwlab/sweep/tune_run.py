"""The sweep driver: Ray Tune runs one trial per (point, seed); a Tune callback on the driver
is the only MLflow writer and feeds the live progress table.

Order of events in ``run_sweep``: check that a local Ray can fit a trial, lock the sweep,
reconcile with MLflow (skip FINISHED trials with the same config hash and workers, reopen or
close runs a killed driver left open), prepare the run directories, create the parent and trial
runs, start or join Ray, run the Tuner, close whatever is still open, summarise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

from ray import tune

from dwlab import faults
from dwlab.errors import DwlabError
from dwlab.store import Tag
from dwlab.sweep.progress import SweepProgress
from dwlab.sweep.spec import Plan, Trial, flag
from dwlab.sweep.tracking import SweepTracker, runs_url, ui_command
from dwlab.sweep.trainable import LOG

if TYPE_CHECKING:
    from rich.console import Console

MARKER = "trial.json"  # in each run directory: point, seed, config hash, workers, MLflow run id
COORDINATOR_MEMORY = 64 * 2**20  # bytes reserved by a data-parallel trial's coordinator


@dataclass
class Outcome:
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # trial key -> error
    skipped: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # FINISHED runs of the same config in other experiments
    killed: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    searches: dict[str, dict | None] = field(default_factory=dict)  # a search sweep: method id -> chosen values

    @property
    def ok(self) -> bool:
        return not self.failed and not self.killed


class DriverCallback(tune.Callback):
    """Forwards Tune's trial events to MLflow (one writer) and the progress view."""

    def __init__(self, tracker: SweepTracker, trials: dict[str, Trial], progress: SweepProgress, outcome: Outcome):
        self.tracker, self.trials, self.progress, self.outcome = tracker, trials, progress, outcome
        self.closed: set[str] = set()

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks into ``tuner.pkl``; this one holds live handles (MLflow
        client, console) and needs no state for a restore: MLflow is the source of truth."""
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @staticmethod
    def _key(trial) -> str:
        return trial.config["trial"]["key"]

    def _error(self, trial, key: str) -> str:
        """The attempt's error in one line, naming the file that holds its traceback."""
        return f"{error_text(trial)} (traceback: {self.trials[key].run_dir / LOG})"

    def on_trial_start(self, iteration, trials, trial, **info):
        key = self._key(trial)
        run_id = self.tracker.started(self.trials[key], trial.num_failures)
        write_marker(self.trials[key], run_id)
        self.progress.started(key)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = self._key(trial)
        self.tracker.log_result(key, result)
        self.progress.result(key, result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        key = self._key(trial)
        error = self._error(trial, key)
        self.tracker.client.set_tag(self.tracker.run_ids[key], Tag.LAST_ERROR, error[:5000])
        self.progress.retrying(key, trial.num_failures, error)

    def on_trial_complete(self, iteration, trials, trial, **info):
        key = self._key(trial)
        last = trial.last_result or {}
        final = last.get("metrics", {}) if last.get("final") else {}
        self.tracker.finish(self.trials[key], final)
        self.closed.add(key)
        self.outcome.finished.append(key)
        self.progress.finished(key)

    def on_trial_error(self, iteration, trials, trial, **info):
        key = self._key(trial)
        error = self._error(trial, key)
        self.tracker.fail(key, error)
        self.closed.add(key)
        self.outcome.failed[key] = error
        self.progress.failed(key, error)


def error_text(trial) -> str:
    """The trial's exception as one line: ``RuntimeError: injected error ...``."""
    exc = None
    try:  # the driver-local copy first: the storage copy is synced later
        local = trial.pickled_error_file
        if local and os.path.isfile(local):
            from ray import cloudpickle

            with open(local, "rb") as f:
                exc = cloudpickle.load(f)
        else:
            exc = trial.get_pickled_error()
    except Exception:  # an unreadable error file must not stop the driver
        pass
    cause = getattr(exc, "cause", None) or exc
    if cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = (trial.get_error() if hasattr(trial, "get_error") else None) or "unknown error"
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    errors = [line for line in lines if _looks_like_error(line)]
    return (errors[-1] if errors else lines[-1] if lines else "unknown error")[:2000]


def _looks_like_error(line: str) -> bool:
    head = line.split(":", 1)[0]
    return ":" in line and " " not in head and (head.endswith(("Error", "Exception", "Loss")))


# ----------------------------------------------------------------------------- driver


def _lock(plan: Plan):
    """One driver per sweep at a time (released by the OS even on SIGKILL)."""
    path = plan.runs_dir / plan.name / ".sweep.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DwlabError(f"sweep '{plan.name}' is already running (lock {path})") from None
    return handle


def prepare_run_dir(trial: Trial, run_id: str | None, resume: bool) -> bool:
    """Write the marker (``run_id``: the reopened run, None until a new one starts); returns
    True when the directory's checkpoint will be resumed.

    A directory is kept only with ``resume`` and when its marker has the same config hash and
    number of data-parallel workers (the global batch); otherwise it is cleared so the trial
    starts fresh (a stale checkpoint of another config must never be resumed). Other resources
    (CPU or GPU shares) may change between invocations.
    """
    marker = trial.run_dir / MARKER
    keep = False
    if resume and marker.is_file():
        try:
            saved = json.loads(marker.read_text())
            keep = saved.get("config_hash") == trial.config_hash and saved.get("workers", 1) == trial.workers
        except (OSError, ValueError, AttributeError):
            keep = False
    if not keep and trial.run_dir.exists():
        shutil.rmtree(trial.run_dir)
    trial.run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(trial, run_id)
    return keep and (trial.run_dir / "checkpoints").is_dir()


def write_marker(trial: Trial, run_id: str | None) -> None:
    """``trial.json`` in the run directory: point, seed, config hash, workers, MLflow run id."""
    payload = {"point": trial.point.id, "seed": trial.seed, "config_hash": trial.config_hash,
               "workers": trial.workers, "mlflow_run_id": run_id}  # fmt: skip
    marker = trial.run_dir / MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(marker)


AUTH_HELP = (
    "the cluster uses Ray's token authentication: set RAY_AUTH_MODE=token and the head's token here "
    "(RAY_AUTH_TOKEN=<output of 'ray get-auth-token' on the head>, or that token in ~/.ray/auth_token)"
)


def init_ray(address: str | None) -> bool:
    """Join ``address`` / ``RAY_ADDRESS``, reuse an initialised Ray, or start a local one;
    returns True when this call started it (and should shut it down).

    Joining uses Ray's token authentication unless ``RAY_AUTH_MODE`` says otherwise: Ray >= 2.59
    starts ``ray start --head`` clusters with it, and a client in token mode also joins a cluster
    without it. A join the cluster refuses is one line that names authentication and the fix."""
    import ray

    if ray.is_initialized():
        return False
    # trials' own output stays in Ray's logs on their node (/tmp/ray/session_latest/logs): the
    # driver shows each trial's events and, for a failure, its error in one line
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        cpus, gpus = local_resources()
        try:
            ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise DwlabError(f"cannot start Ray ({' '.join(str(err).split())[:300]})") from None
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # for the whole driver: later calls authenticate too
    with _stderr_captured() as captured:  # Ray's core retries a refused join with a warning a second
        try:
            ray.init(address=address, **kwargs)
            error = None
        except (ConnectionError, RuntimeError, ValueError) as err:
            error = " ".join(str(err).split())[:300]
        logged = captured.read_text(errors="replace")
    if error is None:
        sys.stderr.write(logged)
        return True
    if "InvalidAuthToken" in logged or "token" in error.lower():
        raise DwlabError(f"cannot join the Ray cluster at {address}: authentication refused; {AUTH_HELP}")
    raise DwlabError(f"cannot join the Ray cluster at {address} ({error})")


def local_resources() -> tuple[int, int]:
    """(CPUs, GPUs) a local Ray is started with: this process's usable cores, and the GPUs torch
    sees (``CUDA_VISIBLE_DEVICES`` respected) rather than what Ray's own probe finds."""
    import torch

    from dwlab.data.synth import usable_cores

    return usable_cores(), torch.cuda.device_count()


def check_local_fit(plan: Plan, address: str | None) -> None:
    """A trial that asks for more CPUs or GPUs than a local Ray has would wait forever: one line
    naming what is missing, before anything is started or written. A Ray this process already
    runs is taken as it is; a cluster (``address`` / ``RAY_ADDRESS``) is not checked here: it may
    grow (``concurrency`` warns)."""
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        return
    if ray.is_initialized():
        total = ray.cluster_resources()
        have = {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0)}
        which, how = "the running local Ray has", {"CPU": "ray.cluster_resources()", "GPU": "ray.cluster_resources()"}
    else:
        cpus, gpus = local_resources()
        have = {"CPU": cpus, "GPU": gpus}
        which, how = "the local Ray gets", {"CPU": f"usable cores={cpus}", "GPU": f"torch.cuda.device_count()={gpus}"}
    res = plan.resources
    for key, unit, need in (("gpus_per_trial", "GPU", res.gpus_per_trial), ("cpus_per_trial", "CPU", res.cpus_per_trial)):
        if need > have[unit] + 1e-9:
            fix = f"{flag(key)} {have[unit]:g} " + ("trains on the CPU" if not have[unit] else "fits")
            raise DwlabError(
                f"{key}={need:g} ({plan.resource_source(key)}) but {which} {have[unit]:g} {unit}s "
                f"({how[unit]}); {fix}, or --address joins a Ray cluster that has them"
            )


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 (where Ray's C++ core logs) goes to a temporary file while the block
    runs; yields that file's path."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stderr"
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(path, "wb") as sink:
                os.dup2(sink.fileno(), 2)
                yield path
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def concurrency(plan: Plan, n_trials: int, requested: int | None, console: Console) -> int:
    """Trials at once: ``--max-concurrent``, else as many as the cluster's CPUs and GPUs fit
    (Tune and Train V2 do not share resource accounting, so this is set explicitly)."""
    import ray

    res = plan.resources
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    fits = math.floor(cpus / res.cpus_per_trial + 1e-9)
    if res.gpus_per_trial:
        fits = min(fits, math.floor(gpus / res.gpus_per_trial + 1e-9))
    if fits < 1:  # a cluster (a local Ray was checked by check_local_fit)
        console.print(
            f"[yellow]warning:[/] a trial needs {res.cpus_per_trial:g} CPU and {res.gpus_per_trial:g} GPU; "
            f"the cluster has {cpus:g} CPU and {gpus:g} GPU: trials wait for nodes that have them "
            "(an autoscaling cluster adds them; on a fixed one, stop with Ctrl-C and lower the resources)"
        )
    if requested is not None:
        if requested < 1:
            raise DwlabError(f"--max-concurrent: expected at least 1, got {requested}")
        return min(requested, max(n_trials, 1))
    return max(1, min(fits, n_trials))


def _payload(plan: Plan, trial: Trial) -> dict[str, Any]:
    from dwlab.config import to_dict

    return {
        "key": trial.key,
        "dirname": trial.key.replace("/", "-"),
        "config": to_dict(trial.config),
        "run_dir": str(trial.run_dir),
        **payload_base(plan),
    }


def payload_base(plan: Plan) -> dict[str, Any]:
    """What every trial's payload holds besides its own key, config and run directory."""
    res = plan.resources
    return {
        "cwd": os.getcwd(),
        "workers": res.workers,
        "cpus_per_worker": res.cpus_per_worker,
        "gpus_per_worker": res.gpus_per_worker,
        "train_storage": str(plan.runs_dir / "_ray" / plan.name / "_train"),
        "faults": os.environ.get(faults.ENV, ""),  # test-only; workers may predate the variable
    }


class RaySession:
    """Ray for this driver: joined or started on first need (``start``), shut down by ``stop``
    when this driver started it."""

    def __init__(self, address: str | None):
        self.address, self.up, self.owned = address, False, False

    def start(self) -> None:
        if not self.up:
            self.owned, self.up = init_ray(self.address), True

    def stop(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()


def run_sweep(
    plan: Plan,
    uri: str,
    *,
    console: Console,
    address: str | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
    copy_finished: bool = False,
) -> Outcome:
    """Run the plan's trials that are not already FINISHED in the MLflow store ``uri`` (a
    search sweep: its searches, then its final trials, ``search_run``); see the module doc."""
    started = time.monotonic()
    outcome = Outcome()
    check_local_fit(plan, address)
    lock = _lock(plan)
    ray_session = RaySession(address)
    try:
        console.print(f"MLflow store: {uri}", soft_wrap=True)
        console.print(f"  view it with: {ui_command(uri)}", soft_wrap=True)
        for warning in plan.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        tracker = SweepTracker(plan, uri)
        console.print(f"  its runs: {runs_url(uri, tracker.experiment_id)}", soft_wrap=True)
        if plan.searches:
            from dwlab.sweep.search_run import run_searches

            run_searches(plan, tracker, outcome, console, ray_session, max_concurrent=max_concurrent, resume=resume)
        else:
            existing = tracker.reconcile(resume=resume)
            run_grid(plan, plan.trials, existing, tracker, outcome, console, ray_session, max_concurrent=max_concurrent,
                     resume=resume, copy_finished=copy_finished)  # fmt: skip
    finally:
        ray_session.stop()
        lock.close()
    outcome.wall_s = time.monotonic() - started
    return outcome


def run_grid(
    plan: Plan, trials: list[Trial], existing: dict, tracker: SweepTracker, outcome: Outcome, console: Console,
    ray_session: RaySession, *, max_concurrent: int | None, resume: bool, parent: str | None = None,
    copy_finished: bool = False,
) -> None:  # fmt: skip
    """Run ``trials`` (those not FINISHED in ``existing``, ``tracker.reconcile``'s) under a
    parent run: the one given, the interrupted invocation's, or a new one. With ``copy_finished``, a
    trial with a FINISHED run of the same config in another experiment of the store gets a copy
    of it instead of training again (``SweepTracker.finished_elsewhere``)."""
    todo = [t for t in trials if not existing[t.key].finished]
    outcome.skipped += [t.key for t in trials if existing[t.key].finished]
    if outcome.skipped:
        console.print(f"{len(outcome.skipped)} trial(s) already FINISHED with the same config: skipped")
    copies = tracker.finished_elsewhere([t for t in todo if not existing[t.key].reopen]) if copy_finished else {}
    todo = [t for t in todo if t.key not in copies]
    if not todo and not copies:
        console.print(f"sweep {plan.name}: nothing to run")
        if parent is not None:  # a search sweep's, whose searches ran
            tracker.end_parent("FAILED" if outcome.failed else "FINISHED", {"finished": 0, "failed": len(outcome.failed), "killed": 0})
        return
    if todo:
        prepare_all(todo, console)
        ray_session.start()  # before any run is opened: a bad --address writes nothing
    uncopied: list[Trial] = []
    if parent is None:
        parents = {existing[t.key].parent for t in todo if existing[t.key].reopen and existing[t.key].parent}
        reuse = next(iter(parents)) if len(parents) == 1 else None  # the interrupted invocation's
        for stale in parents - {reuse}:
            tracker.close(stale, "KILLED", "sweep driver was interrupted")
        tracker.start_parent(reuse, len(todo), len(outcome.skipped))
    for trial in trials:
        if trial.key in copies:
            source = copies[trial.key]
            try:
                run_id, missing = tracker.copy_run(trial, source)
            except Exception as err:  # the half-made copy is gone (copy_run): train it instead
                console.print(f"[yellow]warning:[/] {trial.key}: copying run {source.info.run_id} failed "
                              f"({' '.join(str(err).split())[:200]}); training it instead", soft_wrap=True)  # fmt: skip
                uncopied.append(trial)
                continue
            write_marker(trial, run_id)
            outcome.copied.append(trial.key)
            console.print(f"{trial.key}: copied from the FINISHED run of the same config in "
                          f"{tracker.client.get_experiment(source.info.experiment_id).name} ({source.info.run_name}, "
                          f"AP {100 * source.data.metrics.get('AP', math.nan):.1f})"
                          + (f"; [yellow]warning:[/] {missing}" if missing else ""), soft_wrap=True)  # fmt: skip
    if uncopied:
        prepare_all(uncopied, console)
        if not todo:
            ray_session.start()
        keys = {t.key for t in todo + uncopied}
        todo = [t for t in trials if t.key in keys]  # the file's order
        if parent is None:  # start_parent counted the trials before these copies failed
            tracker.recount_trials(len(todo))
    if not todo:
        tracker.end_parent("FAILED" if outcome.failed else "FINISHED",
                           {"finished": 0, "failed": len(outcome.failed), "killed": 0, "copied": len(outcome.copied)})  # fmt: skip
        return
    reopen = {t.key: existing[t.key].reopen for t in todo}
    run_trials(plan, todo, reopen, tracker, outcome, console, max_concurrent, resume)


def prepare_all(todo: list[Trial], console: Console) -> None:
    """The trials' cached inputs (generated dataset, domain-pretrained backbone), built here once
    per distinct setting instead of by every trial at once. On a cluster each node has its own
    cache unless ``DWLAB_CACHE`` points at shared storage; a node without them builds its own."""
    from dwlab.runner import prepare_inputs

    seen = set()
    for trial in todo:
        model = trial.config.model
        key = (trial.config.data.model_dump_json(), model.backbone, model.pretrained, model.pretrain.model_dump_json())
        if key in seen:
            continue
        seen.add(key)
        started = time.monotonic()
        prepare_inputs(trial.config, log=lambda line: console.print(line, soft_wrap=True))
        if time.monotonic() - started > 1.0:
            console.print(f"inputs of {trial.point.id} ready ({time.monotonic() - started:.0f} s)")


def run_trials(
    plan: Plan,
    todo: list[Trial],
    reopen: dict[str, str | None],
    tracker: SweepTracker,
    outcome: Outcome,
    console: Console,
    max_concurrent: int | None,
    resume: bool,
) -> None:
    """Open the trials' runs and directories, run the Tuner; whatever did not end is closed
    as KILLED."""
    status = "KILLED"
    progress = SweepProgress(todo, console, title=f"sweep {plan.name}")
    by_key = {t.key: t for t in todo}
    callback = DriverCallback(tracker, by_key, progress, outcome)
    try:
        _open_trials(todo, reopen, tracker, resume, console)
        limit = concurrency(plan, len(todo), max_concurrent, console)
        res = plan.resources
        console.print(
            f"sweep {plan.name}: {len(todo)} trial(s), {limit} at a time, "
            f"{res.workers} worker(s) x {res.cpus_per_worker:g} CPU / {res.gpus_per_worker:g} GPU each"
        )
        tuner = _tuner(plan, todo, limit, callback)
        with progress.live(), quiet_tune():
            tuner.fit()
        status = "FAILED" if outcome.failed else "FINISHED"
    finally:
        for key in by_key:
            if key in tracker.run_ids and key not in callback.closed:
                tracker.kill(key, "sweep driver stopped before the trial ended")
                outcome.killed.append(key)
            elif key not in callback.closed and status == "KILLED":  # never started: no run
                outcome.killed.append(key)
        tracker.end_parent(
            status if not outcome.killed else "KILLED",
            {"finished": len(outcome.finished), "failed": len(outcome.failed), "killed": len(outcome.killed),
             "copied": len(outcome.copied)},
        )


def _open_trials(
    todo: list[Trial], reopen: dict[str, str | None], tracker: SweepTracker, resume: bool, console: Console
) -> None:
    """Each trial's run directory, and the runs of interrupted trials reopened (a new trial's
    run is created when it starts); a kept directory's epochs that the run lacks are logged
    from its ``metrics.jsonl``."""
    resumed = 0
    for trial in todo:
        run_id = reopen[trial.key]
        if run_id is not None:
            tracker.reopen_trial(trial, run_id)
        if prepare_run_dir(trial, run_id, resume):
            resumed += 1
            if run_id is not None:
                tracker.backfill(trial.key, trial.run_dir)
    if resume:
        console.print(f"resuming {resumed} trial(s) from their checkpoints")


def trainable(plan: Plan):
    """The trial function with the resources of one trial."""
    from dwlab.sweep.trainable import trial_fn

    res = plan.resources
    if res.workers > 1:
        # the trial only coordinates: its Train workers hold the CPUs and GPUs (a CPU here
        # would be counted twice); Ray needs some resource, so a little memory
        return tune.with_resources(trial_fn, {"cpu": 0, "memory": COORDINATOR_MEMORY})
    return tune.with_resources(trial_fn, {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})


def _tuner(plan: Plan, todo: list[Trial], limit: int, callback: DriverCallback) -> tune.Tuner:
    """One grid-search trial per payload, ``limit`` at a time, ``plan.max_retries`` retries each."""
    res = plan.resources
    return tune.Tuner(
        trainable(plan),
        param_space={"trial": tune.grid_search([_payload(plan, t) for t in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=limit,
            reuse_actors=res.workers == 1,
            trial_name_creator=lambda tr: tr.config["trial"]["dirname"],
            trial_dirname_creator=lambda tr: tr.config["trial"]["dirname"],
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(plan.runs_dir / "_ray"),
            failure_config=tune.FailureConfig(max_failures=plan.max_retries),
            callbacks=[callback],
            verbose=0,
        ),
    )


@contextlib.contextmanager
def quiet_tune():
    """Tune's own progress output and MLflow's URL lines off (the progress view is ours); Tune
    logs each trial failure with its traceback, which the view has in one line."""
    quiet = {"RAY_AIR_NEW_OUTPUT": "0", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    logger = logging.getLogger("ray.tune")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with mock.patch.dict(os.environ, quiet):
            yield
    finally:
        logger.setLevel(level)
