"""Progress of long operator work (migrate, copy-db, backup, reindex): a rich bar on a
terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PLAIN_EVERY = 5.0  # seconds between plain lines when not on a terminal


class Progress:
    """Counts done of a total; `advance` may be called from any thread."""

    def __init__(self, label: str, total: int | None, unit: str, stream: TextIO) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = stream
        self._started = time.monotonic()
        self._last_line = self._started
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            self._show()

    def update(self, done: int, total: int | None = None) -> None:
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
            self._show()

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total)
            return
        now = time.monotonic()
        if now - self._last_line >= PLAIN_EVERY:
            self._last_line = now
            self._stream.write(self.line() + "\n")
            self._stream.flush()

    def line(self) -> str:
        """`label: done/total unit (pct), rate/s`: the plain form."""
        elapsed = max(1e-9, time.monotonic() - self._started)
        rate = self.done / elapsed
        if self.total is not None:
            pct = 100 * self.done / self.total if self.total else 100.0
            return (f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%),"
                    f" {rate:,.0f} {self.unit}/s")
        return f"{self.label}: {self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s"


@contextmanager
def progress(label: str, total: int | None = None, *, unit: str = "rows",
             stream: TextIO | None = None) -> Iterator[Progress]:
    """A bar with counts and rate on a terminal; a line every few seconds (and at the
    end) when stderr is a pipe or a file, so logs stay readable."""
    out = stream or sys.stderr
    p = Progress(label, total, unit, out)
    if not out.isatty():
        try:
            yield p
        finally:
            out.write(p.line() + "\n")
            out.flush()
        return
    bar = _rich_bar(out, unit)
    with bar:
        p._bar = bar
        p._task = bar.add_task(label, total=total)
        yield p


def _rich_bar(out: TextIO, unit: str) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        Task,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items a second, in the work's own unit."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} {unit}/s")

    return RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn(unit), TaskProgressColumn(), RateColumn(),
                        TimeElapsedColumn(), console=Console(file=out))
