"""Sweep concurrency: the same tiny trials run one after another and K at a time through
``dwlab.sweep`` (a local Ray, a throw-away MLflow store), the fixed cost of a trial, and Ray's
start (once per sweep, timed apart)."""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dwlab.config import load_config

TRIAL_SET = {"train.epochs": 1, "data.synth.n_train": 160, "data.synth.n_val": 16, "train.progress": False}


def _sweep_walls(root: Path, trials: int, max_concurrent: int, trial_set: dict) -> tuple[float, float]:
    """Seconds to start a local Ray, and of ``run_sweep`` on it, for ``trials`` seeds of one
    smoke point. A fresh Ray each time: no warm worker processes from an earlier sweep."""
    import ray
    from rich.console import Console

    from dwlab.sweep.spec import load_plan
    from dwlab.sweep.tune_run import init_ray, run_sweep

    name = f"bench-k{max_concurrent}"
    spec = root / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "base": "smoke", "seeds": trials, "set": trial_set,
                                    "points": [{"id": "dw"}], "resources": {"smoke": {"cpus_per_trial": 1}}}))  # fmt: skip
    plan = load_plan(spec, runs_dir=root / "runs")
    start = time.perf_counter()
    init_ray(None)
    ray_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        uri = f"sqlite:///{root / f'{name}.db'}"
        outcome = run_sweep(plan, uri, console=Console(file=io.StringIO()), max_concurrent=max_concurrent)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    if not outcome.ok or len(outcome.finished) != trials:
        raise RuntimeError(f"benchmark sweep {name} did not finish: {outcome}")
    return ray_s, wall


def _single_trial_s(root: Path, trial_set: dict) -> float:
    """Seconds of one such trial as a plain ``run_training`` in this process."""
    from dwlab.runner import run_training

    cfg = load_config("smoke", [f"{k}={v}" for k, v in trial_set.items()])
    start = time.perf_counter()
    run_training(cfg, root / "single")
    return time.perf_counter() - start


def bench_sweep(trials: int, concurrent: int, trial_set: dict = TRIAL_SET) -> dict[str, float]:
    """Walls of the sequential and the concurrent sweep (Ray's start excluded, reported apart),
    their ratio and the overhead per trial."""
    threads = torch.get_num_threads()  # run_training sets the trial's own
    with tempfile.TemporaryDirectory(prefix="dwlab-bench-sweep-") as tmp:
        root = Path(tmp)
        try:
            single = _single_trial_s(root, trial_set)
        finally:
            torch.set_num_threads(threads)
        ray_1, sequential = _sweep_walls(root, trials, 1, trial_set)
        ray_k, parallel = _sweep_walls(root, trials, concurrent, trial_set)
    return {
        "trials": trials, "concurrent": concurrent, "single_s": single, "sequential_s": sequential,
        "concurrent_s": parallel, "speedup": sequential / parallel, "ray_start_s": (ray_1 + ray_k) / 2,
        "overhead_per_trial_s": sequential / trials - single,
    }  # fmt: skip
