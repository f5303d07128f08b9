"""Evaluation time of a val set and data-loading throughput, on the generated dataset at the
scale's image size (no COCO download here; the loader and COCOeval are the ones real COCO uses)."""

from __future__ import annotations

import time

import torch

from dwlab.config import Config
from dwlab.data.coco import CocoDetection
from dwlab.data.synth import data_names
from dwlab.engine import predict
from dwlab.evaluation import coco_evaluate, to_coco_results
from dwlab.models.detector import build_model
from dwlab.models.postprocess import postprocess_settings
from dwlab.runner import build_datasets, make_loader


def generated_datasets(cfg: Config, n_train: int, n_val: int) -> tuple[Config, CocoDetection, CocoDetection]:
    """The generated dataset with ``n_train`` / ``n_val`` images of the scale's short side, under
    its own file names (not those of the scale's dataset, e.g. the paper preset's COCO 2017)."""
    synth = cfg.data.synth.model_copy(update={"n_train": n_train, "n_val": n_val, "image_size": cfg.data.min_size})
    data = cfg.data.model_copy(update={"root": None, "synth": synth, **data_names()})
    cfg = cfg.model_copy(update={"data": data})
    train, val = build_datasets(cfg)
    return cfg, train, val


def bench_eval(cfg: Config, val: CocoDetection, device: torch.device) -> dict[str, float]:
    """Seconds of inference and of COCOeval over ``val`` with a random-init model.

    A random model scores below the usual 0.05 threshold everywhere, which would leave
    COCOeval nothing to do; the score threshold is 0 here, so every image keeps
    ``eval.max_dets`` detections: COCOeval's worst case.
    """
    torch.manual_seed(0)
    model = build_model(cfg.model.model_copy(update={"pretrained": False}), val.num_classes).to(device)
    loader = make_loader(val, cfg.eval.batch_size, cfg, train=False, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    detections, targets = predict(model, loader, device, **{**postprocess_settings(cfg.eval), "score_thresh": 0.0})
    infer_s = time.perf_counter() - start
    start = time.perf_counter()
    results = to_coco_results(detections, [t.image_id for t in targets], [t.scale for t in targets], val.cat_ids)
    coco_evaluate(val.coco, results, val.image_ids)
    cocoeval_s = time.perf_counter() - start
    return {"images": len(val), "detections": len(results), "infer_s": infer_s, "cocoeval_s": cocoeval_s}


def bench_loading(cfg: Config, train: CocoDetection, batches: int) -> dict[str, float]:
    """Images per second of the training loader alone (``data.num_workers`` workers, decode,
    resize, flip, collate), after one warm-up batch that also starts the workers."""
    loader = make_loader(train, cfg.train.batch_size, cfg, train=True, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        images += batch.images.shape[0]
    elapsed = time.perf_counter() - start
    return {"images": images, "images_per_s": images / elapsed, "workers": cfg.data.num_workers}
