"""A capture's changes in completion order, read once, in bounded memory.

``apply``, ``replay``, the qcow2 writer and ``diff`` all want the same thing
from a capture: every write, discard and write-zeroes that the device
accepted, up to a stop point, in the order they completed.  A capture is in
*submission* order (the target reserves a record when it maps a bio and
publishes it when the bio completes), so the two orders differ wherever bios
overlapped in flight.

Sorting the whole capture, as the tools once did, holds every record (and
every payload) at once: tens of GB for an hour of a busy disk.  Here a change
is a small tuple (no payload: its offset in the capture file, read again
when it is applied), and changes wait in a heap only while a later-submitted
bio could still have completed before them.  A bio submitted after the
latest submit time seen so far completes after it, so a change that
completed more than :data:`HORIZON_NS` before that time can go: the heap
holds about a second of I/O, whatever the capture's size.

The horizon is a bound the kernel does not promise (a task preempted between
reserving its record and stamping its submit time could exceed it), so it is
checked: a change that arrives after a later-completing one was released
raises :class:`ReorderedError`, and the callers start again with ``exact=True``,
which sorts every change's tuple (still no payloads).  Never a wrong order.

The capture is validated in the same pass: the iteration reads to the trailer
even after the stop point, so a truncated or damaged capture raises
:class:`CaptureError` before a caller renames its output into place, and the
counts (:class:`Selection`) are checked then too.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from imgrement_dm.errors import IncrementError
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.layout import FLAGS
from imgrement_dm.records import BioRecord, Drop, MarkRecord

FUA_FLAG = next(bit for bit, name in FLAGS.items() if name == "fua")
PREFLUSH_FLAG = next(bit for bit, name in FLAGS.items() if name == "preflush")
CHANGING_OPS = frozenset({"write", "write-zeroes", "discard", "secure-erase"})
#: How long (submit time, ns) a completed change waits for earlier-completing
#: ones that were submitted after it.
HORIZON_NS = 1_000_000_000

E = TypeVar("E", bound="tuple[Any, ...]")


class Change(NamedTuple):
    """One change to the disk; ordered (as a tuple) by completion, then sequence."""

    complete_ns: int
    seq: int
    sector: int
    size: int  # bytes
    op_name: str  # write, write-zeroes, discard or secure-erase
    submit_ns: int
    flags: int
    data_at: int  # the payload's offset in the capture file; -1: none

    @property
    def sectors(self) -> int:
        return self.size >> 9

    @property
    def end(self) -> int:
        """The sector after the last one changed."""
        return self.sector + (self.size >> 9)


def change_of(r: BioRecord, chunk_at: int) -> Change:
    """``r`` as a :class:`Change`; ``chunk_at`` is where its chunk's payload
    starts in the capture file."""
    data_at = chunk_at + r.payload_start if r.has_payload else -1
    return Change(r.complete_ns, r.seq, r.sector, r.size, r.op_name, r.submit_ns, r.flags,
                  data_at)


@dataclass(frozen=True)
class StopAt:
    """Where to stop: at a mark, after the Nth flush or FUA write, or at the end."""

    mark: str | None = None
    flush: int | None = None
    fua: int | None = None

    def describe(self) -> str:
        if self.mark is not None:
            return f"mark {self.mark!r}"
        if self.flush is not None:
            return f"flush {self.flush}"
        if self.fua is not None:
            return f"FUA write {self.fua}"
        return "the end of the capture"


#: The whole capture.
END = StopAt()


@dataclass
class Selection:
    """What the pass found: changes applied, and what was missing or refused."""

    applied: int = 0
    drops: int = 0
    failed: int = 0  # writes the device refused: they changed nothing we can know
    without_data: int = 0  # writes recorded in capture mode meta
    reached: bool = False


class ReorderedError(Exception):
    """A change completed before one already released (see the module's doc)."""


class Reorder(Generic[E]):
    """Tuples ordered by time (their first element) and what breaks ties, put out
    in order once nothing read later can come before them (the horizon of
    the module's doc); ``exact`` keeps them all and sorts at the end."""

    def __init__(self, *, exact: bool = False) -> None:
        self.exact = exact
        self._heap: list[E] = []
        self._last: E | None = None

    def push(self, item: E) -> None:
        if self.exact:
            self._heap.append(item)
            return
        if self._last is not None and item < self._last:
            raise ReorderedError(f"{item} came after {self._last} had gone out")
        heapq.heappush(self._heap, item)

    def release(self, newest: int) -> Iterator[E]:
        """What may go out, now that a record submitted at ``newest`` was read."""
        heap = self._heap
        if self.exact:
            return
        while heap and heap[0][0] < newest - HORIZON_NS:
            self._last = heapq.heappop(heap)
            yield self._last

    def drain(self) -> Iterator[E]:
        """Everything left, in order (at the end of the capture)."""
        if self.exact:
            self._heap.sort()
            yield from self._heap
        else:
            while self._heap:
                yield heapq.heappop(self._heap)
        self._heap = []


class Changes:
    """Iterate the changes of ``reader`` up to ``stop``, in completion order.

    Writes without their data are counted and left out, unless
    ``keep_without_data`` (a map of where, not what). ``ordered=False`` yields
    them in capture order, which is all a map needs. After the iteration,
    :attr:`selection` holds the counts, and the refusals have been raised:
    a stop point the capture does not have, dropped records (unless
    ``force``), writes without data (unless kept or ``force``).
    """

    def __init__(self, reader: CaptureReader, stop: StopAt = END, *,
                 force: bool = False, keep_without_data: bool = False,
                 ordered: bool = True, exact: bool = False,
                 loss: str = "the result would be wrong") -> None:
        self.reader = reader
        self.stop = stop
        self.force = force
        self.keep_without_data = keep_without_data
        self.ordered = ordered
        self.exact = exact
        self.loss = loss
        self.selection = Selection(reached=stop == END)

    def __iter__(self) -> Iterator[Change]:
        sel = self.selection
        stop = self.stop
        flushes = fuas = 0
        order: Reorder[Change] = Reorder(exact=self.exact)
        newest = -(1 << 62)  # the latest submit time seen
        done = False
        reader = self.reader
        for item in reader.items():
            if done:
                continue  # read on to the trailer: the whole capture is checked
            if isinstance(item, Drop):
                sel.drops += item.count
                continue
            if isinstance(item, MarkRecord):
                if stop.mark is not None and item.label == stop.mark:
                    sel.reached = done = True
                continue
            op = item.op_name
            include = op in CHANGING_OPS
            if include and item.status != 0:
                sel.failed += 1
                include = False
            if include and op == "write" and not item.has_payload:
                sel.without_data += 1
                include = self.keep_without_data
            if include:
                c = change_of(item, reader.chunk_at)
                if self.ordered:
                    order.push(c)
                else:
                    yield c
                sel.applied += 1
            if item.submit_ns > newest:
                newest = item.submit_ns
                yield from order.release(newest)
            if op == "flush" or item.flags & PREFLUSH_FLAG:
                flushes += 1
                if stop.flush is not None and flushes == stop.flush:
                    sel.reached = done = True
            if op == "write" and item.flags & FUA_FLAG:
                fuas += 1
                if stop.fua is not None and fuas == stop.fua:
                    sel.reached = done = True
        self._refuse()
        yield from order.drain()

    def _refuse(self) -> None:
        sel, path = self.selection, self.reader.path
        if not sel.reached:
            raise IncrementError(f"{path} has no {self.stop.describe()}")
        if sel.drops and not self.force:
            raise IncrementError(
                f"{path} lost {sel.drops} record(s) (the buffer overflowed while recording): "
                f"{self.loss}. Record again with a larger --buffer-kb, or pass --force to use "
                "what is there")
        if sel.without_data and not self.keep_without_data and not self.force:
            raise IncrementError(
                f"{path} has {sel.without_data} write(s) without their data (recorded in "
                "capture mode meta): record with capture writes or all")
