"""A backbone pretrained on the generated domain, with no label assignment involved.

The paper starts every detector from the same ImageNet classifier. Its analogue here: a ResNet
of the detector's architecture learns to classify object crops (box plus ``context`` on each
side, squared, resized to ``crop`` px) cut from generated images of their own seed stream
(``synth.PRETRAIN_STREAM``: neither the train nor the val images). No box, anchor or
assignment is involved, so every label-assignment method starts from identical features.

It is built once (``dwlab pretrain CONFIG``, or on first use by a run whose
``model.pretrained`` is ``synth``) and cached under ``<cache>/backbones/`` keyed by the backbone
name and every ``model.pretrain`` setting; a run loads the cached trunk like an ImageNet one.
The same key gives the same bytes on any host with the same CPU instruction set: the thread
count and device are settings (part of the key), and the crops, rendered in parallel on the
host's cores, do not depend on how many processes render them.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dwlab.config import PretrainConfig
from dwlab.data import synth
from dwlab.data.transforms import normalize
from dwlab.errors import DwlabError

CROP_CHUNK = 100  # images per rendering task

def cache_path(backbone: str, cfg: PretrainConfig) -> Path:
    """``<cache>/backbones/<backbone>-<hash of the settings>.pt``."""
    settings = {"backbone": backbone, **cfg.model_dump()}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return synth.cache_root() / "backbones" / f"{backbone}-{digest}.pt"


def cached_backbone(backbone: str, cfg: PretrainConfig, log=print) -> Path:
    """The cached domain-pretrained trunk for these settings, built on first use. Processes
    that need it at once (two runs, data-parallel ranks) wait on one lock file: one builds it,
    the others then load the same file."""
    path = cache_path(backbone, cfg)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.is_file():
            build(backbone, cfg, path, log=log)
    return path


def crops(cfg: PretrainConfig) -> tuple[Tensor, Tensor]:
    """Crops of every object in ``cfg.images`` generated images: ``Tensor[N, 3, crop, crop]``
    uint8 and their class indices ``Tensor[N]`` (position in ``synth.CATEGORIES``), in image
    order whatever the number of rendering processes."""
    chunks = [range(i, min(i + CROP_CHUNK, cfg.images)) for i in range(0, cfg.images, CROP_CHUNK)]
    workers = min(synth.usable_cores(), len(chunks))
    task = functools.partial(_chunk_crops, cfg)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(task, chunks))
    else:
        parts = [task(chunk) for chunk in chunks]
    pixels = np.concatenate([p for p, _ in parts])
    labels = torch.from_numpy(np.concatenate([lab for _, lab in parts]))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels


def _chunk_crops(cfg: PretrainConfig, indices: range) -> tuple[np.ndarray, np.ndarray]:
    """The crops of images ``indices``: ``uint8[n, crop, crop, 3]`` and class indices ``int64[n]``."""
    index = {cat_id: k for k, (cat_id, _) in enumerate(synth.CATEGORIES)}
    pixels, labels = [], []
    for i in indices:
        image, objects = synth.render(cfg.seed, synth.PRETRAIN_STREAM, i, cfg.image_size)
        picture = Image.fromarray(image)
        for (x, y, w, h), _area, cat_id in objects:
            half = max(w, h) * (0.5 + cfg.context)
            cx, cy = x + w / 2, y + h / 2
            box = tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half))
            crop = picture.crop(box).resize((cfg.crop, cfg.crop), Image.BILINEAR)  # zero-padded outside
            pixels.append(np.asarray(crop))
            labels.append(index[cat_id])
    empty = np.zeros((0, cfg.crop, cfg.crop, 3), np.uint8)
    return (np.stack(pixels) if pixels else empty), np.asarray(labels, dtype=np.int64)


def _augment(batch: Tensor, gen: torch.Generator) -> Tensor:
    """A random horizontal flip and a random multiple of 90 degrees (the classes are invariant)."""
    if torch.rand((), generator=gen) < 0.5:
        batch = batch.flip(-1)
    return batch.rot90(int(torch.randint(4, (), generator=gen)), dims=(-2, -1))


def train_classifier(backbone: str, cfg: PretrainConfig, images: Tensor, labels: Tensor, log=print) -> tuple[nn.Module, float]:
    """Train ``backbone`` + a linear classifier on 90% of the crops; returns the trunk (the
    classifier layer removed) and the accuracy on the other 10%."""
    from dwlab.models.backbone import resnet

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(labels), generator=gen)
    n_val = max(1, len(labels) // 10)
    val, train = order[:n_val], order[n_val:]
    if len(train) < cfg.batch_size:
        raise DwlabError(
            f"model.pretrain: {len(train)} training crops from images={cfg.images} are fewer than "
            f"batch_size={cfg.batch_size}; raise model.pretrain.images"
        )
    device = _device(cfg.device)
    images, labels = images.to(device), labels.to(device)
    net = resnet(backbone, False, "bn")
    net.fc = nn.Linear(net.fc.in_features, len(synth.CATEGORIES))
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, len(train) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    net.train()
    for epoch in range(cfg.epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        for start in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = net(normalize(_augment(images[idx], gen).float()))
            loss = nn.functional.cross_entropy(logits.float(), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"pretrain epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(normalize(images[val[i : i + 256]].float())).argmax(1) for i in range(0, n_val, 256)])
    accuracy = (predicted == labels[val]).float().mean().item()
    net.fc = nn.Identity()
    return net.cpu(), accuracy


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DwlabError("model.pretrain.device=cuda but torch sees no CUDA device")
    return torch.device(name)


def build(backbone: str, cfg: PretrainConfig, path: Path, log=print) -> dict:
    """Pretrain and write the trunk's state_dict to ``path`` and a ``.json`` beside it with the
    settings, the held-out crop accuracy and the time taken (each to a temp file, then renamed;
    the ``.pt`` last, so that it exists only complete); returns that record."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    # its own RNG stream: a run that builds the cache on first use initialises its detector
    # from train.seed exactly as a run that finds the cache does
    with torch.random.fork_rng(devices=[]):
        try:
            images, labels = crops(cfg)
            log(f"pretrain: {len(labels)} crops from {cfg.images} generated images ({time.perf_counter() - start:.0f} s)")
            net, accuracy = train_classifier(backbone, cfg, images, labels, log=log)
        finally:
            torch.set_num_threads(threads)
    record = {
        "backbone": backbone, "settings": cfg.model_dump(), "crops": len(labels),
        "val_accuracy": round(accuracy, 4), "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    _write_atomic(path.with_suffix(".json"), lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
    _write_atomic(path, lambda f: torch.save(state, f))
    log(f"pretrain: held-out crop accuracy {accuracy:.3f}; wrote {path}")
    return record


def _write_atomic(path: Path, write) -> None:
    """``write(binary file)`` into a temp sibling, then rename it to ``path`` (mode 644)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
