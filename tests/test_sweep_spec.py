"""Sweep files: the paper's tables expand as intended, bad files are refused in one line with
exit code 2 before anything starts, and ``--dry-run`` lists the trials. No Ray, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dwlab.assign import ASSIGNERS
from dwlab.config import HASH_NEUTRAL, Config, flatten, load_config
from dwlab.cli import app
from dwlab.errors import DwlabError
from dwlab.sweep.spec import config_hash, load_plan, point_id

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_cli(*args: str):
    return CliRunner().invoke(app, ["sweep", *args])


# ----------------------------------------------------------------------------- the paper's tables


def test_table2_is_the_papers_cross():
    plan = load_plan(EXPERIMENTS / "table2.yaml", scale="smoke")
    ids = [p.id for p in plan.points]
    expected = [f"beta=5,mu={m}" for m in (3, 4, 5, 6, 7, 8)] + [f"beta={b},mu=5" for b in (3, 4, 6, 7)]
    assert ids == expected
    assert len(plan.trials) == 10 * 2  # two seeds per point
    dw = {(t.config.assigner.dw.beta, t.config.assigner.dw.mu) for t in plan.trials}
    assert dw == {(5.0, m) for m in (3, 4, 5, 6, 7, 8)} | {(b, 5.0) for b in (3, 4, 6, 7)}
    assert plan.name == "table2" and plan.table == "table2" and plan.scale == "smoke"


def test_table2_at_the_learning_scale_runs_the_readme_subset_unless_all_points():
    plan = load_plan(EXPERIMENTS / "table2.yaml")
    assert plan.scale == "mini" and plan.name == "table2-mini"
    assert [p.id for p in plan.points] == ["beta=5,mu=3", "beta=5,mu=5", "beta=3,mu=5", "beta=7,mu=5"]
    assert [t.seed for t in plan.trials] == [0] * 4
    assert all(t.config.model.pretrained == "synth" and t.config.train.threads == 1 for t in plan.trials)
    full = load_plan(EXPERIMENTS / "table2.yaml", all_points=True, seeds=3)
    assert len(full.points) == 10 and len(full.trials) == 30


def test_only_names_unknown_point_and_seeds_per_scale(tmp_path):
    f = write(tmp_path / "s.yaml", {"seeds": {"smoke": 2}, "points": [{"id": "a", "train.epochs": 1}],
                                         "only": {"smoke": ["a", "b"]}})
    with pytest.raises(DwlabError, match=r"only\.smoke: no point has id 'b' \(ids: a\)"):
        load_plan(f)
    assert len(load_plan(f, all_points=True).trials) == 2  # smoke: 2 seeds
    assert len(load_plan(f, scale="mini", all_points=True).trials) == 1  # a scale left out: 1
    bad = write(tmp_path / "b.yaml", {"seeds": {"mini": 0}, "points": [{"train.epochs": 1}]})
    with pytest.raises(DwlabError, match="seeds"):
        load_plan(bad)


def test_config_hash_leaves_out_other_methods_sections_and_neutral_options(monkeypatch):
    """A resumed sweep keeps its finished trials when dwlab adds a method (a section the run does
    not read) or an off-by-default option (``HASH_NEUTRAL``); anything the run reads counts."""
    base = load_config("smoke", {})  # assigner dw
    assert config_hash(base) == config_hash(load_config("smoke", {"assigner.fcos.center_radius": 2.0}))
    assert config_hash(base) != config_hash(load_config("smoke", {"assigner.dw.beta": 3}))
    fcos = load_config("smoke", {"assigner.name": "fcos"})
    assert config_hash(fcos) != config_hash(load_config("smoke", {"assigner.name": "fcos", "assigner.fcos.center_radius": 2.0}))
    other = load_config("smoke", {"train.warmup_ratio": 0.5})
    before = config_hash(base), config_hash(other)
    # as if warmup_ratio were a new option, neutral at the value base has
    monkeypatch.setitem(HASH_NEUTRAL, "train.warmup_ratio", base.train.warmup_ratio)
    assert config_hash(base) != before[0]  # left out at its neutral value ...
    assert config_hash(other) == before[1]  # ... counted at any other
    assert config_hash(base) == config_hash(load_config("smoke", {"assigner.atss.topk": 5}))
    # an option the run reads only in some configurations counts only there (HASH_UNREAD)
    assert config_hash(base) == config_hash(load_config("smoke", {"model.thead_convs": 5}))  # FCOS head
    thead = load_config("smoke", {"model.head": "tood"})
    assert config_hash(thead) != config_hash(load_config("smoke", {"model.head": "tood", "model.thead_convs": 5}))


def test_config_hash_changes_with_the_training_revision(monkeypatch):
    """A change that makes the same config train to other numbers bumps TRAINING_REVISION: a
    sweep then neither skips, copies nor resumes the earlier revision's runs."""
    import dwlab.sweep.spec as spec

    cfg = load_config("smoke", {})
    before = config_hash(cfg)
    monkeypatch.setattr(spec, "TRAINING_REVISION", spec.TRAINING_REVISION + 1)
    assert config_hash(cfg) != before


def test_every_hash_neutral_value_is_the_options_default():
    defaults = flatten(Config())
    assert all(defaults[key] == value for key, value in HASH_NEUTRAL.items())


def test_point_runs_just_the_named_points_in_place_of_only(tmp_path, monkeypatch):
    plan = load_plan(EXPERIMENTS / "table2.yaml", seeds=3, point_ids=["beta=7,mu=5", "beta=5,mu=8"])
    assert [p.id for p in plan.points] == ["beta=5,mu=8", "beta=7,mu=5"]  # the file's order
    assert [t.seed for t in plan.trials] == [0, 1, 2, 0, 1, 2] and plan.left_out == 8
    with pytest.raises(DwlabError, match=r"table2\.yaml: --point: no point has id 'beta=9,mu=5' \(ids: "):
        load_plan(EXPERIMENTS / "table2.yaml", point_ids=["beta=9,mu=5"])
    with pytest.raises(DwlabError, match="--point and --all-points: give one or the other"):
        load_plan(EXPERIMENTS / "table2.yaml", point_ids=["beta=5,mu=5"], all_points=True)
    monkeypatch.chdir(tmp_path)
    result = sweep_cli(str(EXPERIMENTS / "table2.yaml"), "--dry-run", "--point", "beta=5,mu=8")
    assert result.exit_code == 0, result.output
    assert "1 points (of 10: --point) x 1 seeds = 1 trials" in result.stdout


@pytest.mark.parametrize(
    ("table", "n_points"),
    [("table2", 10), ("table3", 7), ("table4", 9), ("table5", 6), ("table6", len(ASSIGNERS) + 5), ("table7", 17)],  # + FCOS+GFLv2, DW refine, DW on the paper equations, 2 T-head
)
@pytest.mark.parametrize("scale", ["smoke", "mini", "paper"])
def test_every_table_validates_at_every_scale(table, n_points, scale):
    plan = load_plan(EXPERIMENTS / f"{table}.yaml", scale=scale, all_points=True)
    assert len(plan.points) == n_points and plan.table == table
    assert plan.name == (table if scale == "smoke" else f"{table}-{scale}")
    assert all(t.config.scale == scale for t in plan.trials)
    if scale == "paper":  # the paper's layout: 8 workers x 2 images at lr 0.01, no warning
        assert plan.world_size * plan.trials[0].config.train.batch_size == 16 and not plan.warnings
    else:
        assert plan.resources.cpus_per_trial == 1 and plan.world_size == 1


def test_table3_4_6_points():
    t3 = load_plan(EXPERIMENTS / "table3.yaml", scale="smoke")
    rows = [(t.config.assigner.dw.gamma1, t.config.assigner.dw.gamma2) for t in t3.trials]
    assert rows == [(1, 1), (1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (2, 3)]
    t4 = load_plan(EXPERIMENTS / "table4.yaml", scale="smoke")
    bags = [(c.bag, c.bag_radius if c.bag == "threshold" else c.bag_topk if c.bag == "topk" else None)
            for c in (t.config.assigner.dw for t in t4.trials)]
    assert bags == [("threshold", r) for r in (1.0, 1.3, 1.7, 2.0, 2.5)] + [("topk", k) for k in (9, 12, 15)] + [("soft", None)]
    # every method once, in ASSIGNERS order, GFLv2's FCOS sampling (its row's variant) before it
    t6 = load_plan(EXPERIMENTS / "table6.yaml", scale="smoke")
    methods = list(ASSIGNERS)
    at = methods.index("gflv2")
    ordered = methods[:at] + ["gflv2+fcos"] + methods[at:]
    assert [p.id for p in t6.points] == ordered + ["dw+refine", "dw-paper-eq", "tood+thead", "dw+thead"]
    assert [(t.config.assigner.name, t.config.model.box_refine, t.config.model.head) for t in t6.trials] == [
        (m, False, "fcos") for m in methods[:at] + ["gflv2"] + methods[at:]
    ] + [("dw", True, "fcos"), ("dw", False, "fcos"), ("tood", False, "tood"), ("dw", False, "tood")]
    assert [t.config.assigner.gflv2.sampling for t in t6.trials if t.config.assigner.name == "gflv2"] == ["fcos", "atss"]
    dw_variants = [(t.config.assigner.dw.variant, t.config.model.prior_prob) for t in t6.trials if t.config.assigner.name == "dw"]
    assert dw_variants == [("official", 0.02), ("official", 0.02), ("paper", 0.01), ("official", 0.02)]  # DW's paper rows: as released
    assert [t.config.assigner.name for t in t6.trials if t.config.eval.score_voting] == ["paa"]  # as PAA's 40.4
    assert all(p.label for p in t6.points)  # the report's name of a method the paper does not list


# ----------------------------------------------------------------------------- expansion


def test_union_of_grids_deduplicated_in_order(tmp_path):
    f = write(tmp_path / "s.yaml", {
        "set": {"train.epochs": 2},
        "seeds": 2,
        "points": [
            {"grid": {"assigner.dw.beta": [3, 5]}},
            {"assigner.dw.beta": 5.0},  # the same config as beta=5: dropped
            {"grid": {"assigner.dw.beta": [5, 7], "assigner.dw.mu": [5]}},  # mu=5 is the default
            {"grid": {"assigner.dw.gamma1": [1, 3]}, "assigner.dw.bag": "topk"},  # fixed key per grid
        ],
    })
    plan = load_plan(f, runs_dir=tmp_path / "runs")
    assert [p.id for p in plan.points] == [
        "beta=3", "beta=5", "beta=7,mu=5", "gamma1=1,bag=topk", "gamma1=3,bag=topk"
    ]
    assert [(t.point.id, t.seed) for t in plan.trials][:4] == [("beta=3", 0), ("beta=3", 1), ("beta=5", 0), ("beta=5", 1)]
    assert all(t.config.train.epochs == 2 and t.config.train.seed == t.seed for t in plan.trials)
    assert all(t.config.train.threads == 1 and not t.config.train.progress for t in plan.trials)
    assert plan.trials[0].run_dir == (tmp_path / "runs" / "s" / "beta=3" / "seed0").resolve()
    assert len({t.config_hash for t in plan.trials}) == len(plan.trials)


def test_point_id_is_stable_and_short():
    assert point_id({"assigner.dw.mu": 6, "assigner.dw.beta": 5}) == "beta=5,mu=6"
    assert point_id({}) == "base"
    assert point_id({"model.box_refine": True}) == "box_refine=true"
    assert point_id({"data.root": "a/b c"}) == "root=a_b_c"


def test_cli_overrides_seeds_scale_and_set(tmp_path):
    f = write(tmp_path / "s.yaml", {"points": [{"grid": {"assigner.dw.mu": [4, 6]}}]})
    plan = load_plan(f, seeds=3, set_=["train.epochs=1", "assigner.dw.beta=4"])
    assert len(plan.trials) == 6
    assert {t.config.train.epochs for t in plan.trials} == {1}
    assert {t.config.assigner.dw.beta for t in plan.trials} == {4.0}


def test_paper_scale_warns_about_the_batch(tmp_path):
    f = write(tmp_path / "s.yaml", {"points": [{"train.lr": 0.02}], "resources": {"cpus_per_trial": 1}})
    plan = load_plan(f, scale="paper")
    assert plan.name == "s-paper"
    assert len(plan.warnings) == 1 and "2 images per batch at lr 0.02" in plan.warnings[0]


def test_resource_flags_override_the_files_resources_and_are_shown(tmp_path, monkeypatch):
    resources = {"mini": {"cpus_per_trial": 2, "gpus_per_trial": 1}}
    f = write(tmp_path / "s.yaml", {"points": [{}], "resources": resources})
    plan = load_plan(f, scale="mini", resources={"gpus_per_trial": 0.25, "cpus_per_trial": None})
    assert (plan.resources.cpus_per_trial, plan.resources.gpus_per_trial, plan.world_size) == (2, 0.25, 1)
    assert plan.resource_flags == {"gpus_per_trial": 0.25}
    assert plan.resource_source("gpus_per_trial") == "--gpus-per-trial"
    assert plan.resource_source("cpus_per_trial") == f"resources.cpus_per_trial in {f}"
    assert plan.resources.record == "cpus_per_trial=2 gpus_per_trial=0.25 workers_per_trial=1"
    assert {t.config.train.threads for t in plan.trials} == {2}
    four = load_plan(f, scale="mini", resources={"cpus_per_trial": 4})  # threads follow the CPUs
    assert {t.config.train.threads for t in four.trials} == {4} and four.resources.gpus_per_trial == 1
    assert load_plan(f, scale="mini", resources={"gpus_per_trial": 2}).world_size == 2  # one worker per GPU
    monkeypatch.chdir(tmp_path)
    result = sweep_cli(str(f), "--scale", "mini", "--dry-run", "--gpus-per-trial", "0.25")
    assert result.exit_code == 0, result.output
    shown = "resources per trial: 2 CPU, 0.25 GPU, 1 worker(s) (--gpus-per-trial 0.25 over the file's)"
    assert shown in result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--gpus-per-trial", "-1"], "--gpus-per-trial: Input should be greater than or equal to 0 (got -1.0)"),
        (["--cpus-per-trial", "0"], "--cpus-per-trial: Input should be greater than 0 (got 0.0)"),
        (["--cpus-per-trial", "inf"], "--cpus-per-trial: Input should be a finite number (got inf)"),
        (["--gpus-per-trial", "1.5"], "gpus_per_trial=1.5 (--gpus-per-trial) gives each of 1 worker(s) 1.5 GPUs"),
    ],
)
def test_a_bad_resource_flag_is_one_line_naming_it(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    f = write(tmp_path / "s.yaml", {"points": [{}]})
    for extra in ([], ["--dry-run"]):
        result = sweep_cli(str(f), *args, *extra)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {f}: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- refusal


BAD = {
    "unknown base": ({"base": "no_such_config.yaml", "points": [{}]}, "base"),
    "empty grid": ({"points": [{"grid": {}}]}, "points[0].grid: empty grid"),
    "empty values": ({"points": [{"grid": {"assigner.dw.mu": []}}]}, "points[0].grid.assigner.dw.mu: empty list"),
    "empty points": ({"points": []}, "points: empty list"),
    "no points": ({"seeds": 1}, "'points' is required"),
    "wrong type": ({"points": [{"assigner.dw.beta": "five"}]}, "assigner.dw.beta: Input should be a valid number"),
    "wrong type in set": ({"set": {"train.epochs": "many"}, "points": [{}]}, "set: train.epochs"),
    "unknown key": ({"points": [{"assigner.dw.bta": 3}]}, "unknown key 'bta' in assigner.dw"),
    "unknown top-level key": ({"pionts": [{}], "points": [{}]}, "unknown key 'pionts'"),
    "bad seeds": ({"seeds": 0, "points": [{}]}, "seeds"),
    "grid not a list": ({"points": [{"grid": {"assigner.dw.mu": 5}}]}, "expected a list of values"),
    "bad resources": ({"points": [{}], "resources": {"gpus": 1}}, "unknown key 'resources.gpus'"),
    "gpus not split whole": ({"points": [{}], "resources": {"gpus_per_trial": 3, "workers_per_trial": 2}},
                             "resources: gpus_per_trial=3 cannot be split into whole GPUs over workers_per_trial=2"),
    "not a mapping": ("- 1\n- 2\n", "expected a mapping"),
    "not yaml": ("points: [\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_file_one_line_exit_2_nothing_started(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, expected = BAD[case]
    f = write(tmp_path / "bad.yaml", data)
    result = sweep_cli(str(f))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {f}:") and expected in lines[0], lines[0]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()


def test_missing_sweep_file_and_bad_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = write(tmp_path / "ok.yaml", {"points": [{}]})
    for args, expected in [
        ([str(tmp_path / "absent.yaml")], "cannot read"),
        ([str(f), "--scale", "huge"], "--scale"),
        ([str(f), "--set", "train.epochs=zero"], "--set: train.epochs"),
        ([str(f), "--seeds", "0"], "--seeds"),
    ]:
        result = sweep_cli(*args)
        assert result.exit_code == 2 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_dry_run_lists_trials_and_differences(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = sweep_cli(str(EXPERIMENTS / "table2.yaml"), "--dry-run", "--scale", "smoke", "--seeds", "2", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "10 points x 2 seeds = 20 trials" in out
    assert "every trial: model.prior_prob=0.02 assigner.dw.variant=official train.epochs=3" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("beta=",))]
    assert len(rows) == 20
    assert ["beta=5,mu=3", "1", "assigner.dw.mu=3.0"] in rows  # mu_norm stays null: resolved when built
    assert ["beta=7,mu=5", "0", "assigner.dw.beta=7.0"] in rows
    assert ["beta=5,mu=5", "0", "-"] in rows
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- fuzzing

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True, width=32), st.text(max_size=8)
)
_keys = st.one_of(
    st.sampled_from(["assigner.dw.beta", "train.epochs", "model.backbone", "assigner.dw.bag", "nope.key", "train", ""]),
    st.text(max_size=12),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3), max_leaves=6)
_points = st.lists(
    st.one_of(st.dictionaries(_keys, _values, max_size=3), st.fixed_dictionaries({"grid": st.dictionaries(_keys, _values, max_size=2)}), _scalars),
    max_size=3,
)
_sweeps = st.one_of(
    st.fixed_dictionaries(
        {"points": _points},
        optional={
            "seeds": _values, "set": st.dictionaries(_keys, _values, max_size=2), "base": _values,
            "scale": _values, "resources": _values, "name": _values, "max_retries": _values,
        },
    ),
    _values,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_sweeps)
def test_fuzzed_sweep_files_never_traceback(data, tmp_path):
    f = tmp_path / "fuzz.yaml"
    f.write_text(yaml.safe_dump(data))
    try:
        load_plan(f, runs_dir=tmp_path / "runs")
    except DwlabError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(str(f))


def test_set_per_scale_picks_this_scales_overrides():
    smoke = load_plan(EXPERIMENTS / "table2.yaml", scale="smoke")
    paper = load_plan(EXPERIMENTS / "table2.yaml", scale="paper")
    assert {t.config.train.epochs for t in smoke.trials} == {3}
    assert {t.config.train.epochs for t in paper.trials} == {12}  # the paper preset's 1x, unchanged


def test_a_value_only_the_assigner_can_judge_stops_the_plan(tmp_path):
    """DW's pneg_low against its variant's pneg_high (null in the config) is checked by building
    the point's assigner at plan time, not first inside a trial."""
    f = write(tmp_path / "s.yaml", {"points": [{"assigner.dw.pneg_low": 0.96}]})
    with pytest.raises(DwlabError) as err:
        load_plan(f)
    assert str(err.value) == (
        f"{f}: points[0] (pneg_low=0.96): assigner.dw: need 0 <= pneg_low < pneg_high, got 0.96 and 0.95"
    )


def test_dry_run_says_when_only_leaves_points_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = sweep_cli(str(EXPERIMENTS / "table2.yaml"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "4 points (of 10: only.mini; --all-points runs all) x 1 seeds = 4 trials" in result.stdout
    result = sweep_cli(str(EXPERIMENTS / "table2.yaml"), "--dry-run", "--all-points")
    assert "10 points x 1 seeds = 10 trials" in result.stdout
