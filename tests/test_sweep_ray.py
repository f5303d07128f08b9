"""``dwlab sweep`` end to end on a real local Ray (2 CPUs) and a real MLflow sqlite store.

Tiny trials (16 images of 64 px, a 1-conv head, 1-2 epochs) keep the module to a few
minutes on 2 cores. One Ray instance serves the whole module; the kill test's driver is a
subprocess that joins it with ``--address`` (so SIGKILL leaves no orphaned Ray behind).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from dwlab import checkpoint, faults
from dwlab.cli import app
from dwlab.config import load_config
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
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The working directory of every sweep here: ./mlruns (MLflow) and ./runs (trials)."""
    return tmp_path_factory.mktemp("sweeps")


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


def sweep_file(directory: Path, name: str, points: list, *, epochs: int = 2, seeds: int = 1, **extra) -> Path:
    path = directory / f"{name}.yaml"
    body = {"set": {**TINY, "train.epochs": epochs}, "seeds": seeds, "points": points, **extra}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run_cli(*args: str):
    result = CliRunner().invoke(app, ["sweep", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def client(store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")


def runs_of(store: Path, experiment: str, kind: str | None = "trial") -> list:
    c = client(store)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [r for r in runs if kind is None or r.data.tags.get("dwlab.kind") == kind]


def by_point_seed(runs) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    for r in runs:
        out.setdefault((r.data.tags["dwlab.point"], r.data.tags["dwlab.seed"]), []).append(r)
    return out


def steps(store: Path, run_id: str, key: str) -> list[int]:
    return [m.step for m in client(store).get_metric_history(run_id, key)]


# ----------------------------------------------------------------------------- tests


def test_tiny_sweep_four_finished_runs_then_idempotent(in_store):
    f = sweep_file(in_store, "four", [{"grid": {"train.lr": [0.01, 0.02]}}], seeds=2)
    t0 = time.monotonic()
    result = run_cli(str(f))
    first_s = time.monotonic() - t0
    assert result.exit_code == 0, result.output
    assert "4 finished, 0 skipped, 0 failed" in result.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{in_store / 'mlruns' / 'mlflow.db'}" in result.stdout
    experiment_id = client(in_store).get_experiment_by_name("four").experiment_id
    assert f"its runs: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning" in result.stdout

    plan = load_plan(f)
    parents = runs_of(in_store, "four", "sweep")
    trials = runs_of(in_store, "four")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert re.fullmatch(r"four \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", parents[0].info.run_name)  # one name per invocation
    experiment = client(in_store).get_experiment_by_name("four")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
    # 4 trials, 2 at a time: a trial's run starts when the trial does, not when the sweep did
    by_start = sorted(trials, key=lambda r: r.info.start_time)
    assert by_start[2].info.start_time >= min(r.info.end_time for r in by_start[:2])
    import ray

    nodes = {n["NodeID"] for n in ray.nodes()}
    assert len(trials) == 4 and {r.info.status for r in trials} == {"FINISHED"}
    expected = {(t.point.id, str(t.seed)): t for t in plan.trials}
    assert set(by_point_seed(trials)) == set(expected)
    for run in trials:
        tags, params = run.data.tags, run.data.params
        trial = expected[(tags["dwlab.point"], tags["dwlab.seed"])]
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["dwlab.config_hash"] == trial.config_hash
        assert tags["dwlab.sweep"] == "four" and tags["dwlab.world_size"] == "1"
        assert tags["dwlab.dataset"].startswith("synth:n_train=16") and tags["dwlab.backbone"] == "resnet18"
        assert tags["dwlab.device"] == "cpu" and tags["dwlab.git_commit"] and tags["dwlab.version"]
        assert json.loads(tags["dwlab.point_overrides"]) == trial.point.overrides
        assert float(params["train.lr"]) == trial.config.train.lr
        assert params["train.seed"] == str(trial.seed) and params["assigner.name"] == "fcos"
        assert params["train.threads"] == "1" and len(params) > 60
        assert not any("inject" in k for k in params)  # faults are not config ($DWLAB_FAULTS)
        assert tags["dwlab.node"].split()[1] in nodes  # "<ip> <node id>" of the node that ran it
        assert steps(in_store, run.info.run_id, "loss") == [1, 2]
        assert steps(in_store, run.info.run_id, "AP") == [2]
        assert {"loss", "loss_cls", "loss_box", "lr", "images_seen", "AP", "AP50", "APs"} <= set(run.data.metrics)
        assert "APl" not in run.data.metrics  # no GT over 96² px: pycocotools' -1 is not a measurement
        arts = {a.path for a in client(in_store).list_artifacts(run.info.run_id)}
        assert {"config.yaml", "resolved.yaml", "eval.json", "metrics.jsonl", "detections.json", "checkpoints"} <= arts
        assert "optimizer" not in checkpoint.load(trial.run_dir / "checkpoints" / "last.pt")  # weights only
        assert not (trial.run_dir / "checkpoints" / "prev.pt").exists()
        assert params["resolved.loss_weights.loss_box"] == "1.0"  # FCOS: every weight 1
        assert (trial.run_dir / "checkpoints" / "last.pt").is_file()

    # again: every (point, seed) is FINISHED with the same config -> no trial, no run
    t0 = time.monotonic()
    again = run_cli(str(f))
    assert again.exit_code == 0, again.output
    assert "0 finished, 4 skipped" in again.stdout and "nothing to run" in again.stdout
    assert len(runs_of(in_store, "four", None)) == 5
    print(f"4-trial sweep {first_s:.1f} s; no-op re-run {time.monotonic() - t0:.1f} s")


def test_failing_trial_is_retried_then_failed_while_others_finish(in_store, monkeypatch):
    points = [
        {"train.lr": 0.01},
        {"id": "boom", "train.lr": 0.02},
        {"id": "nan", "train.lr": 0.03},  # its own config: points with one config are one point
    ]
    # set after the module's Ray started: the driver hands it to the trials
    monkeypatch.setenv(faults.ENV, "error_at_epoch=2@boom,nan_at_iter=1@nan")
    f = sweep_file(in_store, "fails", points, max_retries=1)
    result = run_cli(str(f))
    assert result.exit_code == 1, result.output
    assert "1 finished, 0 skipped, 2 failed" in result.stdout
    assert "FAILED boom/seed0: RuntimeError: injected error at the start of epoch 2" in result.stderr
    assert "FAILED nan/seed0: NonFiniteLoss: non-finite loss" in result.stderr
    boom_log = load_plan(f).trials[1].run_dir / "trial.log"  # named by the failure line, traceback inside
    assert f"(traceback: {boom_log})" in result.stderr and "Traceback (most recent call last)" in boom_log.read_text()
    assert "Traceback" not in result.stdout  # the progress lines stay one line per event

    runs = by_point_seed(runs_of(in_store, "fails"))
    ok, = runs[("lr=0.01", "0")]
    boom, = runs[("boom", "0")]
    assert ok.info.status == "FINISHED"
    assert boom.info.status == "FAILED"
    assert "injected error at the start of epoch 2" in boom.data.tags["dwlab.error"]
    assert boom.data.tags["dwlab.retries"] == "1"  # one retry, then recorded FAILED
    # the retry resumed from the epoch-1 checkpoint: epoch 1 was trained (and logged) once
    assert steps(in_store, boom.info.run_id, "loss") == [1]
    nan, = runs[("nan", "0")]
    assert nan.info.status == "FAILED" and "non-finite loss" in nan.data.tags["dwlab.error"]
    parent, = runs_of(in_store, "fails", "sweep")
    assert parent.info.status == "FAILED" and parent.data.tags["dwlab.failed"] == "2"


def test_killed_driver_then_resume_finishes_each_trial_once(in_store, ray_address):
    import ray

    f = sweep_file(in_store, "killed", [{"grid": {"train.lr": [0.01, 0.02]}}], epochs=4)
    plan = load_plan(f)
    driver = subprocess.Popen(
        [sys.executable, "-m", "dwlab.cli", "sweep", str(f), "--address", ray_address],
        cwd=in_store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deadline = time.monotonic() + 120
        ckpts = [t.run_dir / "checkpoints" / "last.pt" for t in plan.trials]
        while not any(p.is_file() for p in ckpts):
            assert driver.poll() is None, "the driver ended before any checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    markers = {t.key: json.loads((t.run_dir / "trial.json").read_text()) for t in plan.trials}
    left = runs_of(in_store, "killed")
    assert {r.info.status for r in left} <= {"RUNNING", "SCHEDULED"} and len(left) == 2
    # Ray stops the dead driver's trial actors; wait until their CPUs are free again
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)

    result = run_cli(str(f), "--resume")
    assert result.exit_code == 0, result.output
    runs = by_point_seed(runs_of(in_store, "killed"))
    assert set(runs) == {(t.point.id, str(t.seed)) for t in plan.trials}
    for trial in plan.trials:
        assert len(runs[(trial.point.id, str(trial.seed))]) == 1, [(r.info.status, r.info.run_id, r.data.tags.get("dwlab.closed_reason"), r.data.tags.get("dwlab.resumed")) for r in runs[(trial.point.id, str(trial.seed))]]
        run, = runs[(trial.point.id, str(trial.seed))]  # exactly one run per (point, seed)
        assert run.info.status == "FINISHED"
        assert run.info.run_id == markers[trial.key]["mlflow_run_id"]  # the same run, reopened
        logged = steps(in_store, run.info.run_id, "loss")
        assert sorted(set(logged)) == [1, 2, 3, 4]
        epochs = [json.loads(line)["epoch"] for line in (trial.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2, 3, 4]  # each epoch trained once: resumed, not restarted
        # no checkpoint corrupted by the kill; once finished, the weights alone are kept
        assert checkpoint.load(trial.run_dir / "checkpoints" / "last.pt")["epoch"] == 4
        assert not (trial.run_dir / "checkpoints" / "prev.pt").exists()
    statuses = [r.info.status for r in runs_of(in_store, "killed", None)]
    assert "RUNNING" not in statuses and "SCHEDULED" not in statuses
    assert len(runs_of(in_store, "killed", "sweep")) == 1  # the interrupted parent was reopened


def test_killed_trial_worker_is_retried_from_its_last_checkpoint(in_store, ray_address):
    """SIGKILL the trial's own process (its pid from the run's tags) after epoch 1: Tune
    retries the trial, which resumes from the checkpoint instead of starting over."""
    f = sweep_file(in_store, "workerkill", [{"train.lr": 0.01}], epochs=6, max_retries=1)
    trial = load_plan(f).trials[0]
    driver = subprocess.Popen(
        [sys.executable, "-m", "dwlab.cli", "sweep", str(f), "--address", ray_address],
        cwd=in_store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deadline = time.monotonic() + 120
        pid = None
        while pid is None:
            assert driver.poll() is None and time.monotonic() < deadline, "no trial report in time"
            time.sleep(0.2)
            # the store is read only once a checkpoint exists: by then the driver has created
            # the database (two processes migrating a new sqlite store at once collide)
            if not (trial.run_dir / "checkpoints" / "last.pt").is_file():
                continue
            tags = runs_of(in_store, "workerkill")[0].data.tags
            if "dwlab.worker_pid" in tags:
                pid = int(tags["dwlab.worker_pid"])
        os.kill(pid, signal.SIGKILL)
        assert driver.wait(timeout=180) == 0
    finally:
        driver.kill()
        driver.wait()
    run, = runs_of(in_store, "workerkill")
    assert run.info.status == "FINISHED" and run.data.tags["dwlab.retries"] == "1"
    assert int(run.data.tags["dwlab.worker_pid"]) != pid
    epochs = [json.loads(line)["epoch"] for line in (trial.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]  # no epoch trained twice: the retry resumed
    assert sorted(steps(in_store, run.info.run_id, "loss")) == [1, 2, 3, 4, 5, 6]


def test_without_resume_an_interrupted_run_is_closed_killed(in_store):
    """A run left RUNNING by a killed driver, re-run without --resume: KILLED + a fresh run."""
    from dwlab.store import default_uri
    from dwlab.sweep.tracking import SweepTracker

    f = sweep_file(in_store, "stale", [{"train.lr": 0.01}], epochs=1)
    plan = load_plan(f)
    tracker = SweepTracker(plan, default_uri())
    tracker.reconcile(resume=False)
    tracker.start_parent(None, 1, 0)
    stale_id = tracker.started(plan.trials[0], 0)  # ... and the driver dies here
    (plan.trials[0].run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (plan.trials[0].run_dir / "checkpoints" / "junk.pt").write_text("not a checkpoint")

    result = run_cli(str(f))
    assert result.exit_code == 0, result.output
    runs = {r.info.run_id: r for r in runs_of(in_store, "stale")}
    assert runs[stale_id].info.status == "KILLED"
    fresh = [r for r in runs.values() if r.info.run_id != stale_id]
    assert len(fresh) == 1 and fresh[0].info.status == "FINISHED"
    assert not (plan.trials[0].run_dir / "checkpoints" / "junk.pt").exists()  # started fresh
    assert {r.info.status for r in runs_of(in_store, "stale", "sweep")} == {"KILLED", "FINISHED"}


def test_a_trial_bigger_than_the_running_local_ray_fails_at_once_in_one_line(in_store):
    """This module's Ray has 2 CPUs and no GPU: a trial asking for more would wait forever."""
    f = sweep_file(in_store, "toobig", [{"train.lr": 0.01}], epochs=1)
    for args, expected in [
        (["--cpus-per-trial", "3"], "cpus_per_trial=3 (--cpus-per-trial) but the running local Ray has 2 CPUs "
                                    "(ray.cluster_resources()); --cpus-per-trial 2 fits"),
        (["--gpus-per-trial", "0.25"], "gpus_per_trial=0.25 (--gpus-per-trial) but the running local Ray has 0 GPUs "
                                       "(ray.cluster_resources()); --gpus-per-trial 0 trains on the CPU"),
    ]:  # fmt: skip
        t0 = time.monotonic()
        result = run_cli(str(f), *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            f"error: {expected}, or --address joins a Ray cluster that has them"
        ]
        assert time.monotonic() - t0 < 30
    assert not runs_of(in_store, "toobig", kind=None) and not (in_store / "runs" / "sweeps" / "toobig").exists()


def test_two_worker_gloo_trial_matches_one_process_on_the_same_global_batch(in_store, tmp_path):
    """Ray Train, 2 gloo workers x 4 images vs one process x 8 images: the whole (8-image)
    dataset is one global batch, so epoch 1's loss is the loss at the same initial weights."""
    from dwlab.runner import run_training

    same = {"data.synth.n_train": 8, "model.norm": "frozen_bn", "data.flip_prob": 0.0}
    f = sweep_file(
        in_store, "ddp", [{"train.batch_size": 4}], epochs=1,
        resources={"cpus_per_trial": 2, "workers_per_trial": 2},
    )
    body = yaml.safe_load(f.read_text())
    body["set"].update(same)
    f.write_text(yaml.safe_dump(body))
    result = run_cli(str(f))
    assert result.exit_code == 0, result.output
    run, = runs_of(in_store, "ddp")
    assert run.info.status == "FINISHED" and run.data.tags["dwlab.world_size"] == "2"
    assert run.data.tags["dwlab.global_batch"] == "8"
    ddp_loss = run.data.metrics["loss"]

    cfg = load_config("smoke", {**TINY, **same, "train.epochs": 1, "train.batch_size": 8, "train.progress": False})
    reports = []
    run_training(cfg, tmp_path / "single", on_epoch_end=reports.append)
    single = reports[0].metrics
    assert ddp_loss == pytest.approx(single["loss"], rel=1e-3)
    for key in ("loss_cls", "loss_box", "loss_ctr"):
        assert run.data.metrics[key] == pytest.approx(single[key], rel=1e-3)
