"""The embedded default dataset: generated shapes on cluttered backgrounds, in COCO format.

Six shape categories (ellipse, rectangle, triangle, star, cross, ring) with random colour,
texture (solid, stripes, checker, noise), rotation and aspect, so that no category is
separable by colour or texture alone. Object sizes (the longer box side) are log-uniform from
8 px to 70% of the image side, so every FPN level P3-P7 gets objects; 1-8 objects per image,
later shapes drawn over earlier ones (partial occlusion), about 3% of the images empty. The
background is a gradient with soft blobs and lines (clutter that is not an instance), and every
image gets pixel noise. Images have the longer side ``image_size`` and the shorter side
between 0.75 and 1.0 of it, in either orientation.

Annotations are real COCO: ``bbox`` is the box of the whole shape (occluded parts included),
``area`` its anti-aliased mask area, ``segmentation`` is empty (a box-only dataset). An instance
less than 20% visible is dropped. Category ids are deliberately not contiguous (1, 3, 5, ...).
Everything comes from numpy Generators seeded from ``(seed, split, image index)``: the same seed
gives the same files, and train and val are different streams.

A third split, ``tune``, is made on demand (``tune_split``) beside train and val: as many images
as val, from a stream of its own (``TUNE_STREAM``). A sweep's search scores its trials on it, so
that tuning never sees the val set the tables report.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dwlab.config import SynthConfig
from dwlab.errors import DwlabError

CATEGORIES = [  # (COCO id, name); ids are not contiguous on purpose
    (1, "ellipse"),
    (3, "rectangle"),
    (5, "triangle"),
    (7, "star"),
    (9, "cross"),
    (11, "ring"),
]
SPLITS = {"train": 0, "val": 1}  # the splits every generated dataset has
PRETRAIN_STREAM = 2  # the images a domain-pretrained backbone learns from (dwlab.pretrain)
TUNE_SPLIT, TUNE_STREAM = "tune", 3  # the held-out split a search scores its trials on (tune_split)
STREAMS = {**SPLITS, TUNE_SPLIT: TUNE_STREAM}
MIN_SIZE = 8.0  # px, longer box side of the smallest object
MAX_SIZE_FRAC = 0.7  # of the longer image side
MAX_OBJECTS = 8
EMPTY_FRAC = 0.03
MIN_VISIBLE = 0.2  # drop an instance whose visible fraction is below this
SUPERSAMPLE = 4  # shapes are rasterised at 4x and averaged down (anti-aliasing)
STALE_TEMP_S = 3600.0  # temp dirs older than this are left-overs of killed generations
# rendering one image takes about RENDER_S[0] + RENDER_S[1] * side**2 seconds on one core
# (measured on a 2-core laptop CPU: 29 ms at 128 px, 321 ms at 800 px); a process must have
# PROCESS_MIN_S of them to pay for its start (a spawned Python importing numpy, PIL, pydantic)
RENDER_S = (0.02, 5e-7)
PROCESS_MIN_S = 2.0
CHUNKS_PER_PROCESS = 4  # images go to the pool in this many chunks per process (load balance)


# ----------------------------------------------------------------------------- public API


def generate(
    out_dir: Path, n_train: int, n_val: int, seed: int, image_size: int = 128, processes: int | None = None
) -> Path:
    """Write out_dir/{train,val}/*.png and out_dir/instances_{train,val}.json; return out_dir.
    ``processes``: how many render (default: ``render_processes``); the files do not depend on it."""
    if n_train < 1 or n_val < 1:
        raise DwlabError(f"synth: n_train and n_val must be at least 1 (got {n_train}, {n_val})")
    if image_size < 32:
        raise DwlabError(f"synth: image_size must be at least 32 (got {image_size})")
    out_dir = Path(out_dir)
    for split, n in (("train", n_train), ("val", n_val)):
        ann_file, image_dir = split_files(split)
        workers = processes or render_processes(n, image_size)
        coco = _write_split(out_dir / image_dir, split, n, seed, image_size, workers)
        (out_dir / ann_file).write_text(json.dumps(coco))
    return out_dir


def split_files(split: str) -> tuple[str, str]:
    """(annotation file, image folder) of a split, relative to the generated dataset's folder.
    The tune split keeps its annotations inside its folder, so that it appears in one rename."""
    if split == TUNE_SPLIT:
        return f"{TUNE_SPLIT}/instances_{TUNE_SPLIT}.json", TUNE_SPLIT
    return f"instances_{split}.json", split


def data_names() -> dict[str, str]:
    """The generated dataset's file names as ``data.*`` config keys."""
    (train_ann, train_images), (val_ann, val_images) = split_files("train"), split_files("val")
    return {"train_ann": train_ann, "train_images": train_images, "val_ann": val_ann, "val_images": val_images}


def tune_names() -> dict[str, str]:
    """The ``data.val_*`` config keys that score on the tune split instead of val."""
    ann, images = split_files(TUNE_SPLIT)
    return {"val_ann": ann, "val_images": images}


def render_processes(n: int, image_size: int) -> int:
    """Processes to render ``n`` images of ``image_size`` px: every usable core once the work
    pays for them, one for a few small images (no pool to start)."""
    work_s = n * (RENDER_S[0] + RENDER_S[1] * image_size**2)
    return max(1, min(usable_cores(), int(work_s / PROCESS_MIN_S)))


def usable_cores() -> int:
    """The cores this process may run on (a job's CPU set, not the whole machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def cache_root() -> Path:
    """``$DWLAB_CACHE``, else ``~/.cache/dwlab``."""
    env = os.environ.get("DWLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dwlab"


def default_dataset(cfg: SynthConfig) -> Path:
    """The cached embedded dataset for these settings, generated on first use.

    Generation goes into a temp sibling that is renamed into place, so the folder is either
    absent or complete; when two processes race, the loser discards its copy.
    """
    root = cache_root()
    target = root / f"synth-n{cfg.n_train}-v{cfg.n_val}-s{cfg.seed}-{cfg.image_size}"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=root))
    try:
        generate(tmp, cfg.n_train, cfg.n_val, cfg.seed, cfg.image_size)
        try:
            os.replace(tmp, target)
        except OSError as err:  # lost the race: the target exists (and is complete)
            if not _is_complete(target):
                raise DwlabError(
                    f"cannot place the generated dataset at {target} ({err}); remove it and retry"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tune_split(cfg: SynthConfig) -> Path:
    """The cached embedded dataset (``default_dataset``) with its ``tune`` split: ``cfg.n_val``
    images from ``TUNE_STREAM``, generated on first use into a temp folder that is renamed into
    place (absent or complete; when two processes race, the loser discards its copy)."""
    target = default_dataset(cfg)
    ann_file, image_dir = split_files(TUNE_SPLIT)
    if (target / ann_file).is_file():
        return target
    _remove_stale_temps(target, image_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{image_dir}.tmp-", dir=target))
    try:
        workers = render_processes(cfg.n_val, cfg.image_size)
        coco = _write_split(tmp, TUNE_SPLIT, cfg.n_val, cfg.seed, cfg.image_size, workers)
        (tmp / Path(ann_file).name).write_text(json.dumps(coco))
        try:
            os.replace(tmp, target / image_dir)
        except OSError as err:  # lost the race: the split exists (and is complete)
            if not (target / ann_file).is_file():
                raise DwlabError(f"cannot place the tune split at {target / image_dir} ({err}); remove it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(path: Path) -> bool:
    return all((path / split_files(split)[0]).is_file() for split in SPLITS)


def _remove_stale_temps(root: Path, name: str) -> None:
    now = time.time()
    for tmp in root.glob(f"{name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


# ----------------------------------------------------------------------------- one split


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, *keys])


def render(seed: int, stream: int, index: int, size: int) -> tuple[np.ndarray, list]:
    """Image ``index`` of a stream (``STREAMS`` values, or ``PRETRAIN_STREAM``), never empty:
    (uint8 HxWx3 pixels, [(bbox xywh, area, category id), ...])."""
    return _render_image(_rng(seed, stream, index), size, empty=False)


def _write_split(image_dir: Path, split: str, n: int, seed: int, size: int, workers: int) -> dict:
    """Render ``n`` images into ``image_dir`` and return the COCO dict. Images are rendered by
    ``workers`` processes; each is seeded by its index and the dict is built in index order,
    so the files do not depend on the pool."""
    split_id = STREAMS[split]
    image_dir.mkdir(parents=True, exist_ok=True)
    n_empty = int(round(EMPTY_FRAC * n))
    empty = set(_rng(seed, split_id).choice(n, size=n_empty, replace=False).tolist())
    jobs = [(image_dir, seed, split_id, i, size, i in empty) for i in range(n)]
    if workers > 1:
        chunk = max(1, math.ceil(n / (workers * CHUNKS_PER_PROCESS)))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rendered = list(pool.map(_render_file, jobs, chunksize=chunk))
    else:
        rendered = [_render_file(job) for job in jobs]
    images, annotations = [], []
    for i, (file_name, width, height, objects) in enumerate(rendered):
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        for bbox, area, category_id in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": category_id,
                "bbox": bbox, "area": area, "iscrowd": 0, "segmentation": [],
            })
    categories = [{"id": c, "name": name, "supercategory": "shape"} for c, name in CATEGORIES]
    info = {"description": f"dwlab synthetic shapes ({split}, seed {seed})", "version": "1"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def _render_file(job: tuple) -> tuple[str, int, int, list]:
    """Render one image of a split into its PNG; (file name, width, height, objects)."""
    image_dir, seed, split_id, i, size, empty = job
    pixels, objects = _render_image(_rng(seed, split_id, i), size, empty)
    file_name = f"{i + 1:06d}.png"
    Image.fromarray(pixels).save(image_dir / file_name, compress_level=1)
    return file_name, pixels.shape[1], pixels.shape[0], objects


# ----------------------------------------------------------------------------- one image


def _render_image(rng: np.random.Generator, size: int, empty: bool):
    """Return (uint8 HxWx3 pixels, [(bbox xywh, area, category id), ...])."""
    short = int(round(size * rng.uniform(0.75, 1.0)))
    width, height = (size, short) if rng.random() < 0.5 else (short, size)
    canvas = _background(rng, width, height)
    owner = np.full((height, width), -1, np.int16)  # which instance a pixel shows
    placed = []  # (box xyxy, alpha, x, y, category id)
    n_objects = 0 if empty else int(rng.integers(1, MAX_OBJECTS + 1))
    max_side = min(MAX_SIZE_FRAC * size, short - 2.0)
    for _ in range(n_objects):
        category_id, name = CATEGORIES[rng.integers(len(CATEGORIES))]
        side = float(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(max_side))))
        outer, holes = _shape(rng, name)
        shape = _fit(outer, holes, side, rng.uniform(0.0, 2 * np.pi))
        box = _place(rng, shape[2], width, height, [p[0] for p in placed])
        if box is None:
            continue
        x, y, alpha = _rasterise(shape, box)
        h, w = alpha.shape
        region = canvas[y:y + h, x:x + w]
        colour = _contrasting_colour(rng, region.reshape(-1, 3).mean(0))
        fill = _texture(rng, h, w, colour)
        region += alpha[..., None] * (fill - region)
        owner[y:y + h, x:x + w][alpha > 0.5] = len(placed)
        placed.append((box, alpha, x, y, category_id))
    canvas += rng.normal(0.0, rng.uniform(2.0, 8.0), canvas.shape).astype(np.float32)
    pixels = np.clip(canvas, 0, 255).astype(np.uint8)
    return pixels, _visible_objects(placed, owner)


def _visible_objects(placed: list, owner: np.ndarray) -> list:
    objects = []
    for k, (box, alpha, x, y, category_id) in enumerate(placed):
        h, w = alpha.shape
        full = max(int((alpha > 0.5).sum()), 1)
        visible = int((owner[y:y + h, x:x + w] == k).sum())
        if visible / full < MIN_VISIBLE:
            continue
        x0, y0, x1, y1 = (round(float(v), 2) for v in box)
        bbox = [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]
        area = min(round(float(alpha.sum()), 2), bbox[2] * bbox[3])  # PIL fills edges a hair fat
        objects.append((bbox, area, category_id))
    return objects


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A linear gradient, a few soft blobs and a few lines: float32 HxWx3."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    canvas = c0 + t[..., None] * (c1 - c0)
    for _ in range(int(rng.integers(0, 5))):  # soft irregular blobs
        mask = Image.new("L", (width, height), 0)
        centre = rng.uniform(0, 1, 2) * (width, height)
        radius = rng.uniform(0.05, 0.3) * max(width, height) * rng.uniform(0.6, 1.4, 12)
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        pts = centre + radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in pts], fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 5.0)))
        a = np.asarray(mask, np.float32)[..., None] / 255.0 * rng.uniform(0.2, 0.5)
        canvas += a * (rng.uniform(0, 255, 3).astype(np.float32) - canvas)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 7))):  # lines
        ends = rng.uniform(-0.1, 1.1, 4) * (width, height, width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([tuple(ends[:2]), tuple(ends[2:])], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(image, np.float32).copy()


# ----------------------------------------------------------------------------- one object


def _shape(rng: np.random.Generator, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Outline (N x 2) and holes of a shape in a unit frame around the origin."""

    def ring_pts(n: int, radius, aspect: float = 1.0) -> np.ndarray:
        angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + np.pi / 2
        unit = np.stack([np.cos(angles), aspect * np.sin(angles)], 1)
        return np.asarray(radius)[..., None] * unit

    if name == "ellipse":
        return ring_pts(48, 1.0, rng.uniform(0.45, 1.0)), []
    if name == "rectangle":
        a = rng.uniform(0.35, 1.0)
        return np.array([[-1, -a], [1, -a], [1, a], [-1, a]], float), []
    if name == "triangle":
        angles = np.array([90.0, 210.0, 330.0]) + rng.uniform(-20, 20, 3)
        r = rng.uniform(0.75, 1.0, 3)
        rad = np.deg2rad(angles)
        return np.stack([r * np.cos(rad), r * np.sin(rad)], 1), []
    if name == "star":
        points = int(rng.integers(5, 7))
        radius = np.tile([1.0, rng.uniform(0.35, 0.5)], points)
        return ring_pts(2 * points, radius), []
    if name == "cross":
        return _cross_outline(rng.uniform(0.25, 0.45)), []
    if name == "ring":
        aspect = rng.uniform(0.7, 1.0)
        return ring_pts(48, 1.0, aspect), [ring_pts(48, rng.uniform(0.45, 0.65), aspect)]
    raise ValueError(name)


def _cross_outline(t: float) -> np.ndarray:
    """A plus sign with half arm thickness ``t`` (12 vertices)."""
    return np.array([
        [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1],
        [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t], [-t, -1],
    ], float)


def _fit(outer: np.ndarray, holes: list[np.ndarray], side: float, angle: float):
    """Rotate, then scale so the longer box side is ``side``; return (outer, holes, (w, h))."""
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    outer = outer @ rot.T
    lo, hi = outer.min(0), outer.max(0)
    scale = side / float((hi - lo).max())
    outer = (outer - lo) * scale
    holes = [(h @ rot.T - lo) * scale for h in holes]
    return outer, holes, tuple(float(v) for v in (hi - lo) * scale)


def _place(rng, extent: tuple[float, float], width: int, height: int, boxes: list, tries: int = 10):
    """A box xyxy of this extent inside the image, overlapping earlier ones by IoU < 0.5."""
    w, h = extent
    for _ in range(tries):
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = np.array([x0, y0, x0 + w, y0 + h])
        if all(_iou(box, other) < 0.5 for other in boxes):
            return box
    return None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _rasterise(shape, box: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of the shape placed at ``box``: (x, y, alpha float32 h x w)."""
    outer, holes, _ = shape
    x, y = int(np.floor(box[0])), int(np.floor(box[1]))
    w, h = int(np.ceil(box[2])) - x, int(np.ceil(box[3])) - y
    ss = SUPERSAMPLE
    offset = np.array([box[0] - x, box[1] - y])
    mask = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in [(outer, 1)] + [(hole, 0) for hole in holes]:
        pts = (poly + offset) * ss - 0.5
        draw.polygon([tuple(p) for p in pts], fill=fill)
    alpha = np.asarray(mask, np.float32).reshape(h, ss, w, ss).mean((1, 3))
    return x, y, alpha


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least some distance from the local background (a few tries)."""
    for _ in range(8):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if np.linalg.norm(colour - background) > 90:
            break
    return colour


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """Fill of an object's box: solid, stripes, checker or noise (float32 h x w x 3)."""
    kind = int(rng.integers(4))
    if kind == 0:
        return np.broadcast_to(colour, (h, w, 3))
    if kind == 3:
        return colour + rng.normal(0.0, rng.uniform(15, 40), (h, w, 3)).astype(np.float32)
    other = rng.uniform(0, 255, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(2.0, 6.0)
    if kind == 1:  # stripes at a random angle
        theta = rng.uniform(0, np.pi)
        on = ((xx * np.cos(theta) + yy * np.sin(theta)) // period) % 2 == 0
    else:  # checker
        on = ((xx // period) + (yy // period)) % 2 == 0
    return np.where(on[..., None], colour, other)
