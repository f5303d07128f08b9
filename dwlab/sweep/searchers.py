"""The Ray Tune pieces of one method's search: its search algorithm and scheduler.

- ``tpe``: Optuna's TPE through Ray Tune's ``OptunaSearch`` (seeded: ``TPESampler(seed=...)``,
  Optuna's defaults of the pinned version, which samples its first 10 trials at random unless
  ``startup_trials`` says otherwise), behind a ``ConcurrencyLimiter`` so that it sees results
  before it suggests again; ``random``: Ray Tune's ``BasicVariantGenerator`` (seeded).
- ``asha``: Ray Tune's ``ASHAScheduler`` on the trials' ``epoch``, one bracket, never stopping
  a trial that reached its last epoch (``stop_last_trials=False``, so it ends normally).

What Ray and Optuna would otherwise get wrong (/work/shared/notes/pitfalls-methods.md, 7):

- A trial the scheduler stopped early ends with a truncated AP; ``OptunaSearch`` would tell it
  to Optuna as COMPLETE with that value. Here it is told PRUNED (as Optuna's own pruners do), so
  TPE ranks it below every complete trial by its intermediate values instead of mistaking an
  early AP for a final one. Only evaluated epochs (``scored``) become intermediate values, at
  ``step = epoch``.
- A failed trial, or one whose score is not a number, is told FAIL (``OptunaSearch`` would try
  COMPLETE with NaN, which Optuna refuses, leaving it RUNNING in the study for ever).
- ``metric`` and ``mode`` go to the searcher and the scheduler themselves (not to TuneConfig).
- A ``trial_epochs`` budget: a new trial starts while the epochs all trials have trained so
  far (each ended trial at least one) are below it; trials running when it is reached finish
  (or are stopped by ASHA), so the total may pass it by up to the trials running at once.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from dwlab.sweep.search_spec import MethodSearch
from dwlab.sweep.trainable import SCORE, SCORED

COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"  # how a tuning trial ended


def outcome(result: dict[str, Any] | None, error: bool, epochs: int) -> str:
    """COMPLETE (trained every epoch, a score), STOPPED (by the scheduler before its last
    epoch) or FAILED (an error, or no usable score)."""
    if error or not result:
        return FAILED
    score = result.get(SCORE)
    if not isinstance(score, (int, float)) or not math.isfinite(score):
        return FAILED
    return COMPLETE if int(result.get("epoch", 0)) >= epochs else STOPPED


class EpochLedger:
    """Epochs trained per trial, against an optional budget."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.epochs: dict[str, int] = {}

    def result(self, trial_id: str, result: dict[str, Any] | None) -> None:
        epoch = int((result or {}).get("epoch", 0))
        self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), epoch)

    def ended(self, trial_id: str, result: dict[str, Any] | None) -> None:
        self.result(trial_id, result)
        self.epochs[trial_id] = max(self.epochs[trial_id], 1)

    def exhausted(self) -> bool:
        return self.limit is not None and sum(self.epochs.values()) >= self.limit


class BudgetedRandom(BasicVariantGenerator):
    """Ray Tune's random search that stops starting trials once a trial-epochs budget is spent."""

    def __init__(self, budget_epochs: int | None, **kwargs):
        super().__init__(**kwargs)
        self.ledger = EpochLedger(budget_epochs)

    def next_trial(self):
        if self.ledger.exhausted():
            self.set_finished()
            return None
        return super().next_trial()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.ledger.result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.ledger.ended(trial_id, result)
        super().on_trial_complete(trial_id, result, error)


class BudgetedOptuna(OptunaSearch):
    """``OptunaSearch`` that tells a stopped trial PRUNED and a failed one FAIL (module doc), and
    stops suggesting once a trial-epochs budget is spent."""

    def __init__(self, *, epochs: int, budget_epochs: int | None, **kwargs):
        super().__init__(**kwargs)
        self.epochs = epochs
        self.ledger = EpochLedger(budget_epochs)

    def suggest(self, trial_id: str):
        if self.ledger.exhausted():
            return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.ledger.result(trial_id, result)
        self._intermediate(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.ledger.ended(trial_id, result)
        ended = outcome(result, error, self.epochs)
        if ended == STOPPED:  # Tune hands the result that stopped a trial to on_trial_complete only
            self._intermediate(trial_id, result)
        if ended == COMPLETE:  # OptunaSearch tells COMPLETE with the metric's value
            super().on_trial_complete(trial_id, {self.metric: float(result[SCORE])}, False)
        else:  # no value: OptunaSearch tells PRUNED, or FAIL with error
            super().on_trial_complete(trial_id, None, ended == FAILED)

    def _intermediate(self, trial_id: str, result: dict) -> None:
        """An evaluated epoch's score as the Optuna trial's intermediate value at that epoch."""
        score = result.get(SCORE)
        if result.get(SCORED) and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            if isinstance(score, (int, float)) and math.isfinite(score):
                self._ot_trials[trial_id].report(float(score), int(result["epoch"]))


def search_algorithm(search: MethodSearch, limit: int):
    """(search algorithm, the part of the param space it samples from Tune's side)."""
    space = {"space": {key: param.domain() for key, param in search.space.items()}}
    if search.algorithm == "random":
        return BudgetedRandom(search.trial_epochs, random_state=search.seed, max_concurrent=limit), space
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per trial on the driver's console
    seeding: dict[str, Any] = {"seed": search.seed}  # OptunaSearch builds TPESampler(seed=...)
    if search.startup_trials is not None:
        seeding = {"sampler": optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.startup_trials)}
    searcher = BudgetedOptuna(
        space=OptunaSearch.convert_search_space(space), metric=SCORE, mode="max", epochs=search.epochs,
        budget_epochs=search.trial_epochs, **seeding,
    )  # fmt: skip
    return ConcurrencyLimiter(searcher, max_concurrent=limit), {}


def scheduler(search: MethodSearch):
    if search.asha is None:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch", metric=SCORE, mode="max", max_t=search.epochs, grace_period=search.asha.grace_period,
        reduction_factor=search.asha.reduction_factor, brackets=1, stop_last_trials=False,
    )  # fmt: skip
