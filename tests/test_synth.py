"""The embedded generated dataset: real COCO, deterministic, sane sizes, cached atomically."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dwlab.config import SynthConfig
from dwlab.data import synth
from dwlab.errors import DwlabError

SIZE = 64
N_TRAIN, N_VAL = 40, 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert synth.generate(out, N_TRAIN, N_VAL, seed=3, image_size=SIZE) == out
    return out


def load(root: Path, split: str) -> COCO:
    return COCO(str(root / f"instances_{split}.json"))


@pytest.mark.parametrize("split,n", [("train", N_TRAIN), ("val", N_VAL)])
def test_pycocotools_loads_split_with_images_on_disk(dataset, split, n):
    coco = load(dataset, split)
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == n
    assert len(list((dataset / split).glob("*.png"))) == n
    for info in images:
        with Image.open(dataset / split / info["file_name"]) as img:
            assert img.mode == "RGB"
            assert img.size == (info["width"], info["height"])
        long, short = max(img.size), min(img.size)
        assert long == SIZE and 0.75 * SIZE - 1 <= short <= SIZE
    assert len({(i["width"], i["height"]) for i in images}) > 1  # varied aspect


def test_annotations_are_valid_coco(dataset):
    coco = load(dataset, "train")
    images = {i["id"]: i for i in coco.dataset["images"]}
    anns = coco.dataset["annotations"]
    assert anns and len({a["id"] for a in anns}) == len(anns)
    for a in anns:
        x, y, w, h = a["bbox"]
        img = images[a["image_id"]]
        assert all(isinstance(v, float) for v in a["bbox"])
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
        assert 0 < a["area"] <= w * h + 1e-6
        assert a["iscrowd"] == 0 and a["segmentation"] == []
    per_image = Counter(a["image_id"] for a in anns)
    assert max(per_image.values()) <= synth.MAX_OBJECTS


def test_categories_are_non_contiguous_and_all_used(dataset):
    coco = load(dataset, "train")
    declared = sorted(coco.getCatIds())
    assert len(declared) >= 6
    assert declared != list(range(declared[0], declared[0] + len(declared)))
    assert all({"id", "name", "supercategory"} <= c.keys() for c in coco.dataset["categories"])
    assert {a["category_id"] for a in coco.dataset["annotations"]} == set(declared)


def test_sizes_span_small_and_large(dataset):
    anns = load(dataset, "train").dataset["annotations"]
    sides = np.array([max(a["bbox"][2:]) for a in anns])
    assert sides.min() < 16 and sides.max() > 0.5 * SIZE
    assert sides.min() >= synth.MIN_SIZE - 1e-6 and sides.max() <= synth.MAX_SIZE_FRAC * SIZE + 1e-6


def test_some_images_are_empty(dataset):
    coco = load(dataset, "train")
    with_objects = {a["image_id"] for a in coco.dataset["annotations"]}
    n_empty = N_TRAIN - len(with_objects)
    assert 1 <= n_empty <= 0.1 * N_TRAIN


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (synth.generate(tmp_path / n, 5, 3, seed=s, image_size=48) for n, s in
               [("a", 7), ("b", 7), ("c", 8)])
    names = ("instances_train.json", "instances_val.json", "train/000001.png", "val/000003.png")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "instances_train.json").read_bytes() != (c / "instances_train.json").read_bytes()
    assert (a / "train/000001.png").read_bytes() != (a / "val/000001.png").read_bytes()
    train = json.loads((a / "instances_train.json").read_text())
    val = json.loads((a / "instances_val.json").read_text())
    assert [x["bbox"] for x in train["annotations"]] != [x["bbox"] for x in val["annotations"]]


def test_the_files_do_not_depend_on_the_number_of_processes(tmp_path):
    one = synth.generate(tmp_path / "one", 9, 5, seed=4, image_size=48, processes=1)
    two = synth.generate(tmp_path / "two", 9, 5, seed=4, image_size=48, processes=2)

    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip

    assert len(digests(one)) == 2 + 9 + 5
    assert digests(one) == digests(two)


def test_render_processes_follow_the_work_up_to_the_usable_cores(monkeypatch):
    monkeypatch.setattr(synth, "usable_cores", lambda: 16)
    assert synth.render_processes(100, 128) == 1  # a few seconds of work: no pool
    assert synth.render_processes(500, 800) == 16  # the paper-scale val set: every core
    assert synth.render_processes(16000, 128) == 16
    assert 1 < synth.render_processes(400, 128) < 16  # in between: a process per ~2 s of work
    monkeypatch.setattr(synth, "usable_cores", lambda: 1)
    assert synth.render_processes(16000, 800) == 1


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(DwlabError, match="at least 1"):
        synth.generate(tmp_path, 0, 1, seed=0)
    with pytest.raises(DwlabError, match="image_size"):
        synth.generate(tmp_path, 1, 1, seed=0, image_size=16)


CFG = SynthConfig(n_train=4, n_val=2, seed=0, image_size=48)


def test_default_dataset_generates_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    path = synth.default_dataset(CFG)
    assert path == tmp_path / "synth-n4-v2-s0-48"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dir left behind
    assert len(load(path, "train").getImgIds()) == 4 and len(load(path, "val").getImgIds()) == 2
    stamp = (path / "instances_train.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("generate called for a cached dataset")

    monkeypatch.setattr(synth, "generate", fail)
    assert synth.default_dataset(CFG) == path
    assert (path / "instances_train.json").stat().st_mtime_ns == stamp


def test_default_dataset_losing_the_race_keeps_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    real = synth.generate
    target = tmp_path / "synth-n4-v2-s0-48"

    def generate_while_another_process_finishes(out_dir, *args, **kwargs):
        real(target, *args, **kwargs)  # the other process renamed its copy into place first
        (target / "winner").touch()
        return real(out_dir, *args, **kwargs)

    monkeypatch.setattr(synth, "generate", generate_while_another_process_finishes)
    assert synth.default_dataset(CFG) == target
    assert (target / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    stale = tmp_path / "synth-n4-v2-s0-48.tmp-old"  # left by a generation killed long ago
    stale.mkdir()
    old = time.time() - 2 * synth.STALE_TEMP_S
    os.utime(stale, (old, old))

    def interrupted(out_dir, *args, **kwargs):
        (Path(out_dir) / "train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synth.default_dataset(CFG)
    assert list(tmp_path.iterdir()) == []


def test_cli_data_synth(tmp_path):
    from typer.testing import CliRunner

    from dwlab.cli import app

    args = ["data", "synth", "--out", str(tmp_path), "--train", "3", "--val", "2"]
    args += ["--image-size", "48"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(load(tmp_path, "train").getImgIds()) == 3


def test_another_datasets_file_names_without_a_root_are_one_line_before_generating(tmp_path, monkeypatch):
    from dwlab.config import load_config
    from dwlab.runner import data_paths

    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    paper = load_config("paper", ["data.root=null"]).data  # COCO 2017's names
    expected = (r"^data\.train_ann='annotations/instances_train2017\.json' but data\.root is null: "
                r"the generated dataset has instances_train\.json and instances_val\.json")
    with pytest.raises(DwlabError, match=expected):
        data_paths(paper)
    assert list(tmp_path.iterdir()) == []  # nothing generated
    small = load_config("smoke", ["data.val_ann=instances_train.json", "data.val_images=train",
                                  "data.synth.n_train=4", "data.synth.n_val=2", "data.synth.image_size=48"]).data
    assert data_paths(small)[2:] == (tmp_path / "synth-n4-v2-s0-48" / "instances_train.json",
                                     tmp_path / "synth-n4-v2-s0-48" / "train")  # either split's names


def test_the_tune_split_is_its_own_stream_as_large_as_val_made_once_beside_it(tmp_path, monkeypatch):
    from dwlab.config import load_config
    from dwlab.runner import data_paths

    monkeypatch.setenv("DWLAB_CACHE", str(tmp_path))
    path = synth.default_dataset(CFG)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert synth.tune_split(CFG) == path
    ann, images = synth.split_files("tune")
    tune = COCO(str(path / ann))
    assert len(tune.getImgIds()) == CFG.n_val  # as large as val
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(path / images / "000001.png") != digest(path / "val" / "000001.png")  # not val's images
    pixels, _ = synth.render(CFG.seed, synth.TUNE_STREAM, 0, CFG.image_size)  # its own stream
    assert np.array_equal(np.asarray(Image.open(path / images / "000001.png")), pixels)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir() if p.name != images} == before  # train, val untouched
    assert [p.name for p in (path / images).iterdir() if ".tmp-" in p.name] == []
    stamp = (path / ann).stat().st_mtime_ns
    assert synth.tune_split(CFG) == path and (path / ann).stat().st_mtime_ns == stamp  # cached
    other = tmp_path / "again"
    monkeypatch.setenv("DWLAB_CACHE", str(other))
    assert digest(synth.tune_split(CFG) / ann) == digest(path / ann)  # deterministic
    # a config that evaluates on the tune split finds (or makes) it through data_paths
    cfg = load_config("smoke", {"data.synth.n_train": 4, "data.synth.n_val": 2, "data.synth.image_size": 48,
                                **{f"data.{k}": v for k, v in synth.tune_names().items()}})
    assert data_paths(cfg.data)[2:] == (other / path.name / ann, other / path.name / images)
