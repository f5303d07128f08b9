"""The view of a running sweep. In a terminal: a live table, one row per trial (status, epoch,
loss, AP, time) and the ETA. Elsewhere (a log file, a pipe, CI): one line per event, e.g.

    [0:07:12] beta=5,mu=5/seed0 epoch 3/15 loss 2.9001 AP 8.9 | 0/4 finished, 2 running | ETA 0:21:40

A search's trials are not known in advance: each gets its row when it starts (``add``), and a
trial the scheduler stops early ends STOPPED.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from dwlab.sweep.spec import Trial

_STYLE = {"PENDING": "dim", "RUNNING": "cyan", "FINISHED": "green", "STOPPED": "magenta", "FAILED": "red",
          "RETRYING": "yellow"}  # fmt: skip
_ENDED = ("FINISHED", "STOPPED", "FAILED")


@dataclass
class Row:
    epochs: int
    status: str = "PENDING"
    epoch: int = 0
    first_epoch: int | None = None  # the first epoch this invocation saw (resumed trials skip some)
    loss: float | None = None
    ap: float | None = None
    started: float | None = None
    ended: float | None = None
    epoch_times: list[float] = field(default_factory=list)
    last_report: float | None = None
    note: str = ""


class SweepProgress:
    """``expected``: how many trials there will be (a search's budget; default: ``trials``),
    ``epochs`` the length of those not started yet."""

    def __init__(self, trials: list[Trial], console: Console, *, title: str = "sweep",
                 expected: int | None = None, epochs: int = 0):  # fmt: skip
        self.console = console
        self.rows = {t.key: Row(epochs=t.config.train.epochs) for t in trials}
        self.title, self.expected, self.epochs = title, expected, epochs
        self.t0 = time.monotonic()
        self.peak_running = 0  # trials seen running at once: the sweep's concurrency, for the ETA
        self.lines = not console.is_terminal  # one line per event instead of the live table

    def add(self, key: str, epochs: int) -> None:
        """A row for a trial that was not known in advance (a search's)."""
        self.rows.setdefault(key, Row(epochs=epochs))

    def _line(self, key: str, event: str) -> None:
        if self.lines:
            self.console.print(f"[{_hms(time.monotonic() - self.t0)}] {key} {event} | {self.summary()}",
                               soft_wrap=True, highlight=False, markup=False)  # fmt: skip

    # ------------------------------------------------------------------ events

    def started(self, key: str) -> None:
        row = self.rows[key]
        row.status, row.started, row.last_report = "RUNNING", time.monotonic(), time.monotonic()
        self.peak_running = max(self.peak_running, sum(r.status == "RUNNING" for r in self.rows.values()))
        self._line(key, "started")

    def result(self, key: str, result: dict[str, Any]) -> None:
        row, now = self.rows[key], time.monotonic()
        metrics = result.get("metrics") or {}
        epoch = int(result.get("epoch", row.epoch))
        if not result.get("final"):
            if row.first_epoch is None:
                row.first_epoch = epoch
            elif row.last_report is not None and epoch > row.epoch:
                row.epoch_times.append((now - row.last_report) / (epoch - row.epoch))
            row.last_report = now
        row.epoch = epoch
        if "loss" in metrics:
            row.loss = metrics["loss"]
        if "AP" in metrics:
            row.ap = metrics["AP"]
        if not result.get("final"):
            ap = f" AP {100 * metrics['AP']:.1f}" if "AP" in metrics else ""
            self._line(key, f"epoch {epoch}/{row.epochs} loss {row.loss:.4f}{ap}" if row.loss is not None else f"epoch {epoch}")

    def retrying(self, key: str, failures: int, error: str) -> None:
        row = self.rows[key]
        row.status, row.note = "RETRYING", f"retry {failures}: {error[:60]}"
        self._line(key, f"retrying ({failures} failed): {error}")

    def finished(self, key: str) -> None:
        row = self.rows[key]
        row.status, row.ended, row.epoch = "FINISHED", time.monotonic(), row.epochs
        ap = f", AP {100 * row.ap:.1f}" if row.ap is not None else ""
        self._line(key, f"FINISHED in {_hms(row.ended - row.started) if row.started else '?'}{ap}")

    def stopped(self, key: str) -> None:
        """The scheduler stopped the trial early (ASHA)."""
        row = self.rows[key]
        row.status, row.ended = "STOPPED", time.monotonic()
        ap = f", AP {100 * row.ap:.1f}" if row.ap is not None else ""
        self._line(key, f"STOPPED by the scheduler after epoch {row.epoch}/{row.epochs}{ap}")

    def failed(self, key: str, error: str) -> None:
        row = self.rows[key]
        row.status, row.ended, row.note = "FAILED", time.monotonic(), error[:80]
        self._line(key, f"FAILED: {error}")

    # ------------------------------------------------------------------ view

    def eta_s(self) -> float | None:
        """Remaining epochs x mean seconds per epoch / trials running at once: as many as ever ran
        at once (not just now: between one trial's end and the next one's start fewer run),
        at most as many as are left."""
        times = [t for row in self.rows.values() for t in row.epoch_times]
        if not times:
            return None
        per_epoch = sum(times) / len(times)
        live = [r for r in self.rows.values() if r.status not in _ENDED]
        not_started = max(0, (self.expected or 0) - len(self.rows))
        left = sum(r.epochs - r.epoch for r in live) + not_started * self.epochs
        return left * per_epoch / max(min(self.peak_running, len(live) + not_started), 1)

    def summary(self) -> str:
        """``"1/4 finished, 2 running, 0 failed | ETA 0:12:00"`` (``, 1 stopped`` in a search)"""
        counts = {s: sum(r.status == s for r in self.rows.values()) for s in _STYLE}
        eta = self.eta_s()
        stopped = f", {counts['STOPPED']} stopped" if counts["STOPPED"] else ""
        return (
            f"{counts['FINISHED']}/{max(len(self.rows), self.expected or 0)} finished{stopped}, "
            f"{counts['RUNNING']} running, {counts['FAILED']} failed | ETA " + (_hms(eta) if eta is not None else "?")
        )

    def render(self):
        from rich.table import Table

        now = time.monotonic()
        caption = f"{self.summary()} | elapsed {_hms(now - self.t0)}"
        table = Table(title=self.title, caption=caption, expand=False)
        table.add_column("trial", overflow="fold")
        for name in ("status", "epoch", "loss", "AP", "time"):
            table.add_column(name, no_wrap=True)
        table.add_column("", max_width=40, overflow="ellipsis", no_wrap=True)
        for key, row in self.rows.items():
            elapsed = ((row.ended or now) - row.started) if row.started else None
            table.add_row(
                key,
                f"[{_STYLE[row.status]}]{row.status}[/]",
                f"{row.epoch}/{row.epochs}",
                f"{row.loss:.4f}" if row.loss is not None else "",
                f"{row.ap:.4f}" if row.ap is not None else "",
                _hms(elapsed) if elapsed is not None else "",
                row.note,
            )
        return table

    @contextlib.contextmanager
    def live(self):
        """The live table while the block runs (in a terminal; elsewhere the lines suffice)."""
        if self.lines:
            yield
            return
        from rich.live import Live

        with Live(get_renderable=self.render, console=self.console, refresh_per_second=2):
            yield
        self.console.line()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
