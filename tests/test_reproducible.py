"""A run is reproducible from its config: the same config and seed on the same machine write the
same ``metrics.jsonl``, ``eval.json`` and ``detections.json``, byte for byte, whatever else runs
on the machine; the clock's readings go to ``timing.jsonl`` instead."""

import json
import subprocess
import sys

import torch

from dwlab.config import validate
from dwlab.runner import run_training
from tests.conftest import tiny_config

RESULT_FILES = ("metrics.jsonl", "eval.json", "detections.json")


def _config(root):
    """The learning scale's path in small: bf16 autocast on the CPU, channels_last, AdamW, a
    loader worker process drawing random flips, DW (whose weights depend on every score)."""
    return validate(
        tiny_config(
            root,
            data={"num_workers": 1, "flip_prob": 0.5},
            assigner={"name": "dw"},
            train={"epochs": 2, "optimizer": "adamw", "lr": 2e-3, "precision": "bf16", "channels_last": True,
                   "threads": 1},
            eval={"every": 1},
        ),
        "t",
    )


def _busy() -> subprocess.Popen:
    """Another process loading the machine while a run trains: matrix products on 2 threads."""
    code = "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True:\n    a = torch.tanh(a @ a)\n"
    return subprocess.Popen([sys.executable, "-c", code])


def test_two_runs_of_one_config_write_identical_result_files(tmp_path, synth_root):
    cfg = _config(synth_root)
    run_training(cfg, tmp_path / "a")
    load = _busy()
    try:
        run_training(cfg, tmp_path / "b")
    finally:
        load.kill()
        load.wait()
    for name in RESULT_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("iters_per_s" not in r for r in rows)
    assert "AP" in rows[-1] and rows[-1]["loss"] > 0
    timing = [json.loads(line) for line in (tmp_path / "a" / "timing.jsonl").read_text().splitlines()]
    assert [t["epoch"] for t in timing] == [1, 2] and all(t["iters_per_s"] > 0 for t in timing)
