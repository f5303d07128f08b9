"""A sweep file's ``search``: the example validates, a bad search is refused in one line naming
the file and key before anything starts, and the searchers tell Optuna what a trial really was
(complete, stopped early: PRUNED, failed or NaN: FAIL). No Ray cluster, no MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dwlab.cli import app
from dwlab.config import flatten, to_dict
from dwlab.errors import DwlabError
from dwlab.sweep import search_spec
from dwlab.sweep.search_spec import apply_sampled, rungs
from dwlab.sweep.spec import final_points, load_plan, trials_for

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = {"train.epochs": 4, "eval.every": 1}
DW = {"id": "dw", "set": {"assigner.name": "dw"}, "space": {"assigner.dw.beta": {"uniform": [2, 8]}}}


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def search_file(tmp_path: Path, methods=None, **search) -> Path:
    body = {"set": TINY, "search": {"budget": {"trials": 4}, **search, "methods": methods or [DW]}}
    return write(tmp_path / "s.yaml", body)


# ----------------------------------------------------------------------------- the example


def test_the_fair_comparison_example_tunes_each_methods_own_keys_on_the_tune_split():
    plan = load_plan(EXPERIMENTS / "tune-table6.yaml")
    assert plan.scale == "mini" and plan.table == "table6" and plan.seeds == [0, 1, 2] and not plan.trials
    spaces = {s.id: set(s.space) for s in plan.searches}
    assert spaces == {
        "fcos": {"assigner.fcos.center_radius"},
        "atss": {"assigner.atss.topk"},
        "gfl": {"assigner.gfl.box_weight", "assigner.gfl.topk"},
        "vfl": {"assigner.vfl.box_weight", "assigner.vfl.alpha", "assigner.vfl.topk"},
        "tood": {"assigner.tood.alpha", "assigner.tood.beta", "assigner.tood.topk"},
        "dw": {"assigner.dw.beta", "assigner.dw.mu", "assigner.dw.gamma2"},
    }
    for search in plan.searches:
        cfg = search.config
        assert cfg.assigner.name == search.id and set(search.space) <= set(flatten(cfg))
        assert (search.algorithm, search.seed, search.trials, search.asha) == ("tpe", 0, 8, None)
        assert cfg.train.epochs == 15 and cfg.train.seed == 1000  # the full mini schedule, a fresh seed
        assert (cfg.data.val_ann, cfg.data.val_images) == ("tune/instances_tune.json", "tune")  # never val
    dw = next(s.config for s in plan.searches if s.id == "dw")  # Table 6's DW row: the released recipe
    assert (dw.assigner.dw.variant, dw.model.prior_prob) == ("official", 0.02)
    result = CliRunner().invoke(app, ["sweep", str(EXPERIMENTS / "tune-table6.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "search over 6 method(s), scale mini, table table6" in result.stdout
    assert "dw: tpe (first 4 at random) seed 0, 8 trials x 15 epochs" in result.stdout
    assert "  assigner.tood.topk: int 7..19" in result.stdout
    assert "phase 2: per method, tuned at seeds 0, 1, 2: 18 runs scored on val" in result.stdout


def test_final_points_train_the_chosen_values_at_the_sweeps_seeds(tmp_path):
    plan = load_plan(search_file(tmp_path), seeds=2)
    (search,) = plan.searches
    points = final_points(plan, {"dw": {"assigner.dw.beta": 3.25}})
    assert [(role, p.id) for _, role, p in points] == [("defaults", "dw.defaults"), ("tuned", "dw.tuned")]
    trials = trials_for(plan, [p for _, _, p in points])
    assert [(t.key, t.config.assigner.dw.beta, t.config.data.val_ann) for t in trials] == [
        ("dw.defaults/seed0", 5.0, "instances_val.json"), ("dw.defaults/seed1", 5.0, "instances_val.json"),
        ("dw.tuned/seed0", 3.25, "instances_val.json"), ("dw.tuned/seed1", 3.25, "instances_val.json"),
    ]  # fmt: skip
    assert [p.id for _, _, p in final_points(plan, {"dw": None})] == ["dw.defaults"]  # nothing chosen
    sampled = apply_sampled(to_dict(search.config), {"assigner.dw.beta": 7.5})
    assert sampled.assigner.dw.beta == 7.5 and sampled.data.val_ann == "tune/instances_tune.json"


def test_the_search_hash_changes_with_the_search_not_with_the_method_order(tmp_path):
    atss = {"id": "atss", "set": {"assigner.name": "atss"}, "space": {"assigner.atss.topk": {"int": [5, 9]}}}
    one = {s.id: s.digest for s in load_plan(search_file(tmp_path, [DW, atss])).searches}
    two = {s.id: s.digest for s in load_plan(search_file(tmp_path, [atss, DW])).searches}
    assert one == two
    more = {s.id: s.digest for s in load_plan(search_file(tmp_path, [DW, atss], budget={"trials": 5})).searches}
    assert more["dw"] != one["dw"] and more["atss"] != one["atss"]


def test_the_search_hash_changes_with_the_training_revision(tmp_path, monkeypatch):
    """A search resumed after TRAINING_REVISION moved must not reuse the older revision's trials."""
    before = {s.id: s.digest for s in load_plan(search_file(tmp_path, [DW])).searches}
    monkeypatch.setattr(search_spec, "TRAINING_REVISION", search_spec.TRAINING_REVISION + 1)
    after = {s.id: s.digest for s in load_plan(search_file(tmp_path, [DW])).searches}
    assert after["dw"] != before["dw"]


def test_asha_rungs_and_the_descriptions(tmp_path):
    plan = load_plan(search_file(tmp_path, budget={"trial_epochs": 10}, algorithm="random",
                                 scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}}))  # fmt: skip
    (search,) = plan.searches
    assert search.rungs() == [1, 2] and search.max_trials == 10
    assert search.describe() == ("random seed 0, 10 trial-epochs of 4-epoch trials, ASHA (grace 1, "
                                 "reduction 2: rungs at epochs 1, 2)")  # fmt: skip
    asha = search.asha.model_copy(update={"grace_period": 3, "reduction_factor": 3.0})
    assert rungs(asha, 15) == [3, 9] and rungs(asha, 27) == [3, 9]


# ----------------------------------------------------------------------------- refusals


def method(**changes) -> dict:
    return {**DW, **changes}


BAD = {
    "unknown key": ([method(space={"assigner.dw.bta": {"uniform": [1, 2]}})], {}, "unknown key 'bta' in assigner.dw"),
    "not a range": ([method(space={"assigner.dw.beta": [2, 8]})], {}, "search.methods[0] (dw).space.assigner.dw.beta: expected one of"),
    "low above high": ([method(space={"assigner.dw.beta": {"uniform": [8, 2]}})], {}, "assigner.dw.beta.uniform: expected low < high"),
    "loguniform at 0": ([method(space={"assigner.dw.beta": {"loguniform": [0, 2]}})], {}, "loguniform: expected 0 < low"),
    "int of floats": ([method(space={"assigner.dw.bag_topk": {"int": [2.5, 8]}})], {}, "int: expected [low, high], two integers"),
    "uniform on an int": ([method(space={"assigner.dw.bag_topk": {"uniform": [2, 8]}})], {}, "assigner.dw.bag_topk is an integer"),
    "an end out of bounds": ([method(space={"assigner.dw.bag_topk": {"int": [0, 8]}})], {}, "assigner.dw.bag_topk: Input should be greater than or equal to 1 (got 0)"),
    "a bad choice": ([method(space={"assigner.dw.bag": {"choice": ["soft", "nope"]}})], {}, "space.assigner.dw.bag: assigner.dw.bag: Input should be"),
    "another assigner's key": ([method(space={"assigner.tood.alpha": {"uniform": [1, 2]}})], {}, "a key of assigner tood, but this method trains assigner dw"),
    "the seed": ([method(space={"train.seed": {"int": [0, 9]}})], {}, "a search cannot vary train.seed"),
    "the split": ([method(space={"data.synth.seed": {"int": [0, 9]}})], {}, "a search cannot vary data.synth.seed"),
    "searched and fixed": ([method(set={"assigner.name": "dw", "assigner.dw.beta": 3})], {}, "also fixed by set"),
    "empty space": ([method(space={})], {}, "search.methods[0] (dw).space: empty"),
    "two ids": ([DW, DW], {}, "search.methods[1].id: 'dw' names two methods"),
    "bad id": ([method(id="d w")], {}, "search.methods[0].id: 'd w' is not a valid id"),
    "no budget": ([DW], {"budget": None}, "no budget (give search.budget or search.methods[0].budget"),
    "two budgets": ([DW], {"budget": {"trials": 2, "trial_epochs": 8}}, "search.budget: Value error, give exactly one of trials or trial_epochs"),
    "epochs without scheduler": ([DW], {"budget": {"trial_epochs": 8}}, "search.budget.trial_epochs: needs a scheduler"),
    "rung not evaluated": ([DW], {"scheduler": {"asha": {"grace_period": 1}}}, "(dwlab_rungs)"),
    "grace too long": ([method(scheduler={"asha": {"grace_period": 4}})], {}, "search.methods[0] (dw).scheduler.asha.grace_period: 4 is not below the trials' 4 epochs"),
    "unknown algorithm": ([DW], {"algorithm": "bayes"}, "search.algorithm: Input should be 'tpe' or 'random'"),
    "startup for random": ([method(algorithm="random", startup_trials=2)], {}, "search.methods[0] (dw).startup_trials: only for algorithm tpe (this search's is random)"),
    "trial seed reused": ([DW], {"trial_seed": 0}, "search.trial_seed: 0 is one of the final runs' seeds (0)"),
    "tune data without root": ([DW], {"tune_data": {"ann": "a.json", "images": "a"}}, "search.tune_data: only with data.root set"),
    "unknown search key": ([DW], {"budjet": 3}, "unknown key 'search.budjet'"),
    "no methods": ([], {}, "search.methods: List should have at least 1 item"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_search_is_one_line_naming_the_file_and_key_nothing_started(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    methods, search, expected = BAD[case]
    body = {"set": {**TINY, "eval.every": 2} if case == "rung not evaluated" else TINY,
            "search": {"budget": {"trials": 4}, **search, "methods": methods}}  # fmt: skip
    f = write(tmp_path / "bad.yaml", body)
    result = CliRunner().invoke(app, ["sweep", str(f)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {f}: "), result.stderr
    if expected == "(dwlab_rungs)":
        expected = "search.scheduler.asha: decides at epochs 1, 3 but the trials evaluate every 2 epochs (eval.every)"
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()


def test_points_and_search_together_and_a_searched_key_set_on_the_command_line(tmp_path):
    f = write(tmp_path / "both.yaml", {"points": [{}], "search": {"methods": [DW]}})
    with pytest.raises(DwlabError, match=r"both\.yaml: search: a sweep file has 'points' or a 'search', not both$"):
        load_plan(f)
    with pytest.raises(DwlabError, match=r"space\.assigner\.dw\.beta: also fixed by --set"):
        load_plan(search_file(tmp_path), set_=["assigner.dw.beta=3"])
    with pytest.raises(DwlabError, match=r"only\.smoke: no method has id 'tood' \(ids: dw\)"):
        load_plan(write(tmp_path / "o.yaml", {"only": {"smoke": ["tood"]}, "search": {"budget": {"trials": 1}, "methods": [DW]}}))


_ranges = st.one_of(
    st.fixed_dictionaries({"uniform": st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-3, 9), st.text(max_size=2)), max_size=3)}),
    st.fixed_dictionaries({"int": st.lists(st.one_of(st.integers(-3, 30), st.floats(0, 5)), max_size=3)}),
    st.fixed_dictionaries({"choice": st.lists(st.one_of(st.none(), st.text(max_size=4), st.integers(0, 9)), max_size=3)}),
    st.integers(), st.text(max_size=4),
)
_keys = st.sampled_from(["assigner.dw.beta", "assigner.dw.bag_topk", "assigner.dw.bag", "assigner.atss.topk", "train.lr", "nope", ""])
_methods = st.lists(
    st.fixed_dictionaries(
        {"id": st.sampled_from(["dw", "atss", "x y"]), "space": st.dictionaries(_keys, _ranges, max_size=2)},
        optional={"set": st.dictionaries(st.sampled_from(["assigner.name", "train.lr"]), st.sampled_from(["dw", "atss", 3, None])),
                  "budget": st.dictionaries(st.sampled_from(["trials", "trial_epochs", "x"]), st.integers(-1, 9), max_size=2),
                  "scheduler": st.one_of(st.none(), st.fixed_dictionaries({"asha": st.dictionaries(st.sampled_from(["grace_period", "reduction_factor"]), st.integers(-1, 5))}))},
    ),
    max_size=2,
)  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(methods=_methods, budget=st.one_of(st.none(), st.just({"trials": 2})))
def test_fuzzed_searches_never_traceback(methods, budget, tmp_path):
    f = write(tmp_path / "fuzz.yaml", {"set": TINY, "search": {"budget": budget, "methods": methods}})
    try:
        load_plan(f, runs_dir=tmp_path / "runs")
    except DwlabError as err:
        assert "\n" not in str(err) and str(err).startswith(str(f))


# ----------------------------------------------------------------------------- what Optuna is told


def optuna_searcher(budget_epochs=None):
    from ray import tune

    from dwlab.sweep.searchers import BudgetedOptuna

    space = BudgetedOptuna.convert_search_space({"space": {"x": tune.uniform(0.0, 1.0)}})
    return BudgetedOptuna(space=space, metric="score", mode="max", seed=0, epochs=4, budget_epochs=budget_epochs)


def test_a_stopped_trial_is_pruned_a_failed_or_nan_one_failed_a_full_one_complete():
    searcher = optuna_searcher()
    for trial_id in "abcde":
        assert "x" in searcher.suggest(trial_id)["space"]
    searcher.on_trial_result("a", {"epoch": 1, "score": 0.2, "scored": True})
    searcher.on_trial_result("a", {"epoch": 2, "score": 0.2, "scored": False})  # stale: not an intermediate value
    searcher.on_trial_complete("a", {"epoch": 2, "score": 0.25, "scored": True})  # ASHA stopped it at this result
    searcher.on_trial_complete("b", {"epoch": 4, "score": 0.3, "final": True})
    searcher.on_trial_complete("c", {"epoch": 4, "score": math.nan})
    searcher.on_trial_complete("d", {"epoch": 1, "score": 0.1}, error=True)
    searcher.on_trial_complete("e", None)
    states = {t.number: (t.state, t.value, t.intermediate_values) for t in searcher._ot_study.trials}
    S = optuna.trial.TrialState
    assert states == {0: (S.PRUNED, 0.25, {1: 0.2, 2: 0.25}), 1: (S.COMPLETE, 0.3, {}), 2: (S.FAIL, None, {}),
                      3: (S.FAIL, None, {}), 4: (S.FAIL, None, {})}  # fmt: skip
    assert not [t for t in searcher._ot_study.trials if t.state == S.RUNNING]  # none left pending


def test_a_trial_epochs_budget_stops_suggesting_once_spent():
    from ray.tune.search import Searcher

    searcher = optuna_searcher(budget_epochs=5)
    searcher.suggest("a")
    searcher.on_trial_result("a", {"epoch": 3, "score": 0.2, "scored": True})
    searcher.suggest("b")  # 3 of 5 spent: another trial
    searcher.on_trial_complete("b", None, error=True)  # failed at once: counts 1 epoch
    assert searcher.suggest("c") != Searcher.FINISHED  # 4 of 5
    searcher.on_trial_result("c", {"epoch": 1, "score": 0.1, "scored": True})
    assert searcher.suggest("d") == Searcher.FINISHED  # 5 of 5
