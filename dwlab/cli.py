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

from dwlab.errors import DwlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the embedded default.")
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Dotted override, e.g. --set train.epochs=2 (repeatable)."),
]


def user_errors(fn: F) -> F:
    """Turn a ``DwlabError`` into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DwlabError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@user_errors
def train(
    config: Annotated[str, typer.Argument(help="Config file or preset name (smoke, paper).")],
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


@app.command("eval")
@user_errors
def eval_(
    config: Annotated[str, typer.Argument(help="Config file or preset name.")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint file (.pt).")],
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write eval.json (default: beside the checkpoint).")] = None,
) -> None:
    """Evaluate a checkpoint on the config's val set (COCO bbox AP through pycocotools)."""
    from dwlab.config import load_config
    from dwlab.runner import run_evaluation

    cfg = load_config(config, set_ or [])
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


def main() -> None:
    app(prog_name="dwlab")


if __name__ == "__main__":
    sys.exit(main())
