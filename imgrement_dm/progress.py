"""Progress of a long run, for a person or for a script.

A tool that reads a capture of tens of GB for minutes says how far it is:
on a terminal as click's bar on stderr (nothing when stderr is not a
terminal, so logs and pipes stay clean), and with ``--progress json`` as one
JSON object a line on stderr, at most twice a second and always at the end,
so a script can follow it while stdout keeps the command's own output (an
export to ``-``, crashcheck's ``--json`` states).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

#: done, total: how far a run is (bytes of the capture read, states checked).
Progress = Callable[[int, int], None]
MODES = ("auto", "json", "none")
#: Items between two looks at the reader's position.
EVERY = 256
#: Seconds between two JSON lines (the last one always goes).
JSON_EVERY = 0.5

T = TypeVar("T")


class _Positioned(Protocol):
    @property
    def size(self) -> int: ...

    def position(self) -> int: ...


def metered(items: Iterable[T], reader: _Positioned,
            progress: Progress | None) -> Iterable[T]:
    """``items``, telling ``progress`` every :data:`EVERY` of them how many
    bytes of the capture ``reader`` has read, and once more at the end;
    ``items`` themselves without ``progress`` (no layer a record to pay)."""
    if progress is None:
        return items
    return _metered(items, reader, progress)


def _metered(items: Iterable[T], reader: _Positioned, progress: Progress) -> Iterator[T]:
    for n, item in enumerate(items, 1):
        yield item
        if n % EVERY == 0:
            progress(reader.position(), reader.size)
    progress(reader.size, reader.size)


class Meter:
    """A progress callback that shows itself as ``mode`` says: ``auto`` (a bar
    on a terminal), ``json`` (lines on stderr) or ``none``. Close it when the
    run ends, so the bar's line is finished."""

    def __init__(self, mode: str, label: str, unit: str = "bytes") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown progress mode {mode!r}: one of {', '.join(MODES)}")
        self.mode, self.label, self.unit = mode, label, unit
        self.bar: ProgressBar[int] | None = None
        self.shown = 0
        self.last_line = float("-inf")  # the first report is shown
        self.ended = False

    def __call__(self, done: int, total: int) -> None:
        import click  # here: the API's users (metered) need not load the CLI's library

        if self.mode == "json":
            now = time.monotonic()
            end = done >= total
            if (end and not self.ended) or (not end and now - self.last_line >= JSON_EVERY):
                self.last_line, self.ended = now, end
                click.echo(json.dumps({"progress": self.label, "done": done, "total": total,
                                       "unit": self.unit}), err=True)
        elif self.mode == "auto" and sys.stderr.isatty():
            if self.bar is None:
                self.bar = click.progressbar(length=max(total, 1), label=self.label,
                                             file=sys.stderr, show_pos=self.unit != "bytes")
                self.bar.__enter__()
            self.bar.update(done - self.shown)
            self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
