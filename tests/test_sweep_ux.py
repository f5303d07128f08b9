"""The sweep's edges as a user meets them, without Ray: a tracking server that is down, a
``dwlab ui`` pointed at a server, ``--max-concurrent 0``, and what a finished trial leaves
on disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dwlab import checkpoint
from dwlab.cli import app
from dwlab.config import validate
from dwlab.errors import DwlabError
from dwlab.runner import run_training
from dwlab.sweep.tracking import ui_command
from tests.conftest import tiny_config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def _sweep_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"points": [{"train.lr": 0.01}]}))
    return path


def test_a_dead_tracking_server_fails_the_sweep_fast_in_one_line_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dwlab.cli", "sweep", str(_sweep_file(tmp_path))],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-1000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot reach the MLflow store {uri}: ")
    assert "Traceback" not in done.stderr
    assert took < 30, f"{took:.0f} s"
    assert not (tmp_path / "runs" / "sweeps" / "s" / "lr=0.01").exists()  # no trial was prepared


def test_ui_on_a_tracking_server_says_where_its_ui_is(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        "http://mlflow.example:5000 is an MLflow tracking server: its UI is at http://mlflow.example:5000 "
        "(open it in a browser)"
    )
    assert ui_command("http://mlflow.example:5000") == "open http://mlflow.example:5000 in a browser (the tracking server's UI)"


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_max_concurrent_below_one_is_refused_before_anything_runs(tmp_path, monkeypatch, extra):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", str(_sweep_file(tmp_path)), "--max-concurrent", "0", *extra])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --max-concurrent: expected at least 1, got 0"]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()


def test_a_finished_runs_checkpoint_keeps_the_weights_only(tmp_path, synth_root):
    cfg = validate(tiny_config(synth_root, train={"epochs": 2, "optimizer": "adamw"}), "t")
    run_training(cfg, tmp_path / "r")
    ckpt = tmp_path / "r" / "checkpoints"
    full = (ckpt / "last.pt").stat().st_size
    assert (ckpt / "prev.pt").is_file() and "optimizer" in checkpoint.load(ckpt / "last.pt")

    checkpoint.keep_weights_only(ckpt)
    slim = checkpoint.load(ckpt / "last.pt")
    assert not (ckpt / "prev.pt").exists() and "optimizer" not in slim
    assert (ckpt / "last.pt").stat().st_size < 0.45 * full  # AdamW keeps two moments per weight
    assert int(slim["epoch"]) == 2 and set(slim["model"]) == set(torch.load(ckpt / "last.pt")["model"])

    # a re-run of the finished run has nothing to train: the weights suffice ...
    again = run_training(cfg, tmp_path / "r", resume=True)
    assert again.epochs_done == 2 and "AP" in again.metrics
    # ... but training further needs the optimizer state, and says so
    longer = validate(tiny_config(synth_root, train={"epochs": 3, "optimizer": "adamw"}), "t")
    with pytest.raises(DwlabError, match=r"holds the weights of epoch 2 only, without the optimizer state"):
        run_training(longer, tmp_path / "r", resume=True)


def test_a_trial_runs_on_the_devices_ray_gave_it():
    """0 GPUs: ``auto`` means the CPU, whatever the node has; GPUs torch cannot use: an error."""
    from dwlab.config import load_config
    from dwlab.sweep.trainable import on_the_trials_devices

    cfg = load_config("smoke")
    assert cfg.train.device == "auto" and on_the_trials_devices(cfg, 0).train.device == "cpu"
    if not torch.cuda.is_available():  # this machine: a trial given a GPU fails at once
        with pytest.raises(DwlabError, match=r"the trial was given 1 GPU\(s\) but torch .* sees none"):
            on_the_trials_devices(cfg, 1)


def _gpus_beyond_this_host() -> str:
    """A GPU request this host cannot fit: a quarter GPU without one, one GPU more than it has."""
    n = torch.cuda.device_count()
    return "0.25" if n == 0 else str(n + 1)


def test_a_trial_needing_gpus_the_local_ray_lacks_fails_at_once_in_one_line(tmp_path):
    """The sweep file's gpus_per_trial beyond the GPUs torch sees: exit 2 before Ray, MLflow or a
    run directory is started (a local Ray never grows: the sweep used to wait forever)."""
    gpus = _gpus_beyond_this_host()
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"points": [{"train.lr": 0.01}], "resources": {"gpus_per_trial": float(gpus)}}))
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dwlab.cli", "sweep", str(f)],
        cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-1000:]
    assert done.stderr.strip().splitlines() == [
        f"error: gpus_per_trial={float(gpus):g} (resources.gpus_per_trial in {f}) but the local Ray gets "
        f"{torch.cuda.device_count()} GPUs (torch.cuda.device_count()={torch.cuda.device_count()}); "
        + ("--gpus-per-trial 0 trains on the CPU" if not torch.cuda.device_count() else
           f"--gpus-per-trial {torch.cuda.device_count()} fits")
        + ", or --address joins a Ray cluster that has them"
    ]  # fmt: skip
    assert took < 60, f"{took:.0f} s"  # the import of torch and the CLI; no Ray is started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no mlruns, no runs


def test_resource_flags_beyond_the_local_ray_name_the_flag(tmp_path, monkeypatch):
    from dwlab.data.synth import usable_cores

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "")
    f = _sweep_file(tmp_path)
    for args, expected in [
        (["--gpus-per-trial", _gpus_beyond_this_host()], "(--gpus-per-trial) but the local Ray gets"),
        (["--cpus-per-trial", str(usable_cores() + 1)],
         f"(--cpus-per-trial) but the local Ray gets {usable_cores()} CPUs (usable cores={usable_cores()}); "
         f"--cpus-per-trial {usable_cores()} fits"),
    ]:  # fmt: skip
        result = CliRunner().invoke(app, ["sweep", str(f), *args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_resumed_trial_keeps_its_checkpoint_across_gpu_shares_not_across_worker_counts(tmp_path):
    """--gpus-per-trial 0.25 -> 0.5 on resume: the same trial (config, workers) continues; 1 -> 2
    GPUs makes it 2 data-parallel workers (another global batch): it starts over, and a FINISHED
    run of 1 worker does not count as done."""
    from dwlab.sweep.spec import load_plan
    from dwlab.sweep.tracking import SweepTracker
    from dwlab.sweep.tune_run import prepare_run_dir, write_marker

    f = _sweep_file(tmp_path)
    plans = {g: load_plan(f, runs_dir=tmp_path / "runs", resources={"gpus_per_trial": g}) for g in (0.25, 0.5, 2)}
    quarter, half, two = (plans[g].trials[0] for g in (0.25, 0.5, 2))
    assert quarter.config_hash == half.config_hash == two.config_hash and (half.workers, two.workers) == (1, 2)

    def interrupted() -> None:  # a checkpoint and the marker of a 1-worker attempt
        (quarter.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_marker(quarter, "run-id")

    interrupted()
    assert prepare_run_dir(half, "run-id", resume=True) and (half.run_dir / "checkpoints").is_dir()
    assert not prepare_run_dir(two, "run-id", resume=True) and not (two.run_dir / "checkpoints").exists()
    interrupted()
    assert not prepare_run_dir(half, "run-id", resume=False)  # without --resume: always fresh

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(plans[0.25], uri)
    tracker.start_parent(None, 1, 0)
    run_id = tracker.started(quarter, 0)
    tracker.client.set_terminated(run_id, "FINISHED")
    run = tracker.client.get_run(run_id)
    assert run.data.tags["dwlab.resources"] == "cpus_per_trial=1 gpus_per_trial=0.25 workers_per_trial=1"
    assert SweepTracker(plans[0.5], uri).reconcile(resume=True)[half.key].finished
    assert not SweepTracker(plans[2], uri).reconcile(resume=True)[two.key].finished


def test_a_trial_with_a_finished_run_of_its_config_in_another_experiment_gets_a_copy(tmp_path, monkeypatch):
    """Sweep b's only point is sweep a's finished one (same config hash, workers, device): with
    --copy-finished, b copies the run (params, metric history, artifacts, run directory) and trains nothing (no
    Ray); another config, or the same on a GPU, finds nothing to copy."""
    from mlflow.entities import Metric

    from dwlab.store import Tag
    from dwlab.sweep.spec import load_plan
    from dwlab.sweep.tracking import SweepTracker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for f in (a, b):
        f.write_text(yaml.safe_dump({"points": [{"train.lr": 0.01}]}))
    plan_a = load_plan(a, runs_dir=tmp_path / "runs")
    source = SweepTracker(plan_a, uri)
    source.start_parent(None, 1, 0)
    trial = plan_a.trials[0]
    src = source.started(trial, 0)
    source.client.log_batch(src, metrics=[Metric("loss", 1.0, 1, 1), Metric("loss", 0.5, 2, 2), Metric("AP", 0.25, 2, 2)])
    trial.run_dir.mkdir(parents=True)
    (trial.run_dir / "eval.json").write_text('{"AP": 0.25}\n')
    source.client.log_artifact(src, str(trial.run_dir / "eval.json"))
    source.client.set_terminated(src, "FINISHED")

    result = CliRunner().invoke(app, ["sweep", str(b), "--runs-dir", str(tmp_path / "runs"), "--copy-finished"])
    assert result.exit_code == 0, result.output
    assert f"copied from the FINISHED run of the same config in a ({trial.key}, AP 25.0)" in result.output
    assert "sweep b: 0 finished, 1 copied, 0 skipped, 0 failed, 0 killed" in result.output
    assert "Downloading artifacts" not in result.output  # MLflow's progress bar, a line of bars per copy in a log
    tracker = SweepTracker(load_plan(b, runs_dir=tmp_path / "runs"), uri)
    copy, = tracker.client.search_runs([tracker.experiment_id], "tags.`dwlab.kind` = 'trial'")
    assert copy.info.status == "FINISHED" and copy.data.tags[Tag.COPIED_FROM] == src
    assert copy.data.tags[Tag.SWEEP] == "b" and copy.data.params == source.client.get_run(src).data.params
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(copy.info.run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    assert [f.path for f in tracker.client.list_artifacts(copy.info.run_id)] == ["eval.json"]
    copied_dir = tmp_path / "runs" / "b" / trial.key
    assert (copied_dir / "eval.json").read_text() == '{"AP": 0.25}\n'
    assert json.loads((copied_dir / "trial.json").read_text())["mlflow_run_id"] == copy.info.run_id

    again = CliRunner().invoke(app, ["sweep", str(b), "--runs-dir", str(tmp_path / "runs"), "--copy-finished"])
    assert "sweep b: 0 finished, 1 skipped" in again.output  # its own FINISHED run now
    other_lr = load_plan(b, runs_dir=tmp_path / "runs", set_=["train.lr=0.02"])
    on_gpu = load_plan(b, runs_dir=tmp_path / "runs", resources={"gpus_per_trial": 1})
    assert SweepTracker(other_lr, uri).finished_elsewhere(other_lr.trials) == {}
    assert SweepTracker(on_gpu, uri).finished_elsewhere(on_gpu.trials) == {}


def test_a_copy_source_is_the_latest_run_with_an_ap_and_a_failed_copy_leaves_nothing(tmp_path):
    """finished_elsewhere: a FINISHED run without an AP is no source, the latest of two is, and a
    GPU run (its device tag names the card) matches a GPU trial. copy_run keeps the source's
    commit; when the copy fails (here: its staging path is taken by a file) it raises and leaves
    no active run and the trial's directory as it was."""
    from mlflow.entities import Metric, RunTag

    from dwlab.store import Tag
    from dwlab.sweep.spec import load_plan
    from dwlab.sweep.tracking import SweepTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for f in (a, b):
        f.write_text(yaml.safe_dump({"points": [{"train.lr": 0.01}]}))

    def finished(plan, ap: float | None, device: str | None = None, commit: str = "c0") -> str:
        tracker = SweepTracker(plan, uri)
        tracker.start_parent(None, 1, 0)
        run_id = tracker.started(plan.trials[0], 0)
        tags = {Tag.GIT_COMMIT: commit, **({Tag.DEVICE: device} if device else {})}
        tracker.client.log_batch(run_id, metrics=[Metric("AP", ap, 1, 1)] if ap is not None else [],
                                 tags=[RunTag(k, v) for k, v in tags.items()])  # fmt: skip
        tracker.client.set_terminated(run_id, "FINISHED")
        return run_id

    plan_a, plan_b = (load_plan(f, runs_dir=tmp_path / "runs") for f in (a, b))
    finished(plan_a, None)  # FINISHED without a result
    assert SweepTracker(plan_b, uri).finished_elsewhere(plan_b.trials) == {}
    finished(plan_a, 0.2, commit="old")
    time.sleep(0.01)
    latest = finished(plan_a, 0.3, commit="new")
    tracker = SweepTracker(plan_b, uri)
    found = tracker.finished_elsewhere(plan_b.trials)
    trial = plan_b.trials[0]
    assert found[trial.key].info.run_id == latest

    gpu_a, gpu_b = (load_plan(f, runs_dir=tmp_path / "runs", resources={"gpus_per_trial": 1}) for f in (a, b))
    on_card = finished(gpu_a, 0.4, device="cuda:NVIDIA H200")
    assert SweepTracker(gpu_b, uri).finished_elsewhere(gpu_b.trials)[gpu_b.trials[0].key].info.run_id == on_card

    plan_a.trials[0].run_dir.mkdir(parents=True)
    (plan_a.trials[0].run_dir / "eval.json").write_text('{"AP": 0.3}\n')
    trial.run_dir.mkdir(parents=True)
    (trial.run_dir / "left.txt").write_text("an earlier attempt's file\n")
    staged = trial.run_dir.with_name(trial.run_dir.name + ".copying")
    staged.write_text("in the way\n")  # copytree cannot stage there
    tracker.start_parent(None, 1, 0)
    tracker.recount_trials(2)  # what run_grid does when a failed copy trains instead
    assert tracker.client.get_run(tracker.parent_id).data.tags[Tag.TRIALS] == "2"
    with pytest.raises(OSError):
        tracker.copy_run(trial, found[trial.key])
    assert tracker.client.search_runs([tracker.experiment_id], "tags.`dwlab.kind` = 'trial'") == []
    assert sorted(p.name for p in trial.run_dir.iterdir()) == ["left.txt"]
    staged.unlink()
    run_id, _ = tracker.copy_run(trial, found[trial.key])
    copy = tracker.client.get_run(run_id)
    assert copy.data.tags[Tag.GIT_COMMIT] == "new" and copy.data.metrics["AP"] == 0.3
    assert sorted(p.name for p in trial.run_dir.iterdir()) == ["eval.json"]  # the old attempt's file is gone

    client, terminated = tracker.client, tracker.client.set_terminated
    client.set_terminated = lambda *a, **k: (_ for _ in ()).throw(OSError("store gone"))  # after the swap
    with pytest.raises(OSError, match="store gone"):
        tracker.copy_run(trial, found[trial.key])
    client.set_terminated = terminated
    assert not trial.run_dir.exists()  # no source files under the trial's name without its run
    assert [r.info.run_id for r in client.search_runs([tracker.experiment_id], "tags.`dwlab.kind` = 'trial'")] == [run_id]


def test_the_copy_source_is_the_latest_across_blocks_of_experiments(tmp_path, monkeypatch):
    """MLflow searches runs in blocks of experiments: the latest source wins across blocks, not the
    first block's."""
    from mlflow.entities import Metric, ViewType

    from dwlab.sweep import tracking
    from dwlab.sweep.spec import load_plan
    from dwlab.sweep.tracking import SweepTracker

    monkeypatch.setattr(tracking, "EXPERIMENTS_PER_SEARCH", 1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plans = {}
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"points": [{"train.lr": 0.01}]}))
        plans[name] = load_plan(tmp_path / f"{name}.yaml", runs_dir=tmp_path / "runs" / name)

    def finished(plan) -> str:
        tracker = SweepTracker(plan, uri)
        tracker.start_parent(None, 1, 0)
        run_id = tracker.started(plan.trials[0], 0)
        tracker.client.log_batch(run_id, metrics=[Metric("AP", 0.3, 1, 1)])
        tracker.client.set_terminated(run_id, "FINISHED")
        time.sleep(0.01)
        return run_id

    finished(plans["a"])
    finished(plans["c"])
    searcher = SweepTracker(plans["b"], uri)
    ids = {SweepTracker(plans[n], uri).experiment_id: plans[n] for n in ("a", "c")}
    order = [e.experiment_id for e in searcher.client.search_experiments(ViewType.ACTIVE_ONLY) if e.experiment_id in ids]
    last_block = ids[order[-1]]
    latest = finished(last_block)
    assert searcher.finished_elsewhere(plans["b"].trials)[plans["b"].trials[0].key].info.run_id == latest


def test_the_eta_keeps_the_sweeps_concurrency_between_one_trials_end_and_the_next_start(monkeypatch):
    """Two trials at a time, 4 epochs each, one epoch every 10 s: when one ends and the next has
    not started, one runs, but the ETA still divides the work left by two."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from dwlab.sweep import progress as progress_module
    from dwlab.sweep.progress import SweepProgress

    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    trials = [SimpleNamespace(key=k, config=SimpleNamespace(train=SimpleNamespace(epochs=4))) for k in "abc"]
    p = SweepProgress(trials, Console(file=io.StringIO()))
    p.started("a")
    p.started("b")
    for epoch in (1, 2, 3, 4):
        clock[0] += 10
        p.result("a", {"epoch": epoch})
        p.result("b", {"epoch": epoch})
    p.finished("a")
    assert p.eta_s() == (0 + 4) * 10 / 2  # b's last report is its 4th epoch; c's 4 epochs, 2 at a time
    p.finished("b")
    assert p.eta_s() == 4 * 10 / 1  # one trial left: at most one runs
