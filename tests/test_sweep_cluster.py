"""Joining a Ray cluster as the README says: a real two-node cluster on loopback (``ray start
--head`` plus ``ray start --address``, each node one CPU, token authentication on, the token in
``RAY_AUTH_TOKEN`` on every node), then ``dwlab sweep --address`` from a subprocess with the
same environment, its output piped as in a log file.

The nodes run under ``ray start --block`` with their own temp dir and ports; the fixture stops
exactly the two processes it started (SIGTERM makes each stop its own node), never ``ray stop``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.test_sweep_ray import TINY

pytestmark = pytest.mark.slow
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_nodes(address: str, env: dict, count: int, procs: list, timeout: float = 90) -> list[str]:
    """The node ids once ``count`` nodes are alive (asked from a throw-away driver process);
    fails at once if one of ``procs`` (the ``ray start`` processes) has exited."""
    probe = (
        "import ray; ray.init(address=%r, logging_level='ERROR');"
        "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))" % address
    )
    deadline = time.monotonic() + timeout
    while True:
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"ray start exited: {dead}"
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        ids = out.stdout.split()
        if len(ids) >= count:
            return ids
        assert time.monotonic() < deadline, f"{count} Ray nodes not up: {out.stderr[-500:]}"
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``(address, env, node ids)`` of a two-node token-authenticated cluster on 127.0.0.1."""
    root = tmp_path_factory.mktemp("ray-cluster")
    temp_dir = tempfile.mkdtemp(prefix="dwray", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # the README's cluster recipe: on every node and the driver
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_ADDRESS": "",
    }
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--port", str(port),
         "--include-dashboard", "false", "--temp-dir", temp_dir, *common],
        env=env, stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = None
    try:
        _wait_for_nodes(address, env, 1, [head])
        worker = subprocess.Popen(
            [RAY, "start", "--address", address, *common],
            env=env, stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        yield address, env, _wait_for_nodes(address, env, 2, [head, worker])
    finally:
        for proc in (worker, head):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _sweep(directory: Path, address: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    spec = directory / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"set": {**TINY, "train.epochs": 2}, "seeds": 1,
                                    "points": [{"grid": {"train.lr": [0.01, 0.02]}}],
                                    "resources": {"smoke": {"cpus_per_trial": 1}}}))  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "dwlab.cli", "sweep", str(spec), "--address", address],
        cwd=directory, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_readme_cluster_recipe_runs_a_sweep_on_both_nodes(cluster, tmp_path):
    address, env, nodes = cluster
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    done = _sweep(tmp_path, address, env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 finished, 0 skipped, 0 failed" in done.stdout
    # piped to a file, the sweep reports each event on a line of its own
    assert "lr=0.01/seed0 started" in done.stdout and "lr=0.02/seed0 epoch 2/2 loss" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cluster")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("dwlab.kind") == "trial"]
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    ran_on = {r.data.tags["dwlab.node"].split()[1] for r in runs}  # "<ip> <node id>"
    assert ran_on == set(nodes)  # one 1-CPU trial on each 1-CPU node


def test_a_join_without_the_token_is_one_line_naming_authentication(cluster, tmp_path):
    address, env, _ = cluster
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    start = time.monotonic()
    done = _sweep(tmp_path, address, wrong, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot join the Ray cluster at {address}: authentication refused; the cluster uses Ray's "
        "token authentication: set RAY_AUTH_MODE=token and the head's token here (RAY_AUTH_TOKEN=<output of "
        "'ray get-auth-token' on the head>, or that token in ~/.ray/auth_token)"
    ]
    assert "InvalidAuthToken" not in done.stderr  # Ray's retry warnings are not passed on
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cluster")  # the store is opened before Ray is joined ...
    assert exp is not None and client.search_runs([exp.experiment_id]) == []  # ... but no run is
    print(f"refused join reported in {time.monotonic() - start:.0f} s")


def test_two_sweeps_at_once_share_the_default_store_and_record_every_run_once(tmp_path):
    """Tables 2 and 3 from two terminals: two drivers, each with its own local Ray, both on
    ./mlruns/mlflow.db, which neither finds at its start."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    drivers = []
    for name in ("first", "second"):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump({"set": {**TINY, "train.epochs": 1}, "seeds": 1,
                                        "points": [{"grid": {"train.lr": [0.01, 0.02]}}],
                                        "resources": {"smoke": {"cpus_per_trial": 1}}}))  # fmt: skip
        drivers.append(subprocess.Popen(
            [sys.executable, "-m", "dwlab.cli", "sweep", str(spec), "--max-concurrent", "1"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    outputs = [d.communicate(timeout=600)[0] for d in drivers]
    for driver, output in zip(drivers, outputs):
        assert driver.returncode == 0, output[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for name in ("first", "second"):
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id])
        trials = sorted(r.data.tags["dwlab.point"] for r in runs if r.data.tags.get("dwlab.kind") == "trial")
        assert trials == ["lr=0.01", "lr=0.02"]  # each once
        assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 3  # + the parent run
