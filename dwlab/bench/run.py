"""``dwlab bench``: run the selected parts, print and write one markdown report of figures and
ratios measured side by side, with each target and whether it was met."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dwlab.bench.measure import busy_load, interleaved_medians, machine_info
from dwlab.config import Config, load_config
from dwlab.data.synth import CATEGORIES
from dwlab.errors import DwlabError

PARTS = ("train", "throughput", "loss", "eval", "data", "sweep")
SCALES = ("smoke", "mini", "paper")
BUSY_LOAD = 1.0  # a load average from which the report warns that its figures are not an idle machine's
#: classes of the training-step part: COCO's 80, except at the learning scale, whose steps read
#: beside its trials (Table 6's "train ms/step") on its generated data's
TRAIN_CLASSES = {"smoke": 80, "mini": len(CATEGORIES), "paper": 80}
THROUGHPUT_PRESETS = ("smoke", "mini")  # today's fp32 step against the learning scale's
PRECISION_NAMES = {"fp32": "fp32", "fp16": "fp16 autocast + GradScaler", "bf16": "bf16 autocast"}


@dataclass
class BenchOptions:
    device: str = "cpu"
    scale: str = "smoke"  # the preset the training step, eval and data parts use
    parts: tuple[str, ...] = PARTS
    reps: int = 20
    warmup: int = 3
    gt_counts: tuple[int, ...] = (5, 20, 50, 100, 200)
    loss_image: tuple[int, int] = (800, 1333)  # ~22k anchors on P3-P7
    eval_images: int = 500
    load_batches: int = 60  # long enough that the prefetched batches do not flatter the loader
    sweep_trials: int = 4
    sweep_concurrent: int = 2
    threads: int | None = None  # torch threads (default: torch's own choice)
    command: str = "dwlab bench"
    set_: list[str] = field(default_factory=list)


@dataclass
class Check:
    target: str
    measured: str
    met: bool


def busy_note(load: float | None, cores: int) -> list[str]:
    """The report's warning (markdown lines) when other work kept the machine busy at the start."""
    if load is None or load < BUSY_LOAD:
        return []
    return [
        f"> **The machine was busy** (load {load:.1f} at the start, {cores} cores): bursts of other "
        "work skew candidates unevenly even round-robin (seen: a few of the training steps 30-60 % "
        "slower beside two training runs than on an idle pass); re-run on an idle machine before "
        "reading its ratios.", "",
    ]


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise DwlabError(f"--device: expected cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DwlabError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


Section = tuple[list[str], list[Check]]  # markdown lines of a part, its targets


def _train_section(cfg: Config, device: torch.device, step_s: dict[str, float], num_classes: int) -> Section:
    from dwlab.bench.train_step import CANDIDATES, GTS_PER_IMAGE
    from dwlab.runner import resolve_precision

    base, fcos, m = step_s["dwlab DW"], step_s["dwlab FCOS assigner"], cfg.model
    rows = [
        [name, f"{step_s[name] * 1e3:.1f}", f"{step_s[name] / base:.2f}", f"{step_s[name] / fcos:.2f}"]
        for name in CANDIDATES
    ]
    prec = PRECISION_NAMES[resolve_precision(cfg.train, device)]
    lines = [
        "## Training step (forward + loss + backward + SGD step)", "",
        f"{m.backbone}, FPN {m.fpn_channels}, {m.head_convs}-conv GN({m.head_norm_groups}) head, "
        f"{num_classes} classes, batch {cfg.train.batch_size} of {cfg.data.min_size}x{cfg.data.max_size} random "
        f"images, {GTS_PER_IMAGE} random GTs each, {prec}. "
        "torchvision's FCOS gets the same backbone + FPN and head depth; it normalises and "
        "batches its images inside the step (its transform), dwlab's loader does that before.", "",
        "`dwlab <method>`: the same detector with that method's assigner (its head initialisation "
        "and learnable parameters included); the last column is its training-time cost over FCOS's.", "",
        *_table(["model", "ms / step", "/ dwlab DW", "/ dwlab FCOS assigner"], rows),
    ]  # fmt: skip
    r1, r2 = base / step_s["dwlab FCOS assigner"], base / step_s["torchvision FCOS"]
    return lines, [
        Check("train step DW / FCOS assigner <= 1.05", f"{r1:.2f}", r1 <= 1.05),
        Check("train step dwlab DW / torchvision FCOS <= 1.0", f"{r2:.2f}", r2 <= 1.0),
    ]


def _throughput_section(opts: BenchOptions, device: torch.device) -> Section:
    from dwlab.bench.throughput import step_fn
    from dwlab.runner import resolve_precision

    if device.type != "cpu":
        return ["## Training images / s per thread", "", "Measured on the CPU only (`--device cpu`)."], []
    configs = {name: load_config(name, opts.set_) for name in THROUGHPUT_PRESETS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fns = {name: step_fn(cfg, device) for name, cfg in configs.items()}
        step_s = interleaved_medians(fns, reps=opts.reps, warmup=opts.warmup, device=device)
    finally:
        torch.set_num_threads(threads)
    ips = {name: configs[name].train.batch_size / step_s[name] for name in configs}
    rows = []
    for name, cfg in configs.items():
        m, t = cfg.model, cfg.train
        prec = PRECISION_NAMES[resolve_precision(t, device)]
        rows.append([name, f"{m.backbone}, frozen stages {m.frozen_stages}", str(t.batch_size),
                     prec + (", channels_last" if t.channels_last else ""), f"{step_s[name] * 1e3:.0f}",
                     f"{ips[name]:.1f}", f"{ips[name] / ips['smoke']:.2f}x"])  # fmt: skip
    ratio = ips["mini"] / ips["smoke"]
    lines = [
        "## Training images / s per thread", "",
        "One whole training step of each preset (`engine.train_one_epoch` on one fixed batch: its "
        "model, DW assigner, optimizer, precision), 1 torch thread, random images of the preset's "
        "size, 6 classes. `smoke` is the fp32 step the smoke scale trains with; `mini` the "
        "learning scale's.", "",
        *_table(["preset", "backbone", "batch", "precision", "ms / step", "images / s", "/ smoke"], rows),
    ]  # fmt: skip
    return lines, [Check("mini training images/s per thread >= 2x the smoke fp32 step", f"{ratio:.2f}x", ratio >= 2.0)]


def _loss_section(opts: BenchOptions, device: torch.device) -> Section:
    from dwlab.bench.loss import bench_losses

    h, w = opts.loss_image
    rows = bench_losses(opts.gt_counts, height=h, width=w, device=device, reps=opts.reps, warmup=opts.warmup)
    mem = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) in a fresh process"
    lines = [
        "## DW weights + loss alone (forward + backward on fixed head outputs)", "",
        f"One {h}x{w} image ({rows[0]['anchors']} anchors on P3-P7), 80 classes, random GTs. "
        "`loop`: a per-GT Python loop of the same equations (`dwlab/bench/reference.py`, the "
        "released code's structure); its loss agrees with dwlab's to the relative difference "
        f"shown. `fcos`: the FCOS assigner's loss on the same outputs. Peak memory: {mem}, "
        "above what was allocated before the call.", "",
        *_table(
            ["GTs", "pairs", "agree", "dw ms", "loop ms", "fcos ms", "loop / dw", "dw / fcos",
             "dw MiB", "loop MiB", "fcos MiB"],
            [[str(r["gts"]), str(r["pairs"]), f"{r['agree']:.1e}", f"{r['dw_ms']:.1f}", f"{r['loop_ms']:.1f}",
              f"{r['fcos_ms']:.1f}", f"{r['loop_ms'] / r['dw_ms']:.1f}x", f"{r['dw_ms'] / r['fcos_ms']:.2f}",
              f"{r['dw_mib']:.0f}", f"{r['loop_mib']:.0f}", f"{r['fcos_mib']:.0f}"] for r in rows],
        ),
    ]  # fmt: skip
    speedups = {r["gts"]: r["loop_ms"] / r["dw_ms"] for r in rows}
    worst = min(speedups.values())
    checks = [Check("DW loss never slower than the per-GT loop", f"min {worst:.1f}x", worst >= 1.0)]
    at, need = (200, 2.0) if device.type == "cpu" else (50, 10.0)
    if at in speedups:
        checks.append(Check(f"DW loss >= {need:g}x the loop at {at} GTs ({device.type})",
                            f"{speedups[at]:.1f}x", speedups[at] >= need))  # fmt: skip
    ratio = max(r["dw_ms"] / r["fcos_ms"] for r in rows)
    checks.append(Check("DW loss <= 1.5x the FCOS loss (all GT counts)", f"max {ratio:.2f}", ratio <= 1.5))
    big = max(rows, key=lambda r: r["gts"])
    peak_mb = big["dw_mib"] * 2**20 / 1e6
    checks.append(Check(f"DW loss peak memory <= 200 MB at {big['gts']} GTs", f"{peak_mb:.0f} MB", peak_mb <= 200))
    return lines, checks


def _eval_section(cfg: Config, data_cfg: Config, val_set, device: torch.device) -> Section:
    from dwlab.bench.pipeline import bench_eval

    e = bench_eval(data_cfg, val_set, device)
    total = e["infer_s"] + e["cocoeval_s"]
    return [
        f"## Evaluation of a {e['images']}-image val set", "",
        f"Generated images of {cfg.data.min_size} px, random-init model with the score threshold at 0 "
        f"so every image keeps {cfg.eval.max_dets} detections ({e['detections']} in all: "
        f"COCOeval's worst case); eval batch {cfg.eval.batch_size}.", "",
        *_table(["inference s", "COCOeval s", "total s", "images / s"],
                [[f"{e['infer_s']:.1f}", f"{e['cocoeval_s']:.1f}", f"{total:.1f}", f"{e['images'] / total:.1f}"]]),
    ], []  # fmt: skip


def _data_section(cfg: Config, data_cfg: Config, train_set, batches: int, step_s: float) -> Section:
    from dwlab.bench.pipeline import bench_loading

    d = bench_loading(data_cfg, train_set, batches)
    train_ips = cfg.train.batch_size / step_s
    ratio = d["images_per_s"] / train_ips
    return [
        "## Data loading vs training throughput", "",
        f"The training loader alone ({d['workers']} worker(s), PNG decode, resize, flip, collate) over "
        f"{d['images']} generated images, against the dwlab DW training step above.", "",
        *_table(["loader images / s", "training images / s", "ratio"],
                [[f"{d['images_per_s']:.1f}", f"{train_ips:.1f}", f"{ratio:.1f}x"]]),
    ], [Check("data loading >= 3x training throughput", f"{ratio:.1f}x", ratio >= 3.0)]  # fmt: skip


def _sweep_section(opts: BenchOptions, device: torch.device) -> Section:
    from dwlab.bench.sweep import TRIAL_SET, bench_sweep

    s = bench_sweep(opts.sweep_trials, opts.sweep_concurrent, device=device.type)
    share = f", {s['gpus_per_trial']:g} GPU" if s["gpus_per_trial"] else ""
    lines = [
        "## Sweep concurrency", "",
        f"{s['trials']} trials of the smoke preset with {TRIAL_SET} (1 CPU{share} and 1 thread each; "
        f"trained on {s['devices']}, like the single run) "
        "through `dwlab.sweep` on a fresh local Ray each, with a throw-away MLflow sqlite store. "
        "Sweep walls start once Ray is up (its start, once per sweep, is timed apart). Overhead "
        "per trial: the sequential wall per trial minus the same training as one plain "
        "`run_training` call.", "",
        *_table(["one run_training s", "sequential s", f"{s['concurrent']} at a time s", "speed-up",
                 "overhead / trial s", "Ray start s"],
                [[f"{s['single_s']:.1f}", f"{s['sequential_s']:.1f}", f"{s['concurrent_s']:.1f}",
                  f"{s['speedup']:.2f}x", f"{s['overhead_per_trial_s']:.1f}", f"{s['ray_start_s']:.1f}"]]),
    ]  # fmt: skip
    overhead = s["overhead_per_trial_s"]
    return lines, [
        Check(f"{s['concurrent']} trials at once >= 1.7x sequential", f"{s['speedup']:.2f}x", s["speedup"] >= 1.7),
        Check("overhead per trial < 5 s (Ray start, once per sweep, apart)", f"{overhead:.1f} s", overhead < 5.0),
    ]


def run_bench(opts: BenchOptions, echo: Callable[[str], None] = print) -> str:
    """Run ``opts.parts`` and return the report (markdown); ``echo`` gets each section as it is done."""
    unknown = [p for p in opts.parts if p not in PARTS]
    if unknown:
        raise DwlabError(f"--parts: unknown part {unknown[0]!r} (expected some of {', '.join(PARTS)})")
    if opts.scale not in SCALES:
        raise DwlabError(f"--scale: expected one of {', '.join(SCALES)}, got {opts.scale!r}")
    device = _device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfg = load_config(opts.scale, opts.set_)
    load = busy_load()  # before the bench's own work adds to it
    info = machine_info(device, load)  # before a part changes the thread count
    checks: list[Check] = []
    sections: list[str] = []

    def emit(section: Section) -> None:
        text = "\n".join(section[0]) + "\n"
        sections.append(text)
        checks.extend(section[1])
        echo(text)

    step_s: dict[str, float] = {}
    if "train" in opts.parts or "data" in opts.parts:  # the data part compares with the DW step
        from dwlab.bench.train_step import step_fns

        fns = step_fns(cfg, TRAIN_CLASSES[opts.scale], device)
        step_s = interleaved_medians(fns, reps=opts.reps, warmup=opts.warmup, device=device)
    if "train" in opts.parts:
        emit(_train_section(cfg, device, step_s, TRAIN_CLASSES[opts.scale]))
    if "throughput" in opts.parts:
        emit(_throughput_section(opts, device))
    if "loss" in opts.parts:
        emit(_loss_section(opts, device))
    if "eval" in opts.parts or "data" in opts.parts:
        from dwlab.bench.pipeline import generated_datasets

        n_train = (opts.load_batches + 1) * cfg.train.batch_size
        data_cfg, train_set, val_set = generated_datasets(cfg, n_train, opts.eval_images)
        if "eval" in opts.parts:
            emit(_eval_section(cfg, data_cfg, val_set, device))
        if "data" in opts.parts:
            emit(_data_section(cfg, data_cfg, train_set, opts.load_batches, step_s["dwlab DW"]))
    if "sweep" in opts.parts:
        emit(_sweep_section(opts, device))

    head = [
        f"# dwlab bench ({opts.scale} scale, {device.type})", "",
        f"`{opts.command}`, {datetime.date.today().isoformat()}. Each time is the median of {opts.reps} "
        f"repetitions after {opts.warmup} warm-up ones, candidates run round-robin.", "",
        *busy_note(load, os.cpu_count() or 1),
        *_table(["machine", ""], [[k, v] for k, v in info.items()]), "",
        "## Targets", "",
        *_table(["target", "measured", "met"], [[c.target, c.measured, "yes" if c.met else "**no**"] for c in checks]),
        "",
    ]  # fmt: skip
    return "\n".join(head) + "\n" + "\n".join(sections)


def write_report(text: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
