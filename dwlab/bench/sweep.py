"""Sweep concurrency: the same tiny trials run one after another and K at a time through
``dwlab.sweep`` (a local Ray, a throw-away MLflow store), the fixed cost of a trial, and Ray's
start (once per sweep, timed apart). The single run and the trials train on the bench's device:
on CUDA each trial gets a 1/K share of a GPU (or a whole one when there are K)."""

from __future__ import annotations

import io
import math
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dwlab.config import load_config

TRIAL_SET = {"train.epochs": 1, "data.synth.n_train": 160, "data.synth.n_val": 16, "train.progress": False}


def gpu_share(device: str, concurrent: int) -> float:
    """GPUs per trial so that ``concurrent`` trials run at once on this host's GPUs (0 on the CPU)."""
    if device != "cuda":
        return 0.0
    return min(1.0, math.floor(torch.cuda.device_count() / concurrent * 1e4) / 1e4)  # Ray counts 1e-4 GPUs


def _sweep_walls(
    root: Path, trials: int, max_concurrent: int, trial_set: dict, gpus: float
) -> tuple[float, float, set[str]]:
    """Seconds to start a local Ray, and of ``run_sweep`` on it, for ``trials`` seeds of one
    smoke point with ``gpus`` each, and the devices the trials reported. A fresh Ray each time:
    no warm worker processes from an earlier sweep."""
    import ray
    from rich.console import Console

    from dwlab.sweep.spec import load_plan
    from dwlab.sweep.tune_run import init_ray, run_sweep

    name = f"bench-k{max_concurrent}"
    spec = root / f"{name}.yaml"
    resources = {"cpus_per_trial": 1, "gpus_per_trial": gpus}
    spec.write_text(yaml.safe_dump({"name": name, "base": "smoke", "seeds": trials, "set": trial_set,
                                    "points": [{"id": "dw"}], "resources": {"smoke": resources}}))  # fmt: skip
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
    return ray_s, wall, _trial_devices(uri, name)


def _trial_devices(uri: str, experiment: str) -> set[str]:
    """The devices the sweep's trials trained on, as their runs record them (``cpu``, ``cuda:<name>``)."""
    from mlflow import MlflowClient

    from dwlab.store import TRIAL_FILTER, Tag

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], TRIAL_FILTER, max_results=1000)
    return {run.data.tags.get(Tag.DEVICE, "?") for run in runs}


def _single_trial_s(root: Path, trial_set: dict) -> float:
    """Seconds of one such trial as a plain ``run_training`` in this process."""
    from dwlab.runner import run_training

    cfg = load_config("smoke", [f"{k}={v}" for k, v in trial_set.items()])
    start = time.perf_counter()
    run_training(cfg, root / "single")
    return time.perf_counter() - start


def bench_sweep(trials: int, concurrent: int, trial_set: dict = TRIAL_SET, device: str = "cpu") -> dict:
    """Walls of the sequential and the concurrent sweep (Ray's start excluded, reported apart),
    their ratio and the overhead per trial, all on ``device`` (cpu or cuda). A trial that
    trained elsewhere than the single run is an error, not a figure."""
    trial_set = {**trial_set, "train.device": device}
    gpus = gpu_share(device, concurrent)
    threads = torch.get_num_threads()  # run_training sets the trial's own
    with tempfile.TemporaryDirectory(prefix="dwlab-bench-sweep-") as tmp:
        root = Path(tmp)
        try:
            single = _single_trial_s(root, trial_set)
        finally:
            torch.set_num_threads(threads)
        ray_1, sequential, devices_1 = _sweep_walls(root, trials, 1, trial_set, gpus)
        ray_k, parallel, devices_k = _sweep_walls(root, trials, concurrent, trial_set, gpus)
    devices = devices_1 | devices_k
    if {d.split(":")[0] for d in devices} != {device}:
        raise RuntimeError(f"the benchmark sweep's trials trained on {sorted(devices)}, its single run on {device}")
    return {
        "trials": trials, "concurrent": concurrent, "single_s": single, "sequential_s": sequential,
        "concurrent_s": parallel, "speedup": sequential / parallel, "ray_start_s": (ray_1 + ray_k) / 2,
        "overhead_per_trial_s": sequential / trials - single, "gpus_per_trial": gpus,
        "devices": ", ".join(sorted(devices)),
    }  # fmt: skip
