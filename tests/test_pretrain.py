"""The domain-pretrained backbone: crops from their own stream, a cache keyed by the settings,
loaded by ``model.pretrained: synth`` like an ImageNet trunk."""

import json

import pytest
import torch
from typer.testing import CliRunner

from dwlab.cli import app
from dwlab.config import PretrainConfig, validate
from dwlab.data import synth
from dwlab.errors import DwlabError
from dwlab.models.detector import build_model
from dwlab.pretrain import cache_path, cached_backbone, crops
from tests.conftest import tiny_config

TINY = PretrainConfig(images=12, epochs=1, batch_size=16, threads=1)


def test_crops_cover_every_object_of_their_own_stream():
    images, labels = crops(TINY)
    n_objects = sum(len(synth.render(0, synth.PRETRAIN_STREAM, i, 128)[1]) for i in range(12))
    assert images.shape == (n_objects, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.shape == (n_objects,) and 0 <= labels.min() and labels.max() < len(synth.CATEGORIES)
    train_first, _ = synth.render(0, synth.SPLITS["train"], 0, 128)
    pretrain_first, _ = synth.render(0, synth.PRETRAIN_STREAM, 0, 128)
    assert train_first.shape != pretrain_first.shape or (train_first != pretrain_first).any()


def test_cache_key_follows_every_setting():
    base = cache_path("resnet10", TINY)
    assert cache_path("resnet18", TINY) != base
    for change in ({"images": 13}, {"seed": 1}, {"crop": 32}, {"epochs": 2}, {"lr": 1e-3}, {"threads": 2},
                   {"device": "cuda"}):  # fmt: skip
        assert cache_path("resnet10", TINY.model_copy(update=change)) != base, change


def test_configs_written_with_null_threads_still_load():
    assert PretrainConfig.model_validate({"threads": None}).threads == PretrainConfig().threads


def test_crops_do_not_depend_on_the_number_of_rendering_processes(monkeypatch):
    import dwlab.pretrain as pretrain

    monkeypatch.setattr(pretrain, "CROP_CHUNK", 5)  # 12 images: 3 chunks
    monkeypatch.setattr(pretrain.synth, "usable_cores", lambda: 1)
    one_images, one_labels = crops(TINY)
    monkeypatch.setattr(pretrain.synth, "usable_cores", lambda: 3)
    three_images, three_labels = crops(TINY)
    assert torch.equal(one_images, three_images) and torch.equal(one_labels, three_labels)


def test_the_same_key_builds_the_same_bytes(tmp_path, monkeypatch):
    """Two builds of one key, in other caches and with another global thread count, write
    byte-identical trunks: a run is reproducible from its config, whoever built the cache."""
    built = []
    for cache, threads in ((tmp_path / "a", 1), (tmp_path / "b", 2)):
        monkeypatch.setenv("DWLAB_CACHE", str(cache))
        torch.set_num_threads(threads)
        built.append(cached_backbone("resnet10", TINY, log=lambda _: None).read_bytes())
    assert built[0] == built[1]


def test_built_once_then_loaded_by_pretrained_synth(tmp_path, monkeypatch):
    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    path = cached_backbone("resnet10", TINY, log=lambda _: None)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["backbone"] == "resnet10" and 0.0 <= record["val_accuracy"] <= 1.0
    assert not list(path.parent.glob("*.tmp-*"))
    mtime = path.stat().st_mtime_ns
    assert cached_backbone("resnet10", TINY) == path and path.stat().st_mtime_ns == mtime  # reused

    raw = tiny_config(None, model={"backbone": "resnet10", "pretrained": "synth", "pretrain": TINY.model_dump()})
    model = build_model(validate(raw, "t").model, num_classes=6)
    trunk = torch.load(path, weights_only=True)
    body = model.backbone.body
    assert not any(k.startswith("fc.") for k in trunk)
    assert torch.equal(body.conv1.weight, trunk["conv1.weight"])
    assert torch.equal(body.layer3[0].conv1.weight, trunk["layer3.0.conv1.weight"])


def test_cli_pretrain_builds_then_reports_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    settings = [f"model.pretrain.{k}={v}" for k, v in TINY.model_dump().items() if v is not None]
    args = ["pretrain", "smoke", "--set", "model.backbone=resnet10"]
    for item in settings:
        args += ["--set", item]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "held-out crop accuracy" in first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and second.output.startswith("cached: ")
    bad = CliRunner().invoke(app, ["pretrain", "smoke", "--set", "model.pretrain.images=0"])
    assert bad.exit_code == 2 and "model.pretrain.images" in bad.output


def test_building_the_cache_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """A run that builds the backbone on first use initialises its detector from its own seed,
    exactly as a run that finds the cache."""
    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cached_backbone("resnet10", TINY, log=lambda _: None)
    assert torch.equal(torch.rand(3), expected)


def test_too_few_crops_for_one_batch_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    with pytest.raises(DwlabError, match=r"model\.pretrain: \d+ training crops from images=10 are fewer than batch_size=64"):
        cached_backbone("resnet10", TINY.model_copy(update={"images": 10, "batch_size": 64}), log=lambda _: None)
    assert not list((tmp_path / "backbones").glob("*.pt"))


def test_plot_curves_reads_sweep_run_directories(tmp_path):
    run = tmp_path / "table2-mini" / "beta=5,mu=5" / "seed0"
    run.mkdir(parents=True)
    rows = [{"epoch": 1, "images_seen": 2400.0}, {"epoch": 2, "images_seen": 4800.0, "AP": 0.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["plot", "curves", f"DW=={run}", "--out", str(out)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output  # the label ends at the first "="
    result = CliRunner().invoke(app, ["plot", "curves", f"DW={run}", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


def test_prepare_inputs_leaves_a_given_data_root_to_the_trials(tmp_path):
    """The sweep driver prepares cached inputs; a data.root it cannot see (the nodes mount it)
    is not its business."""
    from dwlab.runner import prepare_inputs

    prepare_inputs(validate(tiny_config(tmp_path / "mounted-on-the-nodes-only"), "t"), log=lambda _: None)
