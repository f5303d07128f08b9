"""Fault suite, data / checkpoint / security part (issue 7): bad COCO data is refused at
construction or skipped and counted, an unreadable image mid-epoch is skipped and reported,
checkpoint writes are atomic, and nothing user-supplied is deserialised unsafely.

Every dataset here is a few 32x32 images written into ``tmp_path``."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

import dwlab
from dwlab import checkpoint
from dwlab.cli import app
from dwlab.config import load_config, validate
from dwlab.data.coco import CocoDetection
from dwlab.errors import DwlabError
from dwlab.runner import run_training
from dwlab.sweep.spec import load_plan
from dwlab.sweep.tracking import UI_HOST, ui_args, ui_command
from tests.conftest import tiny_config, write_json, write_yaml

SIZE = 32
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def write_images(img_dir: Path, names: list[str], seed: int = 0) -> None:
    """Noise PNGs of SIZE x SIZE (noise: the compressed data is long enough to cut in half)."""
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(img_dir / name)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_coco(root: Path, annotations: list[dict], n_images: int = 2, *, split: str = "train",
               images: list[dict] | None = None) -> tuple[Path, Path]:
    """``root/instances_<split>.json`` and ``root/<split>/img<i>.png``; image ids 1..n."""
    names = [f"img{i}.png" for i in range(1, n_images + 1)]
    write_images(root / split, names)
    entries = images if images is not None else [
        {"id": i, "file_name": name, "width": SIZE, "height": SIZE} for i, name in enumerate(names, 1)
    ]
    raw = {"images": entries, "annotations": annotations, "categories": CATEGORIES}
    return write_json(root / f"instances_{split}.json", raw), root / split


def ann(ann_id: int, bbox: list, image_id: int = 1, category_id: int = 1, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def dataset(ann_file: Path, img_dir: Path, **kwargs) -> CocoDetection:
    return CocoDetection(ann_file, img_dir, min_size=SIZE, max_size=SIZE, **kwargs)


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


# ----------------------------------------------------------------------------- refused at construction


def test_unknown_category_names_the_file_and_annotation_id(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [ann(1, [1, 1, 8, 8]), ann(7, [1, 1, 8, 8], category_id=99)])
    with pytest.raises(DwlabError) as err:
        dataset(ann_file, img_dir)
    assert one_line(str(err.value)) == f"{ann_file}: annotation 7 has category_id 99 not in 'categories'"


def test_missing_image_file_names_the_file_and_image_id(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [ann(1, [1, 1, 8, 8])])
    (img_dir / "img2.png").unlink()
    with pytest.raises(DwlabError) as err:
        dataset(ann_file, img_dir)
    assert one_line(str(err.value)) == f"{img_dir / 'img2.png'}: image file of image id 2 is missing"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (ann(5, ["a", 1, 2, 3]), "annotation 5 has bbox ['a', 1, 2, 3] (expected [x, y, width, height], 4 numbers)"),
        (ann(5, [1, 2, 3]), "annotation 5 has bbox [1, 2, 3]"),
        ({"id": 5, "image_id": 1, "category_id": 1}, "annotation 5 has no 'bbox'"),
        (ann(5, [1, 1, 8, 8], image_id=42), "annotation 5 has image_id 42 not in 'images'"),
    ],
)
def test_malformed_annotation_names_the_file_and_annotation_id(tmp_path, bad, message):
    ann_file, img_dir = write_coco(tmp_path, [ann(1, [1, 1, 8, 8]), bad])
    with pytest.raises(DwlabError) as err:
        dataset(ann_file, img_dir)
    assert one_line(str(err.value)).startswith(f"{ann_file}: {message}")


def test_bad_image_size_names_the_file_and_image_id(tmp_path):
    images = [{"id": 1, "file_name": "img1.png", "width": SIZE, "height": 0}]
    ann_file, img_dir = write_coco(tmp_path, [], n_images=1, images=images)
    with pytest.raises(DwlabError) as err:
        dataset(ann_file, img_dir)
    assert one_line(str(err.value)) == f"{ann_file}: image 1 has height 0"


# ----------------------------------------------------------------------------- skipped and counted


def test_degenerate_and_outside_boxes_are_skipped_counted_and_reported_once(tmp_path, capsys):
    annotations = [
        ann(1, [4, 4, 10, 12]),  # kept as is
        ann(2, [4, 4, 0, 10]),  # zero width
        ann(3, [4, 4, 10, 0], image_id=2),  # zero height
        ann(4, [4, 4, -3, 10]),  # negative width
        ann(5, [40, 4, 10, 10]),  # right of the image
        ann(6, [20, 24, 30, 30], category_id=2),  # partly outside: clipped to [20, 24, 32, 32]
        ann(7, [-20, 5, 10, 10], image_id=2),  # left of the image
        ann(8, [4, 4, 0, 0], iscrowd=1),  # crowd: never a target, not counted
    ]
    ann_file, img_dir = write_coco(tmp_path, annotations)
    ds = dataset(ann_file, img_dir)
    assert ds.skipped == {"zero_area": [2, 3], "negative_size": [4], "outside_image": [5, 7]}
    assert ds.clipped == [6] and ds.num_boxes == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"warning: {ann_file}: skipped 5 box(es): zero_area 2 (ids 2, 3), negative_size 1 (ids 4), "
        "outside_image 2 (ids 5, 7); clipped 1 box(es) to their image (ids 6)"
    ]
    _, target = ds[0]  # 32 px: scale 1, input frame = original frame
    assert target.boxes.tolist() == [[4, 4, 14, 16], [20, 24, 32, 32]] and target.labels.tolist() == [0, 1]
    _, target = ds[1]
    assert target.boxes.shape == (0, 4)  # image 2 kept, as a negative-only image
    assert len(ds.coco.dataset["annotations"]) == 8  # the evaluation's ground truth is untouched


def test_example_ids_are_capped_and_clean_data_prints_nothing(tmp_path, capsys):
    ann_file, img_dir = write_coco(tmp_path, [ann(i, [1, 1, 0, 4]) for i in range(1, 6)] + [ann(9, [1, 1, 4, 4])])
    ds = dataset(ann_file, img_dir)
    assert ds.skipped["zero_area"] == [1, 2, 3, 4, 5]
    assert capsys.readouterr().err.strip() == f"warning: {ann_file}: skipped 5 box(es): zero_area 5 (ids 1, 2, 3, ...)"
    ann_file, img_dir = write_coco(tmp_path / "clean", [ann(1, [1, 1, 4, 4])])
    ds = dataset(ann_file, img_dir)
    assert ds.skipped == {"zero_area": [], "negative_size": [], "outside_image": []} and ds.clipped == []
    assert capsys.readouterr().err == ""


def test_image_without_size_in_the_json_is_clipped_when_read(tmp_path):
    images = [{"id": 1, "file_name": "img1.png"}]
    ann_file, img_dir = write_coco(tmp_path, [ann(1, [20, 20, 30, 30]), ann(2, [40, 40, 5, 5])], 1, images=images)
    ds = dataset(ann_file, img_dir)
    assert ds.clipped == [] and not any(ds.skipped.values())  # nothing to clip against yet
    _, target = ds[0]
    assert target.boxes.tolist() == [[20, 20, 32, 32]]  # the decoded size: 32 x 32; box 2 empty


def test_empty_annotation_list_is_fine_for_evaluation_refused_for_training(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [])
    ds = dataset(ann_file, img_dir)
    assert len(ds) == 2 and ds.num_boxes == 0  # evaluating negative-only images is valid
    write_coco(tmp_path, [], split="val")
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path))
    res = CliRunner().invoke(app, ["train", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"error: {tmp_path / 'instances_train.json'}: no annotations (the train split needs at least one box)"
    )
    assert not (tmp_path / "run").exists()


def test_train_split_whose_boxes_are_all_skipped_is_refused(tmp_path):
    write_coco(tmp_path, [ann(1, [1, 1, 0, 4]), ann(2, [1, 1, 4, 4], iscrowd=1)])
    write_coco(tmp_path, [], split="val")
    with pytest.raises(DwlabError) as err:
        run_training(validate(tiny_config(tmp_path), "t"), tmp_path / "run")
    assert one_line(str(err.value)) == (
        f"{tmp_path / 'instances_train.json'}: no box to train on (all 2 annotations are crowd or skipped)"
    )


# ----------------------------------------------------------------------------- unreadable image mid-epoch


@pytest.fixture
def one_thread():
    """``small_run`` sets torch's threads to 1 (fastest on a busy machine); restore them after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def small_run(root: Path, **train) -> dict:
    """1 epoch of a ResNet-10 on the 32 px images resized to 64 (batch norm needs more than 1x1
    at stride 32), batch 1 (the truncated image is a batch on its own), one DataLoader worker
    process, evaluated on the train split itself."""
    return tiny_config(
        root,
        data={"min_size": 2 * SIZE, "max_size": 2 * SIZE, "flip_prob": 0.0, "num_workers": 1,
              "val_ann": "instances_train.json", "val_images": "train"},
        model={"backbone": "resnet10"},
        train={"batch_size": 1, "warmup_iters": 1, "threads": 1, **train},
    )


def test_truncated_image_mid_epoch_is_skipped_counted_and_named(tmp_path, capsys, one_thread):
    boxes = [[2, 3, 12, 14], [10, 8, 20, 20], [4, 16, 24, 12], [1, 1, 30, 30]]
    write_coco(tmp_path, [ann(i, box, image_id=i) for i, box in enumerate(boxes, 1)], n_images=4)
    bad = tmp_path / "train" / "img3.png"
    truncate(bad)
    result = run_training(validate(small_run(tmp_path), "t"), tmp_path / "run")

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["skipped_images"], row["images_seen"]) for row in lines] == [(1, 1, 3)]
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 3  # empty batch: no step
    assert set(result.metrics) == {"AP", "AP50", "AP75", "APs"}  # 32 px images: no GT over 32² px, so no APm or APl
    err = capsys.readouterr().err.splitlines()
    epoch_lines = [x for x in err if x.startswith("warning: epoch 1/1: ")]
    assert len(epoch_lines) == 1, err
    assert epoch_lines[0].startswith(f"warning: epoch 1/1: skipped 1 unreadable image(s): {bad} (first: cannot decode")
    assert epoch_lines[0].endswith(", left out of training")
    eval_lines = [x for x in err if x.startswith("warning: evaluation on ")]
    assert len(eval_lines) == 1 and str(bad) in eval_lines[0] and eval_lines[0].endswith("left out of the metrics")


def test_epoch_without_any_readable_image_is_one_line_naming_the_files(tmp_path, one_thread):
    write_coco(tmp_path, [ann(1, [2, 2, 10, 10]), ann(2, [2, 2, 10, 10], image_id=2)])
    for png in (tmp_path / "train").glob("*.png"):
        truncate(png)
    with pytest.raises(DwlabError) as err:
        run_training(validate(small_run(tmp_path, save_checkpoints=False), "t"), tmp_path / "run")
    message = one_line(str(err.value))
    assert message.startswith("epoch 1: no image could be read; skipped 2 unreadable image(s): ")
    assert str(tmp_path / "train" / "img1.png") in message and str(tmp_path / "train" / "img2.png") in message


# ----------------------------------------------------------------------------- checkpoints


def state(epoch: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(epoch))}, "epoch": epoch}


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoints(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    checkpoint.save_atomic(state(1), ckpt)
    checkpoint.save_atomic(state(2), ckpt)
    real_save = torch.save

    def crash_half_way(obj, f):  # a crash while writing: half the bytes reach the disk
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise RuntimeError("simulated crash half-way through torch.save")

    monkeypatch.setattr(checkpoint.torch, "save", crash_half_way)
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save_atomic(state(3), ckpt)
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "prev.pt"]  # no partial file left
    assert checkpoint.load(ckpt / "last.pt")["epoch"] == 2 and checkpoint.load(ckpt / "prev.pt")["epoch"] == 1
    assert checkpoint.load_latest(ckpt, warn=pytest.fail)["epoch"] == 2


def test_crash_between_the_renames_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    checkpoint.save_atomic(state(1), ckpt)
    checkpoint.save_atomic(state(2), ckpt)
    real_replace, calls = checkpoint.os.replace, []

    def replace_then_crash(src, dst):  # last.pt -> prev.pt happens, temp -> last.pt does not
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save_atomic(state(3), ckpt)
    monkeypatch.undo()
    assert not (ckpt / "last.pt").exists()
    assert checkpoint.load_latest(ckpt, warn=pytest.fail)["epoch"] == 2  # the newest complete one


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_last_checkpoint_is_one_line_naming_it_and_prev_is_used(tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    checkpoint.save_atomic(state(1), ckpt)
    checkpoint.save_atomic(state(2), ckpt)
    last = ckpt / "last.pt"
    last.write_bytes(last.read_bytes()[:1000] if damage == "truncated" else b"not a checkpoint")
    warnings: list[str] = []
    assert checkpoint.load_latest(ckpt, warn=warnings.append)["epoch"] == 1
    assert len(warnings) == 1 and one_line(warnings[0]).startswith(f"warning: {last}: corrupt or unreadable checkpoint")


# ----------------------------------------------------------------------------- security


PYTHON_TAG = '!!python/object/apply:os.system ["touch {marker}"]'


def test_yaml_config_with_a_python_tag_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"name: {PYTHON_TAG.format(marker=marker)}\n")
    with pytest.raises(DwlabError) as err:
        load_config(str(cfg))
    assert one_line(str(err.value)).startswith(f"{cfg}: not valid YAML (line 1: could not determine a constructor")
    res = CliRunner().invoke(app, ["train", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and str(cfg) in res.stderr
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"points:\n  - {{name: {PYTHON_TAG.format(marker=marker)}}}\n")
    with pytest.raises(DwlabError, match="not valid YAML"):
        load_plan(sweep, runs_dir=tmp_path / "runs")
    # an override is YAML too: the tag is not run, the text stays a plain string
    assert load_config("smoke", [f"name={PYTHON_TAG.format(marker=marker)}"]).name.startswith("!!python")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_package_never_loads_yaml_or_pickles_unsafely():
    """Every ``yaml`` call is ``safe_load`` / ``safe_dump``; every ``torch.load`` passes
    ``weights_only=True``; no ``pickle.load``."""
    unsafe_yaml = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
                   "Loader", "UnsafeLoader", "FullLoader", "add_constructor"}
    problems = []
    package = Path(dwlab.__file__).parent
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(package.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "yaml" and node.attr in unsafe_yaml:
                    problems.append(f"{where}: yaml.{node.attr}")
                if node.value.id == "pickle" and node.attr in {"load", "loads", "Unpickler"}:
                    problems.append(f"{where}: pickle.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "yaml":
                problems += [f"{where}: from yaml import {a.name}" for a in node.names if a.name in unsafe_yaml]
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                if not safe:
                    problems.append(f"{where}: torch.load without weights_only=True")
    assert problems == []


class Payload:
    """Unpickling this runs ``_touch(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path: str) -> None:
    Path(path).touch()


def test_checkpoint_holding_a_python_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({**state(1), "extra": Payload(marker)}, evil)
    with pytest.raises(DwlabError) as err:
        checkpoint.load(evil)
    assert one_line(str(err.value)) == (
        f"{evil}: refused: it holds a Python object (tests.test_faults._touch) other than tensors and "
        "plain containers (loading it could run code; weights_only=True)"
    )
    assert not marker.exists()
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path))
    res = CliRunner().invoke(app, ["eval", str(cfg), "--checkpoint", str(evil), "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [f"error: {err.value}"]
    ckpt = tmp_path / "ckpt"  # on resume: one warning naming it, then the previous checkpoint
    checkpoint.save_atomic(state(1), ckpt)
    (ckpt / "prev.pt").write_bytes((ckpt / "last.pt").read_bytes())
    (ckpt / "last.pt").write_bytes(evil.read_bytes())
    warnings: list[str] = []
    assert checkpoint.load_latest(ckpt, warn=warnings.append)["epoch"] == 1
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {ckpt / 'last.pt'}: refused")
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_mlflow_ui_binds_to_localhost_by_default():
    ui = typer.main.get_command(app).commands["ui"]
    host = next(p for p in ui.params if p.name == "host")
    assert host.default == UI_HOST == "127.0.0.1"
    args = ui_args("sqlite:///x.db")
    assert args[args.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in args
    assert "--host 127.0.0.1" in ui_command("sqlite:///x.db")
