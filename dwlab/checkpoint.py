"""Atomic checkpoints: write a temp file, then rename. ``last.pt`` is the newest, ``prev.pt``
the one before; a corrupt or half-written ``last.pt`` falls back to ``prev.pt``.

Loading is ``torch.load(weights_only=True)``: a file holding other Python objects than tensors
and plain containers is refused (unpickling it could run code), in one line naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from dwlab.errors import DwlabError

LAST, PREV = "last.pt", "prev.pt"


def save_atomic(state: dict[str, Any], directory: Path) -> Path:
    """Save ``state`` as ``directory/last.pt``; the previous ``last.pt`` becomes ``prev.pt``.

    A crash at any point leaves at least one complete checkpoint: the temp file is complete
    before any rename, and each rename is atomic.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{LAST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a failed write (disk full, interrupt) leaves the old files alone
        tmp.unlink(missing_ok=True)
        raise
    last = directory / LAST
    if last.exists():
        os.replace(last, directory / PREV)
    os.replace(tmp, last)
    return last


def load(path: Path) -> dict[str, Any]:
    """Load one checkpoint file (``weights_only=True``: tensors and plain containers only)."""
    try:
        with warnings.catch_warnings():  # the weights-only unpickler warns about old pickle protocols
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DwlabError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:  # the file is intact, but unpickling it would call or build ``found``
            raise DwlabError(
                f"{path}: refused: it holds a Python object ({found.group(1)}) other than tensors and "
                "plain containers (loading it could run code; weights_only=True)"
            ) from None
        raise DwlabError(f"{path}: corrupt or unreadable checkpoint ({type(err).__name__})") from None
    except Exception as err:  # a truncated zip, not a checkpoint at all
        raise DwlabError(f"{path}: corrupt or unreadable checkpoint ({type(err).__name__})") from None


def load_latest(directory: Path, warn=print) -> dict[str, Any] | None:
    """The newest loadable checkpoint in ``directory`` (``last.pt``, else ``prev.pt``), or None
    when there is none. A corrupt file is reported in one line and skipped."""
    for name in (LAST, PREV):
        path = directory / name
        if not path.exists():
            continue
        try:
            return load(path)
        except DwlabError as err:
            warn(f"warning: {err}; trying the previous checkpoint")
    return None


TRAINING_STATE = ("optimizer", "scaler")  # what only a run that trains on needs


def keep_weights_only(directory: Path) -> Path | None:
    """A finished run's checkpoints, shrunk: ``last.pt`` without the optimizer and scaler state
    (about a third of the ResNet-18 smoke checkpoint with AdamW), ``prev.pt`` removed. Enough to
    evaluate, visualise, or resume a run that has nothing left to train. Returns ``last.pt``,
    None when there is none."""
    last = directory / LAST
    if not last.is_file():
        return None
    state = load(last)
    if any(k in state for k in TRAINING_STATE):
        save_atomic({k: v for k, v in state.items() if k not in TRAINING_STATE}, directory)
    (directory / PREV).unlink(missing_ok=True)
    return last
