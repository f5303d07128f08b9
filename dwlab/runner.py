"""A whole run from a config: data, model, assigner, optimiser, epochs, checkpoints, evaluation.

A run directory holds ``config.yaml`` (the config as given, fields left null stay null),
``resolved.yaml`` (what the run resolved beyond it: the assigner's constants and loss weights,
see ``resolved_record``), ``metrics.jsonl`` (one line per epoch: what was computed, identical
when the run is repeated), ``timing.jsonl`` (one line per epoch: ``iters_per_s``), ``checkpoints/last.pt``
(+ ``prev.pt``), ``eval.json`` (final COCO metrics) and ``detections.json`` (the val set's
detections at the latest evaluation, COCO results format).
Under torch.distributed (e.g. a Ray Train worker) it trains data-parallel; rank 0 writes files.

Images that cannot be decoded are skipped, not fatal (see ``data.coco``): each epoch's
``skipped_images`` is in ``metrics.jsonl`` and a ``warning:`` line on stderr names the files;
evaluation leaves them out of the metrics and says so. An epoch in which no image at all could
be read, or a train split without a box, is a ``DwlabError``.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from dwlab import TRAINING_REVISION, __version__, checkpoint, faults, paper
from dwlab.assign import build_assigner
from dwlab.assign.base import LabelAssigner, head_init
from dwlab.config import Config, DataConfig, TrainConfig, dump_yaml, to_dict
from dwlab.data.coco import CocoDetection, SkippedImage, collate
from dwlab.data.sampler import GroupedBatchSampler, orientation_groups
from dwlab.distributed import is_distributed, mean_over_workers, rank, sum_over_workers, world_size
from dwlab.engine import StepState, TrainStep, lr_at, param_groups, predict, train_one_epoch
from dwlab.errors import DwlabError, NonFiniteLoss
from dwlab.evaluation import coco_evaluate, to_coco_results
from dwlab.models.detector import FCOS, build_model
from dwlab.models.detector import head_options as model_head_options
from dwlab.models.postprocess import postprocess_settings

__all__ = ["EpochReport", "RunResult", "NonFiniteLoss", "run_training", "run_evaluation"]

FINAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
DETECTIONS = "detections.json"  # beside eval.json: the val detections of the latest evaluation
# one line per epoch each: what the run computed (the same for the same config, seed and
# machine, to the last digit) and what the clock measured (never the same twice)
METRICS, TIMING = "metrics.jsonl", "timing.jsonl"
WALL_CLOCK = ("iters_per_s",)  # the epoch's metrics that go to TIMING, not METRICS
RANK_SEED_STRIDE = 1_000_003  # rank r's random streams are seeded at seed + r * this


@dataclass
class EpochReport:
    epoch: int  # epochs completed (1-based)
    epochs: int
    metrics: dict[str, float]  # mean loss terms, lr, iters_per_s, images_seen; AP* when evaluated
    checkpoint: Path | None  # written for this epoch (rank 0 only)
    resolved: dict[str, Any]  # resolved_record of the run


@dataclass
class RunResult:
    out_dir: Path
    metrics: dict[str, float]  # final AP, AP50, AP75, APs, APm, APl
    epochs_done: int
    resolved: dict[str, Any]  # resolved_record of the run


# ----------------------------------------------------------------------------- building


def data_paths(cfg: DataConfig) -> tuple[Path, Path, Path, Path]:
    """(train_ann, train_images, val_ann, val_images); the embedded dataset when root is null
    (with its tune split when ``val_ann`` names it: a search's trials score there)."""
    if cfg.root is None:
        from dwlab.data.synth import default_dataset, tune_names, tune_split

        check_generated_names(cfg)
        root = tune_split(cfg.synth) if cfg.val_ann == tune_names()["val_ann"] else default_dataset(cfg.synth)
    else:
        root = Path(cfg.root)
        if not root.is_dir():
            raise DwlabError(f"data.root: directory {root} does not exist")
    return root / cfg.train_ann, root / cfg.train_images, root / cfg.val_ann, root / cfg.val_images


def check_generated_names(cfg: DataConfig) -> None:
    """With ``data.root`` null, the file names must be the generated dataset's (either split's:
    evaluating on the train images is allowed; a search's trials evaluate on the tune split);
    checked before anything is generated."""
    from dwlab.data.synth import data_names, tune_names

    own, tune = data_names(), tune_names()
    for key in own:
        kind = ("train_ann", "val_ann") if key.endswith("_ann") else ("train_images", "val_images")
        allowed = sorted({own[k] for k in kind} | ({tune[key]} if key in tune else set()))
        if getattr(cfg, key) not in allowed:
            fix = " ".join(f"data.{k}={v}" for k, v in own.items())
            raise DwlabError(
                f"data.{key}={getattr(cfg, key)!r} but data.root is null: the generated dataset has "
                f"{' and '.join(allowed)} (set data.root to your dataset, or {fix})"
            )


def prepare_inputs(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Make a run's one-time inputs, each cached: the generated dataset (``data.root`` null)
    and the domain-pretrained backbone (``model.pretrained: synth``). A sweep calls this once
    per distinct setting before its trials start, so that they do not all build them at once."""
    if cfg.data.root is None:  # a given data.root need only exist where the trials run
        data_paths(cfg.data)
    if cfg.model.pretrained == "synth":
        from dwlab.pretrain import cached_backbone

        cached_backbone(cfg.model.backbone, cfg.model.pretrain, log=log)


def build_datasets(cfg: Config) -> tuple[CocoDetection, CocoDetection]:
    train_ann, train_images, val_ann, val_images = data_paths(cfg.data)
    size = dict(min_size=cfg.data.min_size, max_size=cfg.data.max_size)
    train = CocoDetection(
        train_ann, train_images, flip_prob=cfg.data.flip_prob, min_size_range=cfg.data.train_min_size_range, **size
    )
    val = CocoDetection(val_ann, val_images, flip_prob=0.0, **size)
    if val.cat_ids != train.cat_ids:
        raise DwlabError(f"{val_ann}: categories differ from {train_ann}")
    return train, val


def require_boxes(dataset: CocoDetection) -> None:
    """A train split needs at least one box (an empty ``annotations`` list is fine for
    evaluating, not for training)."""
    n_anns = len(dataset.coco.dataset["annotations"])
    if n_anns == 0:
        raise DwlabError(f"{dataset.ann_file}: no annotations (the train split needs at least one box)")
    if dataset.num_boxes == 0:
        raise DwlabError(
            f"{dataset.ann_file}: no box to train on (all {n_anns} annotations are crowd or skipped)"
        )


def num_classes_of(cfg: Config, dataset: CocoDetection) -> int:
    n = cfg.model.num_classes
    if n is not None and n != dataset.num_classes:
        raise DwlabError(
            f"model.num_classes={n} but {dataset.ann_file} has {dataset.num_classes} categories"
        )
    return dataset.num_classes


def make_assigner(cfg: Config, num_classes: int) -> LabelAssigner:
    """``build_assigner``; a value the builder refuses (e.g. DW's ``pneg_low`` against its
    variant's ``pneg_high``) is a one-line ``DwlabError`` naming the section."""
    try:
        return build_assigner(cfg.assigner, num_classes)
    except ValueError as err:
        raise DwlabError(f"assigner.{cfg.assigner.name}: {err}") from None


def build_detector(cfg: Config, num_classes: int, assigner: LabelAssigner) -> FCOS:
    """``build_model`` with the head initialised as the method asks (``assign.base.head_init``:
    e.g. an objectness prior on the centerness branch, GFL's distribution head); the detector's
    default otherwise. A head the options cannot build is a one-line ``DwlabError``."""
    init = head_init(assigner)
    try:
        model = build_model(
            cfg.model, num_classes, centerness_bias=init.centerness_bias, reg_max=init.reg_max, dgqp=init.dgqp
        )
    except ValueError as err:
        raise DwlabError(f"model ({cfg.assigner.name}): {err}") from None
    learnable = getattr(assigner, "learnable", None)
    if learnable is not None:  # the method's own parameters train, save and move with the detector
        model.add_module("assigner", learnable)
    return model


def eval_detector(cfg: Config, num_classes: int) -> FCOS:
    """The detector a checkpoint of ``cfg`` was saved from (its method's ``learnable`` module
    included), untrained and without pretrained weights: ``load_state_dict`` it."""
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False})})
    return build_detector(cfg, num_classes, make_assigner(cfg, num_classes))


def head_options(cfg: Config, assigner: LabelAssigner) -> dict[str, Any]:
    """The head options a run builds (``build_model``'s rule): ``{"reg_max", "dgqp"}``, from
    ``model.*`` and the method's ``head_init``."""
    init = head_init(assigner)
    reg_max, dgqp = model_head_options(cfg.model, init.reg_max, init.dgqp)
    return {"reg_max": reg_max, "dgqp": dgqp}


def resolved_record(cfg: Config, assigner: LabelAssigner, device: torch.device) -> dict[str, Any]:
    """What a run resolves beyond its config: ``{"assigner": {name: assigner.resolved_params()}}``
    when the assigner has that method (DW: every constant after the variant table),
    ``{"loss_weights": assigner.loss_weights}`` and ``{"train": {"device", "precision",
    "deterministic", "cpu_isa"}}``: what ``train.device: auto`` and ``train.precision: null``
    became, whether a repeat gives the same numbers (always on the CPU; ``train.deterministic``
    on CUDA) and the CPU kernels' instruction set (bf16 and fp32 kernels differ between, e.g.,
    AVX2 and AVX512 machines), and ``training_revision`` (``dwlab.TRAINING_REVISION``)."""
    record: dict[str, Any] = {"training_revision": TRAINING_REVISION}
    resolved_params = getattr(assigner, "resolved_params", None)
    if resolved_params is not None:
        record["assigner"] = {cfg.assigner.name: resolved_params()}
    record["loss_weights"] = dict(assigner.loss_weights)
    head = head_options(cfg, assigner)
    if head["reg_max"] is not None:  # a distribution head, perhaps the method's (config.yaml: null)
        record["model"] = head
    record["train"] = {
        "device": device.type, "precision": resolve_precision(cfg.train, device),
        "deterministic": cfg.train.deterministic or device.type == "cpu",
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
    }  # fmt: skip
    return record


def write_run_config(out_dir: Path, cfg: Config, resolved: dict[str, Any]) -> None:
    """``config.yaml`` (the config as given) and ``resolved.yaml`` (``resolved_record``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_yaml(cfg))
    (out_dir / "resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DwlabError("train.device=cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def make_loader(dataset, batch_size: int, cfg: Config, *, train: bool, generator: torch.Generator | None) -> DataLoader:
    """Batches of ``data.coco.collate``: shuffled by ``generator`` when ``train``, in order
    otherwise; under data parallelism each rank gets its shard (``DistributedSampler``)."""
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=cfg.train.seed)
    else:
        sampler = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
    if train and cfg.data.group_by_aspect:
        batches = GroupedBatchSampler(sampler, orientation_groups(dataset), batch_size)
    else:
        batches = BatchSampler(sampler, batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=cfg.data.num_workers,
        collate_fn=functools.partial(collate, size_divisor=cfg.data.size_divisor),
        generator=generator,
        pin_memory=cfg.train.device != "cpu" and torch.cuda.is_available(),  # so non_blocking copies overlap
        # Workers start each epoch, seeded from ``generator`` (reseeded per epoch, _train_epoch):
        # a persistent worker's RNG would carry on across epochs, which a run resumed from a
        # checkpoint cannot reproduce (its workers start at the resumed epoch).
        persistent_workers=False,
    )


AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``train.precision`` on ``device``: itself, or (null) fp16 on CUDA and fp32 elsewhere."""
    return cfg.precision or ("fp16" if device.type == "cuda" else "fp32")


def precision(cfg: Config, device: torch.device) -> tuple[torch.amp.GradScaler | None, torch.dtype | None, torch.memory_format]:
    """How a step computes: (GradScaler or None, autocast dtype or None, memory format), the
    same on every device: fp32 none; fp16 fp16 autocast and a scaler; bf16 bf16 autocast (its
    range is fp32's: no scaler). ``train.channels_last``: NHWC activations. bf16 on a GPU
    without it (before compute capability 8.0) is a one-line ``DwlabError``."""
    name = resolve_precision(cfg.train, device)
    if name == "bf16" and device.type == "cuda" and (capability := torch.cuda.get_device_capability(device)) < (8, 0):
        raise DwlabError(
            f"train.precision=bf16: {torch.cuda.get_device_name(device)} (compute capability "
            f"{capability[0]}.{capability[1]}) has no bf16; use fp16"
        )
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return scaler, AUTOCAST_DTYPES[name], memory_format


def set_determinism(enabled: bool, device: torch.device) -> None:
    """``train.deterministic`` on ``device``: on CUDA, cuDNN's deterministic algorithms without
    autotuning, cuBLAS with a fixed workspace and torch's deterministic mode (warning, not
    failing, on an op that has no deterministic CUDA kernel); nothing on the CPU, whose
    kernels are deterministic for a fixed thread count."""
    if device.type != "cuda":
        return
    if enabled:  # read by cuBLAS when it first starts in this process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``param_groups`` (no weight decay on norms, biases, scales)."""
    groups = param_groups(model, cfg.train.weight_decay)
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model: FCOS, dataset: CocoDetection, cfg: Config, device: torch.device, detections_path: Path | None = None
) -> dict[str, float]:
    """COCO bbox metrics of ``model`` on ``dataset``; with ``detections_path``, its detections
    are written there too (COCO results json: image_id, category_id, bbox xywh in the image's
    pixels, score), to re-score or visualise without running inference again.

    Under data parallelism every rank must call it: each scores its shard of the images, rank 0
    gathers the detections, writes them and runs COCOeval, and every rank gets the metrics."""
    results, image_ids, skipped = detect(model, dataset, cfg, device)
    if is_distributed():
        results, image_ids, skipped = _gather_shards(results, image_ids, skipped)
        if rank() != 0:
            shared = [None]
            dist.broadcast_object_list(shared, src=0)
            return shared[0]
    if skipped and not image_ids:
        raise DwlabError(f"evaluation on {dataset.ann_file}: no image could be read; {_skipped_line(skipped)}")
    if skipped:
        _warn(f"warning: evaluation on {dataset.ann_file}: {_skipped_line(skipped)}, left out of the metrics")
    if detections_path is not None:
        _write_json(detections_path, results)
    metrics = coco_evaluate(dataset.coco, results, image_ids if skipped else dataset.image_ids)
    if is_distributed():
        dist.broadcast_object_list([metrics], src=0)
    return metrics


def detect(
    model: FCOS, dataset: CocoDetection, cfg: Config, device: torch.device
) -> tuple[list[dict], list[int], list[SkippedImage]]:
    """``model``'s detections on ``dataset`` at ``eval.*`` settings, as COCO result entries
    (image_id, category_id, bbox xywh in the image's pixels, score); the ids of the images
    scored and the images that could not be read."""
    # its own generator: evaluating must not advance the global RNG that training draws from
    loader = make_loader(dataset, cfg.eval.batch_size, cfg, train=False, generator=torch.Generator().manual_seed(0))
    skipped: list[SkippedImage] = []
    detections, targets = predict(model, loader, device, skipped=skipped, **postprocess_settings(cfg.eval))
    image_ids = [t.image_id for t in targets]
    return to_coco_results(detections, image_ids, [t.scale for t in targets], dataset.cat_ids), image_ids, skipped


def _gather_shards(results: list[dict], image_ids: list[int], skipped: list) -> tuple[list[dict], list[int], list]:
    """Every rank's detections, image ids and unreadable images, on rank 0 (others get theirs
    back). An image that ``DistributedSampler`` gave two ranks (it pads the shards to one
    length) is counted once."""
    shards = [None] * world_size() if rank() == 0 else None
    dist.gather_object((results, image_ids, skipped), shards, dst=0)
    if rank() != 0:
        return results, image_ids, skipped
    seen: set[int] = set()
    merged_results, merged_ids, merged_skipped = [], [], []
    for shard_results, shard_ids, shard_skipped in shards:
        new = {i for i in shard_ids if i not in seen}
        merged_ids += [i for i in dict.fromkeys(shard_ids) if i in new]
        merged_results += [r for r in shard_results if r["image_id"] in new]
        seen |= new
        known = {x.path for x in merged_skipped}
        merged_skipped += [s for s in shard_skipped if s.path not in known]
    return merged_results, merged_ids, merged_skipped


def _skipped_line(skipped: list[SkippedImage], shown: int = 5) -> str:
    """``"skipped 2 unreadable image(s): a.png, b.png (first: cannot decode image (...))"``"""
    paths = [s.path for s in skipped[:shown]]
    if len(skipped) > shown:
        paths.append(f"... {len(skipped) - shown} more")
    first = skipped[0].reason.removeprefix(f"{skipped[0].path}: ")
    return f"skipped {len(skipped)} unreadable image(s): {', '.join(paths)} (first: {first})"


def run_evaluation(cfg: Config, checkpoint_path: Path, out_path: Path | None = None) -> dict[str, float]:
    """Evaluate a checkpoint on the config's val set; writes ``out_path`` (json) and, beside
    it, the detections (``detections.json``) if given."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    state = checkpoint.load(Path(checkpoint_path))
    _, val = build_datasets(cfg)
    device = pick_device(cfg.train.device)
    model = model_with_weights(cfg, state, num_classes_of(cfg, val), Path(checkpoint_path))
    detections = None if out_path is None else Path(out_path).with_name(DETECTIONS)
    metrics = evaluate(model.to(device), val, cfg, device, detections)
    if out_path is not None:
        _write_json(Path(out_path), metrics)
    return metrics


def model_with_weights(cfg: Config, state: dict[str, Any], num_classes: int, checkpoint_path: Path) -> FCOS:
    """The config's detector (its method's ``learnable`` module included) with the weights of
    checkpoint ``state`` (read from ``checkpoint_path``); no pretrained weights are loaded first."""
    model = eval_detector(cfg, num_classes)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise DwlabError(f"{checkpoint_path}: does not match the config's model ({str(err).splitlines()[0]})") from None
    return model


def results_name(ann_file: Path) -> str:
    """The evaluation server's file name for the detections on ``ann_file``'s images:
    ``image_info_test-dev2017.json`` -> ``detections_test-dev2017_dwlab_results.json``."""
    split = Path(ann_file).stem.removeprefix("image_info_").removeprefix("instances_")
    return f"detections_{split}_dwlab_results.json"


def run_detection(cfg: Config, checkpoint_path: Path, ann_file: Path, image_dir: Path, out_path: Path) -> int:
    """Detect on the images listed in ``ann_file`` (an image-info json: its ``annotations``, if
    any, are not used) under ``image_dir`` at the eval settings, and write the COCO results json
    (a list of image_id, category_id, bbox xywh, score) that COCO's evaluation server takes.
    Labels map to the file's category ids in sorted order, as training maps its split's (COCO's
    image-info files list the same 80 categories as instances_train2017.json). Returns the
    number of detections written. An image that cannot be read is left out with a warning;
    none readable is an error."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    state = checkpoint.load(Path(checkpoint_path))
    size = dict(min_size=cfg.data.min_size, max_size=cfg.data.max_size)
    images = CocoDetection(ann_file, image_dir, images_only=True, **size)
    device = pick_device(cfg.train.device)
    model = model_with_weights(cfg, state, num_classes_of(cfg, images), Path(checkpoint_path))
    results, image_ids, skipped = detect(model.to(device), images, cfg, device)
    if skipped and not image_ids:
        raise DwlabError(f"{ann_file}: no image could be read; {_skipped_line(skipped)}")
    if skipped:
        _warn(f"warning: {ann_file}: {_skipped_line(skipped)}, left out of the results")
    _write_json(Path(out_path), results, indent=None)  # test-dev: 2 million entries, one line
    return len(results)


def _write_json(path: Path, payload: dict | list, indent: int | None = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- training


def _progress(enabled: bool, total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.2f} it/s"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
        disable=not enabled,
    )
    task = progress.add_task(description, total=total, rate=0.0, losses="")
    return progress, task


@dataclass
class _Run:
    """The parts of one training run (``_build_run``)."""

    cfg: Config
    out_dir: Path
    model: FCOS  # the bare model: checkpoints and evaluation
    step: TrainStep  # its model is the DDP wrapper under data parallelism
    loader: DataLoader
    generator: torch.Generator  # shuffles the train split; reseeded each epoch
    val_set: CocoDetection
    resolved: dict[str, Any]
    state: StepState

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def run_training(
    cfg: Config,
    out_dir: Path,
    *,
    resume: bool = False,
    on_epoch_end: Callable[[EpochReport], None] | None = None,
) -> RunResult:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its last checkpoint."""
    if rank() == 0:
        _warn_paper_schedule(cfg)
    run = _build_run(cfg, Path(out_dir))
    start_epoch, history = _resume(run) if resume else (0, [])
    if rank() == 0:
        write_run_config(run.out_dir, cfg, run.resolved)
    if is_distributed():  # after resuming: every rank starts from the same weights
        device = run.step.device
        run.step.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    images_seen = int(history[-1]["images_seen"]) if history else 0
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        metrics = _train_epoch(run, epoch)
        images_seen += int(metrics.pop("images")) * world_size()
        metrics["images_seen"] = float(images_seen)
        if epoch + 1 == cfg.train.epochs or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0):
            metrics.update(evaluate(run.model, run.val_set, cfg, run.step.device, run.out_dir / DETECTIONS))
        ckpt_path = _record_epoch(run, epoch, metrics, history) if rank() == 0 else None
        if on_epoch_end is not None:
            on_epoch_end(EpochReport(epoch + 1, cfg.train.epochs, metrics, ckpt_path, run.resolved))
    final = {k: metrics[k] for k in FINAL_METRICS if k in metrics}
    if not final and history:  # resumed after the last epoch: nothing left to train
        final = {k: history[-1][k] for k in FINAL_METRICS if k in history[-1]}
    if rank() == 0 and final:
        _write_json(run.out_dir / "eval.json", final)
    return RunResult(run.out_dir, final, max(start_epoch, cfg.train.epochs), run.resolved)




def _warn_paper_schedule(cfg: Config) -> None:
    """One line when a ``scale: paper`` run keeps the paper's lr on another number of images per
    step than the paper's (its numbers would not be comparable)."""
    images = world_size() * cfg.train.batch_size
    if cfg.scale == "paper" and cfg.train.lr == paper.LR and images != paper.IMAGES_PER_STEP:
        _warn(
            f"warning: scale paper: lr {paper.LR:g} is the paper's for {paper.IMAGES_PER_STEP} images per step "
            f"(8 GPUs x 2); this run steps on {images} ({world_size()} worker(s) x {cfg.train.batch_size}): set "
            f"train.lr={paper.LR * images / paper.IMAGES_PER_STEP:g} (linear scaling), or run the paper's 8 x 2 "
            "through `dwlab sweep ... --scale paper` on a GPU cluster (README)"
        )


def _build_run(cfg: Config, out_dir: Path) -> _Run:
    """Seeds, data, model, assigner (wrapped by ``faults`` when asked), optimizer, precision."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # each rank its own random stream (flips, loader workers); rank 0's is one process's, and
    # DDP starts every rank from rank 0's initial weights
    seed_everything(cfg.train.seed + RANK_SEED_STRIDE * rank())
    train_set, val_set = build_datasets(cfg)
    require_boxes(train_set)
    num_classes = num_classes_of(cfg, train_set)
    device = pick_device(cfg.train.device)
    set_determinism(cfg.train.deterministic, device)
    assigner = make_assigner(cfg, num_classes)
    model = build_detector(cfg, num_classes, assigner).to(device)
    resolved = resolved_record(cfg, assigner, device)
    assigner = faults.wrap(assigner, out_dir)  # itself unless $DWLAB_FAULTS names this run
    optimizer = make_optimizer(model, cfg)
    scaler, autocast_dtype, memory_format = precision(cfg, device)
    model = model.to(memory_format=memory_format)
    step = TrainStep(model, assigner, optimizer, device, scaler, autocast_dtype, memory_format, cfg.train.grad_clip)
    generator = torch.Generator()
    loader = make_loader(train_set, cfg.train.batch_size, cfg, train=True, generator=generator)
    return _Run(cfg, out_dir, model, step, loader, generator, val_set, resolved, StepState())


def _resume(run: _Run) -> tuple[int, list[dict]]:
    """Load the run directory's latest loadable checkpoint into ``run``; returns (epochs done,
    their ``metrics.jsonl`` rows). (0, []) when there is no checkpoint yet; a ``DwlabError``
    when there are checkpoints and none of them loads."""
    saved = checkpoint.load_latest(run.ckpt_dir, warn=_warn)
    if saved is None:
        if any(run.ckpt_dir.glob("*.pt")):
            raise DwlabError(f"{run.ckpt_dir}: no loadable checkpoint to resume from")
        return 0, []
    _check_revision(saved, run.ckpt_dir)
    run.model.load_state_dict(saved["model"])
    if "optimizer" not in saved:  # checkpoint.keep_weights_only: a finished run's
        if int(saved["epoch"]) < run.cfg.train.epochs:
            raise DwlabError(
                f"{run.ckpt_dir}: holds the weights of epoch {saved['epoch']} only, without the optimizer "
                f"state needed to train to epoch {run.cfg.train.epochs}"
            )
    else:
        run.step.optimizer.load_state_dict(saved["optimizer"])
    if run.step.scaler is not None and "scaler" in saved:
        run.step.scaler.load_state_dict(saved["scaler"])
    start_epoch, run.state.iteration = int(saved["epoch"]), int(saved["iteration"])
    history = _read_history(run.out_dir / METRICS, start_epoch, rewrite=rank() == 0)
    _read_history(run.out_dir / TIMING, start_epoch, rewrite=rank() == 0)
    torch.set_rng_state(saved["rng"])
    return start_epoch, history


def _check_revision(saved: dict[str, Any], ckpt_dir: Path) -> None:
    """Refuse a checkpoint of another ``TRAINING_REVISION``: its run resumed here would train to
    neither revision's numbers. Checkpoints written before ``resolved_record`` held the revision
    (dwlab 0.1.0 before a92bafb) cannot be checked: a warning says so."""
    revision = saved.get("resolved", {}).get("training_revision")  # resolved_record's
    if revision is None:
        _warn(f"{ckpt_dir}: the checkpoint does not record its training revision; resuming it as revision "
              f"{TRAINING_REVISION} unchecked")  # fmt: skip
    elif int(revision) != TRAINING_REVISION:
        raise DwlabError(
            f"{ckpt_dir}: the checkpoint is of training revision {revision}, this dwlab trains revision "
            f"{TRAINING_REVISION}; train it again in a new run directory"
        )


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """Epoch ``epoch`` (0-based): the metrics of ``train_one_epoch`` averaged over workers, with
    this worker's ``images`` and every worker's ``skipped_images``."""
    cfg = run.cfg
    run.generator.manual_seed(cfg.train.seed * 100_003 + epoch + RANK_SEED_STRIDE * rank())
    if hasattr(run.step.assigner, "set_epoch"):  # e.g. TOOD's ATSS warm-up epochs
        run.step.assigner.set_epoch(epoch)
    sampler = run.loader.batch_sampler.sampler  # the loader batches its batch sampler's indices
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    iters = min(len(run.loader), cfg.train.max_iters_per_epoch or len(run.loader))
    progress, task = _progress(cfg.train.progress and rank() == 0, iters, f"epoch {epoch + 1}/{cfg.train.epochs}")

    def on_step(step: dict[str, float]) -> None:  # the terms come every engine.LOG_EVERY steps
        shown = " ".join(f"{k}={v:.3f}" for k, v in step.items() if k.startswith("loss"))
        progress.update(task, advance=1, rate=progress.tasks[0].speed or 0.0, **({"losses": shown} if shown else {}))

    lr_kwargs = dict(base_lr=cfg.train.lr, warmup_iters=cfg.train.warmup_iters, warmup_ratio=cfg.train.warmup_ratio,
                     steps=cfg.train.lr_steps, gamma=cfg.train.lr_gamma)  # fmt: skip
    skipped: list[SkippedImage] = []
    with progress:
        metrics = train_one_epoch(
            run.step, run.loader, lambda it: lr_at(it, epoch, **lr_kwargs), run.state,
            max_iters=cfg.train.max_iters_per_epoch, on_step=on_step, skipped=skipped,
        )  # fmt: skip
    device = run.step.device
    metrics = mean_over_workers(metrics, device)
    metrics["skipped_images"] = sum_over_workers(metrics["skipped_images"], device)
    _report_skipped(epoch + 1, cfg.train.epochs, skipped, metrics)
    return metrics


def _record_epoch(run: _Run, epoch: int, metrics: dict[str, float], history: list[dict]) -> Path | None:
    """Rank 0: the checkpoint of epoch ``epoch`` (0-based; when ``train.save_checkpoints``) and
    its ``metrics.jsonl`` and ``timing.jsonl`` lines; returns the checkpoint's path."""
    ckpt_path = None
    if run.cfg.train.save_checkpoints:
        scaler = run.step.scaler
        ckpt_path = checkpoint.save_atomic(
            {
                "model": run.model.state_dict(),
                "optimizer": run.step.optimizer.state_dict(),
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                "epoch": epoch + 1,
                "iteration": run.state.iteration,
                "rng": torch.get_rng_state(),
                "config": to_dict(run.cfg),
                "resolved": run.resolved,
                "dwlab_version": __version__,
            },
            run.ckpt_dir,
        )
    row = {"epoch": epoch + 1, **{k: v for k, v in metrics.items() if k not in WALL_CLOCK}}
    history.append(row)
    with open(run.out_dir / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
    with open(run.out_dir / TIMING, "a") as f:
        f.write(json.dumps({"epoch": epoch + 1, **{k: metrics[k] for k in WALL_CLOCK if k in metrics}}) + "\n")
    return ckpt_path


def _report_skipped(epoch: int, epochs: int, skipped: list[SkippedImage], metrics: dict[str, float]) -> None:
    """One warning line naming this worker's unreadable images of the epoch (``skipped``); a
    ``DwlabError`` when no image could be read at all. ``metrics``: the epoch's, with this
    worker's ``images`` and every worker's ``skipped_images`` (all workers step over the same
    batches, so either all of them trained on something or none did)."""
    if not metrics["skipped_images"]:
        return
    where = f" (rank {rank()})" if is_distributed() else ""
    detail = _skipped_line(skipped) if skipped else "the unreadable images were on other workers"
    if metrics["images"] == 0:
        raise DwlabError(f"epoch {epoch}: no image could be read{where}; {detail}")
    if skipped:
        _warn(f"warning: epoch {epoch}/{epochs}{where}: {detail}, left out of training")


def _read_history(path: Path, up_to_epoch: int, rewrite: bool = True) -> list[dict]:
    """The per-epoch lines of ``metrics.jsonl`` up to ``up_to_epoch``; with ``rewrite`` (rank 0
    only: one writer) the file is rewritten without later lines, which a killed run may have left."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("epoch", 0) <= up_to_epoch:
            rows.append(row)
    if rewrite:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _warn(message: str) -> None:
    import sys

    print(message, file=sys.stderr)
