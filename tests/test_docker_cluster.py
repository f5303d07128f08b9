"""README "Run on a GPU cluster", run in containers on this host: the image built from the working
tree by ``docker/build-local.sh`` (Debian base, no registry needed), its commands, then
``docker/compose.yaml``'s stack (PostgreSQL, the MLflow server, a Ray head and a Ray worker, all
on the host's network, token authentication on) running a 2-trial smoke sweep through
``--address`` from inside the head container, the runs read back from the server and
``dwlab report`` made from them.

Skipped, with the reason, without a Docker client and daemon (CI has none) or when the ports the
compose file fixes are taken. Without an NVIDIA runtime the worker's GPU reservation is dropped
from the composed file (the only change; CPU trials). Every container and volume the test makes
is removed at its end; the images stay for the next run (``docker image rm`` to free the space).
Set ``DOCKER`` to a client that builds with BuildKit when ``docker`` cannot (no buildx plugin).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = os.environ.get("DOCKER", "docker")
IMAGE, POSTGRES_IMAGE = "dwlab:gpu", "dwlab-postgres:15"  # build-local.sh's; POSTGRES_IMAGE=postgres:16.6 to pull
PORTS = {6379: "Ray's GCS", 5000: "MLflow", 5432: "PostgreSQL", 8265: "Ray's dashboard"}
# two Table 2 points on tiny inputs, 2 epochs: a pipeline check, not a measurement
SMOKE = {
    "name": "docker-smoke",
    "table": "table2",
    "scale": "smoke",
    "seeds": 1,
    "points": [{"grid": {"assigner.dw.beta": [5], "assigner.dw.mu": [4, 5]}}],
    "set": {"data.synth.n_train": 16, "data.synth.n_val": 8, "data.synth.image_size": 64, "data.min_size": 64,
            "data.max_size": 64, "data.num_workers": 0, "train.batch_size": 4, "train.epochs": 2,
            "train.threads": 1, "model.fpn_channels": 16, "model.head_norm_groups": 8, "model.head_convs": 1},
}  # fmt: skip


def _run(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)


def _why_not() -> str | None:
    if shutil.which(DOCKER) is None:
        return f"no Docker client ({DOCKER!r} is not on PATH)"
    info = _run(DOCKER, "info", "--format", "{{.ServerVersion}}", timeout=30)
    if info.returncode != 0:
        return "no Docker daemon: " + ((info.stderr.strip().splitlines() or ["docker info failed"])[-1])
    return None


REASON = _why_not()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _compose_tool() -> list[str]:
    if _run(DOCKER, "compose", "version").returncode == 0:
        return [DOCKER, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no Docker Compose (neither 'docker compose' nor 'docker-compose')")


def _host_ip() -> str:
    """This host's outward address (a UDP connect sends nothing), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _taken_ports() -> list[str]:
    taken = []
    for port, what in PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(f"{port} ({what})")
    return taken


@pytest.fixture(scope="module")
def images():
    """``docker/build-local.sh`` on the working tree (cached layers: seconds after the first)."""
    start = time.monotonic()
    built = _run("sh", "docker/build-local.sh", cwd=ROOT, timeout=3600, env={**os.environ, "DOCKER": DOCKER})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    print(f"build-local.sh: {time.monotonic() - start:.0f} s; " + built.stdout.strip().splitlines()[-1])
    return IMAGE


def test_the_image_answers_its_commands_and_keeps_no_build_secret(images):
    shown = _run(DOCKER, "run", "--rm", IMAGE)  # CMD: dwlab --help
    assert shown.returncode == 0 and "sweep" in shown.stdout, shown.stderr
    gpu = _run(DOCKER, "run", "--rm", IMAGE, "dwlab-check-gpu")
    assert gpu.returncode == 1 and "no usable GPU" in gpu.stdout, gpu.stdout + gpu.stderr  # no --gpus here
    check = _run(DOCKER, "run", "--rm", IMAGE, "pip", "check")
    assert check.returncode == 0 and "No broken requirements found." in check.stdout, check.stdout + check.stderr
    layout = _run(DOCKER, "run", "--rm", IMAGE, "sh", "-c", "id -u; stat -c %U /shared; pwd; ls experiments")
    assert layout.stdout.split()[:4] == ["1000", "dwlab", "/home/dwlab", "table2.yaml"], layout.stdout
    # the CA bundle was a build secret: in no layer, no history line, no environment variable
    history = _run(DOCKER, "history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
    assert "BEGIN CERTIFICATE" not in history and "ca-certificates.crt" not in history
    env = _run(DOCKER, "image", "inspect", "--format", "{{json .Config.Env}}", IMAGE).stdout
    assert "PIP_CERT" not in env and "secret" not in env.lower()
    assert "RAY_USAGE_STATS_ENABLED=0" in env and "MLFLOW_DISABLE_TELEMETRY=true" in env  # nothing leaves the cluster
    secret = _run(DOCKER, "run", "--rm", IMAGE, "sh", "-c", "ls /run/secrets 2>&1; pip config list")
    assert "pip-ca" not in secret.stdout and "cert" not in secret.stdout, secret.stdout


class Stack:
    """The compose project: ``compose(*args)`` and ``exec(service, *cmd)`` with its variables."""

    def __init__(self, tool: list[str], file: Path, env: dict):
        self.tool, self.file, self.env = tool, file, env

    def compose(self, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return _run(*self.tool, "-f", str(self.file), *args, env=self.env, timeout=timeout, **kwargs)

    def exec(self, service: str, *cmd: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", service, *cmd, timeout=timeout, **kwargs)


def _composed(tool: list[str], env: dict, directory: Path) -> Path:
    """compose.yaml as the README's variables resolve it; without an NVIDIA runtime the
    worker's GPU reservation (which Docker refuses without one) is dropped."""
    config = _run(*tool, "-f", str(ROOT / "docker" / "compose.yaml"), "config", env=env)
    assert config.returncode == 0, config.stderr
    raw = yaml.safe_load(config.stdout)
    if "nvidia" not in _run(DOCKER, "info", "--format", "{{json .Runtimes}}").stdout:
        raw["services"]["ray-worker"].pop("deploy")
    path = directory / "compose.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def stack(images, tmp_path):
    taken = _taken_ports()
    if taken:
        pytest.skip(f"ports the compose file fixes are taken on this host: {', '.join(taken)}")
    tool = _compose_tool()
    project = f"dwlabtest{secrets.token_hex(3)}"
    (tmp_path / "coco").mkdir()
    shared = tmp_path / "shared"  # SHARED_DIR: the NFS mount of a multi-host cluster, owned by uid 1000
    shared.mkdir()
    os.chown(shared, 1000, 1000) if os.geteuid() == 0 else shared.chmod(0o777)
    env = {**os.environ, "COMPOSE_PROJECT_NAME": project, "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "HEAD_IP": _host_ip(), "COCO_ROOT": str(tmp_path / "coco"), "SHARED_DIR": str(shared),
           "DWLAB_IMAGE": IMAGE, "POSTGRES_IMAGE": os.environ.get("POSTGRES_IMAGE", POSTGRES_IMAGE)}  # fmt: skip
    stack = Stack(tool, _composed(tool, env, tmp_path), env)
    try:
        up = stack.compose("up", "-d", timeout=600)
        assert up.returncode == 0, up.stderr
        yield stack
    finally:
        logs = stack.compose("logs", "--no-color", timeout=120).stdout
        (tmp_path / "stack.log").write_text(logs)
        down = stack.compose("down", "--volumes", "--remove-orphans", timeout=300)
        label = f"label=com.docker.compose.project={project}"
        left = _run(DOCKER, "ps", "-aq", "--filter", label).stdout + _run(DOCKER, "volume", "ls", "-q", "--filter", label).stdout
        assert down.returncode == 0 and not left.strip(), down.stderr + left


def _wait(what: str, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} not ready after {timeout:.0f} s"
        time.sleep(2)


def _answers(url: str, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_the_compose_stack_runs_a_smoke_sweep_through_address_and_reports_it(stack):
    head = stack.env["HEAD_IP"]
    probe = "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    start = time.monotonic()
    _wait("the MLflow server", lambda: _answers("http://127.0.0.1:5000/health") == 200)
    _wait("two Ray nodes", lambda: stack.exec("ray-head", "python", "-c", probe).stdout.strip().endswith("2"))
    print(f"MLflow and two Ray nodes up {time.monotonic() - start:.0f} s after 'up -d'")

    spec = stack.exec("ray-head", "sh", "-c", "mkdir -p /shared/sweeps && cat > /shared/sweeps/docker-smoke.yaml",
                      input=yaml.safe_dump(SMOKE, sort_keys=False))  # fmt: skip
    assert spec.returncode == 0, spec.stderr
    start = time.monotonic()
    sweep = stack.exec("ray-head", "dwlab", "sweep", "/shared/sweeps/docker-smoke.yaml", "--address",
                       f"{head}:6379", "--runs-dir", "/shared/runs/sweeps", timeout=1200)  # fmt: skip
    print(f"sweep: {time.monotonic() - start:.0f} s\n{sweep.stdout[-1500:]}")
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert "sweep docker-smoke: 2 finished, 0 skipped, 0 failed" in sweep.stdout

    from mlflow import MlflowClient

    client = MlflowClient("http://127.0.0.1:5000")  # the server's API, from the host
    exp = client.get_experiment_by_name("docker-smoke")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("dwlab.kind") == "trial"]
    assert sorted(r.data.tags["dwlab.point"] for r in runs) == ["beta=5,mu=4", "beta=5,mu=5"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.tags["dwlab.node"].startswith(head) for r in runs)  # the nodes advertise HEAD_IP
    print("trials ran on", sorted(r.data.tags["dwlab.node"] for r in runs))
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"eval.json", "resolved.yaml"} <= artifacts  # through the server onto /shared
    rows = stack.exec("postgres", "psql", "-U", "mlflow", "-d", "mlflow", "-tAc", "select count(*) from runs")
    assert rows.stdout.strip() == "3", rows.stdout + rows.stderr  # 2 trials + the parent, in PostgreSQL
    stored = {p.name for p in (Path(stack.env["SHARED_DIR"]) / "runs" / "sweeps" / "docker-smoke").iterdir()}
    assert {"beta=5,mu=4", "beta=5,mu=5"} <= stored  # the run directories, on SHARED_DIR (uid 1000 wrote them)

    report = stack.exec("ray-head", "dwlab", "report", "--experiment", "docker-smoke", "--out", "/shared/reports")
    assert report.returncode == 0, report.stdout + report.stderr
    assert "/shared/reports/table2.md: runs 2 (2 finished, 0 running, 0 failed), scale smoke" in report.stdout

    # the UI: on 127.0.0.1 for a browser on the head host, and the Host header the nodes send
    assert _answers("http://127.0.0.1:5000/") == 200
    assert _answers("http://127.0.0.1:5000/api/2.0/mlflow/experiments/search?max_results=1", f"{head}:5000") == 200
    assert _answers("http://127.0.0.1:5000/", "evil.example:5000") == 403  # any other Host is refused
