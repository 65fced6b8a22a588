"""Progress on a terminal: named stages and counted loops, drawn on stderr with tqdm.

Library code calls :func:`stage`, :func:`bar` and :func:`counter` without knowing who is watching.
Nothing is drawn unless progress was switched on with :func:`configure` (the CLI does, unless
``--quiet``) *and* stderr is a terminal: API users, pipes, files and CI logs get no bars by default.
With progress off, a stage logs one INFO line on ``clipdeploy.progress`` when it ends, which only
``--verbose`` shows. tqdm is imported only when something is drawn; without it a terminal gets plain
lines, so the torch-free runtime does not need it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

TICK_SECONDS = 0.5  # how often a running stage redraws its elapsed time

_wanted = False  # set by configure(); off by default so library use stays silent
_depth = 0  # stages open now: a nested stage is indented under the one it runs in


def configure(enabled: bool) -> None:
    """Switch terminal progress on or off for this process (it is still drawn only on a terminal)."""
    global _wanted
    _wanted = bool(enabled)


def active() -> bool:
    """Whether progress is drawn now: switched on, and stderr is a terminal."""
    if not _wanted:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def write(message: str) -> None:
    """One line on stderr that does not tear a bar being drawn."""
    tqdm = _tqdm() if active() else None
    if tqdm is not None:
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class LogHandler(logging.Handler):
    """Log records through :func:`write`, so --verbose lines and bars share the terminal cleanly."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{s % 60:04.1f}s"


class Stage:
    """A running stage. ``note(text)`` sets a short outcome shown after the stage's name and time."""

    def __init__(self, name: str, bar: Any = None) -> None:
        self.name = name
        self.outcome = ""
        self._bar = bar

    def note(self, text: str) -> None:
        self.outcome = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)


@contextlib.contextmanager
def stage(name: str, *, keep: bool = True) -> Iterator[Stage]:
    """Show ``name`` with a running clock while the block runs; leave one line with its time after
    (unless ``keep=False``: the caller reports the outcome itself).

    Off a terminal this draws nothing (one INFO log line on ``clipdeploy.progress`` at the end)."""
    global _depth
    start = time.perf_counter()
    indent = "  " * _depth
    tqdm = _tqdm() if active() else None
    bar = None
    stop = threading.Event()
    ticker = None
    if tqdm is not None:
        bar = tqdm(
            total=None, desc=indent + name, bar_format="{desc}  {elapsed}{postfix}", file=sys.stderr,
            leave=False, dynamic_ncols=True,
        )  # fmt: skip

        def tick() -> None:  # a stage has no counts to update: redraw so its clock keeps moving
            while not stop.wait(TICK_SECONDS):
                bar.refresh()

        ticker = threading.Thread(target=tick, name="clipdeploy-progress", daemon=True)
        ticker.start()
    elif active():
        write(f"{indent}{name} ...")
    handle = Stage(name, bar)
    _depth += 1
    outcome = ""
    try:
        yield handle
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except BaseException:
        outcome = "failed"
        raise
    finally:
        _depth -= 1
        if ticker is not None:
            stop.set()
            ticker.join()
        if bar is not None:
            bar.close()
        line = f"{indent}{name}  {_seconds(time.perf_counter() - start)}"
        if outcome or handle.outcome:
            line += "  " + (outcome or handle.outcome)
        if not active():
            log.info("%s", line.strip())
        elif keep:
            write(line)


class _NoCounter:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


LINE_SECONDS = 5.0  # without tqdm: at most one progress line this often (and one at the end)


class LineCounter(_NoCounter):
    """A counter drawn as plain lines (no tqdm): ``desc: done/total unit (pct), rate unit/s, ETA``."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self._start = self._last = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit}s ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}s"
        text += f", {rate:.1f} {self.unit}s/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_seconds((self.total - self.done) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= LINE_SECONDS and (self.total is None or self.done < self.total):
            self._last = now
            write(self.line())

    def close(self) -> None:
        write(self.line() + f" in {_seconds(time.perf_counter() - self._start)}")

    def __exit__(self, *exc: object) -> None:
        self.close()


def counter(total: int | None, desc: str, unit: str = "it") -> Any:
    """A bar advanced by hand (``update(n)``, ``close()``, or as a context manager); a no-op when off.
    Without tqdm a terminal gets a plain line every few seconds (count, rate, ETA) and one at the end."""
    if not active():
        return _NoCounter()
    tqdm = _tqdm()
    if tqdm is None:
        return LineCounter(total, "  " * _depth + desc, unit)
    return tqdm(
        total=total, desc="  " * _depth + desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True
    )


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """``iterable``, drawn as a bar while it is consumed; ``iterable`` itself when progress is off."""
    tqdm = _tqdm() if active() else None
    if tqdm is None:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(
        iterable, desc="  " * _depth + desc, total=total, unit=unit, file=sys.stderr, leave=False,
        dynamic_ncols=True,
    )  # fmt: skip


@contextlib.contextmanager
def muted_stdout() -> Iterator[None]:
    """What third-party code prints to stdout goes to stderr with --verbose, else nowhere: stdout
    carries clipdeploy's results (JSON for some commands)."""
    verbose = logging.getLogger("clipdeploy").isEnabledFor(logging.INFO)
    with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
        yield
