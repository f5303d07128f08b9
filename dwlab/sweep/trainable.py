"""What runs inside a Tune trial: ``run_training`` on the trial's stable run directory.

One worker: the Tune function trainable trains in its own process. Several workers (or
``gpus_per_trial > 1``): the trainable builds a Ray Train ``TorchTrainer`` (gloo on CPU, NCCL
on GPU) whose workers train data-parallel and report back through ``TuneReportCallback``.
Trials never talk to MLflow; the driver records what they report.

Every attempt calls ``run_training(..., resume=True)``, so a retried trial continues from
the last checkpoint in its run directory instead of starting over.

A search's trial (its payload names the ``search``) builds its config from the values the search
algorithm sampled, trains in ``<run_root>/<Ray trial id>`` (stable when Tune restores the
search) and adds to every report the ``score`` the search algorithm and scheduler read: the
latest AP on the tune split (``scored``: evaluated at this report's epoch).
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable


LOG = "trial.log"  # in the run directory: the traceback of each failed attempt


def trial_fn(config: dict[str, Any]) -> None:
    """The Tune function trainable; ``config["trial"]`` is the payload built by the driver. A
    failure's traceback is appended to the run directory's ``trial.log`` (the driver shows the
    error in one line and names that file)."""
    spec = config["trial"]
    if spec.get("search"):
        spec = search_payload(spec, config.get("space") or {})
    if os.path.isdir(spec["cwd"]):  # Tune may chdir into its trial dir; configs use the user's cwd
        os.chdir(spec["cwd"])
    try:
        if spec["workers"] > 1:
            _fit_data_parallel(spec)
        else:
            from ray import tune

            train(spec, tune.report)
    except BaseException:
        log = Path(spec["run_dir"]) / LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {spec['key']} on {socket.gethostname()}\n")
            f.write(traceback.format_exc())
        raise


SCORE, SCORED = "score", "scored"  # what a search's trial reports for its search algorithm
NO_SCORE = -1.0  # the score before a trial's first evaluation (AP is in [0, 1])


def search_payload(spec: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """A search trial's payload: its config (the search's with the sampled values), run
    directory and key, from its Ray trial id."""
    from ray import tune

    from dwlab.config import to_dict
    from dwlab.sweep.search_spec import apply_sampled

    trial_id = tune.get_context().get_trial_id()
    config = to_dict(apply_sampled(spec["config"], sampled))
    key = f"{spec['search']}/{trial_id}"
    return {**spec, "config": config, "run_dir": str(Path(spec["run_root"]) / trial_id), "key": key,
            "dirname": key.replace("/", "-")}  # fmt: skip


def scored_reports(report: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``report`` with ``score`` and ``scored`` added; a final AP that is not a number fails the
    trial (a search must not take it as a result)."""
    state = {"score": NO_SCORE, "epoch": None}

    def wrapped(result: dict[str, Any]) -> None:
        ap = result.get("metrics", {}).get("AP")
        fresh = ap is not None and math.isfinite(ap) and state["epoch"] != result["epoch"]
        if result.get("final") and (ap is None or not math.isfinite(ap)):
            from dwlab.errors import DwlabError

            raise DwlabError(f"the trial's AP on the tune split is {ap} after epoch {result['epoch']}")
        if fresh:
            state["score"], state["epoch"] = float(ap), result["epoch"]
        report({**result, SCORE: state["score"], SCORED: fresh})

    return wrapped


def train(spec: dict[str, Any], report: Callable[[dict[str, Any]], None]) -> None:
    """``run_training`` with a report per epoch and a final one (also when the run was already
    complete on disk, e.g. a driver killed between the last epoch and its record); each report
    carries the run's ``resolved`` record (``runner.resolved_record``)."""
    from dwlab import checkpoint, faults
    from dwlab.config import Config
    from dwlab.distributed import rank
    from dwlab.runner import run_training

    if spec.get("search"):
        report = scored_reports(report)
    if spec.get("faults"):  # the driver's $DWLAB_FAULTS (test-only), whatever this worker inherited
        os.environ[faults.ENV] = spec["faults"]
    else:
        os.environ.pop(faults.ENV, None)
    cfg = on_the_trials_devices(Config.model_validate(spec["config"]), spec["gpus_per_worker"])
    info = {"host": socket.gethostname(), "node": _ray_node(), "pid": os.getpid(), "device": _device_name(cfg.train.device)}

    def on_epoch_end(rep) -> None:
        report(
            {
                "epoch": rep.epoch,
                "epochs": rep.epochs,
                "final": False,
                "metrics": {k: float(v) for k, v in rep.metrics.items()},
                "resolved": rep.resolved,
                **info,
            }
        )

    result = run_training(cfg, Path(spec["run_dir"]), resume=True, on_epoch_end=on_epoch_end)
    if rank() == 0:  # a finished trial keeps its weights, not the state to train on (disk)
        checkpoint.keep_weights_only(Path(spec["run_dir"]) / "checkpoints")
    report(
        {
            "epoch": result.epochs_done,
            "epochs": cfg.train.epochs,
            "final": True,
            "metrics": {k: float(v) for k, v in result.metrics.items()},
            "resolved": result.resolved,
            **info,
        }
    )


def on_the_trials_devices(cfg, gpus: float):
    """``cfg`` on the devices Ray gave the trial: ``train.device: auto`` becomes ``cpu`` for a
    trial without GPUs (Ray >= 2.60 no longer hides a node's GPUs from tasks that asked for none,
    so they would all land on ``cuda:0``); a trial given GPUs that torch cannot use fails here,
    instead of training on the CPU."""
    import torch

    from dwlab.errors import DwlabError

    if not gpus:
        if cfg.train.device == "auto":
            return cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})})
        return cfg
    if cfg.train.device != "cpu" and not torch.cuda.is_available():
        raise DwlabError(
            f"the trial was given {gpus:g} GPU(s) but torch {torch.__version__} (CUDA {torch.version.cuda}) "
            "sees none: is the node's NVIDIA driver new enough for that CUDA (dwlab-check-gpu)?"
        )
    return cfg


def _ray_node() -> str:
    """``"<node ip> <node id>"`` of the Ray node this runs on (two nodes may share a hostname)."""
    import ray

    return f"{ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()}"


def _device_name(setting: str) -> str:
    import torch

    if setting != "cpu" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return "cpu"


def _worker_loop(spec: dict[str, Any]) -> None:
    import ray.train

    if os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])
    train(spec, ray.train.report)


def _fit_data_parallel(spec: dict[str, Any]) -> None:
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = spec["gpus_per_worker"] > 0
    per_worker = {"CPU": spec["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = spec["gpus_per_worker"]
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=spec,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec["workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            # stable within the Tune trial (no timestamps), new for each sweep invocation
            name=f"{spec['dirname']}-{tune.get_context().get_trial_id()}",
            storage_path=spec["train_storage"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=0),  # Tune retries the trial
        ),
    )
    trainer.fit()
