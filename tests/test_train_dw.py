"""DW on the whole detector: trains (also on images without GTs), plots its weight maps."""

import json
import math
import shutil

import yaml
from PIL import Image
from typer.testing import CliRunner

from dwlab import checkpoint
from dwlab.cli import app
from dwlab.config import validate
from dwlab.runner import run_training
from tests.conftest import tiny_config

runner = CliRunner()


def test_dw_with_box_refinement_trains_and_pos_terms_fall(tmp_path, synth_root):
    """The positive terms (cls and GIoU) fall. The total is not monotone from random init: the
    neg term is divided by the in-bag sum of (1 - P_neg) (METHOD.md), which stays near its
    clamp of 1 while predicted IoUs are below 0.5, so it swings with the scores."""
    raw = tiny_config(synth_root, assigner={"name": "dw"}, model={"box_refine": True},
                      train={"epochs": 4, "grad_clip": 10.0})
    history = []
    result = run_training(validate(raw, "t"), tmp_path / "run", on_epoch_end=lambda r: history.append(r.metrics))
    for key in ("loss_cls_pos", "loss_box"):
        assert history[-1][key] < history[0][key], [h[key] for h in history]
    assert all(math.isfinite(h["loss"]) for h in history)
    assert set(result.metrics) == {"AP", "AP50", "AP75", "APs", "APm"}  # no GT over 96² px: no APl
    # the run records the resolved DW constants beside its config (whose null fields stay null)
    assert result.resolved["assigner"]["dw"]["mu_norm"] == 5.0 and result.resolved["loss_weights"]["loss_box"] == 5.0
    assert yaml.safe_load((tmp_path / "run" / "resolved.yaml").read_text()) == result.resolved
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["assigner"]["dw"]["mu_norm"] is None
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["resolved"] == result.resolved


def test_images_without_ground_truth_train(tmp_path, synth_root):
    root = tmp_path / "empty"
    shutil.copytree(synth_root, root)
    ann = json.loads((root / "instances_train.json").read_text())
    first = min(a["image_id"] for a in ann["annotations"])
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] == first][:1]  # 1 box in 12 images
    (root / "instances_train.json").write_text(json.dumps(ann))
    for name in ("dw", "fcos"):  # most batches have no GT at all: negatives only
        raw = tiny_config(root, assigner={"name": name}, train={"epochs": 1})
        result = run_training(validate(raw, "t"), tmp_path / name)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["loss"] > 0 and 0.0 <= result.metrics["AP"] <= 1.0


def test_plot_commands_write_pngs(tmp_path, synth_root):
    raw = tiny_config(synth_root, assigner={"name": "dw"})
    run_training(validate(raw, "t"), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    res = runner.invoke(app, ["plot", "weights", "--checkpoint", str(ckpt), "--image", "1", "--out", str(tmp_path / "w.png")])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "w.png") as img:
        assert img.size[0] > 500 and img.size[1] > 500
    res = runner.invoke(app, ["plot", "weights", "--checkpoint", str(ckpt), "--image", "nope.png", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "no image with that id or file name" in res.output
    res = runner.invoke(app, ["plot", "pneg", "--out", str(tmp_path / "p.png"), "--gamma1", "1,2"])
    assert res.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 0
