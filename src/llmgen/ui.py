"""Presentation helpers shared by the library's long-running work: progress bars on stderr.

Bars are drawn with rich when stderr is a terminal; elsewhere (CI, pipes) they stay quiet and
the caller's final summary line says what happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("llmgen")


class Bar:
    """A progress bar handle: `advance(n)`, `update(total=..., description=...)`."""

    def __init__(self, progress: Optional[Progress], task):
        self._p, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def update(self, **kwargs) -> None:
        if self._p is not None:
            self._p.update(self._task, **kwargs)


@contextlib.contextmanager
def progress(description: str, total: Optional[float], unit: str = "bytes", enabled: bool = True) -> Iterator[Bar]:
    """A live bar with rate and ETA. `unit="bytes"` shows MB and MB/s; otherwise counts and it/s."""
    if not enabled or not console.is_terminal:
        yield Bar(None, None)
        return
    if unit == "bytes":
        cols = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TimeRemainingColumn()]
    else:
        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(description, total=total, info="")
        yield Bar(p, task)


def info(message: str) -> None:
    """A status line for the user (stderr, so stdout stays machine-readable); rank 0 only."""
    if os.environ.get("RANK", "0") != "0":
        return
    console.print(message, highlight=False, markup=False)


def set_verbosity(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
