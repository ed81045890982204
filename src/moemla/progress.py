"""A live progress line on a terminal (rich); silent when output is not a terminal (CI, pipes, tests)."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, description: str, total: int | None = None, unit: str = "steps") -> None:
        self.enabled = sys.stderr.isatty()
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()] if total else [
            TextColumn("[bold]{task.description}"), TextColumn("{task.completed:,} " + unit)
        ]  # fmt: skip
        columns += [TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
        if total:
            columns += [TextColumn("ETA"), TimeRemainingColumn()]
        self._bar = RichProgress(*columns, disable=not self.enabled, transient=False)
        self._task = self._bar.add_task(description, total=total, info="")

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._bar.stop()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self._bar.update(self._task, advance=n, **({"info": info} if info is not None else {}))

    def set(self, completed: int, info: str = "") -> None:
        self._bar.update(self._task, completed=completed, info=info)
