"""The container recipe, read from its files (no Docker daemon here): what a cluster user needs
before the first job. Each test names the failure it guards against."""

from __future__ import annotations

import re
from pathlib import Path

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
        assert "shared:/shared" in compose()["services"][name]["volumes"]


def test_the_image_has_one_cuda_the_pinned_torch_wheels():
    """A CUDA base image older than the torch wheels' CUDA made torch.cuda.is_available() False
    on older drivers; the image now has only the wheels' CUDA, pinned with everything else."""
    steps = dockerfile()
    base = [arg for op, arg in steps if op == "FROM"]
    assert base == ["python:3.11.11-slim-bookworm"] and "cuda" not in base[0]
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
