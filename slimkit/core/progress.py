"""Progress on stderr, so that `--json` output on stdout stays clean.

On a terminal: rich bars and spinners that erase themselves. Elsewhere (a log file,
a pipe, a CI job): plain timestamped lines, at most one per stage every
SLIMKIT_LOG_EVERY seconds (default 10; `slimkit --log-every`), with the stage, the
count done of the total, the time elapsed and the time left. Work shorter than the
interval prints nothing, so logs grow with the run's length, not its number of steps.
SLIMKIT_QUIET=1 silences both (the search's benchmark subprocesses run with it).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slimkit.core.errors import SlimkitError

console = Console(stderr=True)
LOG_EVERY_S = 10.0


def _silent() -> bool:
    return bool(os.environ.get("SLIMKIT_QUIET"))


def _live() -> bool:
    """Rich bars: stderr is a terminal and nobody asked for quiet."""
    return not _silent() and console.is_terminal


def log_every() -> float:
    """Seconds between plain progress lines (SLIMKIT_LOG_EVERY, default 10)."""
    text = os.environ.get("SLIMKIT_LOG_EVERY", "").strip()
    if not text:
        return LOG_EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise SlimkitError(f"SLIMKIT_LOG_EVERY (--log-every) must be a positive number of seconds, e.g. 10; got '{text}'")
    return value


def log(message: str) -> None:
    """One plain, timestamped line on stderr, flushed at once so a log file shows it while work goes on."""
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    sys.stderr.flush()


def duration(seconds: float) -> str:
    """0.4 s, 12 s, 4m05s, 1h02m."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def note(message: str) -> None:
    """A one-line notice about slow work that is starting (hidden only by SLIMKIT_QUIET)."""
    if _silent():
        return
    if console.is_terminal:
        console.print(message, highlight=False)
    else:
        log(message)


@contextlib.contextmanager
def heartbeat(line: Callable[[], str]) -> Iterator[None]:
    """Log `line()` every interval while the block runs, from a background thread (logs only)."""
    every, stop = log_every(), threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            log(line())

    thread = threading.Thread(target=beat, name="slimkit-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with a message for work of unknown length; in a log, a line every interval while it lasts."""
    if _silent():
        yield
        return
    if not console.is_terminal:
        start = time.monotonic()
        with heartbeat(lambda: f"{message}: {duration(time.monotonic() - start)} elapsed"):
            yield
        return
    with console.status(message):
        yield


def track(items: Iterable, description: str, total: int | Callable[[], int] | None = None) -> Iterator:
    """Iterate with a progress bar (count, elapsed and remaining time); a callable
    `total` is read again after every item, for work whose length is revised."""
    if _silent():
        yield from items
        return
    if not console.is_terminal:
        yield from _logged(items, description, total)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total() if callable(total) else total)
        for item in items:
            yield item
            progress.advance(task)
            if callable(total):
                progress.update(task, total=total())


def _logged(items: Iterable, description: str, total: int | Callable[[], int] | None) -> Iterator:
    """`track` for logs: a line when an item ends at least an interval after the last line, and a closing one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    every = log_every()
    start = last = time.monotonic()
    done, spoke = 0, False
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every:
            log(f"{description}: {_count(done, total() if callable(total) else total, now - start)}")
            last, spoke = now, True
    if spoke:
        log(f"{description}: done, {done} in {duration(time.monotonic() - start)}")


def _count(done: int, total: int | None, elapsed: float) -> str:
    """'40/120 (33%), 25 s elapsed, about 50 s left', or '40 done, 25 s elapsed' without a total."""
    if not total:
        return f"{done} done, {duration(elapsed)} elapsed"
    left = elapsed / done * max(0, total - done)
    return f"{done}/{total} ({100 * done / total:.0f}%), {duration(elapsed)} elapsed, about {duration(left)} left"


@contextlib.contextmanager
def search_progress():
    """A live line for `slimkit optimize`: candidate n/N, time left, current best. In a log, every event
    is a line, and the current one is repeated every interval with the time spent on it."""
    if _silent():
        yield lambda **event: None
        return
    if not console.is_terminal:
        now = {"event": ("start", "the original", {}), "since": time.monotonic()}

        def record(event: str, name: str, **info) -> None:
            now["event"], now["since"] = (event, name, info), time.monotonic()
            log(_search_line(event, name, info))

        def again() -> str:  # the current event, its time left counted down
            event, name, info = now["event"]
            spent = time.monotonic() - now["since"]
            if "left" in info:
                info = {**info, "left": max(0.0, info["left"] - spent)}
            return f"{_search_line(event, name, info)} ({duration(spent)} on it)"

        with heartbeat(again):
            yield record
        return
    with console.status("starting the search") as live:
        yield lambda event, name, **info: live.update(_search_line(event, name, info))


def _search_line(event: str, name: str, info: dict) -> str:
    if event == "candidate":
        best = info.get("best") or "none yet"
        return f"candidate {info['index'] + 1}/{info['total']}: {name}  |  {info['left']:.0f} s left  |  best: {best}"
    if event == "reference":
        return f"measuring {name}"
    if event == "start":
        return f"starting the search: measuring {name}"
    return f"confirming {name} on the full evaluation split"
