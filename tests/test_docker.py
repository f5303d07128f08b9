"""The container recipe, read from its files (no Docker here): what a cluster user needs
before the first job."""

from __future__ import annotations

from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_every_ray_node_uses_token_authentication_with_one_token_from_the_environment():
    services = compose()["services"]
    ray_nodes = {name: s for name, s in services.items() if "ray start" in str(s.get("command", ""))}
    assert set(ray_nodes) == {"ray-head", "ray-worker"}
    for name, service in ray_nodes.items():
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name  # required, never a default
