"""The ``dwlab`` command. Each command is a thin wrapper: parse, call one function, report.

User errors (``DwlabError``) print one line ``error: ...`` on stderr and exit with code 2.
Heavy imports (torch, ray, mlflow) happen inside the commands so ``dwlab --help`` is quick.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer

from dwlab.assign import WEIGHT_METHODS
from dwlab.errors import DwlabError, NonFiniteLoss
from dwlab.sweep.tracking import UI_HOST

DESCRIPTION = "Reproduce the Dual Weighting label-assignment paper (CVPR 2022) on FCOS."  # dwlab --help
app = typer.Typer(add_completion=False, no_args_is_help=True, help=DESCRIPTION)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the embedded default.")
app.add_typer(data_app, name="data")
plot_app = typer.Typer(no_args_is_help=True, help="Figures of the paper: P_neg curves, weight maps, Table 1.")
app.add_typer(plot_app, name="plot")

F = TypeVar("F", bound=Callable)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Dotted override, e.g. --set train.epochs=2 (repeatable)."),
]


def user_errors(fn: F) -> F:
    """Turn a ``DwlabError`` into one line on stderr and exit code 2, a diverged training
    (``NonFiniteLoss``) into one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DwlabError as err:
            typer.echo(f"error: {one_line(err)}", err=True)
            raise typer.Exit(2) from None
        except NonFiniteLoss as err:
            typer.echo(f"error: {one_line(err)}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def one_line(err: Exception) -> str:
    """The message of ``err``; for an error re-raised from a DataLoader worker (whose message
    carries the worker's traceback) the original message, without the traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


@app.command()
@user_errors
def train(
    config: Annotated[str, typer.Argument(help="Config file or preset name (smoke, mini, paper).")],
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's last checkpoint.")] = False,
) -> None:
    """Train a detector; evaluates on the val set and writes eval.json beside the checkpoint."""
    from dwlab.config import load_config
    from dwlab.runner import run_training

    cfg = load_config(config, set_ or [])
    out_dir = out or Path("runs") / cfg.name
    result = run_training(cfg, out_dir, resume=resume)
    typer.echo(f"run directory: {out_dir}")
    typer.echo("final: " + " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))


@app.command()
@user_errors
def pretrain(
    config: Annotated[str, typer.Argument(help="Config file or preset name: its model.backbone and model.pretrain.")],
    set_: SetOption = None,
) -> None:
    """Build (or find) the cached domain-pretrained backbone that model.pretrained=synth loads."""
    from dwlab.config import load_config
    from dwlab.pretrain import cache_path, cached_backbone

    cfg = load_config(config, set_ or [])
    path = cache_path(cfg.model.backbone, cfg.model.pretrain)
    if path.is_file():
        typer.echo(f"cached: {path}")
        return
    cached_backbone(cfg.model.backbone, cfg.model.pretrain, log=typer.echo)


@app.command("eval")
@user_errors
def eval_(
    config: Annotated[str, typer.Argument(help="Config file or preset name.")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint file (.pt).")],
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write eval.json (default: beside the checkpoint); with --images-only, the results json.")] = None,
    images_only: Annotated[Optional[Path], typer.Option(help="An image-info json without labels (COCO's annotations/image_info_test-dev2017.json): detect on its images and write the results json the evaluation server takes, no metrics.")] = None,
    image_dir: Annotated[Optional[Path], typer.Option(help="With --images-only: the folder of its images (COCO's test2017).")] = None,
) -> None:
    """Evaluate a checkpoint on the config's val set (COCO bbox AP through pycocotools), or
    write its detections on an unlabelled split for COCO's evaluation server (--images-only)."""
    from dwlab.config import load_config

    if (images_only is None) != (image_dir is None):
        raise DwlabError("--images-only and --image-dir go together (the image-info json and its image folder)")
    cfg = load_config(config, set_ or [])
    if images_only is not None:
        from dwlab.runner import results_name, run_detection

        path = out or checkpoint.parent / results_name(images_only)
        count = run_detection(cfg, checkpoint, images_only, image_dir, path)
        typer.echo(f"wrote {count} detections to {path} (COCO results format; README: \"Test-dev\")")
        return
    from dwlab.runner import run_evaluation

    metrics = run_evaluation(cfg, checkpoint, out or checkpoint.parent / "eval.json")
    typer.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


@data_app.command("synth")
@user_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="Output directory.")],
    train: Annotated[int, typer.Option(help="Number of train images.")] = 400,
    val: Annotated[int, typer.Option(help="Number of val images.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same dataset).")] = 0,
    image_size: Annotated[int, typer.Option(help="Longer image side in pixels.")] = 128,
) -> None:
    """Write the generated COCO-format shapes dataset (images + instances_{train,val}.json)."""
    from dwlab.data.synth import generate

    if train < 1 or val < 1:
        raise DwlabError(f"--train and --val must be at least 1 (got {train}, {val})")
    path = generate(out, n_train=train, n_val=val, seed=seed, image_size=image_size)
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------- sweep


@app.command()
@user_errors
def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep file, e.g. experiments/table2.yaml.")],
    scale: Annotated[Optional[str], typer.Option(help="smoke, mini or paper (default: the file's scale).")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Seeds per point (default: the file's seeds).")] = None,
    all_points: Annotated[bool, typer.Option(help="Run every point, also where the file's 'only' picks a subset for this scale.")] = False,
    point: Annotated[Optional[list[str]], typer.Option(help="Run just this point id (repeat the option for several), in place of the file's 'only'.")] = None,
    set_: SetOption = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray).")] = None,
    max_concurrent: Annotated[Optional[int], typer.Option(help="Trials at once (default: as many as the resources fit).")] = None,
    cpus_per_trial: Annotated[Optional[float], typer.Option(help="CPUs per trial, over the file's resources.")] = None,
    gpus_per_trial: Annotated[Optional[float], typer.Option(help="GPUs per trial, over the file's resources (0.25: four trials per GPU).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue interrupted trials from their checkpoints and MLflow runs.")] = False,
    copy_finished: Annotated[bool, typer.Option(help="A trial with a FINISHED run of the same config (hash, workers, device) in another experiment of the store gets a copy of that run instead of training again.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the expanded trials and their config differences; run nothing.")] = False,
    runs_dir: Annotated[Path, typer.Option(help="Where trial run directories and Ray's results go.")] = Path("runs/sweeps"),
) -> None:
    """Run a sweep file's trials (one per point and seed) on Ray Tune, tracked in MLflow; for a
    sweep file with a search: each method's search (scored on the tune split), then the final
    runs of the chosen values (scored on val)."""
    from dwlab.sweep.spec import describe, load_plan

    if max_concurrent is not None and max_concurrent < 1:
        raise DwlabError(f"--max-concurrent: expected at least 1, got {max_concurrent}")
    plan = load_plan(
        file, scale=scale, seeds=seeds, set_=set_ or [], runs_dir=runs_dir, all_points=all_points,
        resources={"cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial}, point_ids=point,
    )  # fmt: skip
    if dry_run:
        typer.echo("\n".join(describe(plan)))
        return
    from rich.console import Console

    from dwlab.store import default_uri
    from dwlab.sweep.tune_run import run_sweep

    outcome = run_sweep(
        plan, default_uri(), console=Console(), address=address, max_concurrent=max_concurrent, resume=resume,
        copy_finished=copy_finished,
    )
    copied = f"{len(outcome.copied)} copied, " if outcome.copied else ""
    typer.echo(
        f"sweep {plan.name}: {len(outcome.finished)} finished, {copied}{len(outcome.skipped)} skipped, "
        f"{len(outcome.failed)} failed, {len(outcome.killed)} killed in {outcome.wall_s:.0f} s"
    )
    for key, error in outcome.failed.items():
        typer.echo(f"  FAILED {key}: {error}", err=True)
    for key in outcome.killed:
        typer.echo(f"  KILLED {key} (re-run with --resume to continue it)", err=True)
    if not outcome.ok:
        raise typer.Exit(1)


@app.command()
@user_errors
def ui(
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = UI_HOST,
) -> None:
    """Start the MLflow UI on the default store (./mlruns, or $MLFLOW_TRACKING_URI)."""
    import os

    from dwlab.store import default_uri, is_local, prepare
    from dwlab.sweep.tracking import ui_args

    uri = default_uri()
    if not is_local(uri):  # a tracking server serves its own UI
        typer.echo(f"{uri} is an MLflow tracking server: its UI is at {uri} (open it in a browser)")
        return
    prepare(uri)
    args = ui_args(uri, host=host, port=port)
    typer.echo("mlflow " + " ".join(args))
    sys.stdout.flush()
    # replace this process, so that signals (Ctrl-C, SIGTERM) reach the server directly
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", *args])


# ----------------------------------------------------------------------------- report


@app.command()
@user_errors
def report(
    experiment: Annotated[
        Optional[list[str]],
        typer.Option("--experiment", "-e", help="MLflow experiment (= sweep name) to report (repeatable; default: all)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory for tables, figures and README.md.")] = Path("reports"),
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db).")
    ] = None,
) -> None:
    """Rebuild the paper's Tables 2-7 from the sweeps' runs: markdown, CSV, figures, README."""
    from dwlab.report import build_report

    result = build_report(experiment or None, out, tracking_uri=tracking_uri)
    for name, t in result.tables.items():
        typer.echo(f"{out / (name + '.md')}: runs {t.header['runs']}, scale {t.header['scale']}")
    typer.echo(f"{len(result.files)} files written to {out} (index: {out / 'README.md'})")
    for line in result.skipped:
        typer.echo(f"not produced: {line}")


# ----------------------------------------------------------------------------- end of report


@app.command()
@user_errors
def bench(
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    scale: Annotated[str, typer.Option(help="Preset of the training-step, eval and data parts: smoke, mini or paper.")] = "smoke",
    out: Annotated[Path, typer.Option(help="Markdown report to write.")] = Path("reports/bench.md"),
    parts: Annotated[str, typer.Option(help="Comma-separated parts: train, throughput, loss, eval, data, sweep.")] = "train,throughput,loss,eval,data,sweep",
    reps: Annotated[int, typer.Option(min=1, help="Measured repetitions per figure (the median is reported).")] = 20,
    warmup: Annotated[int, typer.Option(min=0, help="Unmeasured repetitions first.")] = 3,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: torch's choice).")] = None,
    eval_images: Annotated[int, typer.Option(min=1, help="Generated val images the eval part scores.")] = 500,
    load_batches: Annotated[int, typer.Option(min=1, help="Training batches the data part loads (after one warm-up).")] = 60,
    set_: SetOption = None,
) -> None:
    """Speed and memory side by side: training step vs torchvision's FCOS, DW loss vs a per-GT
    loop and the FCOS loss, evaluation, data loading, sweep concurrency."""
    from dwlab.bench.run import BenchOptions, run_bench, write_report

    opts = BenchOptions(
        device=device, scale=scale, parts=tuple(p.strip() for p in parts.split(",") if p.strip()),
        reps=reps, warmup=warmup, threads=threads, eval_images=eval_images, load_batches=load_batches,
        set_=set_ or [], command="dwlab " + " ".join(sys.argv[1:]),
    )  # fmt: skip
    text = run_bench(opts, echo=typer.echo)
    write_report(text, out)
    typer.echo(f"wrote {out}")


@plot_app.command("pneg")
@user_errors
def plot_pneg_cmd(
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("reports/fig3_pneg.png"),
    gamma1: Annotated[str, typer.Option(help="Comma-separated gamma1 values.")] = "1,2,3,4,5",
) -> None:
    """Fig. 3: P_neg against IoU for several gamma1 (Eq. 5-6)."""
    from dwlab.plots import plot_pneg

    try:
        values = [float(v) for v in gamma1.split(",")]
    except ValueError:
        raise DwlabError(f"--gamma1 {gamma1!r}: expected comma-separated numbers") from None
    typer.echo(f"wrote {plot_pneg(out, values)}")


@plot_app.command("weights")
@user_errors
def plot_weights_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint of a trained run (.pt).")],
    image: Annotated[str, typer.Option(help="Val image: COCO id or file name.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("reports/fig5_weights.png"),
    methods: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated methods whose (pos, neg) weights to draw side by side: {', '.join(WEIGHT_METHODS)}."
        ),
    ] = "dw",
) -> None:
    """Fig. 5: cls score, IoU, pos weight and neg weight over one image's anchors, per level
    (Fig. 1 / 5's comparison with --methods gfl,vfl,tood,dw)."""
    from dwlab.visualize import parse_methods, plot_checkpoint_weights

    typer.echo(f"wrote {plot_checkpoint_weights(checkpoint, image, out, parse_methods(methods))}")


@plot_app.command("curves")
@user_errors
def plot_curves_cmd(
    runs: Annotated[list[str], typer.Argument(help="LABEL=RUN_DIR, one per curve (each run's metrics.jsonl).")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("reports/learning_curves.png"),
    title: Annotated[str, typer.Option(help="Figure title.")] = "",
) -> None:
    """Learning curves: val AP against training images seen, one line per run."""
    from dwlab.plots import plot_learning_curves, read_curve

    curves = {}
    for item in runs:
        label, sep, run_dir = item.partition("=")  # sweep run directories have "=" in them
        if not sep or not label:
            raise DwlabError(f"{item!r}: expected LABEL=RUN_DIR")
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise DwlabError(f"{item!r}: no metrics.jsonl in {run_dir}")
        curves[label] = read_curve(run_dir)
    typer.echo(f"wrote {plot_learning_curves(out, curves, title=title)}")


@plot_app.command("table1")
@user_errors
def plot_table1_cmd(
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("reports/table1_weights.png"),
) -> None:
    """Table 1: w_pos and w_neg of GFL, VFL, TOOD, AutoAssign and DW against score and IoU."""
    from dwlab.plots import plot_table1

    typer.echo(f"wrote {plot_table1(out)}")


@app.command()
@user_errors
def bundle(
    python: Annotated[str, typer.Option(help="The GPU host's Python, major.minor, e.g. 3.12.")],
    out: Annotated[Path, typer.Option(help="Folder to write; must not exist yet, or be empty.")],
    backbone: Annotated[str, typer.Option(help="Preset whose domain-pretrained backbone travels along (built here if not cached).")] = "mini",
    host_has: Annotated[str, typer.Option(help="Comma-separated distributions the host already has, e.g. pandas,matplotlib: left out with what they require.")] = "",
) -> None:
    """An offline install for a GPU host that has torch and torchvision: one archive of dwlab and
    the rest of its stack (pinned to this environment), the pretrained backbone, a manifest."""
    from dwlab.bundle import build_bundle

    names = tuple(name.strip() for name in host_has.split(",") if name.strip())
    record = build_bundle(python, out, backbone=backbone, host_has=names, log=typer.echo)
    for name, entry in record["files"].items():
        typer.echo(f"{out / name}: {entry['bytes'] / 2**20:.2f} MiB")
    typer.echo(f"{len(record['distributions'])} distributions, dwlab {record['dwlab']['commit'][:12]}; "
               "on the host: README.md, 'Run on an offline GPU host'")  # fmt: skip


def main() -> None:
    app(prog_name="dwlab")


if __name__ == "__main__":
    sys.exit(main())
