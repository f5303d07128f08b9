"""A sweep file's ``search``: per method, a Ray Tune search over some of its config keys,
scored on the generated data's ``tune`` split, never on val::

    search:
      algorithm: tpe        # tpe: Optuna's TPE through Ray Tune's OptunaSearch | random: Ray Tune's
      seed: 0               # the search algorithm's seed
      startup_trials: null  # tpe: trials sampled at random before TPE models (null: Optuna's 10)
      budget: {trials: 8}   # or {trial_epochs: 60}: epochs over all trials (needs a scheduler)
      scheduler: null       # or {asha: {grace_period: 3, reduction_factor: 3}}: stops weak trials
      trial_seed: 1000      # train.seed of every tuning trial (the final runs take the sweep's seeds)
      defaults: true        # the final runs include each method at its defaults, on the same seeds
      tune_data: null       # with data.root set: {ann: ..., images: ...} of a held-out split under it
      methods:
        - id: dw
          label: DW
          set: {assigner.name: dw}             # the method, at its defaults
          space:
            assigner.dw.beta: {uniform: [2, 8]}
            assigner.dw.mu: {loguniform: [2, 10]}
            assigner.dw.bag_topk: {int: [5, 15]}  # both ends included
            assigner.dw.bag: {choice: [soft, topk]}
          budget: {trials: 12}                  # algorithm, seed, budget, scheduler: per method too

Everything is checked before anything runs (``expand_search``): every key, every range end and
choice is resolved into a config, the ASHA rungs must be evaluation epochs, a method tunes only
its own assigner's keys. A problem is one line naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dwlab import TRAINING_REVISION
from dwlab.config import Config, apply_overrides, flatten, to_dict, validate
from dwlab.errors import DwlabError

KINDS = ("uniform", "loguniform", "int", "choice")
ALGORITHMS = {"tpe": "Optuna's TPE (Ray Tune's OptunaSearch)", "random": "Ray Tune's random search"}
# keys a search must not vary: they pick the method, the data a trial is scored on, or its seed
FIXED_KEYS = ("name", "scale", "assigner.name", "train.seed", "data.root", "data.val_ann", "data.val_images", "data.synth.")
TRIAL_SEED = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Asha(_Strict):
    grace_period: int = Field(1, ge=1)  # epochs before a trial can be stopped (the first rung)
    reduction_factor: float = Field(3.0, gt=1.0, le=100.0, allow_inf_nan=False)


class Scheduler(_Strict):
    asha: Asha


class Budget(_Strict):
    trials: int | None = Field(None, ge=1, le=10_000)
    trial_epochs: int | None = Field(None, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.trials is None) == (self.trial_epochs is None):
            raise ValueError("give exactly one of trials or trial_epochs")
        return self


class _Common(_Strict):
    algorithm: Literal["tpe", "random"] = "tpe"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    startup_trials: int | None = Field(None, ge=1, le=10_000)
    budget: Budget | None = None
    scheduler: Scheduler | None = None


class MethodSpec(_Common):
    id: str
    label: str | None = None
    set: dict[str, Any] = {}
    space: dict[str, Any]


class TuneData(_Strict):
    ann: str
    images: str


class SearchSection(_Common):
    trial_seed: int = Field(TRIAL_SEED, ge=0)
    defaults: bool = True
    tune_data: TuneData | None = None
    methods: list[MethodSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Param:
    """One key's range: ``uniform``/``loguniform`` (lo, hi), ``int`` (lo, hi, both included) or
    ``choice`` (the values)."""

    kind: str
    values: tuple

    def domain(self):
        """The Ray Tune search space of this range."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        if self.kind == "int":
            return tune.randint(lo, hi + 1)  # Ray's upper end is exclusive
        return tune.loguniform(lo, hi) if self.kind == "loguniform" else tune.uniform(lo, hi)

    def __str__(self) -> str:
        if self.kind == "choice":
            return "choice " + " | ".join(map(str, self.values))
        return f"{self.kind} {self.values[0]:g}..{self.values[1]:g}"


def parse_range(raw: Any, where: str) -> Param:
    """``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{int: [lo, hi]}`` or ``{choice: [...]}``."""
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in KINDS:
        raise DwlabError(f"{where}: expected one of {{{': [...]}, {'.join(KINDS)}: [...]}}, got {raw!r}")
    kind, values = next(iter(raw.items()))
    if not isinstance(values, list) or not values:
        raise DwlabError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind == "choice":
        if any(isinstance(v, (list, dict)) for v in values) or len({json.dumps(v) for v in values}) != len(values):
            raise DwlabError(f"{where}.choice: expected distinct plain values, got {values!r}")
        return Param(kind, tuple(values))
    number = int if kind == "int" else (int, float)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, number) for v in values):
        what = "integers" if kind == "int" else "numbers"
        raise DwlabError(f"{where}.{kind}: expected [low, high], two {what}, got {values!r}")
    lo, hi = values
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise DwlabError(f"{where}.{kind}: expected low < high, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise DwlabError(f"{where}.loguniform: expected 0 < low, got {values!r}")
    return Param(kind, (lo, hi))


@dataclass(frozen=True)
class MethodSearch:
    """One method's search, resolved: ``config`` is a tuning trial's before the sampled values
    (the method at its defaults, scored on the tune split, ``train.seed`` = the trial seed)."""

    id: str
    label: str | None
    overrides: dict[str, Any]  # the method's ``set``: its defaults
    space: dict[str, Param]
    algorithm: str
    seed: int
    startup_trials: int | None  # tpe: random trials before TPE models (None: Optuna's default)
    trials: int | None
    trial_epochs: int | None
    asha: Asha | None
    config: Config
    run_root: Path  # tuning trials' run directories: <run_root>/<ray trial id>
    digest: str  # what makes two searches the same one (a finished one is not run again)

    @property
    def epochs(self) -> int:
        return self.config.train.epochs

    @property
    def max_trials(self) -> int:
        """Trials Tune may start: the budget's, or for trial-epochs at most one per epoch
        (every ended trial counts at least one epoch, so failing trials cannot loop)."""
        return self.trials if self.trials is not None else self.trial_epochs

    def rungs(self) -> list[int]:
        """The epochs at which ASHA compares a trial with its peers."""
        return rungs(self.asha, self.epochs) if self.asha else []

    def describe(self) -> str:
        """``"tpe seed 0, 8 trials x 15 epochs"``; ``"random seed 0, 60 trial-epochs of 15-epoch
        trials, ASHA (grace 3, reduction 3: rungs at epochs 3, 9)"``."""
        budget = f"{self.trials} trials x {self.epochs} epochs" if self.trials else (
            f"{self.trial_epochs} trial-epochs of {self.epochs}-epoch trials")
        startup = f" (first {self.startup_trials} at random)" if self.startup_trials else ""
        text = f"{self.algorithm}{startup} seed {self.seed}, {budget}"
        if self.asha:
            a = self.asha
            text += (f", ASHA (grace {a.grace_period}, reduction {a.reduction_factor:g}: rungs at epochs "
                     f"{', '.join(map(str, self.rungs())) or 'none'})")
        return text


def rungs(asha: Asha, epochs: int) -> list[int]:
    """ASHA's milestones below ``epochs`` (grace x reduction^k), as the epochs that reach them."""
    out, k = [], 0
    while asha.grace_period * asha.reduction_factor**k < epochs:
        out.append(math.ceil(asha.grace_period * asha.reduction_factor**k - 1e-9))
        k += 1
    return sorted(set(out))


def apply_sampled(config: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """A tuning trial's config: ``config`` (a ``MethodSearch.config`` as a dict) with the values
    the search algorithm sampled (dotted keys)."""
    return validate(apply_overrides(config, sampled), "the tuning trial's config")


def trial_digest(search: MethodSearch) -> str:
    """What a resumed search must match to reuse a finished tuning trial: the search itself and
    ``TRAINING_REVISION`` (the same trial trains to other numbers at another revision)."""
    text = json.dumps({
        "revision": TRAINING_REVISION,
        "config": to_dict(search.config), "space": {k: [p.kind, list(p.values)] for k, p in search.space.items()},
        "algorithm": search.algorithm, "seed": search.seed, "startup_trials": search.startup_trials, "trials": search.trials,
        "trial_epochs": search.trial_epochs, "asha": search.asha.model_dump() if search.asha else None,
    }, sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- expansion


@dataclass
class Context:
    """What ``expand_search`` needs from the sweep file around the search."""

    file_set: dict[str, Any]
    cli_set: dict[str, Any]
    resolve: Callable[[dict[str, Any], str], Config]  # overrides -> checked config, errors name `where`
    name_ok: Callable[[str], bool]
    runs_root: Path  # <runs dir>/<sweep name>
    seeds: list[int]
    runtime: dict[str, Any]  # per-trial runtime keys (train.progress, train.threads)


def expand_search(raw: Any, ctx: Context, format_error: Callable[[ValidationError, str], str]) -> tuple[SearchSection, list[MethodSearch]]:
    """The ``search`` section, validated, and its methods' searches in order."""
    try:
        section = SearchSection.model_validate(raw)
    except ValidationError as err:
        raise DwlabError(format_error(err, "search")) from None
    if section.trial_seed in ctx.seeds:
        raise DwlabError(f"search.trial_seed: {section.trial_seed} is one of the final runs' seeds "
                         f"({', '.join(map(str, ctx.seeds))}): they must be fresh")  # fmt: skip
    searches, seen = [], set()
    for index, method in enumerate(section.methods):
        where = f"search.methods[{index}]"
        if not ctx.name_ok(method.id):
            raise DwlabError(f"{where}.id: {method.id!r} is not a valid id (letters, digits, . _ + = , -; at most 100)")
        if method.id in seen:
            raise DwlabError(f"{where}.id: {method.id!r} names two methods")
        seen.add(method.id)
        searches.append(_method(section, method, f"{where} ({method.id})", ctx))
    return section, searches


def _method(section: SearchSection, method: MethodSpec, where: str, ctx: Context) -> MethodSearch:
    raw_set = {k: v for k, v in method.set.items()}
    defaults = ctx.resolve({**ctx.file_set, **raw_set, **ctx.cli_set}, where)
    space = _space(method, defaults, where, ctx)
    common = {k: getattr(section, k) for k in _Common.model_fields}
    common.update({k: getattr(method, k) for k in method.model_fields_set if k in _Common.model_fields})
    src = {k: (f"{where}.{k}" if k in method.model_fields_set else f"search.{k}") for k in _Common.model_fields}
    budget: Budget | None = common["budget"]
    if budget is None:
        raise DwlabError(f"{where}: no budget (give search.budget or {where.split(' ')[0]}.budget: {{trials: N}} or {{trial_epochs: N}})")
    asha = common["scheduler"].asha if common["scheduler"] else None
    if common["startup_trials"] is not None and common["algorithm"] != "tpe":
        raise DwlabError(f"{src['startup_trials']}: only for algorithm tpe (this search's is {common['algorithm']})")
    if budget.trial_epochs is not None and asha is None:
        raise DwlabError(f"{src['budget']}.trial_epochs: needs a scheduler (without one every trial trains all "
                         "its epochs: give budget.trials)")  # fmt: skip
    config = ctx.resolve({**ctx.file_set, **raw_set, **ctx.cli_set, **ctx.runtime, **_tune_data(section, defaults),
                          "train.seed": section.trial_seed}, f"{where} (its tuning trials)")  # fmt: skip
    if asha is not None:
        _check_rungs(asha, config, f"{src['scheduler']}.asha")
    search = MethodSearch(
        id=method.id, label=method.label, overrides=raw_set, space=space, algorithm=common["algorithm"],
        seed=common["seed"], startup_trials=common["startup_trials"], trials=budget.trials, trial_epochs=budget.trial_epochs, asha=asha, config=config,
        run_root=ctx.runs_root / method.id / "tune", digest="",
    )  # fmt: skip
    return MethodSearch(**{**search.__dict__, "digest": trial_digest(search)})


def _space(method: MethodSpec, defaults: Config, where: str, ctx: Context) -> dict[str, Param]:
    """The method's ranges, each end (each choice) resolved into a config."""
    if not method.space:
        raise DwlabError(f"{where}.space: empty (name at least one key and its range)")
    flat = flatten(defaults)
    space = {}
    for key, raw in method.space.items():
        at = f"{where}.space.{key}"
        if not isinstance(key, str) or not key.strip():
            raise DwlabError(f"{where}.space: expected dotted config keys, got {key!r}")
        if key in FIXED_KEYS or any(key.startswith(k) for k in FIXED_KEYS if k.endswith(".")):
            raise DwlabError(f"{at}: a search cannot vary {key} (it picks the method, the split scored on or the seed)")
        if key in method.set or key in ctx.cli_set:
            raise DwlabError(f"{at}: also fixed by {'set' if key in method.set else '--set'}; a key is searched or fixed")
        parts = key.split(".")
        if parts[0] == "assigner" and len(parts) > 2 and parts[1] != defaults.assigner.name:
            raise DwlabError(f"{at}: a key of assigner {parts[1]}, but this method trains assigner "
                             f"{defaults.assigner.name} (set assigner.name, or tune its own keys)")  # fmt: skip
        param = parse_range(raw, at)
        for value in param.values:
            ctx.resolve({**ctx.file_set, **method.set, key: value, **ctx.cli_set}, at)
        current = flat.get(key)
        if param.kind in ("uniform", "loguniform") and isinstance(current, int) and not isinstance(current, bool):
            raise DwlabError(f"{at}: {key} is an integer (give {{int: [low, high]}})")
        space[key] = param
    return space


def _tune_data(section: SearchSection, defaults: Config) -> dict[str, str]:
    """The ``data.val_*`` keys of a tuning trial: the generated tune split, or ``tune_data``."""
    from dwlab.data.synth import tune_names

    data = defaults.data
    if data.root is None:
        if section.tune_data is not None:
            raise DwlabError("search.tune_data: only with data.root set (the generated data has its own tune split)")
        return {f"data.{k}": v for k, v in tune_names().items()}
    if section.tune_data is None:
        raise DwlabError(f"search.tune_data: required with data.root={data.root} (give {{ann: ..., images: ...}} "
                         "of a held-out split under it; tuning never scores on val)")  # fmt: skip
    if section.tune_data.ann == data.val_ann:
        raise DwlabError(f"search.tune_data.ann: {section.tune_data.ann} is the val set (data.val_ann); tuning never scores on val")
    return {"data.val_ann": section.tune_data.ann, "data.val_images": section.tune_data.images}


def _check_rungs(asha: Asha, config: Config, where: str) -> None:
    """ASHA compares trials at its rungs on the last AP: each rung must be an evaluation epoch."""
    epochs, every = config.train.epochs, config.eval.every
    if asha.grace_period >= epochs:
        raise DwlabError(f"{where}.grace_period: {asha.grace_period} is not below the trials' {epochs} epochs (train.epochs)")
    bad = [r for r in rungs(asha, epochs) if not every or r % every]
    if bad:
        when = "only after the last epoch" if not every else f"every {every} epochs"
        raise DwlabError(f"{where}: decides at epochs {', '.join(map(str, rungs(asha, epochs)))} but the trials "
                         f"evaluate {when} (eval.every): make every rung an evaluation epoch")  # fmt: skip
