"""Sweep files: schema, validation and expansion into trials.

A sweep file names a base config, a list of points (each a mapping of dotted overrides, or a
``grid`` whose Cartesian product is a set of points), seeds per point and resources per trial::

    name: table2                 # experiment name (default: the file's stem)
    table: table2                # which paper table it reproduces (table2 .. table7)
    base: null                   # config preset or path (relative to this file); null: the scale preset
                                 # or per scale, {paper: paper-2x-ms}: a scale left out gets its preset
    scale: smoke                 # smoke | mini | paper (--scale overrides)
    seeds: 1                     # seeds 0 .. seeds-1 per point (--seeds overrides), or per scale
    set: {train.epochs: 8}       # overrides applied to every point (or per scale, like resources)
    points:
      - {assigner.dw.beta: 5, id: my-id, label: "beta 5"}       # one point
      - grid: {assigner.dw.mu: [3, 4, 5]}                        # three points
        assigner.dw.beta: 5                                      # fixed keys of this grid
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, workers_per_trial: 1}
      # or per scale: {smoke: {...}, mini: {...}, paper: {...}}; --cpus-per-trial and
      # --gpus-per-trial override the first two
    only: {mini: [beta=5,mu=5]}  # per scale: run just these point ids (--all-points: every one;
                                 # --point ID, repeated: just those, e.g. a third seed where the
                                 # report's noise rule asks for one)
    max_retries: 1
    checkpoint_artifact: true

The sweep is the union of the points in order, de-duplicated on the resolved config. Every
point is resolved with ``load_config`` before anything starts, so a bad key, value or path
stops the sweep with one line naming the sweep file, the key and the problem.

Instead of ``points``, a sweep file may name a ``search`` (``dwlab.sweep.search_spec``): per
method, a Ray Tune search scored on the tune split; its plan has no trials until the searches
have chosen (``final_trials``), and ``only.<scale>`` then names method ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dwlab import TRAINING_REVISION, paper
from dwlab.assign import ASSIGNERS
from dwlab.config import HASH_NEUTRAL, HASH_UNREAD, Config, flatten, load_config, parse_override, read_yaml, resolve_path
from dwlab.errors import DwlabError
from dwlab.store import ROLE_DEFAULTS, ROLE_TUNED, TRIAL, Tag
from dwlab.sweep.search_spec import Context, MethodSearch, expand_search

TABLES = ("table2", "table3", "table4", "table5", "table6", "table7")
SCALES = ("smoke", "mini", "paper")
PAPER_IMAGES_PER_BATCH, PAPER_LR = paper.IMAGES_PER_STEP, paper.LR
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]{0,99}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")
_RESERVED = ("id", "label")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    """What one trial gets. ``cpus_per_trial`` and ``gpus_per_trial`` are split evenly over
    ``workers_per_trial`` (default: one worker per GPU when ``gpus_per_trial > 1``, else 1)."""

    cpus_per_trial: float = Field(1.0, gt=0, allow_inf_nan=False)
    gpus_per_trial: float = Field(0.0, ge=0, allow_inf_nan=False)
    workers_per_trial: int | None = Field(None, ge=1)

    @property
    def workers(self) -> int:
        if self.workers_per_trial is not None:
            return self.workers_per_trial
        return int(self.gpus_per_trial) if self.gpus_per_trial > 1 else 1

    @property
    def cpus_per_worker(self) -> float:
        return self.cpus_per_trial / self.workers

    @property
    def gpus_per_worker(self) -> float:
        return self.gpus_per_trial / self.workers

    @property
    def record(self) -> str:
        """As the sweep's runs record it: ``cpus_per_trial=1 gpus_per_trial=0.25 workers_per_trial=1``."""
        cpus, gpus = self.cpus_per_trial, self.gpus_per_trial
        return f"cpus_per_trial={cpus:g} gpus_per_trial={gpus:g} workers_per_trial={self.workers}"

    @property
    def threads(self) -> int:
        """torch CPU threads per worker (``train.threads``)."""
        return max(1, int(self.cpus_per_worker))


SeedCount = Annotated[int, Field(ge=1, le=1000)]


class SweepFile(_Strict):
    """The YAML schema; ``points`` items and ``resources`` are checked further in ``expand``."""

    name: str | None = None
    table: Literal["table2", "table3", "table4", "table5", "table6", "table7"] | None = None
    base: str | dict[Literal["smoke", "mini", "paper"], str] | None = None
    scale: Literal["smoke", "mini", "paper"] = "smoke"
    seeds: SeedCount | dict[Literal["smoke", "mini", "paper"], SeedCount] = 1
    set: dict[str, Any] = {}
    points: list[dict[str, Any]] | None = None
    search: Any = None  # checked by search_spec.expand_search
    only: dict[Literal["smoke", "mini", "paper"], list[str]] = {}
    resources: dict[str, Any] = {}
    max_retries: int = Field(1, ge=0, le=100)
    checkpoint_artifact: bool = True


@dataclass(frozen=True)
class Point:
    id: str
    overrides: dict[str, Any]  # the point's own dotted overrides, values as written
    label: str | None = None


@dataclass(frozen=True)
class Trial:
    point: Point
    seed: int
    config: Config  # fully resolved: base + set + point + --set + seed/threads
    config_hash: str
    run_dir: Path
    workers: int = 1  # data-parallel workers (resources): a checkpoint resumes only on as many
    kind: str = TRIAL  # or store.TUNE_TRIAL: a search's trial
    tags: dict[str, str] = field(default_factory=dict, hash=False)  # more MLflow tags of its run

    @property
    def key(self) -> str:
        """``<point>/seed<k>``; a search's trial: ``<method>/<Ray trial id>`` (its point's id)."""
        return f"{self.point.id}/seed{self.seed}" if self.kind == TRIAL else self.point.id


@dataclass
class Plan:
    """An expanded, validated sweep: everything needed to run it or print it."""

    file: Path
    name: str  # experiment name; ``<name>-paper`` at the paper scale
    table: str | None
    scale: str
    base: str  # resolved base config path
    base_config: Config
    overrides: dict[str, Any]  # file ``set`` + ``--set``
    points: list[Point]
    seeds: list[int]
    trials: list[Trial]
    resources: Resources
    max_retries: int
    checkpoint_artifact: bool
    runs_dir: Path
    warnings: list[str] = field(default_factory=list)
    resource_flags: dict[str, float] = field(default_factory=dict)  # resources set by --*-per-trial
    left_out: int = 0  # points the file's ``only`` (or --point) leaves out at this scale (--all-points: 0)
    subset: str = ""  # what picked the points run: "only.<scale>" or "--point"
    file_set: dict[str, Any] = field(default_factory=dict)  # the file's ``set`` at this scale
    cli_set: dict[str, Any] = field(default_factory=dict)  # --set
    searches: list[MethodSearch] = field(default_factory=list)  # a search sweep's, in order
    search_defaults: bool = True  # a search sweep's final runs include each method at its defaults

    @property
    def world_size(self) -> int:
        return self.resources.workers

    def resource_source(self, key: str) -> str:
        """Where ``resources.<key>`` came from: its flag or the sweep file."""
        return flag(key) if key in self.resource_flags else f"resources.{key} in {self.file}"


# ----------------------------------------------------------------------------- helpers


def config_hash(cfg: Config) -> str:
    """sha256 of what decides a run, as canonical JSON: the idempotence key of a trial (``--resume``).

    That is the resolved config without what the run does not read, so that a sweep resumed
    after dwlab has grown keeps its finished trials: the sections of the assigners other than
    ``assigner.name`` (a new method adds one), the options of ``HASH_UNREAD`` where their test
    says the run does not read them, and the options of ``HASH_NEUTRAL`` at their neutral value
    (an off-by-default option added later). ``TRAINING_REVISION`` is in it: the same config
    trains to other numbers at another revision."""
    flat = flatten(cfg)
    own = f"assigner.{ASSIGNERS[cfg.assigner.name].section}."
    kept = {
        k: v for k, v in flat.items()
        if not (k.startswith("assigner.") and k != "assigner.name" and not k.startswith(own))
        and not (k in HASH_UNREAD and HASH_UNREAD[k](flat))
        and not (k in HASH_NEUTRAL and v == HASH_NEUTRAL[k])
    }  # fmt: skip
    kept[Tag.REVISION] = TRAINING_REVISION  # renaming the key would orphan every finished run
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _format_pydantic(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<root>")
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if first["type"] == "missing":
        return f"'{where}' is required"
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{where}: {first['msg']}{shown}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ""), default=str)


def _key_order() -> dict[str, int]:
    return {k: i for i, k in enumerate(flatten(Config()))}


def point_id(overrides: dict[str, Any]) -> str:
    """A short stable id: ``beta=5,mu=6`` (last key component; full key where they clash),
    keys in the config's field order; ``base`` for no overrides."""
    if not overrides:
        return "base"
    order = _key_order()
    keys = sorted(overrides, key=lambda k: (order.get(k, len(order)), k))
    last = [k.split(".")[-1] for k in keys]
    parts = [
        f"{short if last.count(short) == 1 else key}={_fmt_value(overrides[key])}"
        for key, short in zip(keys, last)
    ]
    return _UNSAFE.sub("_", ",".join(parts))[:100]


def _check_override_keys(mapping: dict[str, Any], where: str) -> None:
    for key in mapping:
        if not isinstance(key, str) or not key.strip():
            raise DwlabError(f"{where}: expected dotted config keys, got {key!r}")


# ----------------------------------------------------------------------------- points


def _expand_item(item: Any, index: int) -> list[tuple[dict[str, Any], str | None, str | None]]:
    """One ``points`` entry -> [(overrides, explicit id, label)]."""
    where = f"points[{index}]"
    if not isinstance(item, dict):
        raise DwlabError(f"{where}: expected a mapping of dotted overrides or {{grid: ...}}")
    if "grid" not in item:
        overrides = {k: v for k, v in item.items() if k not in _RESERVED}
        _check_override_keys(overrides, where)
        explicit, label = item.get("id"), item.get("label")
        if explicit is not None and (not isinstance(explicit, str) or not _NAME_RE.match(explicit)):
            raise DwlabError(
                f"{where}.id: {explicit!r} is not a valid id (letters, digits, . _ + = , -; at most 100)"
            )
        if label is not None and not isinstance(label, str):
            raise DwlabError(f"{where}.label: expected a string, got {label!r}")
        return [(overrides, explicit, label)]
    for key in _RESERVED:
        if key in item:
            raise DwlabError(f"{where}.{key}: not allowed in a grid item (each grid point gets its own id)")
    grid = item["grid"]
    if not isinstance(grid, dict):
        raise DwlabError(f"{where}.grid: expected a mapping of key: [values], got {type(grid).__name__}")
    if not grid:
        raise DwlabError(f"{where}.grid: empty grid")
    fixed = {k: v for k, v in item.items() if k != "grid"}
    _check_override_keys(fixed, where)
    _check_override_keys(grid, f"{where}.grid")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise DwlabError(f"{where}.grid.{key}: expected a list of values, got {values!r}")
        if not values:
            raise DwlabError(f"{where}.grid.{key}: empty list of values")
    keys = list(grid)
    return [
        ({**fixed, **dict(zip(keys, combo))}, None, None)
        for combo in itertools.product(*(grid[k] for k in keys))
    ]


def _resolve_base(base: str | dict[str, str] | None, scale: str, sweep_dir: Path, file: Path) -> str:
    where = f"base.{scale}" if isinstance(base, dict) else "base"
    if isinstance(base, dict):
        base = base.get(scale)
    if base is None:
        return str(resolve_path(scale))
    if not isinstance(base, str) or not base.strip():
        raise DwlabError(f"{file}: {where}: expected a config preset name or path, got {base!r}")
    candidate = sweep_dir / base
    if candidate.is_file():
        return str(candidate)
    try:
        return str(resolve_path(base))
    except DwlabError as err:
        raise DwlabError(f"{file}: {where}: {err}") from None


def _per_scale(raw: dict[str, Any], scale: str, where: str) -> dict[str, Any]:
    """A section given once, or per scale as ``{smoke: {...}, mini: {...}, paper: {...}}``: this scale's."""
    if raw and set(raw) <= set(SCALES):
        raw = raw.get(scale) or {}
        if not isinstance(raw, dict):
            raise DwlabError(f"{where}.{scale}: expected a mapping, got {raw!r}")
    return raw


RESOURCE_FLAGS = ("cpus_per_trial", "gpus_per_trial")  # resources ``dwlab sweep`` also takes as flags


def flag(key: str) -> str:
    """The command-line flag of a resource: ``--gpus-per-trial``."""
    return "--" + key.replace("_", "-")


def _resources(raw: dict[str, Any], scale: str, flags: dict[str, float]) -> Resources:
    """The scale's resources, ``flags`` (``RESOURCE_FLAGS`` given on the command line) over the
    file's; a bad value names its flag or its key in the file."""
    where = f"resources.{scale}" if raw and set(raw) <= set(SCALES) else "resources"
    raw = _per_scale(raw, scale, "resources")
    for key, value in flags.items():
        try:
            Resources.model_validate({key: value})
        except ValidationError as err:
            raise DwlabError(f"{flag(key)}: {err.errors()[0]['msg']} (got {value!r})") from None
    try:
        res = Resources.model_validate({**raw, **flags})
    except ValidationError as err:
        raise DwlabError(_format_pydantic(err, where)) from None
    gpus = f"gpus_per_trial={res.gpus_per_trial:g}"
    gpus += f" ({flag('gpus_per_trial')})" if "gpus_per_trial" in flags else ""
    if res.workers > 1 and res.gpus_per_trial and (res.gpus_per_worker % 1 or res.gpus_per_worker < 1):
        raise DwlabError(f"{where}: {gpus} cannot be split into whole GPUs over workers_per_trial={res.workers}")
    if res.gpus_per_worker > 1 and res.gpus_per_worker % 1:
        raise DwlabError(
            f"{where}: {gpus} gives each of {res.workers} worker(s) {res.gpus_per_worker:g} GPUs "
            "(a worker takes a share of one GPU, or whole GPUs)"
        )
    return res


def _sweep_name(spec: SweepFile, file: Path, scale: str) -> str:
    name = spec.name if spec.name is not None else file.stem
    if not _NAME_RE.match(name):
        raise DwlabError(f"name: {name!r} is not a valid sweep name (letters, digits, . _ + = , -)")
    return name if scale == "smoke" else f"{name}-{scale}"


def _strip_source(message: str, source: str) -> str:
    return message[len(source) + 2 :] if message.startswith(source + ": ") else message


# ----------------------------------------------------------------------------- expansion


def load_plan(
    file: Path | str,
    *,
    scale: str | None = None,
    seeds: int | None = None,
    set_: list[str] | None = None,
    runs_dir: Path | str = Path("runs/sweeps"),
    all_points: bool = False,
    resources: dict[str, float | None] | None = None,
    point_ids: list[str] | None = None,
) -> Plan:
    """Read, validate and expand a sweep file; ``resources`` (keys of ``RESOURCE_FLAGS``, None:
    not given) override the file's; ``point_ids`` (``--point``) run just those points (a search
    sweep: those methods) in place of the file's ``only``. Any problem is a one-line ``DwlabError`` that starts with
    the sweep file's path; nothing is started or written."""
    file = Path(file)
    flags = {k: v for k, v in (resources or {}).items() if v is not None}
    if set(flags) - set(RESOURCE_FLAGS):
        raise ValueError(f"resources: expected keys of {RESOURCE_FLAGS}, got {sorted(flags)}")
    try:
        return _load_plan(
            file, scale=scale, seeds=seeds, set_=set_ or [], runs_dir=Path(runs_dir), all_points=all_points,
            flags=flags, point_ids=point_ids or [],
        )
    except DwlabError as err:
        message = _one_line(str(err))
        raise DwlabError(message if message.startswith(str(file)) else f"{file}: {message}") from None


def _load_plan(
    file: Path, *, scale: str | None, seeds: int | None, set_: list[str], runs_dir: Path, all_points: bool,
    flags: dict[str, float], point_ids: list[str],
) -> Plan:  # fmt: skip
    spec = _read_spec(file)
    if point_ids and all_points:
        raise DwlabError("--point and --all-points: give one or the other")
    if scale is not None and scale not in SCALES:
        raise DwlabError(f"--scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    if seeds is not None and seeds < 1:
        raise DwlabError(f"--seeds: expected at least 1, got {seeds}")
    scale = scale or spec.scale
    n_seeds = seeds or _seeds_at(spec.seeds, scale)
    file_set = _per_scale(spec.set, scale, "set")
    _check_override_keys(file_set, "set")
    cli_set = {}
    for item in set_:
        keys, value = parse_override(item)
        cli_set[".".join(keys)] = value
    name = _sweep_name(spec, file, scale)
    resources = _resources(spec.resources, scale, flags)
    base = _resolve_base(spec.base, scale, file.parent, file)
    base_config = resolve(base, {}, "base")
    resolve(base, dict(file_set), "set")
    resolve(base, {**file_set, **cli_set}, "--set")
    plan = Plan(
        file=file, name=name, table=spec.table, scale=scale, base=base, base_config=base_config,
        overrides={**file_set, **cli_set}, points=[], seeds=list(range(n_seeds)), trials=[],
        resources=resources, max_retries=spec.max_retries, checkpoint_artifact=spec.checkpoint_artifact,
        runs_dir=runs_dir.resolve(), resource_flags=flags, file_set=file_set, cli_set=cli_set,
    )  # fmt: skip
    if point_ids:
        subset, ids = "--point", point_ids
    elif not all_points and scale in spec.only:
        subset, ids = f"only.{scale}", spec.only[scale]
    else:
        subset, ids = "", None
    if spec.search is not None:
        _plan_searches(plan, spec, subset, ids)
    else:
        points = _expand_points(spec, lambda overrides, where: resolve(base, {**file_set, **overrides, **cli_set}, where))
        plan.points = _only(points, ids, subset) if ids is not None else points
        plan.left_out, plan.subset = len(points) - len(plan.points), subset
        plan.trials = trials_for(plan, plan.points)
    plan.warnings.extend(_warnings(plan, cli_set))
    return plan


def resolve(base: str, overrides: dict[str, Any], where: str) -> Config:
    """``load_config(base, overrides)``; an error names ``where`` instead of the base file."""
    try:
        return load_config(base, overrides)
    except DwlabError as err:
        raise DwlabError(f"{where}: {_strip_source(_one_line(str(err)), base)}") from None


def _runtime(plan: Plan, user: dict[str, Any]) -> dict[str, Any]:
    """What a trial sets at run time: no progress bar (no terminal), its CPU threads."""
    extra: dict[str, Any] = {"train.progress": False}
    if "train.threads" not in user:
        extra["train.threads"] = plan.resources.threads
    return extra


def trials_for(plan: Plan, points: list[Point]) -> list[Trial]:
    """One trial per point and seed of ``plan``: its config resolved, its run directory."""
    trials = []
    for point in points:
        user = {**plan.file_set, **point.overrides, **plan.cli_set}
        extra = _runtime(plan, user)
        for seed in plan.seeds:
            cfg = resolve(plan.base, {**user, **extra, "train.seed": seed}, f"point {point.id} seed {seed}")
            run_dir = plan.runs_dir / plan.name / point.id / f"seed{seed}"
            trials.append(Trial(point, seed, cfg, config_hash(cfg), run_dir, plan.resources.workers))
    return trials


def _plan_searches(plan: Plan, spec: SweepFile, subset: str, ids: list[str] | None) -> None:
    """A search sweep's methods (``ids``, from ``subset``: ``only.<scale>`` or ``--point``,
    names method ids; None: all)."""
    def checked(overrides: dict[str, Any], where: str) -> Config:
        cfg = resolve(plan.base, overrides, where)
        _check_assigner(cfg, where)
        return cfg

    ctx = Context(
        file_set=plan.file_set, cli_set=plan.cli_set, resolve=checked, name_ok=lambda n: bool(_NAME_RE.match(n)),
        runs_root=plan.runs_dir / plan.name, seeds=plan.seeds, runtime=_runtime(plan, {**plan.file_set, **plan.cli_set}),
    )  # fmt: skip
    section, searches = expand_search(spec.search, ctx, _format_pydantic)
    plan.search_defaults = section.defaults
    if ids is not None:
        known = [s.id for s in searches]
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DwlabError(f"{subset}: no method has id {unknown[0]!r} (ids: {', '.join(known)})")
        searches = [s for s in searches if s.id in ids]
        plan.left_out, plan.subset = len(known) - len(searches), subset
    plan.searches = searches


DEFAULTS, TUNED = ROLE_DEFAULTS, ROLE_TUNED  # the roles of a search sweep's final runs


def final_points(plan: Plan, chosen: dict[str, dict[str, Any] | None]) -> list[tuple[MethodSearch, str, Point]]:
    """A search sweep's final points: per method, its defaults (``search.defaults``) and its
    chosen values (``chosen[id]``; None: its search chose nothing), as (search, role, point)."""
    out = []
    for search in plan.searches:
        label = search.label or search.id
        if plan.search_defaults:
            out.append((search, DEFAULTS, Point(f"{search.id}.{DEFAULTS}", dict(search.overrides), f"{label} (defaults)")))
        if chosen.get(search.id) is not None:
            values = {**search.overrides, **chosen[search.id]}
            out.append((search, TUNED, Point(f"{search.id}.{TUNED}", values, f"{label} (tuned)")))
    return out


def _read_spec(file: Path) -> SweepFile:
    """The sweep file, parsed and validated (at least one point, or a search)."""
    raw = read_yaml(file)
    if not isinstance(raw, dict):
        raise DwlabError(f"expected a mapping with 'points', got {type(raw).__name__}")
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise DwlabError(f"unknown key {bad_keys[0]!r}")
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as err:
        raise DwlabError(_format_pydantic(err, "")) from None
    if spec.points is None and spec.search is None:
        raise DwlabError("'points' is required (or a 'search' instead)")
    if spec.points is not None and spec.search is not None:
        raise DwlabError("search: a sweep file has 'points' or a 'search', not both")
    if spec.points is not None and not spec.points:
        raise DwlabError("points: empty list (give at least one point or grid)")
    return spec


def _expand_points(spec: SweepFile, resolve: Callable[[dict[str, Any], str], Config]) -> list[Point]:
    """The file's points and grids as distinct points, in order; ``resolve(overrides, where)``
    is the point's config. A config met twice (e.g. the centre of a cross) is one point; two
    different points with one id are an error."""
    points: list[Point] = []
    seen_hashes: dict[str, str] = {}
    seen_ids: dict[str, str] = {}
    for index, item in enumerate(spec.points):
        for overrides, explicit, label in _expand_item(item, index):
            pid = explicit or point_id(overrides)
            where = f"points[{index}] ({pid})"
            cfg = resolve(overrides, where)
            _check_assigner(cfg, where)
            digest = config_hash(cfg)
            if digest in seen_hashes:
                continue
            if pid in seen_ids:
                raise DwlabError(f"{where}: id '{pid}' names two different points; give them distinct 'id's")
            seen_hashes[digest] = seen_ids[pid] = pid
            points.append(Point(pid, overrides, label))
    return points


def _check_assigner(cfg: Config, where: str) -> None:
    """Build the point's assigner once, so that a value only its builder can judge (DW's
    ``pneg_low`` against the variant's ``pneg_high``) stops the sweep before anything starts."""
    from dwlab.runner import make_assigner

    try:
        make_assigner(cfg, num_classes=1)
    except DwlabError as err:
        raise DwlabError(f"{where}: {err}") from None


def _seeds_at(seeds: int | dict[str, int], scale: str) -> int:
    """``seeds`` given once, or per scale (a scale left out gets 1)."""
    return seeds if isinstance(seeds, int) else seeds.get(scale, 1)


def _only(points: list[Point], ids: list[str], subset: str) -> list[Point]:
    """The points named by ``ids`` (from ``subset``: ``only.<scale>`` or ``--point``), in the
    file's order."""
    known = {p.id for p in points}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise DwlabError(f"{subset}: no point has id {unknown[0]!r} (ids: {', '.join(sorted(known))})")
    return [p for p in points if p.id in ids]


def _warnings(plan: Plan, cli_set: dict[str, Any]) -> list[str]:
    out = []
    varied = {k for p in plan.points for k in p.overrides}
    for key in sorted(varied & set(cli_set)):
        out.append(f"--set {key} overrides a key the points vary: those points collapse into one")
    if plan.scale == "paper":
        seen = set()
        for cfg in [t.config for t in plan.trials] + [s.config for s in plan.searches]:
            t = cfg.train
            images = plan.world_size * t.batch_size
            if (images, t.lr) in seen:
                continue
            seen.add((images, t.lr))
            if images != PAPER_IMAGES_PER_BATCH or t.lr != PAPER_LR:
                out.append(
                    f"paper scale with {plan.world_size} worker(s) x {t.batch_size} images = "
                    f"{images} images per batch at lr {t.lr:g} (paper: {PAPER_IMAGES_PER_BATCH} "
                    f"images, lr {PAPER_LR:g}); results are not comparable to the paper's"
                )
    return out


def _flags_note(plan: Plan) -> str:
    """`` (--gpus-per-trial 0.25 over the file's)`` when flags set resources."""
    given = " ".join(f"{flag(k)} {v:g}" for k, v in plan.resource_flags.items())
    return f" ({given} over the file's)" if given else ""


def config_diff(cfg: Config, base: Config) -> dict[str, Any]:
    """Dotted keys whose resolved value differs from ``base``."""
    new, old = flatten(cfg), flatten(base)
    return {k: v for k, v in new.items() if old.get(k) != v}


def _subset_note(plan: Plan) -> str:
    return f"{plan.subset}; --all-points runs all" if plan.subset.startswith("only.") else plan.subset


def describe(plan: Plan) -> list[str]:
    """The dry-run listing: the expanded trials and the config keys that differ from the base."""
    if plan.searches:
        return describe_searches(plan)
    diffs = [config_diff(t.config, plan.base_config) for t in plan.trials]
    common = {
        k: v for k, v in (diffs[0] if diffs else {}).items()
        if k != "train.seed" and all(k in d and d[k] == v for d in diffs)
    }
    res = plan.resources
    lines = [
        f"sweep {plan.name} ({plan.file}): {len(plan.points)} points"
        + (f" (of {len(plan.points) + plan.left_out}: {_subset_note(plan)})" if plan.left_out else "")
        + f" x {len(plan.seeds)} seeds = "
        f"{len(plan.trials)} trials, scale {plan.scale}, table {plan.table or '-'}",
        f"base: {plan.base}",
        "every trial: " + (" ".join(f"{k}={_fmt_value(v)}" for k, v in common.items()) or "-"),
        f"resources per trial: {res.cpus_per_trial:g} CPU, {res.gpus_per_trial:g} GPU, "
        f"{res.workers} worker(s){_flags_note(plan)}; retries {plan.max_retries}",
        f"run directories: {plan.runs_dir / plan.name}/<point>/seed<k>",
    ]
    width = max((len(t.point.id) for t in plan.trials), default=5)
    lines.append(f"{'point':<{width}}  seed  differs from base")
    for trial, diff in zip(plan.trials, diffs):
        shown = " ".join(
            f"{k}={_fmt_value(v)}" for k, v in diff.items() if k not in common and k != "train.seed"
        )
        lines.append(f"{trial.point.id:<{width}}  {trial.seed:>4}  {shown or '-'}")
    lines.extend(f"warning: {w}" for w in plan.warnings)
    return lines


def describe_searches(plan: Plan) -> list[str]:
    """The dry-run listing of a search sweep: per method, its keys and ranges, budget, algorithm
    and scheduler, what its tuning trials change from the base, then the final runs."""
    res = plan.resources
    n_final = len(plan.seeds) * (2 if plan.search_defaults else 1)
    lines = [
        f"sweep {plan.name} ({plan.file}): search over {len(plan.searches)} method(s)"
        + (f" (of {len(plan.searches) + plan.left_out}: {_subset_note(plan)})" if plan.left_out else "")
        + f", scale {plan.scale}, table {plan.table or '-'}",
        f"base: {plan.base}",
        f"resources per trial: {res.cpus_per_trial:g} CPU, {res.gpus_per_trial:g} GPU, "
        f"{res.workers} worker(s){_flags_note(plan)}; retries {plan.max_retries}",
        "phase 1, per method: tuning trials scored on the tune split (never val), in "
        f"{plan.runs_dir / plan.name}/<method>/tune/<trial id>",
    ]
    for search in plan.searches:
        diff = config_diff(search.config, plan.base_config)
        lines.append(f"{search.id}: {search.describe()}")
        lines += [f"  {key}: {param}" for key, param in search.space.items()]
        lines.append("  its trials: " + " ".join(f"{k}={_fmt_value(v)}" for k, v in diff.items()))
    roles = [DEFAULTS, TUNED] if plan.search_defaults else [TUNED]
    lines.append(
        f"phase 2: per method, {' and '.join(roles)} at seeds {', '.join(map(str, plan.seeds))}: "
        f"{n_final * len(plan.searches)} runs scored on val, in {plan.runs_dir / plan.name}/<method>."
        + (f"{{{','.join(roles)}}}" if len(roles) > 1 else roles[0]) + "/seed<k>"
    )
    lines.extend(f"warning: {w}" for w in plan.warnings)
    return lines
