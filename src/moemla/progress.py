"""Progress of long work: a live bar on a terminal (rich); elsewhere (a pipe, a log file, CI) a plain line with
rate and ETA every PLAIN_EVERY_S seconds, so a long quiet stretch still shows that work goes on."""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

PLAIN_EVERY_S = float(os.environ.get("MOEMLA_PROGRESS_EVERY_S", "30"))


def duration(seconds: float) -> str:
    """3 h 05 min, 4 min 10 s, 12 s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def plain_line(
    description: str, done: int, total: int | None, unit: str, rate: float, elapsed: float, info: str
) -> str:
    """`train tiny: 12/1,000 steps (1%) | 0.52 steps/s | 23 s elapsed | ETA 32 min | loss 3.1` for logs."""
    head = f"{description}: {done:,}/{total:,} {unit} ({done / total:.0%})" if total else f"{description}: {done:,}"
    head += "" if total else f" {unit}"
    parts = [head, f"{rate:,.2f} {unit}/s", f"{duration(elapsed)} elapsed"]
    if total and rate > 0:
        parts.append(f"ETA {duration(max(0, total - done) / rate)}")
    if info:
        parts.append(info)
    return " | ".join(parts)


class Progress:
    def __init__(self, description: str, total: int | None = None, unit: str = "steps") -> None:
        self.enabled = sys.stderr.isatty()
        self.description, self.total, self.unit = description, total, unit
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()] if total else [
            TextColumn("[bold]{task.description}"), TextColumn("{task.completed:,} " + unit)
        ]  # fmt: skip
        columns += [TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
        if total:
            columns += [TextColumn("ETA"), TimeRemainingColumn()]
        # on stderr, where the terminal test was made: `moemla train > log` shows the bar and logs only results
        self._bar = RichProgress(*columns, console=Console(stderr=True), disable=not self.enabled, transient=False)
        self._task = self._bar.add_task(description, total=total, info="")
        self._done, self._info = 0, ""
        self._start = self._last = time.monotonic()
        self._base = 0  # work already done when this started (a resumed run): not counted in the rate

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._bar.stop()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self._bar.update(self._task, advance=n, **({"info": info} if info is not None else {}))
        self._note(self._done + n, info)

    def set(self, completed: int, info: str = "") -> None:
        if self._done == 0 and time.monotonic() - self._start < 1.0:
            self._base = completed  # the first set of a resumed run says where it starts
        self._bar.update(self._task, completed=completed, info=info)
        self._note(completed, info)

    def _note(self, done: int, info: str | None) -> None:
        self._done, self._info = done, info if info is not None else self._info
        now = time.monotonic()
        if self.enabled or now - self._last < PLAIN_EVERY_S:
            return
        self._last, elapsed = now, now - self._start
        rate = (done - self._base) / elapsed
        line = plain_line(self.description, done, self.total, self.unit, rate, elapsed, self._info)
        print(line, file=sys.stderr, flush=True)
