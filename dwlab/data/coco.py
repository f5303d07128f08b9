"""COCO-format detection data on pycocotools: the real COCO 2017 files or the generated default.

Category ids are mapped to contiguous labels 0..C-1 in sorted id order (and back for
evaluation). Crowd boxes are excluded from the targets; an image without annotations is kept
(a negative-only image).

Bad data, and what happens to it:

- Refused when the dataset is built, in one line naming the file and the id (``DwlabError``):
  an annotation whose ``category_id`` is not in ``categories``, whose ``image_id`` is not in
  ``images`` or whose ``bbox`` is not four finite numbers; an image without a ``file_name``,
  with a ``width``/``height`` that is not a positive number, or whose file is missing.
- Skipped and counted when the dataset is built: a box of zero width or height
  (``zero_area``), of negative width or height (``negative_size``), or with nothing of it inside
  its image (``outside_image``). A box partly outside its image is clipped to it and kept
  (``clipped``). The image size is the json's ``width``/``height``; an image without them is
  clipped to its decoded size when read (and a box left empty then is dropped uncounted).
  ``CocoDetection.skipped`` holds the annotation ids per skip reason, ``CocoDetection.clipped``
  the clipped ones, and one ``warning:`` line on stderr summarises both when the dataset is
  built. These annotations stay in ``coco`` (the ground truth of the evaluation); only the
  training targets change.
- An empty ``annotations`` list is valid here (evaluating negative-only images); training
  refuses a train split without a box (``runner.require_boxes``).
- An image file that cannot be decoded (truncated, not an image) is found only when it is read,
  possibly mid-epoch: ``__getitem__`` then returns a ``SkippedImage`` naming the file instead of
  raising, ``collate`` drops it and lists it in the batch's ``skipped``, and the loops count it
  (``engine.train_one_epoch``: ``skipped_images`` in the epoch metrics, which the runner logs
  with the file names at the end of the epoch; ``engine.predict``: the evaluation leaves the
  image out of the metrics and says so). The list travels with the batch, so this works with
  DataLoader worker processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from dwlab.data.target import Target
from dwlab.data.transforms import hflip, normalize, resize_keep_ratio
from dwlab.errors import DwlabError

REQUIRED_KEYS = ("images", "annotations", "categories")
SKIP_REASONS = ("zero_area", "negative_size", "outside_image")
EXAMPLE_IDS = 3  # annotation ids shown per reason in the summary line


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_bbox(ann: Any, ann_file: Path) -> None:
    """Every annotation (crowd too) needs ``bbox`` ``[x, y, w, h]``: four finite numbers."""
    if not isinstance(ann, dict):
        return  # pycocotools' index reports it
    if "bbox" not in ann:
        raise DwlabError(f"{ann_file}: annotation {ann.get('id')} has no 'bbox'")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise DwlabError(
            f"{ann_file}: annotation {ann.get('id')} has bbox {bbox!r} (expected [x, y, width, height], 4 numbers)"
        )


def load_coco(ann_file: Path, images_only: bool = False) -> COCO:
    """Load and check an instances json; one-line errors for a missing file or a non-COCO json.
    ``images_only``: a file without ``annotations`` (an image-info file) is read as one with
    none."""
    try:
        raw = json.loads(Path(ann_file).read_text())
    except OSError as err:
        raise DwlabError(f"{ann_file}: cannot read annotation file ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise DwlabError(f"{ann_file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise DwlabError(f"{ann_file}: not a text file ({err.reason} at byte {err.start})") from None
    if images_only and isinstance(raw, dict):
        raw.setdefault("annotations", [])
    if not isinstance(raw, dict) or any(not isinstance(raw.get(k), list) for k in REQUIRED_KEYS):
        kind, keys = ("image-info", REQUIRED_KEYS[::2]) if images_only else ("instances", REQUIRED_KEYS)
        raise DwlabError(f"{ann_file}: not a COCO {kind} file (needs lists {', '.join(map(repr, keys))})")
    if not raw["categories"]:
        raise DwlabError(f"{ann_file}: 'categories' is empty")
    for ann in raw["annotations"]:  # pycocotools' COCOeval needs these; real COCO has them
        _check_bbox(ann, ann_file)
        if isinstance(ann, dict):
            ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
            ann.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = raw
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco.createIndex()
        except (KeyError, TypeError) as err:
            raise DwlabError(f"{ann_file}: malformed COCO entry (missing or bad field {err})") from None
    return coco


def clean_box(
    bbox: list[float], width: float | None, height: float | None
) -> tuple[list[float] | None, str]:
    """A COCO ``[x, y, w, h]`` as xyxy, clipped to a ``width`` x ``height`` image (no clipping
    where they are None), and what happened to it.

    Returns ``(box, "ok")``, ``(clipped box, "clipped")`` or ``(None, reason)`` with the skip
    reason ``"negative_size"``, ``"zero_area"`` or ``"outside_image"``.
    """
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return None, "negative_size"
    if w == 0 or h == 0:
        return None, "zero_area"
    box = [x, y, x + w, y + h]
    if width is None or height is None:
        return box, "ok"
    clipped = [min(max(v, 0.0), limit) for v, limit in zip(box, (width, height, width, height))]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, "outside_image"
    return clipped, "ok" if clipped == box else "clipped"


@dataclass(frozen=True)
class SkippedImage:
    """What ``CocoDetection.__getitem__`` returns for an image it cannot read: the image id,
    its file and the one-line reason (``"<file>: cannot decode image (...)"``)."""

    image_id: int
    path: str
    reason: str


class CocoDetection(Dataset):
    """Images and targets of one COCO split.

    Item ``i`` is ``(image, target)``: image ``Tensor[3, H, W]`` float, normalised, resized so
    that the shorter side is ``min_size`` and the longer at most ``max_size``; target boxes in
    the same frame (see ``Target``). An image that cannot be decoded gives a ``SkippedImage``
    instead (see the module docstring).

    ``min_size_range`` ``(lo, hi)``: multi-scale training, each item's shorter side drawn
    uniformly from the integers lo..hi instead of ``min_size``. Like the flip, the draw comes
    from torch's default generator, which the run seeds (in a DataLoader worker: the seed the
    loader's generator gives it), so the same seed draws the same sizes.
    ``images_only``: the annotation file may lack ``annotations`` (COCO's
    ``image_info_test-dev2017.json``): every image then has an empty target.

    ``skipped``: ``{reason: [annotation id, ...]}`` of the boxes left out of the targets
    (reasons ``SKIP_REASONS``); ``clipped``: ids of the boxes clipped to their image.
    """

    def __init__(
        self,
        ann_file: Path,
        image_dir: Path,
        *,
        min_size: int,
        max_size: int,
        flip_prob: float = 0.0,
        min_size_range: tuple[int, int] | None = None,
        images_only: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.coco = load_coco(self.ann_file, images_only=images_only)
        self.min_size, self.max_size, self.flip_prob = min_size, max_size, flip_prob
        self.min_size_range = min_size_range
        self.image_ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.label_of_cat = {cat: i for i, cat in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self._check()
        self.skipped: dict[str, list[int]] = {reason: [] for reason in SKIP_REASONS}
        self.clipped: list[int] = []
        self._targets = self._build_targets()
        summary = self.skip_summary()
        if summary:
            (warn or _stderr)(f"warning: {summary}")

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def num_boxes(self) -> int:
        """Boxes in the training targets, over all images (crowd and skipped boxes excluded)."""
        return sum(len(labels) for _, labels in self._targets.values())

    def _check(self) -> None:
        """Fail before training on what would otherwise fail mid-epoch."""
        if not self.image_dir.is_dir():
            raise DwlabError(f"{self.image_dir}: image directory does not exist")
        for ann in self.coco.dataset["annotations"]:
            category, image_id = ann.get("category_id"), ann.get("image_id")
            if not isinstance(category, (int, str)) or category not in self.label_of_cat:
                raise DwlabError(
                    f"{self.ann_file}: annotation {ann.get('id')} has category_id {category!r} not in 'categories'"
                )
            if not isinstance(image_id, (int, str)) or image_id not in self.coco.imgs:
                raise DwlabError(
                    f"{self.ann_file}: annotation {ann.get('id')} has image_id {image_id!r} not in 'images'"
                )
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            if not isinstance(info.get("file_name"), str):
                raise DwlabError(f"{self.ann_file}: image {image_id} has no 'file_name'")
            for key in ("width", "height"):
                if key in info and not (_is_number(info[key]) and info[key] > 0):
                    raise DwlabError(f"{self.ann_file}: image {image_id} has {key} {info[key]!r}")
            path = self.image_path(image_id)
            if not path.is_file():
                raise DwlabError(f"{path}: image file of image id {image_id} is missing")

    def _build_targets(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per image id: boxes ``[G, 4]`` float32 xyxy in original pixels, clipped to the image,
        and labels ``[G]`` int64; crowd boxes left out, bad boxes skipped and counted."""
        targets = {}
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            boxes, labels = [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    continue
                box, what = clean_box(ann["bbox"], info.get("width"), info.get("height"))
                if box is None:
                    self.skipped[what].append(ann["id"])
                    continue
                if what == "clipped":
                    self.clipped.append(ann["id"])
                boxes.append(box)
                labels.append(self.label_of_cat[ann["category_id"]])
            targets[image_id] = (
                np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64),
            )
        return targets

    def skip_summary(self) -> str | None:
        """One line: how many boxes were skipped per reason and clipped, with example ids."""
        parts = [f"{reason} {len(ids)} ({_examples(ids)})" for reason, ids in self.skipped.items() if ids]
        n_skipped = sum(len(ids) for ids in self.skipped.values())
        line = f"skipped {n_skipped} box(es): {', '.join(parts)}" if parts else ""
        if self.clipped:
            clipped = f"clipped {len(self.clipped)} box(es) to their image ({_examples(self.clipped)})"
            line = f"{line}; {clipped}" if line else clipped
        return f"{self.ann_file}: {line}" if line else None

    def __len__(self) -> int:
        return len(self.image_ids)

    def shorter_side(self) -> int:
        """``min_size``, or a draw from ``min_size_range`` (torch's default generator)."""
        if self.min_size_range is None:
            return self.min_size
        lo, hi = self.min_size_range
        return int(torch.randint(lo, hi + 1, ()))

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def read_image(self, image_id: int) -> Tensor:
        """The original image, ``Tensor[3, H, W]`` uint8 RGB; a one-line ``DwlabError`` naming
        the file when it cannot be decoded."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except Exception as err:  # a damaged file: OSError (truncated, UnidentifiedImageError),
            # SyntaxError, ValueError, EOFError, zlib.error, DecompressionBombError, ... from PIL
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise DwlabError(f"{path}: cannot decode image ({reason})") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def raw_target(self, image_id: int, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Boxes ``Tensor[G, 4]`` xyxy and labels ``Tensor[G]`` in original pixels: no crowd,
        no skipped box; with ``size`` (h, w) also clipped to it (boxes left empty dropped)."""
        boxes, labels = self._targets[image_id]
        boxes, labels = torch.from_numpy(boxes.copy()), torch.from_numpy(labels.copy())
        if size is not None:
            h, w = size
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
        return boxes, labels

    def __getitem__(self, index: int) -> tuple[Tensor, Target] | SkippedImage:
        image_id = self.image_ids[index]
        try:
            image = self.read_image(image_id)
        except DwlabError as err:  # never raise mid-epoch: collate drops it, the loops count it
            return SkippedImage(image_id, str(self.image_path(image_id)), str(err))
        orig_size = (image.shape[1], image.shape[2])
        boxes, labels = self.raw_target(image_id, orig_size)
        image, boxes, scale = resize_keep_ratio(image, boxes, self.shorter_side(), self.max_size)
        if self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
            image, boxes = hflip(image, boxes)
        return normalize(image), Target(boxes, labels, image_id, scale, orig_size)


def _examples(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:EXAMPLE_IDS])
    return f"ids {shown}{', ...' if len(ids) > EXAMPLE_IDS else ''}"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class Batch:
    """``collate``'s output: images ``Tensor[B, 3, H, W]``, their unpadded sizes ``Tensor[B, 2]``
    (h, w), the targets, and ``skipped``: the ``SkippedImage`` of each sample it dropped.
    Unpacks like the 3-tuple ``(images, sizes, targets)``; pickles whole (batches of DataLoader
    worker processes).

    Not a tuple, sequence or mapping on purpose: torch's ``pin_memory`` (DataLoader
    ``pin_memory=True``) rebuilds those from their items, which drops ``skipped`` (older torch
    did so before it looked for a ``pin_memory`` method), and calls the ``pin_memory`` method of
    any other object, whatever its order of checks."""

    images: Tensor
    sizes: Tensor
    targets: list[Target]
    skipped: tuple[SkippedImage, ...] = ()

    def __iter__(self) -> Iterator:
        return iter((self.images, self.sizes, self.targets))

    def pin_memory(self) -> Batch:
        return replace(self, images=self.images.pin_memory(), sizes=self.sizes.pin_memory())


def collate(batch: list[tuple[Tensor, Target] | SkippedImage], size_divisor: int = 32) -> Batch:
    """Pad to a common size divisible by ``size_divisor``; drop unreadable images.

    Returns images ``Tensor[B, 3, H, W]`` (zero padding, bottom/right), the unpadded sizes
    ``Tensor[B, 2]`` (h, w) and the targets, B counting the readable images only (0 when none
    is: images ``Tensor[0, 3, size_divisor, size_divisor]``); ``.skipped`` lists the others.
    """
    skipped = [s for s in batch if isinstance(s, SkippedImage)]
    images = [img for img, _ in (s for s in batch if not isinstance(s, SkippedImage))]
    targets = [t for _, t in (s for s in batch if not isinstance(s, SkippedImage))]
    if not images:
        empty = torch.zeros((0, 3, size_divisor, size_divisor))
        return Batch(empty, torch.zeros((0, 2), dtype=torch.long), [], tuple(skipped))
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    h = (h + size_divisor - 1) // size_divisor * size_divisor
    w = (w + size_divisor - 1) // size_divisor * size_divisor
    out = images[0].new_zeros((len(images), 3, h, w))
    for i, img in enumerate(images):
        out[i, :, : img.shape[1], : img.shape[2]] = img
    sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.long)
    return Batch(out, sizes, targets, tuple(skipped))
