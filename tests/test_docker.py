"""The container recipe, read from its files (no Docker daemon needed; tests/test_docker_cluster.py
builds and runs it where one is): what a cluster user needs before the first job. Each test
names the failure it guards against."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_every_ray_node_uses_token_authentication_with_one_token_from_the_environment():
    services = compose()["services"]
    ray_nodes = {name: s for name, s in services.items() if "ray start" in str(s.get("command", ""))}
    assert set(ray_nodes) == {"ray-head", "ray-worker"}
    for name, service in ray_nodes.items():
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name  # required, never a default


def test_the_mlflow_server_allows_the_host_names_its_clients_send():
    """MLflow 3 answers 403 "Invalid Host header" to a Host it does not allow (default:
    localhost and private IPs only)."""
    services = compose()["services"]
    command = " ".join(services["mlflow"]["command"].split())
    allowed = re.search(r"--allowed-hosts (\S+)", command).group(1).split(",")
    client_uri = services["ray-head"]["environment"]["MLFLOW_TRACKING_URI"]  # what every node sends
    host = re.match(r"http://(\$\{HEAD_IP[^}]*\}|[^/]+):5000", client_uri).group(1)
    assert host.startswith("${HEAD_IP") and "${HEAD_IP}:5000" in allowed and "localhost:5000" in allowed


def test_shared_is_writable_by_the_image_user_and_the_working_directory_holds_experiments():
    steps = dockerfile()
    user_at = max(i for i, (op, _) in enumerate(steps) if op == "USER")
    assert steps[user_at][1] == "1000"
    chowned = " ".join(arg for op, arg in steps[:user_at] if op == "RUN" and "chown" in arg)
    assert re.search(r"chown \S*dwlab\S* .*/shared", chowned), "a named volume on /shared copies the owner of /shared"
    workdir = [arg for op, arg in steps if op == "WORKDIR"][-1]
    copied = [arg.split()[-2:] for op, arg in steps[user_at:] if op == "COPY"]
    assert ["experiments", "experiments"] in copied and workdir == "/home/dwlab"  # ./experiments in the workdir
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert "${SHARED_DIR:-shared}:/shared" in compose()["services"][name]["volumes"]


def test_the_image_has_one_cuda_the_pinned_torch_wheels():
    """A CUDA base image older than the torch wheels' CUDA made torch.cuda.is_available() False
    on older drivers; the image now has only the wheels' CUDA, pinned with everything else."""
    steps = dockerfile()
    assert [arg for op, arg in steps if op == "FROM"] == ["${BASE_IMAGE}"]
    base = [arg.split("=", 1)[1] for op, arg in steps if op == "ARG" and arg.startswith("BASE_IMAGE=")]
    assert base == ["python:3.11.11-slim-bookworm"] and "cuda" not in base[0]  # the default; build-local.sh: Debian's
    pins = dict(line.split("==") for line in (DOCKER / "requirements.txt").read_text().splitlines()
                if line and not line.startswith("#"))  # fmt: skip
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1" and pins["ray"] and pins["mlflow"]
    assert pins["nvidia-cuda-runtime"].startswith("13.0")  # the driver note says >= 580 for CUDA 13.0
    assert any(op == "RUN" and "--no-deps -r docker/requirements.txt" in arg for op, arg in steps)


def test_one_gpu_set_per_container_and_host_networking_for_ray_and_nccl():
    services = compose()["services"]
    gpu_services = {n: s for n, s in services.items() if "devices" in str(s.get("deploy", {}))}
    assert set(gpu_services) == {"ray-worker"}
    assert gpu_services["ray-worker"]["deploy"]["replicas"] == 1  # one per host: all its GPUs
    for name in ("ray-head", "ray-worker", "mlflow"):
        assert services[name]["network_mode"] == "host", name  # addresses other hosts reach, no NAT
    assert "NCCL_SOCKET_IFNAME" in services["ray-worker"]["environment"]
    readme = (ROOT / "README.md").read_text()
    assert "--scale ray-worker" not in readme


def test_pip_steps_get_the_ca_bundle_as_a_build_secret_never_as_an_argument():
    """Behind a TLS-intercepting proxy pip needs the host's CA bundle: a build argument or a
    COPY would leave it (or its host path) in the image's history and layers."""
    steps = dockerfile()
    pip_steps = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert len(pip_steps) == 2 and all(arg.startswith("--mount=type=secret,id=pip-ca ") for arg in pip_steps)
    assert not any(op == "ARG" and "CERT" in arg.upper() for op, arg in steps)
    script = (DOCKER / "build-local.sh").read_text()
    assert "--secret id=pip-ca," in script and "--network host" in script


def _compose_tool() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_accepts_the_file_with_the_readme_variables_and_refuses_it_without_the_token(tmp_path):
    """Docker Compose itself reads the file (v1 1.29, Debian's, or the v2 plugin; no daemon
    needed): a key either one rejects (v1 refused the top-level ``name``) fails here."""
    tool = _compose_tool()
    if tool is None:
        pytest.skip("no Docker Compose here (neither 'docker compose' nor 'docker-compose')")
    env = {**os.environ, "RAY_AUTH_TOKEN": "0" * 32, "HEAD_IP": "10.1.2.3", "COCO_ROOT": str(tmp_path),
           "COMPOSE_PROJECT_NAME": "dwlab"}  # fmt: skip
    file = ["-f", str(DOCKER / "compose.yaml"), "config"]
    done = subprocess.run([*tool, *file], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["ray-worker"]["command"].split()[:3] == ["ray", "start", "--address=10.1.2.3:6379"]
    assert services["ray-head"]["environment"]["MLFLOW_TRACKING_URI"] == "http://10.1.2.3:5000"
    assert f"{tmp_path}:/data/coco:ro" in [v if isinstance(v, str) else f"{v['source']}:{v['target']}:ro"
                                           for v in services["ray-worker"]["volumes"]]  # fmt: skip
    assert services["mlflow"]["image"] == "dwlab:gpu" and services["postgres"]["image"] == "postgres:16.6"
    del env["RAY_AUTH_TOKEN"]
    refused = subprocess.run([*tool, *file], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "set RAY_AUTH_TOKEN" in refused.stderr
