"""Progress display on stderr, so that `--json` output on stdout stays clean.

Bars and spinners hide themselves when stderr is not a terminal, or when
SLIMKIT_QUIET is set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def _quiet() -> bool:
    return bool(os.environ.get("SLIMKIT_QUIET")) or not console.is_terminal


def note(message: str) -> None:
    """A one-line notice about slow work that is starting (hidden when quiet)."""
    if not _quiet():
        console.print(message, highlight=False)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with a message for work of unknown length."""
    if _quiet():
        yield
        return
    with console.status(message):
        yield


def track(items: Iterable, description: str, total: int | Callable[[], int] | None = None) -> Iterator:
    """Iterate with a progress bar (count, elapsed and remaining time); a callable
    `total` is read again after every item, for work whose length is revised."""
    if _quiet():
        yield from items
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total() if callable(total) else total)
        for item in items:
            yield item
            progress.advance(task)
            if callable(total):
                progress.update(task, total=total())


@contextlib.contextmanager
def search_progress():
    """A live line for `slimkit optimize`: candidate n/N, time left, current best."""
    if _quiet():
        yield lambda **event: None
        return
    with console.status("starting the search") as live:

        def update(event: str, name: str, **info) -> None:
            if event == "candidate":
                best = info.get("best") or "none yet"
                live.update(f"candidate {info['index'] + 1}/{info['total']}: {name}  |  {info['left']:.0f} s left  |  best: {best}")
            elif event == "reference":
                live.update(f"measuring {name}")
            else:
                live.update(f"confirming {name} on the full evaluation split")

        yield update
