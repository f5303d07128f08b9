"""The sweep's edges as a user meets them, without Ray: a tracking server that is down, a
``dwlab ui`` pointed at a server, ``--max-concurrent 0``, and what a finished trial leaves
on disk."""

from __future__ import annotations

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
