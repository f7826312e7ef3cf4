"""Writing a capture in the peers' formats: blktrace, dm-log-writes, JSON lines.

blktrace: ``PREFIX.blktrace.0`` holds ``struct blk_io_trace`` events (the
layout and constants come from <linux/blktrace_api.h> through cffi), a Q
(queue) event when the target mapped each bio and a C (complete) event when
it completed, with process-name notes, so ``blkparse -i PREFIX`` and ``btt``
read it as they read a trace of a bio-based device.

log-writes: the on-disk log of dm-log-writes (a super block in sector 0,
then one entry sector per write, flush, discard or mark, followed by the
write's data), in completion order, for tools that replay such logs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from imgrement_dm import layout, render
from imgrement_dm._kernel_ffi import lib
from imgrement_dm.changes import Reorder, ReorderedError
from imgrement_dm.errors import IncrementError
from imgrement_dm.formats import files
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.output import atomic_output, check_writable, is_stream
from imgrement_dm.progress import Progress, metered
from imgrement_dm.records import BioRecord, Drop, Item, MarkRecord

_TRACE, _ = layout.struct_for("struct blk_io_trace")
_MAGIC = lib.BLK_IO_TRACE_MAGIC | lib.BLK_IO_TRACE_VERSION


def _act(cat: int) -> int:
    return int(cat) << int(lib.BLK_TC_SHIFT)


def _categories(r: BioRecord) -> int:
    names = set(r.flag_names)
    what = _act(lib.BLK_TC_WRITE) if r.op_name != "read" else _act(lib.BLK_TC_READ)
    if r.op_name in ("discard", "secure-erase"):
        what |= _act(lib.BLK_TC_DISCARD)
    if r.op_name == "flush" or "preflush" in names:
        what |= _act(lib.BLK_TC_FLUSH)
    for flag, cat in (("sync", lib.BLK_TC_SYNC), ("rahead", lib.BLK_TC_AHEAD),
                      ("meta", lib.BLK_TC_META), ("fua", lib.BLK_TC_FUA)):
        if flag in names:
            what |= _act(cat)
    return what


def blktrace(items: Iterable[Item], out: BinaryIO, device: tuple[int, int], *,
             exact: bool = False) -> dict[str, int]:
    """Write the events blkparse reads from PREFIX.blktrace.0; returns what was written.

    Events go out in time order as soon as nothing read later can precede
    them (changes.Reorder): memory is about a second of events, not the
    capture. ``exact`` sorts them whole instead (the fallback when a
    capture's stamps break that horizon: ReorderedError).
    """
    dev = (device[0] << 20) | device[1]
    events: Reorder[tuple[int, int, bytes]] = Reorder(exact=exact)  # (time, order, event)
    named: set[int] = set()
    counts = {"queue": 0, "complete": 0, "bytes": 0}
    order = 0
    written = 0
    newest = -(1 << 62)

    def emit(ready: Iterable[tuple[int, int, bytes]]) -> None:
        nonlocal written
        for _, _, ev in ready:
            written += 1
            out.write(ev[:4] + struct.pack("<I", written) + ev[8:])

    for item in items:
        if not isinstance(item, BioRecord):
            continue
        r = item
        if r.pid not in named:
            named.add(r.pid)
            note = r.comm_raw
            events.push((r.submit_ns, order, _TRACE.pack(
                _MAGIC, 0, r.submit_ns, 0, 0, lib.BLK_TN_PROCESS, r.pid, dev, 0, 0, len(note)
            ) + note))
            order += 1
        cats = _categories(r)
        for kind, when, action, error in (
            ("queue", r.submit_ns, lib.BLK_TA_QUEUE, 0),
            ("complete", r.complete_ns, lib.BLK_TA_COMPLETE, r.status & 0xFFFF),
        ):
            events.push((when, order, _TRACE.pack(
                _MAGIC, 0, when, r.sector, r.size, action | cats, r.pid, dev, 0, error, 0)))
            order += 1
            counts[kind] += 1
        counts["bytes"] += r.size
        if r.submit_ns > newest:
            newest = r.submit_ns
            emit(events.release(newest))
    emit(events.drain())
    return counts


LOG_WRITES_MAGIC = 0x6A736677736872
LOG_WRITES_VERSION = 1
LW_FLUSH, LW_FUA, LW_DISCARD, LW_MARK, LW_META = 1, 2, 4, 8, 16
LW_END_MARK = "dm-log-writes-end"
_LW_SUPER = struct.Struct("<QQQI")
_LW_ENTRY = struct.Struct("<QQQQ")
SECTOR = 512
_ZEROS = bytes(1 << 20)


def _sector(data: bytes) -> bytes:
    return data + bytes(-len(data) % SECTOR)


class _Logged(NamedTuple):
    """What a log-writes entry needs of a record: never its data, which is
    read again from the capture (``data_at``) as the entry is written."""

    kind: str  # mark, write, zeroes, discard, flush
    sector: int
    sectors: int
    flags: int  # LW_* flags
    data_at: int  # the payload's offset in the capture (writes)
    size: int  # bytes
    label: bytes  # marks


def _logged(item: BioRecord | MarkRecord, chunk_at: int) -> _Logged:
    if isinstance(item, MarkRecord):
        return _Logged("mark", 0, 0, LW_MARK, -1, 0,
                       item.label.encode()[:SECTOR - _LW_ENTRY.size])
    names = set(item.flag_names)
    flags = (LW_FLUSH if item.op_name == "flush" or "preflush" in names else 0) | (
        LW_FUA if "fua" in names else 0) | (LW_META if "meta" in names else 0)
    if item.op_name == "write":
        if not item.has_payload:
            raise IncrementError(f"write {item.seq} has no data (capture mode meta): a "
                                 "log-writes log must hold every write")
        return _Logged("write", item.sector, item.sectors, flags,
                       chunk_at + item.payload_start, item.size, b"")
    if item.op_name == "write-zeroes":
        return _Logged("zeroes", item.sector, item.sectors, flags, -1, item.size, b"")
    if item.op_name in ("discard", "secure-erase"):
        return _Logged("discard", item.sector, item.sectors, flags | LW_DISCARD, -1, 0, b"")
    return _Logged("flush", 0, 0, flags, -1, 0, b"")


def _lw_order(reader: CaptureReader, *, exact: bool = False) -> Iterator[_Logged]:
    """The order dm-log-writes logs in: a mark at once; a FUA write when it
    completes; any other write (and a discard) when a flush made it durable:
    a flush takes the writes completed before it was mapped and logs them,
    then itself, when it completes; what no flush took comes last (the
    target logs it when it goes).  Failed bios are not logged.  A dropped
    record fails the export: the log would miss it."""
    events: Reorder[tuple[int, int, int, bool, _Logged]] = Reorder(exact=exact)
    unflushed: list[_Logged] = []
    took: dict[int, list[_Logged]] = {}
    newest = -(1 << 62)

    def walk(ready: Iterable[tuple[int, int, int, bool, _Logged]]) -> Iterator[_Logged]:
        nonlocal unflushed
        for _, kind, seq, fua, entry in ready:
            if kind == 1:
                yield entry
            elif kind == 0:
                took[seq], unflushed = unflushed, []
            elif seq in took:
                yield from took.pop(seq)
                yield entry
            elif fua:
                yield entry
            else:
                unflushed.append(entry)

    for item in reader.items():
        if isinstance(item, Drop):
            raise IncrementError(f"{reader.path} lost {item.count} record(s): a log-writes "
                                 "log must hold every write")
        if isinstance(item, MarkRecord):
            events.push((item.time_ns, 1, item.seq, False, _logged(item, 0)))
            continue
        if item.status == 0 and item.op_name in (
                "write", "write-zeroes", "discard", "secure-erase", "flush"):
            entry = _logged(item, reader.chunk_at)
            if entry.flags & LW_FLUSH:
                events.push((min(item.submit_ns, item.complete_ns), 0, item.seq, False, entry))
            events.push((item.complete_ns, 2, item.seq, bool(entry.flags & LW_FUA), entry))
        if item.submit_ns > newest:
            newest = item.submit_ns
            yield from walk(events.release(newest))
    yield from walk(events.drain())
    yield from unflushed


def log_writes(reader: CaptureReader, out: BinaryIO, *, exact: bool = False,
               progress: Progress | None = None) -> int:
    """Write a dm-log-writes log of the capture's changes and marks, in the
    target's own order (:func:`_lw_order`), each write's data copied from the
    capture as its entry is written; returns its entries."""
    out.write(bytes(SECTOR))  # the super block, written last
    n = 0
    source = reader.fileno()
    for e in metered(_lw_order(reader, exact=exact), reader, progress):
        if e.kind == "mark":
            # as dm-log-writes writes it: the label inside the entry's own
            # sector, right after the 32-byte entry, and no sector of its own
            out.write(_sector(_LW_ENTRY.pack(0, 0, LW_MARK, len(e.label)) + e.label))
        elif e.kind == "write":
            # data_len is the target's only for marks (and DAX's inline data)
            out.write(_sector(_LW_ENTRY.pack(e.sector, e.sectors, e.flags, 0)))
            left, at = e.size, e.data_at
            while left:
                data = os.pread(source, min(left, 1 << 20), at)
                if not data:
                    raise IncrementError(f"{reader.path} ended inside a payload")
                out.write(data)
                left -= len(data)
                at += len(data)
            out.write(bytes(-e.size % SECTOR))
        elif e.kind == "zeroes":
            # logged as a write of zeros, so replaying it needs no special case
            out.write(_sector(_LW_ENTRY.pack(e.sector, e.sectors, e.flags, 0)))
            left = e.size
            while left:
                out.write(_ZEROS[:min(left, len(_ZEROS))])
                left -= min(left, len(_ZEROS))
        else:  # a discard, an empty flush
            out.write(_sector(_LW_ENTRY.pack(e.sector, e.sectors, e.flags, 0)))
        n += 1
    # the target ends every log with this mark when it goes (replay-log's
    # --end-mark finds it)
    end = LW_END_MARK.encode()
    out.write(_sector(_LW_ENTRY.pack(0, 0, LW_MARK, len(end)) + end))
    n += 1
    out.seek(0)
    out.write(_sector(_LW_SUPER.pack(LOG_WRITES_MAGIC, LOG_WRITES_VERSION, n, SECTOR)))
    return n


def jsonl(items: Iterable[Item], out: BinaryIO, *, with_payload: bool = False) -> int:
    n = 0
    for item in items:
        out.write(render.dumps(render.item_json(item, with_payload=with_payload)).encode() + b"\n")
        n += 1
    return n


#: The formats export_capture writes; each but log-writes (which seeks back
#: to its super block) may go to a stream (``-``, a FIFO).
FORMATS = ("blktrace", "jsonl", "log-writes")


def export_capture(capture: Path, fmt: str, out: Path, *, device: tuple[int, int] = (253, 0),
                   with_payload: bool = False, progress: Progress | None = None) -> int:
    """Write ``capture`` to ``out`` in ``fmt`` (one of :data:`FORMATS`): the
    bios of a blktrace trace, the records of JSON lines (payloads as hex with
    ``with_payload``), or the entries of a dm-log-writes log; returns that
    count.  ``device`` is the major:minor blktrace events carry.  The capture
    is read once, in bounded memory, and checked whole on the way; ``out`` is
    written whole or not at all (output.py), never over the capture itself, so
    a damaged capture leaves nothing (a stream, ``-`` or a FIFO, gets nothing:
    the capture is checked before it).  A log-writes log must hold every
    write's data.  ``progress`` hears the bytes of the capture read."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    streams = fmt != "log-writes"
    check_writable(out, inputs=(capture,), stream_ok=streams)
    files.require_capture(capture, "export")
    to_stream = streams and is_stream(out)
    if to_stream:
        # what goes down a pipe cannot be taken back: check the capture first
        with CaptureReader(capture) as check:
            check.validate()
    for exact in (False, True):
        try:
            with atomic_output(out, inputs=(capture,), stream_ok=streams) as f, \
                    CaptureReader(capture) as reader:
                # one pass: every chunk and the trailer are checked as it goes,
                # before the output is renamed into place
                items = metered(reader.items(), reader, progress)
                if fmt == "blktrace":
                    return blktrace(items, f, device, exact=exact)["queue"]
                if fmt == "jsonl":
                    return jsonl(items, f, with_payload=with_payload)
                return log_writes(reader, f, exact=exact, progress=progress)
        except ReorderedError:
            if to_stream:
                raise IncrementError(
                    f"{capture}'s time stamps are out of order by more than a second: "
                    "export it to a file (where it is then sorted whole), not a stream"
                ) from None
    raise AssertionError("the exact pass does not reorder")
