"""Reading a live stream for a while: the loops behind ``trace`` and ``record``.

They live here, not in the CLI, so a script gets the same behaviour as the
commands: :func:`record` is ``imgrement-dm record`` (lossless by default,
the capture finished and renamed into place however the recording ends),
and :func:`items` is what ``trace`` and ``stats`` iterate.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from imgrement_dm import api
from imgrement_dm.errors import ImgrementError
from imgrement_dm.formats.capture import write_capture
from imgrement_dm.output import check_writable
from imgrement_dm.records import STREAM_MAGIC, Item, RecordReader

#: The longest one read waits, so a duration or the stream's end is noticed.
MAX_WAIT = 1.0


def waits(reader: RecordReader, duration: float | None) -> Iterator[float]:
    """Read timeouts (1 s at most) until the stream ends or ``duration`` passes."""
    deadline = None if duration is None else time.monotonic() + duration
    while not reader.eof:
        if deadline is None:
            yield MAX_WAIT
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield min(left, MAX_WAIT)


def items(source: Iterator[Item] | RecordReader, *, duration: float | None) -> Iterator[Item]:
    """Items of a file, or of a live stream until it ends or ``duration`` passes."""
    if not isinstance(source, RecordReader):
        yield from source
        return
    for wait in waits(source, duration):
        yield from source.read(timeout=wait)


def store_raw(reader: RecordReader, save: BinaryIO, duration: float | None) -> None:
    """Save the stream as it comes (a saved stream: magic, then whole records).

    The records are not checked here: checking each header in Python cost a
    CPU under load. They are checked when the file is read back.
    """
    save.write(STREAM_MAGIC)
    for wait in waits(reader, duration):
        save.write(reader.read_view(timeout=wait))


@dataclass(frozen=True)
class Recorded:
    """How far a recording got (also what the progress callback is shown)."""

    output: Path
    records: int = 0
    bytes: int = 0
    drops: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def lossless(name: str, wanted: bool = True) -> Iterator[bool]:
    """Device ``name`` in wait mode while the block runs, and back after.

    Yields whether it switched (a device wrapped with ``overflow=wait`` is
    left as it is).
    """
    switch = wanted and api.status(name).overflow == "drop"
    if switch:
        api.set_overflow(name, "wait")
    try:
        yield switch
    finally:
        if switch:
            with contextlib.suppress(ImgrementError):  # unwrapped meanwhile: nothing to undo
                api.set_overflow(name, "drop")


def record(name: str, output: Path, *, duration: float | None = None,
           allow_drops: bool = False,
           progress: Callable[[Recorded], None] | None = None,
           progress_every: float = 1.0) -> Recorded:
    """Record traced device ``name`` into the capture file ``output``.

    Lossless unless ``allow_drops``: see :func:`lossless`. Runs until the
    device is unwrapped, ``duration`` passes, or KeyboardInterrupt (Ctrl-C),
    which ends the recording like the others: the trailer is written and
    OUTPUT.part renamed to OUTPUT either way. Any other failure leaves
    OUTPUT as it was. ``progress`` is called about every ``progress_every``
    seconds. A capture with drops is still written (the result says how
    many); apply and replay refuse it.
    """
    check_writable(output)
    sectors = api.TracedDevice.find(name).table().length
    began = last = time.monotonic()
    with RecordReader.live(name) as reader, write_capture(output, name, sectors) as writer, \
            lossless(name, not allow_drops), contextlib.suppress(KeyboardInterrupt):

        def so_far() -> Recorded:
            return Recorded(output, writer.records, writer.bytes, writer.drops,
                            time.monotonic() - began)

        for wait in waits(reader, duration):
            writer.add(reader.read_view(timeout=wait))
            if progress is not None and time.monotonic() - last >= progress_every:
                last = time.monotonic()
                progress(so_far())
    return so_far()
