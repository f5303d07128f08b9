"""End-to-end: training, overfitting through the real COCO evaluation, resume, NaN, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dwlab import checkpoint, faults
from dwlab import runner as runner_module
from dwlab.cli import app
from dwlab.config import validate
from dwlab.data.synth import generate
from dwlab.errors import DwlabError, NonFiniteLoss
from dwlab.runner import run_training
from tests.conftest import tiny_config, write_json, write_yaml

runner = CliRunner()


def test_overfits_a_handful_of_images(tmp_path):
    """(a) 4 generated images, trained on and evaluated on themselves: AP50 >= 0.9."""
    root = generate(tmp_path / "data", n_train=4, n_val=1, seed=3, image_size=128)
    raw = tiny_config(
        root,
        data={"val_ann": "instances_train.json", "val_images": "train", "flip_prob": 0.0},
        train={"epochs": 60, "warmup_iters": 10, "lr_steps": [45], "save_checkpoints": False},
    )
    result = run_training(validate(raw, "test"), tmp_path / "run")
    assert result.metrics["AP50"] >= 0.9, result.metrics
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result.metrics
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 60 and lines[-1]["loss"] < lines[0]["loss"] / 2


def test_resume_continues_at_the_right_epoch_with_the_same_state(tmp_path, synth_root):
    """(e) 2 epochs + resume to 3 == 3 epochs straight: same weights, same optimizer state. On
    the CPU in fp32, bit for bit (a run and its resume on CUDA: ``tests/test_cuda.py``)."""
    raw = tiny_config(synth_root, train={"epochs": 3, "device": "cpu"})
    straight = run_training(validate(raw, "t"), tmp_path / "straight")
    events = []
    run_training(validate(tiny_config(synth_root, train={"epochs": 2, "device": "cpu"}), "t"), tmp_path / "split")
    resumed = run_training(
        validate(raw, "t"), tmp_path / "split", resume=True, on_epoch_end=lambda r: events.append(r.epoch)
    )
    assert events == [3]
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["iteration"] == b["iteration"] == 9
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-5), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.allclose(pa["momentum_buffer"], pb["momentum_buffer"], atol=1e-5)
    assert resumed.metrics == straight.metrics
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_a_resumed_run_with_loader_workers_and_flips_writes_the_straight_runs_files(tmp_path, synth_root):
    """mini's data path (a DataLoader worker, random flips, bf16 DW): 2 epochs + resume to 3 write
    the same ``metrics.jsonl`` and ``eval.json`` as 3 straight. Persistent workers broke this:
    their RNG carried on across epochs, and a resumed run's started afresh (epoch 3's loss 6.30
    straight vs 6.11 resumed on 48 images)."""

    def cfg(epochs: int):
        raw = tiny_config(synth_root, data={"num_workers": 1, "flip_prob": 0.5}, assigner={"name": "dw"},
                          train={"epochs": epochs, "device": "cpu", "precision": "bf16", "threads": 1},
                          eval={"batch_size": 8, "every": 1})  # fmt: skip
        return validate(raw, "t")

    run_training(cfg(3), tmp_path / "straight")
    run_training(cfg(2), tmp_path / "split")
    run_training(cfg(3), tmp_path / "split", resume=True)
    for name in ("metrics.jsonl", "eval.json"):
        assert (tmp_path / "split" / name).read_text() == (tmp_path / "straight" / name).read_text(), name


def test_a_checkpoint_of_another_training_revision_is_refused(tmp_path, synth_root, monkeypatch, capsys):
    """Resumed across a TRAINING_REVISION bump, a run would train to neither revision's numbers."""
    run_training(validate(tiny_config(synth_root, train={"epochs": 1}), "t"), tmp_path / "r")
    monkeypatch.setattr(runner_module, "TRAINING_REVISION", runner_module.TRAINING_REVISION + 1)
    with pytest.raises(DwlabError, match=r"checkpoint is of training revision \d+, this dwlab trains revision \d+"):
        run_training(validate(tiny_config(synth_root, train={"epochs": 2}), "t"), tmp_path / "r", resume=True)
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    del state["resolved"]["training_revision"]  # written before the revision was saved: resumed with a warning
    torch.save(state, last)
    run_training(validate(tiny_config(synth_root, train={"epochs": 2}), "t"), tmp_path / "r", resume=True)
    assert "does not record its training revision" in capsys.readouterr().err


def test_resume_falls_back_to_previous_checkpoint_when_last_is_corrupt(tmp_path, synth_root, capsys):
    run_training(validate(tiny_config(synth_root, train={"epochs": 2}), "t"), tmp_path / "r")
    ckpt = tmp_path / "r" / "checkpoints"
    (ckpt / "last.pt").write_bytes((ckpt / "last.pt").read_bytes()[:1000])  # half-written
    events = []
    run_training(validate(tiny_config(synth_root, train={"epochs": 2}), "t"), tmp_path / "r", resume=True,
                 on_epoch_end=lambda r: events.append(r.epoch))
    assert events == [2]  # prev.pt held epoch 1: epoch 2 is trained again
    lines = [line for line in capsys.readouterr().err.splitlines() if "last.pt" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {ckpt / 'last.pt'}: corrupt or unreadable checkpoint (")


def test_nan_loss_stops_with_the_iteration_and_terms(tmp_path, synth_root, monkeypatch):
    monkeypatch.setenv(faults.ENV, "nan_at_iter=1")
    with pytest.raises(NonFiniteLoss, match=r"at iteration 1: loss_cls=.*loss_box=.*loss_ctr="):
        run_training(validate(tiny_config(synth_root), "t"), tmp_path / "nan")


def test_faults_apply_to_the_named_runs_only_and_bad_entries_are_one_line():
    assert faults.parse("", Path("runs/t/a/seed0")) == faults.Faults()
    spec = "error_at_epoch=2@boom, nan_at_iter=0"
    assert faults.parse(spec, Path("runs/t/boom/seed0")) == faults.Faults(error_at_epoch=2, nan_at_iter=0)
    assert faults.parse(spec, Path("runs/t/boomer/seed0")) == faults.Faults(nan_at_iter=0)
    with pytest.raises(DwlabError, match=r"^\$DWLAB_FAULTS: bad entry 'nan_at=1' \(expected FAULT=N\[@NAME\]"):
        faults.parse("nan_at=1", Path("r"))


def test_cli_train_and_eval(tmp_path, synth_root):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(synth_root))
    res = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "run"), "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "config.yaml").exists() and "AP=" in res.output
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    res = runner.invoke(app, ["eval", str(cfg), "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "e.json").read_text())) == {"AP", "AP50", "AP75", "APs", "APm"}  # no large GT
    for directory in (tmp_path / "run", tmp_path):  # the run's last evaluation, and dwlab eval's
        detections = json.loads((directory / "detections.json").read_text())  # a 1-epoch model may find nothing
        assert isinstance(detections, list) and all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)


def _bad_inputs(tmp_path, synth_root):
    write_json(tmp_path / "notcoco.json", {"hello": 1})
    broken = generate(tmp_path / "broken", n_train=2, n_val=1, seed=0, image_size=64)
    for png in (broken / "train").glob("*.png"):  # one unreadable image is skipped; all: nothing to train on
        png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {
        "unknown key": (tiny_config(synth_root, train={"epochz": 1}), [], "unknown key 'train.epochz'"),
        "wrong type": (tiny_config(synth_root, train={"epochs": "two"}), [], "train.epochs: Input should be a valid integer"),
        "missing data": (tiny_config(tmp_path / "nowhere"), [], "data.root: directory"),
        "not coco": (tiny_config(tmp_path, data={"train_ann": "notcoco.json", "train_images": "."}), [], "not a COCO instances file"),
        "bad override": (tiny_config(synth_root), ["--set", "model.depth=50"], "override 'model.depth': unknown key 'depth' in model"),
        "unreadable image": (tiny_config(broken, data={"num_workers": 1}), [], "cannot decode image"),
    }


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, synth_root):
    """(d) each bad input: one line on stderr naming the problem, exit code 2, via the console script."""
    for name, (raw, extra, message) in _bad_inputs(tmp_path, synth_root).items():
        cfg = write_yaml(tmp_path / f"{name.replace(' ', '_')}.yaml", raw)
        proc = subprocess.run(
            [sys.executable, "-m", "dwlab.cli", "train", str(cfg), "--out", str(tmp_path / "out"), *extra],
            capture_output=True, text=True, timeout=300,
        )
        err = proc.stderr.strip()
        assert proc.returncode == 2, (name, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, (name, err)


def test_a_paper_scale_run_off_the_papers_images_per_step_says_so(tmp_path, synth_root, capsys):
    raw = tiny_config(synth_root, train={"lr": 0.01, "batch_size": 4})
    run_training(validate({**raw, "scale": "paper"}, "t"), tmp_path / "p")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: scale paper")]
    assert lines == [
        "warning: scale paper: lr 0.01 is the paper's for 16 images per step (8 GPUs x 2); this run steps on 4 "
        "(1 worker(s) x 4): set train.lr=0.0025 (linear scaling), or run the paper's 8 x 2 through "
        "`dwlab sweep ... --scale paper` on a GPU cluster (README)"
    ]
    run_training(validate({**raw, "scale": "custom"}, "t"), tmp_path / "c")  # other scales: silent
    assert "scale paper" not in capsys.readouterr().err
