"""COCO-format detection data on pycocotools: the real COCO 2017 files or the generated default.

Category ids are mapped to contiguous labels 0..C-1 in sorted id order (and back for
evaluation). Crowd boxes are excluded from the targets; images without annotations are kept.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from PIL import Image

from dwlab.data.target import Target
from dwlab.data.transforms import hflip, normalize, resize_keep_ratio
from dwlab.errors import DwlabError

REQUIRED_KEYS = ("images", "annotations", "categories")


def load_coco(ann_file: Path) -> COCO:
    """Load and check an instances json; one-line errors for a missing file or a non-COCO json."""
    try:
        raw = json.loads(Path(ann_file).read_text())
    except OSError as err:
        raise DwlabError(f"{ann_file}: cannot read annotation file ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise DwlabError(f"{ann_file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict) or any(not isinstance(raw.get(k), list) for k in REQUIRED_KEYS):
        raise DwlabError(
            f"{ann_file}: not a COCO instances file (needs lists 'images', 'annotations', 'categories')"
        )
    if not raw["categories"]:
        raise DwlabError(f"{ann_file}: 'categories' is empty")
    for ann in raw["annotations"]:  # pycocotools' COCOeval needs these; real COCO has them
        if isinstance(ann, dict) and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
            ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        if isinstance(ann, dict):
            ann.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = raw
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco.createIndex()
        except (KeyError, TypeError) as err:
            raise DwlabError(f"{ann_file}: malformed COCO entry (missing or bad field {err})") from None
    return coco


class CocoDetection(Dataset):
    """Images and targets of one COCO split.

    Item ``i`` is ``(image, target)``: image ``Tensor[3, H, W]`` float, normalised, resized so
    that the shorter side is ``min_size`` and the longer at most ``max_size``; target boxes in
    the same frame (see ``Target``).
    """

    def __init__(
        self,
        ann_file: Path,
        image_dir: Path,
        *,
        min_size: int,
        max_size: int,
        flip_prob: float = 0.0,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.coco = load_coco(self.ann_file)
        self.min_size, self.max_size, self.flip_prob = min_size, max_size, flip_prob
        self.image_ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.label_of_cat = {cat: i for i, cat in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self._check()

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _check(self) -> None:
        """Fail before training on what would otherwise fail mid-epoch."""
        if not self.image_dir.is_dir():
            raise DwlabError(f"{self.image_dir}: image directory does not exist")
        for ann in self.coco.dataset["annotations"]:
            if ann.get("category_id") not in self.label_of_cat:
                raise DwlabError(
                    f"{self.ann_file}: annotation {ann.get('id')} has category_id "
                    f"{ann.get('category_id')!r} not in 'categories'"
                )
        for image_id in self.image_ids:
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            if not path.is_file():
                raise DwlabError(f"{path}: image file of image id {image_id} is missing")

    def __len__(self) -> int:
        return len(self.image_ids)

    def read_image(self, image_id: int) -> Tensor:
        """The original image, ``Tensor[3, H, W]`` uint8 RGB."""
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DwlabError(f"{path}: cannot decode image ({str(err).splitlines()[0]})") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def raw_target(self, image_id: int) -> tuple[Tensor, Tensor]:
        """Boxes ``Tensor[G, 4]`` xyxy and labels ``Tensor[G]`` in original pixels, no crowd,
        boxes of zero or negative size dropped."""
        anns = self.coco.imgToAnns.get(image_id, [])
        boxes, labels = [], []
        for ann in anns:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            if w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of_cat[ann["category_id"]])
        return (
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.long),
        )

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.image_ids[index]
        image = self.read_image(image_id)
        boxes, labels = self.raw_target(image_id)
        orig_size = (image.shape[1], image.shape[2])
        image, boxes, scale = resize_keep_ratio(image, boxes, self.min_size, self.max_size)
        if self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
            image, boxes = hflip(image, boxes)
        return normalize(image), Target(boxes, labels, image_id, scale, orig_size)


def collate(batch: list[tuple[Tensor, Target]], size_divisor: int = 32) -> tuple[Tensor, Tensor, list[Target]]:
    """Pad to a common size divisible by ``size_divisor``.

    Returns images ``Tensor[B, 3, H, W]`` (zero padding, bottom/right), the unpadded sizes
    ``Tensor[B, 2]`` (h, w) and the targets.
    """
    images = [img for img, _ in batch]
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    h = (h + size_divisor - 1) // size_divisor * size_divisor
    w = (w + size_divisor - 1) // size_divisor * size_divisor
    out = images[0].new_zeros((len(images), 3, h, w))
    for i, img in enumerate(images):
        out[i, :, : img.shape[1], : img.shape[2]] = img
    sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.long)
    return out, sizes, [t for _, t in batch]
