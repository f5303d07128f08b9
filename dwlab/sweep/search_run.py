"""A search sweep, both phases in one ``dwlab sweep``:

1. per method, in order, one Ray Tune search (``searchers``): trials of the method's config with
   sampled values, scored on the tune split, each an MLflow run nested under the method's search
   run; the search chooses the complete trial with the highest AP there (a trial stopped early
   by the scheduler, or failed, is never chosen);
2. the final runs, an ordinary grid (``tune_run.run_grid``): per method its chosen values (and,
   with ``search.defaults``, its defaults) at the sweep's seeds, scored on val.

Idempotence and resume follow the grid's: a FINISHED search run with the same search hash is not
run again (its chosen values are reused), a final run FINISHED with the same config is skipped.
An interrupted search is resumed with ``--resume`` by Ray Tune's own restore
(``Tuner.restore``): its search algorithm, scheduler and unfinished trials continue where Tune
last saved them, each trial from the checkpoint in its run directory, in the same MLflow run.
Without ``--resume`` it starts again from scratch (its earlier runs closed KILLED).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ray import tune

from dwlab.config import to_dict
from dwlab.store import TUNE_TRIAL, Tag
from dwlab.sweep.progress import SweepProgress
from dwlab.sweep.search_spec import MethodSearch, apply_sampled
from dwlab.sweep.searchers import COMPLETE, FAILED, STOPPED, outcome, scheduler, search_algorithm
from dwlab.sweep.spec import TUNED, Plan, Point, Trial, config_hash, final_points, trials_for
from dwlab.sweep.tracking import SearchState, SweepTracker
from dwlab.sweep.tune_run import (
    DriverCallback, Outcome, RaySession, concurrency, payload_base, prepare_all, quiet_tune, run_grid, trainable,
)  # fmt: skip

if TYPE_CHECKING:
    from rich.console import Console

LOST = "lost"  # a tuning trial the restored Ray experiment does not know (started after Tune last saved it)
LIVE: dict[str, SearchCallback] = {}  # search id -> the driver's callback, for a restored Tuner's copy


@dataclass
class SearchSummary:
    chosen: dict[str, Any] | None
    run_id: str | None
    score: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False  # Tune stopped before the search's trials ended (Ctrl-C)


class SearchCallback(DriverCallback):
    """``DriverCallback`` for one search's trials: each trial's run is created (nested under the
    search run) when it starts; a trial ends complete, stopped (by the scheduler) or failed."""

    def __init__(self, tracker: SweepTracker, search: MethodSearch, search_run: str, progress: SweepProgress,
                 outcome: Outcome, workers: int):  # fmt: skip
        super().__init__(tracker, {}, progress, outcome)
        self.search, self.search_run, self.workers = search, search_run, workers
        LIVE[search.id] = self

    def __getstate__(self) -> dict:
        return {"search": self.search.id}

    def __setstate__(self, state: dict) -> None:
        """A restored Tuner's copy (``tuner.pkl``) works through the driver's live callback."""
        live = LIVE.get(state.get("search", ""))
        self.__dict__.update(live.__dict__ if live is not None else state)

    def _key(self, trial) -> str:
        return f"{self.search.id}/{trial.trial_id}"

    def on_trial_start(self, iteration, trials, trial, **info):
        key = self._key(trial)
        if key not in self.trials:
            sampled = trial.config.get("space") or {}
            cfg = apply_sampled(to_dict(self.search.config), sampled)
            tags = {Tag.PARENT: self.search_run, Tag.SEARCH: self.search.id, Tag.RAY_TRIAL_ID: trial.trial_id}
            self.trials[key] = Trial(Point(key, sampled), cfg.train.seed, cfg, config_hash(cfg),
                                     self.search.run_root / trial.trial_id, self.workers, TUNE_TRIAL, tags)  # fmt: skip
            self.progress.add(key, self.search.epochs)
        reopened = key in self.tracker.run_ids  # an interrupted invocation's run, or a retry
        super().on_trial_start(iteration, trials, trial, **info)
        if reopened:  # the epochs its checkpoint holds but the run lacks (the driver stopped before their record)
            self.tracker.backfill(key, self.trials[key].run_dir)

    def on_trial_complete(self, iteration, trials, trial, **info):
        key = self._key(trial)
        last = trial.last_result or {}
        ended = outcome(last, False, self.search.epochs)
        self._ended(key, ended, last)
        final = last.get("metrics", {}) if int(last.get("epoch", 0)) >= self.search.epochs else {}
        self.tracker.finish(self.trials[key], final)
        self.closed.add(key)
        (self.progress.finished if ended == COMPLETE else self.progress.stopped)(key)
        _drop_checkpoints(self.trials[key])

    def on_trial_error(self, iteration, trials, trial, **info):
        """A failed tuning trial is one of the search's results (its counts), not the sweep's failure."""
        key = self._key(trial)
        error = self._error(trial, key)
        self._ended(key, FAILED, trial.last_result or {})
        self.tracker.fail(key, error)
        self.closed.add(key)
        self.progress.failed(key, error)
        _drop_checkpoints(self.trials[key])

    def _ended(self, key: str, ended: str, last: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        metric = Metric("epochs_trained", float(last.get("epoch", 0)), 0, 0)
        self.tracker.client.log_batch(self.tracker.run_ids[key], metrics=[metric], tags=[RunTag(Tag.TUNE_OUTCOME, ended)])


def _drop_checkpoints(trial: Trial) -> None:
    """An ended tuning trial's checkpoints (its metrics, eval and config files stay): nothing
    resumes it, and a search writes many."""
    shutil.rmtree(trial.run_dir / "checkpoints", ignore_errors=True)


# ----------------------------------------------------------------------------- driver


def run_searches(plan: Plan, tracker: SweepTracker, outcome: Outcome, console: Console, ray_session: RaySession,
                 *, max_concurrent: int | None, resume: bool) -> None:  # fmt: skip
    """Phase 1 (each method's search), then phase 2 (the final runs); see the module doc. The
    parent run is opened when something runs (an interrupted invocation's, with ``resume``)."""
    states = tracker.search_states(resume=resume)
    reuse = tracker.unfinished_parent() if resume else None
    tracker.close_parents({reuse} if reuse else set())
    todo = [s for s in plan.searches if not states[s.id].finished]
    if todo:
        prepare_all([_as_trial(s) for s in todo], console)
        ray_session.start()  # before any run is opened: a bad --address writes nothing
        tracker.start_parent(reuse, sum(s.max_trials for s in todo), len(plan.searches) - len(todo))
    summaries: dict[str, SearchSummary] = {}
    status = "KILLED"
    try:
        for search in plan.searches:
            summaries[search.id] = _one_search(plan, search, states[search.id], tracker, outcome, console,
                                               max_concurrent=max_concurrent, resume=resume)  # fmt: skip
            if summaries[search.id].interrupted:
                return  # neither the other searches nor the final runs: the parent ends KILLED
        status = "FINISHED"
    finally:
        if status == "KILLED" and tracker.parent_id is not None:
            tracker.end_parent("KILLED", {"finished": len(outcome.finished), "failed": len(outcome.failed),
                                          "killed": len(outcome.killed)})  # fmt: skip
    outcome.searches = {k: s.chosen for k, s in summaries.items()}
    for key, summary in summaries.items():
        if summary.chosen is None:
            outcome.failed[f"search {key}"] = "no tuning trial completed: nothing chosen"
    _final_phase(plan, _final_trials(plan, summaries), reuse, tracker, outcome, console, ray_session,
                 max_concurrent=max_concurrent, resume=resume)  # fmt: skip


def _final_phase(plan: Plan, trials: list[Trial], reuse: str | None, tracker: SweepTracker, outcome: Outcome,
                 console: Console, ray_session: RaySession, *, max_concurrent: int | None, resume: bool) -> None:  # fmt: skip
    """Phase 2 under the parent run of phase 1, or (no search ran) the interrupted one's or a new one."""
    existing = tracker.reconcile(resume=resume, trials=trials, parents=False)
    if tracker.parent_id is None and any(not existing[t.key].finished for t in trials):
        ray_session.start()
        tracker.start_parent(reuse, len(trials), 0)
    elif tracker.parent_id is None and reuse is not None:  # nothing left to run for the interrupted one
        tracker.close(reuse, "KILLED", "sweep driver was interrupted")
    console.print(f"sweep {plan.name}: the final runs, scored on val")
    run_grid(plan, trials, existing, tracker, outcome, console, ray_session, max_concurrent=max_concurrent,
             resume=resume, parent=tracker.parent_id)  # fmt: skip


def _as_trial(search: MethodSearch) -> Trial:
    """A stand-in trial of the search's config, for ``prepare_all`` (its inputs: the data with
    its tune split, the pretrained backbone)."""
    return Trial(Point(search.id, {}), 0, search.config, "", search.run_root)


def _final_trials(plan: Plan, summaries: dict[str, SearchSummary]) -> list[Trial]:
    """Phase 2's trials, tagged with their role and (tuned) the search that chose their values."""
    trials = []
    for search, role, point in final_points(plan, {k: s.chosen for k, s in summaries.items()}):
        tags = {Tag.ROLE: role, Tag.SEARCH: search.id, Tag.SEARCH_DESC: search.describe()}
        if role == TUNED:
            summary = summaries[search.id]
            tags.update({Tag.SEARCH_RUN: summary.run_id or "", Tag.CHOSEN: json.dumps(summary.chosen, sort_keys=True),
                         Tag.TUNE_SCORE: f"{summary.score}"})  # fmt: skip
        trials += [replace(t, tags=tags) for t in trials_for(plan, [point])]
    return trials


def _one_search(plan: Plan, search: MethodSearch, state: SearchState, tracker: SweepTracker, outcome: Outcome,
                console: Console, *, max_concurrent: int | None, resume: bool) -> SearchSummary:  # fmt: skip
    """One method's search (or its earlier FINISHED run's choice)."""
    if state.finished:
        console.print(f"search {search.id}: already FINISHED with the same search, chose {_values(state.chosen)}",
                      soft_wrap=True)  # fmt: skip
        return SearchSummary(state.chosen, state.run_id, state.score)
    run_id = tracker.start_search(search, state.run_id)
    limit = concurrency(plan, search.max_trials, max_concurrent, console)
    console.print(f"search {search.id}: {search.describe()}, {limit} at a time, scored on the tune split", soft_wrap=True)
    progress = SweepProgress([], console, title=f"search {search.id}", expected=search.trials, epochs=search.epochs)
    callback = SearchCallback(tracker, search, run_id, progress, outcome, plan.resources.workers)
    restored = resume and state.run_id is not None
    if restored:
        for trial_id, run in tracker.tune_trial_runs(run_id).items():  # reopened when the trial starts again
            tracker.run_ids[f"{search.id}/{trial_id}"] = run.info.run_id
    status, summary = "KILLED", None
    try:
        tuner = _tuner(plan, search, limit, callback, restored, console)
        with progress.live(), quiet_tune():
            tuner.fit()
        if all(key in callback.closed for key in callback.trials):  # else Tune stopped on Ctrl-C
            summary = _summary(tracker, search, run_id)
            status = "FINISHED" if summary.chosen is not None else "FAILED"
    finally:
        _close_search(tracker, search, run_id, callback, status, summary)
    if summary is None:
        console.print(f"search {search.id}: interrupted (re-run with --resume to continue it)", soft_wrap=True)
        return SearchSummary(None, run_id, interrupted=True)
    console.print(f"search {search.id}: " + (f"chose {_values(summary.chosen)} (AP {100 * summary.score:.1f} on the "
                  f"tune split)" if summary.chosen is not None else "no trial completed: nothing chosen")
                  + " | " + ", ".join(f"{n} {k}" for k, n in summary.counts.items()), soft_wrap=True)  # fmt: skip
    return summary


def _tuner(plan: Plan, search: MethodSearch, limit: int, callback: SearchCallback, restore: bool,
           console: Console) -> tune.Tuner:  # fmt: skip
    """A fresh Tuner for the search, or (``restore``) Ray Tune's restore of the interrupted one."""
    path = plan.runs_dir / "_ray" / f"{plan.name}.search.{search.id}"
    if restore and tune.Tuner.can_restore(str(path)):
        LIVE[search.id] = callback
        console.print(f"search {search.id}: resuming Ray Tune's saved state ({path})", soft_wrap=True)
        return tune.Tuner.restore(str(path), trainable(plan), resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)  # fmt: skip
    shutil.rmtree(path, ignore_errors=True)  # a new search: nothing of an earlier one
    shutil.rmtree(search.run_root, ignore_errors=True)
    algorithm, space = search_algorithm(search, limit)
    payload = {**payload_base(plan), "search": search.id, "config": to_dict(search.config),
               "run_root": str(search.run_root), "key": search.id, "dirname": search.id, "run_dir": ""}  # fmt: skip
    name = lambda trial: f"{search.id}-{trial.trial_id}"  # noqa: E731
    return tune.Tuner(
        trainable(plan),
        param_space={"trial": payload, **space},
        tune_config=tune.TuneConfig(
            search_alg=algorithm, scheduler=scheduler(search), num_samples=search.max_trials,
            reuse_actors=plan.resources.workers == 1, trial_name_creator=name, trial_dirname_creator=name,
        ),
        run_config=tune.RunConfig(
            name=path.name, storage_path=str(path.parent), callbacks=[callback], verbose=0,
            failure_config=tune.FailureConfig(max_failures=plan.max_retries),
        ),
    )  # fmt: skip


def _summary(tracker: SweepTracker, search: MethodSearch, run_id: str) -> SearchSummary:
    """The search's choice, from its trials' runs: the complete one with the highest AP on the
    tune split (the earliest on a tie)."""
    runs = [r for r in tracker.tune_trial_runs(run_id).values() if r.info.status in ("FINISHED", "FAILED")]
    runs.sort(key=lambda r: r.info.start_time)
    counts = {k: sum(r.data.tags.get(Tag.TUNE_OUTCOME) == k for r in runs) for k in (COMPLETE, STOPPED, FAILED)}
    counts["trial-epochs"] = int(sum(r.data.metrics.get("epochs_trained", 0) for r in runs))
    done = [r for r in runs if r.data.tags.get(Tag.TUNE_OUTCOME) == COMPLETE and "AP" in r.data.metrics]
    if not done:
        return SearchSummary(None, run_id, None, counts)
    best = max(done, key=lambda r: (r.data.metrics["AP"], -r.info.start_time))
    chosen = json.loads(best.data.tags.get(Tag.POINT_OVERRIDES, "{}"))
    return SearchSummary(chosen, run_id, best.data.metrics["AP"], counts)


def _close_search(tracker: SweepTracker, search: MethodSearch, run_id: str, callback: SearchCallback, status: str,
                  summary: SearchSummary | None) -> None:  # fmt: skip
    """Close the search run (and what of it is still open): its choice and counts when it ran
    through, KILLED otherwise."""
    from dwlab.sweep.tracking import UNFINISHED

    LIVE.pop(search.id, None)
    for key, trial_run in list(tracker.run_ids.items()):
        if not key.startswith(f"{search.id}/") or key in callback.closed:
            continue
        if tracker.client.get_run(trial_run).info.status in UNFINISHED:
            reason = "sweep driver stopped before the trial ended" if status == "KILLED" else (
                "not in the restored Ray Tune state (started after Tune last saved it)")
            if status == "KILLED":
                callback.outcome.killed.append(key)
            else:
                tracker.client.set_tag(trial_run, Tag.TUNE_OUTCOME, LOST)
            tracker.close(trial_run, "KILLED", reason)
    if summary is None:
        tracker.end_search(run_id, status, {}, {})
        return
    tags = {Tag.CHOSEN: json.dumps(summary.chosen, sort_keys=True)} if summary.chosen is not None else {}
    metrics = {f"trials_{k}": v for k, v in summary.counts.items() if k != "trial-epochs"}
    metrics.update({"trial_epochs": summary.counts.get("trial-epochs", 0), "tune_AP": summary.score})
    tracker.end_search(run_id, status, tags, {k: v for k, v in metrics.items() if v is not None})


def _values(chosen: dict[str, Any] | None) -> str:
    if not chosen:
        return "nothing"
    return ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in chosen.items())  # fmt: skip
