"""Search sweeps end to end on a real local Ray (2 CPUs) and a real MLflow sqlite store: the
searches, their nested tuning trials scored on the tune split, the final runs of the chosen
values, ASHA with failing trials and a trial-epochs budget, a killed driver resumed, the
report's tuned columns.

Tiny trials as in test_sweep_ray (16 images of 64 px, a 1-conv head, 2-4 epochs); detections
are kept down to score 0 so that the AP of an untrained detector still differs between trials.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from dwlab.cli import app
from dwlab.sweep.spec import load_plan

pytestmark = pytest.mark.slow

TINY = {
    "assigner.name": "fcos",
    "data.synth.n_train": 16,
    "data.synth.n_val": 8,
    "data.synth.image_size": 64,
    "data.min_size": 64,
    "data.max_size": 64,
    "data.num_workers": 0,
    "train.batch_size": 4,
    "model.fpn_channels": 16,
    "model.head_norm_groups": 8,
    "model.head_convs": 1,
    "eval.every": 1,
    "eval.score_thresh": 0.0,
}
LR = {"train.lr": {"loguniform": [0.0001, 0.01]}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("searches")


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def in_store(store, ray_address, monkeypatch):
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return store


def search_file(directory: Path, name: str, search: dict, *, epochs: int = 2, **extra) -> Path:
    path = directory / f"{name}.yaml"
    body = {"table": "table6", "set": {**TINY, "train.epochs": epochs}, "search": search, **extra}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def runs_of(store: Path, experiment: str, kind: str | None = None) -> list:
    c = MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"]) if exp else []
    return [r for r in runs if kind is None or r.data.tags.get("dwlab.kind") == kind]


def steps(store: Path, run_id: str, key: str = "loss") -> list[int]:
    c = MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
    return [m.step for m in c.get_metric_history(run_id, key)]


def optuna_trials(store: Path, experiment_dir: str) -> list:
    """The Optuna study the search's searcher left in Ray Tune's saved state."""
    path = sorted(glob.glob(str(store / "runs" / "sweeps" / "_ray" / experiment_dir / "searcher-state-*.pkl")))[-1]
    with open(path, "rb") as f:
        return pickle.load(f)["_ot_study"].trials


# ----------------------------------------------------------------------------- tests


def test_a_search_nests_its_trials_scores_on_tune_then_trains_the_choice_and_is_idempotent(in_store):
    search = {"budget": {"trials": 3}, "methods": [{"id": "fcos", "set": {"assigner.name": "fcos"}, "space": LR}]}
    f = search_file(in_store, "tpe", search)
    result = run_cli("sweep", str(f))
    assert result.exit_code == 0, result.output
    assert "search fcos: tpe seed 0, 3 trials x 2 epochs" in result.stdout
    assert "3 complete, 0 stopped, 0 failed, 6 trial-epochs" in result.stdout
    assert "2 finished, 0 skipped, 0 failed, 0 killed" in result.stdout
    assert " started | " in result.stdout and "Traceback" not in result.stdout  # piped: a line per event

    parent, = runs_of(in_store, "tpe", "sweep")
    search_run, = runs_of(in_store, "tpe", "search")
    tags = search_run.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["dwlab.search"] == "fcos"
    assert search_run.info.status == "FINISHED" and search_run.data.metrics["trials_complete"] == 3
    trials = runs_of(in_store, "tpe", "tune_trial")
    assert len(trials) == 3 and len({t.data.tags["dwlab.ray_trial_id"] for t in trials}) == 3
    for t in trials:  # nested under the search, scored on the tune split, at the tuning seed
        assert t.data.tags["mlflow.parentRunId"] == search_run.info.run_id and t.info.status == "FINISHED"
        assert t.data.tags["dwlab.tune_outcome"] == "complete"
        assert t.data.params["data.val_ann"] == "tune/instances_tune.json" and t.data.params["train.seed"] == "1000"
        run_dir = Path(t.data.tags["dwlab.run_dir"])
        assert (run_dir / "eval.json").is_file() and not (run_dir / "checkpoints").exists()  # weights dropped
    best = max(trials, key=lambda t: t.data.metrics["AP"])
    chosen = json.loads(tags["dwlab.chosen"])
    assert chosen == json.loads(best.data.tags["dwlab.point_overrides"]) and set(chosen) == {"train.lr"}
    assert search_run.data.metrics["tune_AP"] == best.data.metrics["AP"]

    finals = {r.data.tags["dwlab.point"]: r for r in runs_of(in_store, "tpe", "trial")}
    assert set(finals) == {"fcos.defaults", "fcos.tuned"}
    for point, run in finals.items():  # scored on val, at the sweep's seed 0
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["data.val_ann"] == "instances_val.json" and run.data.params["train.seed"] == "0"
    tuned = finals["fcos.tuned"]
    assert tuned.data.tags["dwlab.role"] == "tuned" and tuned.data.tags["dwlab.search_run"] == search_run.info.run_id
    assert float(tuned.data.params["train.lr"]) == chosen["train.lr"]
    assert finals["fcos.defaults"].data.params["train.lr"] == "0.001"  # the smoke preset's

    again = run_cli("sweep", str(f))
    assert again.exit_code == 0, again.output
    assert "search fcos: already FINISHED with the same search" in again.stdout
    assert "0 finished, 2 skipped" in again.stdout and len(runs_of(in_store, "tpe")) == 7  # no new run

    report = run_cli("report", "--experiment", "tpe", "--out", str(in_store / "report"))
    assert report.exit_code == 0, report.output
    table = (in_store / "report" / "table6.md").read_text()
    assert "| tuned values | AP at defaults | AP tuned | tuned - defaults |" in table
    fcos_row, = [line for line in table.splitlines() if line.startswith("| FCOS (ours: fcos)")]
    assert f"lr={chosen['train.lr']:.3g}" in fcos_row and "(n=1)" in fcos_row
    assert f"- fcos in sweep tpe: tpe seed 0, 3 trials x 2 epochs; chose train.lr={chosen['train.lr']:.4g}" in table
    csv = (in_store / "report" / "table6.csv").read_text()
    assert "tuned_values" in csv.splitlines()[0]


def test_asha_stops_weak_trials_failures_end_and_optuna_learns_each_as_it_ended(in_store):
    """TPE + ASHA on a trial-epochs budget, one trial at a time. Two knobs make the outcomes
    certain: score threshold 0.99 leaves an untrained detector no detection (AP 0: weak), lr 1e6
    diverges at once (failed). TPE's seed 6 draws, at random before it models: strong, weak,
    diverging, diverging, strong, weak (tests/test_sweep_search_spec's searcher, same draws)."""
    space = {"eval.score_thresh": {"choice": [0.0, 0.99]}, "train.lr": {"choice": [0.004, 1000000.0]}}
    search = {"budget": {"trial_epochs": 12}, "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
              "seed": 6, "defaults": False,
              "methods": [{"id": "fcos", "set": {"assigner.name": "fcos"}, "space": space}]}  # fmt: skip
    f = search_file(in_store, "asha", search, epochs=4, max_retries=0)
    result = run_cli("sweep", str(f), "--max-concurrent", "1")
    assert result.exit_code == 0, result.output
    trials = runs_of(in_store, "asha", "tune_trial")
    sampled = [json.loads(t.data.tags["dwlab.point_overrides"]) for t in trials]
    outcomes = [t.data.tags["dwlab.tune_outcome"] for t in trials]
    expected = {(0.0, 0.004): "complete", (0.99, 0.004): "stopped", (0.0, 1e6): "failed", (0.99, 1e6): "failed"}
    assert outcomes == [expected[(p["eval.score_thresh"], p["train.lr"])] for p in sampled]
    assert outcomes[:2] == ["complete", "stopped"] and "failed" in outcomes
    spent = [max(int(t.data.metrics.get("epochs_trained", 0)), 1) for t in trials]
    assert sum(spent) >= 12 and sum(spent[:-1]) < 12  # the last trial started below the budget
    assert "STOPPED by the scheduler after epoch 1/4, AP 0.0" in result.stdout
    assert "FAILED: NonFiniteLoss" in result.stdout

    S = optuna.trial.TrialState
    told = {"complete": S.COMPLETE, "stopped": S.PRUNED, "failed": S.FAIL}
    study = optuna_trials(in_store, "asha.search.fcos")
    assert len(study) == len(trials) and not [t for t in study if t.state == S.RUNNING]  # none left pending
    for ot, run, ended in zip(study, trials, outcomes):  # each told what its Tune trial really was
        assert {k.removeprefix("space/"): v for k, v in ot.params.items()} == json.loads(run.data.tags["dwlab.point_overrides"])
        assert ot.state == told[ended]
        assert ot.value == (run.data.metrics["AP"] if ended != "failed" else None)  # a stopped one: its AP when stopped
        evaluated = {"complete": [1, 2, 3, 4], "stopped": [1], "failed": []}[ended]  # each epoch evaluates
        assert sorted(ot.intermediate_values) == evaluated
    chosen = json.loads(runs_of(in_store, "asha", "search")[0].data.tags["dwlab.chosen"])
    assert chosen == {"eval.score_thresh": 0.0, "train.lr": 0.004}  # never a stopped or failed trial's
    tuned, = runs_of(in_store, "asha", "trial")  # defaults: false
    assert tuned.data.tags["dwlab.point"] == "fcos.tuned" and tuned.info.status == "FINISHED"


def test_a_killed_search_resumes_from_rays_saved_state_each_trial_once(in_store, ray_address):
    import ray

    search = {"budget": {"trials": 3}, "defaults": False,
              "methods": [{"id": "fcos", "set": {"assigner.name": "fcos"}, "space": LR}]}  # fmt: skip
    f = search_file(in_store, "killed", search, epochs=4)
    root = load_plan(f).searches[0].run_root
    state_dir = in_store / "runs" / "sweeps" / "_ray" / "killed.search.fcos"
    driver = subprocess.Popen(
        [sys.executable, "-m", "dwlab.cli", "sweep", str(f), "--address", ray_address, "--max-concurrent", "1"],
        # Tune saves its state at most every 10 s by default: a fast machine ran the whole search in
        # less, so the kill below never found a trial in the saved state. Saving on every step does.
        cwd=in_store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": "", "TUNE_GLOBAL_CHECKPOINT_S": "0"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:  # one trial ended, the next one checkpointed and in Tune's saved state
            assert driver.poll() is None and time.monotonic() < deadline, "no second trial in time"
            time.sleep(0.3)
            done = [d for d in root.glob("*") if (d / "eval.json").is_file() and not (d / "checkpoints").exists()]
            running = [d for d in root.glob("*") if (d / "checkpoints" / "last.pt").is_file()]
            saved = " ".join(p.read_text() for p in state_dir.glob("experiment_state-*.json"))
            if done and running and running[0].name in saved:
                break
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    interrupted = running[0].name
    before = {t.data.tags["dwlab.ray_trial_id"]: t for t in runs_of(in_store, "killed", "tune_trial")}
    assert before[interrupted].info.status == "RUNNING"
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)

    result = run_cli("sweep", str(f), "--max-concurrent", "1", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming Ray Tune's saved state" in result.stdout
    search_run, = runs_of(in_store, "killed", "search")  # the interrupted search, reopened
    assert search_run.info.status == "FINISHED" and search_run.data.tags["dwlab.resumed"] == "true"
    trials = runs_of(in_store, "killed", "tune_trial")
    by_id = {}
    for t in trials:
        by_id.setdefault(t.data.tags["dwlab.ray_trial_id"], []).append(t)
    assert len(by_id) == 3 and all(len(v) == 1 for v in by_id.values())  # one run per trial
    for trial_id, (run,) in by_id.items():
        assert run.info.status == "FINISHED" and run.data.tags["dwlab.tune_outcome"] == "complete"
        assert sorted(steps(in_store, run.info.run_id)) == [1, 2, 3, 4]
        epochs = [json.loads(line)["epoch"] for line in (root / trial_id / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2, 3, 4]  # the interrupted one resumed from its checkpoint, not restarted
    assert by_id[interrupted][0].info.run_id == before[interrupted].info.run_id  # the same run, reopened
    assert len(runs_of(in_store, "killed", "sweep")) == 1  # the interrupted parent was reopened
    tuned, = runs_of(in_store, "killed", "trial")
    assert tuned.info.status == "FINISHED"


def test_ctrl_c_stops_a_search_killed_choosing_nothing_and_resume_continues_it(in_store, ray_address):
    import ray

    search = {"budget": {"trials": 2}, "defaults": False,
              "methods": [{"id": "fcos", "set": {"assigner.name": "fcos"}, "space": LR}]}  # fmt: skip
    f = search_file(in_store, "ctrlc", search, epochs=3)
    root = load_plan(f).searches[0].run_root
    driver = subprocess.Popen(
        [sys.executable, "-m", "dwlab.cli", "sweep", str(f), "--address", ray_address, "--max-concurrent", "1"],
        cwd=in_store, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not [d for d in root.glob("*") if (d / "checkpoints" / "last.pt").is_file()]:
            assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.3)
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=120)
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == 1, output
    assert "search fcos: interrupted (re-run with --resume to continue it)" in output
    search_run, = runs_of(in_store, "ctrlc", "search")
    assert search_run.info.status == "KILLED" and "dwlab.chosen" not in search_run.data.tags
    stopped = [t for t in runs_of(in_store, "ctrlc", "tune_trial") if t.info.status == "KILLED"]
    assert len(stopped) == 1 and f"KILLED fcos/{stopped[0].data.tags['dwlab.ray_trial_id']}" in output
    assert runs_of(in_store, "ctrlc", "trial") == []  # nothing chosen: no final run
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)

    result = run_cli("sweep", str(f), "--max-concurrent", "1", "--resume")
    assert result.exit_code == 0, result.output
    search_run, = runs_of(in_store, "ctrlc", "search")  # the same search, continued
    assert search_run.info.status == "FINISHED" and search_run.data.metrics["trials_complete"] == 2
    trials = runs_of(in_store, "ctrlc", "tune_trial")
    assert len(trials) == 2 and stopped[0].info.run_id in {t.info.run_id for t in trials}  # reopened, not a new run
    for t in trials:
        assert t.info.status == "FINISHED" and sorted(steps(in_store, t.info.run_id)) == [1, 2, 3]
    tuned, = runs_of(in_store, "ctrlc", "trial")
    assert tuned.info.status == "FINISHED"
