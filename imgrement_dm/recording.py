"""Reading a live stream for a while: the loops behind ``trace`` and ``record``.

They live here, not in the CLI, so a script gets the same behaviour as the
commands: :func:`record` is ``imgrement-dm record`` (lossless by default,
the capture finished and renamed into place however the recording ends),
and :func:`items` is what ``trace`` and ``stats`` iterate.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imgrement_dm import api, layout
from imgrement_dm.directio import BLOCK, DirectAppender, address_of
from imgrement_dm.errors import ImgrementError
from imgrement_dm.formats.capture import IN_PLACE_MIN, write_capture
from imgrement_dm.markfifo import mark_fifo
from imgrement_dm.output import atomic_appender, check_writable
from imgrement_dm.records import STREAM_MAGIC, Item, RecordReader

#: A pad record's header (records.py skips pads): size, type, version, 0, seq.
_PAD_RECORD = struct.Struct("<IHBBQ")

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


def store_stream(reader: RecordReader, output: Path, duration: float | None) -> None:
    """Save the stream as it comes into ``output`` (magic, then whole records).

    What ``trace -q -o`` does: written whole or not at all (output.py),
    with O_DIRECT where the file system allows it, a large window straight
    from the kernel's mapped buffer after a pad record that lines it up
    (records.py skips pads), as :func:`record` does. The records are not
    checked here (checking each header in Python cost a CPU under load);
    they are when the file is read back. Ctrl-C ends it like the duration
    does, after storing what the buffer holds then.
    """
    with atomic_appender(output) as out:
        out.write(STREAM_MAGIC)
        store_until_end(reader, lambda view: add_to_stream(out, view), duration, 1 << 30)


def add_to_stream(out: DirectAppender, view: memoryview | bytes) -> None:
    """Append whole records to a saved stream, a large window in place.

    Before a window written in place, a pad record lines the file up with
    the window's address (both are multiples of 8, and so is the pad).
    """
    if len(view) >= IN_PLACE_MIN and out.direct:
        gap = (address_of(view) - out.tell()) % BLOCK
        if gap:
            if gap < _PAD_RECORD.size:
                gap += BLOCK
            out.write(_PAD_RECORD.pack(gap, layout.REC_PAD, layout.RECORD_VERSION, 0, 0)
                      + bytes(gap - _PAD_RECORD.size))
        out.write_in_place(view)
    else:
        out.write(view)


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
           progress_every: float = 1.0, marks: Path | None = None,
           warn: Callable[[str], None] | None = None) -> Recorded:
    """Record traced device ``name`` into the capture file ``output``.

    Lossless unless ``allow_drops``: see :func:`lossless`. Runs until the
    device is unwrapped, ``duration`` passes, or KeyboardInterrupt (Ctrl-C),
    which ends the recording like the others: the records the buffer holds
    at that moment are stored (see :func:`take_committed`), the trailer is
    written and OUTPUT.part renamed to OUTPUT either way. Any other failure leaves
    OUTPUT as it was. ``progress`` is called about every ``progress_every``
    seconds. A capture with drops is still written (the result says how
    many); apply and replay refuse it. ``marks``: a FIFO made for the
    recording, each line written to it a mark (:mod:`~imgrement_dm.markfifo`;
    ``warn`` hears of one that could not be made).
    """
    check_writable(output)
    sectors = api.TracedDevice.find(name).table().length
    began = last = time.monotonic()
    with RecordReader.live(name) as reader, write_capture(output, name, sectors) as writer, \
            lossless(name, not allow_drops), mark_fifo(name, marks, warn):

        def so_far() -> Recorded:
            return Recorded(output, writer.records, writer.bytes, writer.drops,
                            time.monotonic() - began)

        def tick() -> None:
            nonlocal last
            if progress is not None and time.monotonic() - last >= progress_every:
                last = time.monotonic()
                progress(so_far())

        store_until_end(reader, writer.add, duration, _buffer_bytes(name), tick)
    return so_far()


def store_until_end(reader: RecordReader, add: Callable[[memoryview], None],
                    duration: float | None, buffer_bytes: int,
                    tick: Callable[[], None] | None = None) -> None:
    """Pass every window to ``add`` until the stream ends, ``duration``
    passes or Ctrl-C/SIGTERM; then what the buffer holds (take_committed).

    Each window is taken and stored with the signals held (see
    :func:`signals_held`); ``tick`` runs after each. What the buffer held
    when the recording ended belongs to it: the I/O it describes was done
    before then. A second Ctrl-C skips that last part.
    """
    with contextlib.suppress(KeyboardInterrupt):
        for wait in waits(reader, duration):
            with signals_held():
                add(reader.read_view(timeout=wait))
            if tick is not None:
                tick()
    if not reader.eof:
        with contextlib.suppress(KeyboardInterrupt):
            take_committed(reader, add, buffer_bytes)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then act.

    A KeyboardInterrupt raised inside a capture writer's add() (between a
    chunk's header and its payload, or after an O_DIRECT write but before
    the writer counted it) would leave a capture whose last chunk is cut,
    which every reader then refuses; raised just after the kernel lent a
    window, before the reader held it, it would lose that window. Blocked
    here, the signal is delivered when the block ends: between two chunks.
    A block that waits for records waits at most a second (MAX_WAIT), so
    Ctrl-C still acts within one.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _buffer_bytes(name: str) -> int:
    """The device's record buffer size (a generous bound if it just went away)."""
    try:
        return api.status(name).buffer
    except ImgrementError:
        return 1 << 30


def take_committed(reader: RecordReader, add: Callable[[memoryview], None],
                   buffer_bytes: int) -> None:
    """Pass on the records committed now, without waiting for more.

    Called when a recording ends (Ctrl-C, its duration, SIGTERM): records
    the reader had not taken yet describe I/O that happened before the end,
    and leaving them out would make a capture that looks complete but lacks
    its last writes. Stops at the first empty read, or after a buffer's
    worth (``buffer_bytes``): everything committed at the call is within
    that, and a disk that keeps writing must not keep us here.
    """
    taken = 0
    while not reader.eof and taken <= buffer_bytes:
        with signals_held():
            view = reader.read_view(timeout=0)
            taken += len(view)
            add(view)
        if not view:
            return
