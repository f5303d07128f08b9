"""Shared fixtures: a temp cache for the generated dataset, tiny configs, tiny datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Keep generated datasets out of the user's cache; one cache for the whole session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DWLAB_CACHE", str(tmp_path_factory.mktemp("dwlab-cache")))
    torch.set_num_threads(2)
    yield
    mp.undo()


def tiny_config(root: Path | None, **sections) -> dict:
    """A raw config dict for a tiny ResNet-18 detector on 128 px images; ``sections`` update it."""
    raw = {
        "name": "tiny",
        "data": {"root": str(root) if root else None, "min_size": 128, "max_size": 128, "num_workers": 0},
        "model": {
            "backbone": "resnet18",
            "pretrained": False,
            "norm": "bn",
            "frozen_stages": -1,
            "fpn_channels": 32,
            "head_convs": 1,
            "head_norm_groups": 8,
        },
        "assigner": {"name": "fcos", "fcos": {"size_ranges": [0, 16, 32, 64, 128, 1e8]}},
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "warmup_iters": 5,
            "lr_steps": [],
            "threads": 2,
            "progress": False,
        },
        "eval": {"batch_size": 8, "every": 0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small generated dataset: 12 train, 4 val images of 128 px."""
    from dwlab.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth"), n_train=12, n_val=4, seed=1, image_size=128)


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def write_json(path: Path, raw) -> Path:
    path.write_text(json.dumps(raw))
    return path
