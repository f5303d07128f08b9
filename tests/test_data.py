import collections.abc
import pickle

import torch
from PIL import Image

import pytest

from dwlab.data.coco import CocoDetection, SkippedImage, collate, load_coco
from dwlab.data.transforms import hflip, resize_keep_ratio
from dwlab.errors import DwlabError
from tests.conftest import write_json


def make_coco(tmp_path, annotations=None, images=None, categories=None):
    """Two 40x60 images; category ids 3 and 17 (non-contiguous); a crowd box; image 2 has no
    annotation."""
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (60, 40), (10, 20, 30)).save(img_dir / name)
    raw = {
        "images": images or [
            {"id": 1, "file_name": "a.png", "width": 60, "height": 40},
            {"id": 2, "file_name": "b.png", "width": 60, "height": 40},
        ],
        "annotations": annotations if annotations is not None else [
            {"id": 10, "image_id": 1, "category_id": 17, "bbox": [5, 5, 10, 20]},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 10, 30, 20]},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60, 40], "iscrowd": 1},
        ],
        "categories": categories or [{"id": 17, "name": "b"}, {"id": 3, "name": "a"}],
    }
    return write_json(tmp_path / "ann.json", raw), img_dir


def test_loader_maps_categories_skips_crowd_keeps_empty_images(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    ds = CocoDetection(ann, img_dir, min_size=80, max_size=200)
    assert ds.cat_ids == [3, 17] and ds.num_classes == 2 and ds.class_names == ["a", "b"]
    assert len(ds) == 2
    image, target = ds[0]
    # 40x60 -> shorter side 80: scale 2
    assert image.shape == (3, 80, 120) and target.scale == 2.0 and target.orig_size == (40, 60)
    assert target.labels.tolist() == [1, 0]  # 17 -> 1, 3 -> 0; crowd excluded
    assert torch.allclose(target.boxes, torch.tensor([[10.0, 10, 30, 50], [40, 20, 100, 60]]))
    image, target = ds[1]
    assert target.boxes.shape == (0, 4) and target.labels.shape == (0,)


def test_resize_respects_max_size_and_flip_mirrors_boxes():
    image = torch.zeros(3, 100, 400, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0, 40, 10]])
    out, b, scale = resize_keep_ratio(image, boxes, min_size=800, max_size=1333)
    assert out.shape[1:] == (333, 1333) and scale == pytest.approx(1333 / 400)
    flipped_img, flipped = hflip(out, b)
    w = out.shape[-1]
    assert torch.allclose(flipped, torch.tensor([[w - b[0, 2], b[0, 1], w - b[0, 0], b[0, 3]]]))
    assert torch.equal(flipped_img.flip(-1), out)


def test_collate_pads_to_32():
    a = (torch.ones(3, 50, 70), None)
    b = (torch.ones(3, 64, 33), None)
    images, sizes, _ = collate([a, b])
    assert images.shape == (2, 3, 64, 96)
    assert sizes.tolist() == [[50, 70], [64, 33]]
    assert images[0, :, 50:].abs().sum() == 0 and images[1, :, :, 33:].abs().sum() == 0


def test_not_coco_and_bad_files_are_one_line_errors(tmp_path):
    bad = write_json(tmp_path / "x.json", {"images": []})
    with pytest.raises(DwlabError, match="not a COCO instances file"):
        load_coco(bad)
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(DwlabError, match="y.json: not valid JSON"):
        load_coco(tmp_path / "y.json")
    with pytest.raises(DwlabError, match="cannot read annotation file"):
        load_coco(tmp_path / "missing.json")
    ann, img_dir = make_coco(tmp_path, annotations=[{"id": 5, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(DwlabError, match="annotation 5 has category_id 99 not in 'categories'"):
        CocoDetection(ann, img_dir, min_size=40, max_size=60)
    ann, img_dir = make_coco(tmp_path, images=[{"id": 1, "file_name": "nope.png", "width": 6, "height": 4}], annotations=[])
    with pytest.raises(DwlabError, match="nope.png: image file of image id 1 is missing"):
        CocoDetection(ann, img_dir, min_size=40, max_size=60)


def test_unreadable_image_names_the_file(tmp_path):
    ann, img_dir = make_coco(tmp_path, annotations=[])
    (img_dir / "a.png").write_bytes(b"\x89PNG truncated")
    ds = CocoDetection(ann, img_dir, min_size=40, max_size=60)
    with pytest.raises(DwlabError, match="a.png: cannot decode image"):
        ds.read_image(1)
    item = ds[0]  # mid-epoch: a documented skip that names the file, not an exception
    assert isinstance(item, SkippedImage) and item.image_id == 1 and item.path == str(img_dir / "a.png")
    assert item.reason.startswith(f"{img_dir / 'a.png'}: cannot decode image (") and "\n" not in item.reason
    batch = collate([item, ds[1]])
    images, sizes, targets = batch
    assert images.shape[0] == 1 and sizes.shape == (1, 2) and [t.image_id for t in targets] == [2]
    assert batch.skipped == (item,)
    images, sizes, targets = empty = collate([item])  # every image of the batch unreadable
    assert images.shape[0] == 0 and sizes.shape == (0, 2) and targets == [] and empty.skipped == (item,)


def test_a_batch_keeps_its_skipped_images_through_pin_memory_and_pickling(tmp_path, monkeypatch):
    """What ``DataLoader(pin_memory=True)`` does to a batch: torch's ``pin_memory`` rebuilds a
    tuple, sequence or mapping from its items (older torch checked those before looking for a
    ``pin_memory`` method), so a ``Batch`` is none of them and torch calls its own method.
    Pinning needs CUDA: without it, a copy stands in for ``Tensor.pin_memory`` (the dispatch and
    ``Batch.pin_memory`` run as they are; ``tests/test_cuda.py`` pins a real loader's)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    ann, img_dir = make_coco(tmp_path, annotations=[])
    (img_dir / "a.png").write_bytes(b"\x89PNG truncated")
    ds = CocoDetection(ann, img_dir, min_size=40, max_size=60)
    batch = collate([ds[0], ds[1]])
    assert not isinstance(batch, (tuple, collections.abc.Sequence, collections.abc.Mapping))
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self.clone())
    pinned = pin_memory(batch)
    assert type(pinned) is type(batch) and pinned.skipped == batch.skipped and len(batch.skipped) == 1
    assert pinned.images is not batch.images and torch.equal(pinned.images, batch.images)
    assert torch.equal(pinned.sizes, batch.sizes) and pinned.targets is batch.targets
    restored = pickle.loads(pickle.dumps(batch))  # as from a DataLoader worker process
    assert torch.equal(restored.images, batch.images) and restored.skipped == batch.skipped
