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

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from imgrement_dm import layout, render
from imgrement_dm._kernel_ffi import lib
from imgrement_dm.errors import IncrementError
from imgrement_dm.formats import files
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.output import atomic_output, check_writable
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


def blktrace(items: Iterable[Item], out: BinaryIO, device: tuple[int, int]) -> dict[str, int]:
    """Write the events blkparse reads from PREFIX.blktrace.0; returns what was written."""
    dev = (device[0] << 20) | device[1]
    events: list[tuple[int, int, bytes]] = []  # (time, order, packed event)
    named: set[int] = set()
    counts = {"queue": 0, "complete": 0, "bytes": 0}
    order = 0
    for item in items:
        if not isinstance(item, BioRecord):
            continue
        r = item
        if r.pid not in named:
            named.add(r.pid)
            note = r.comm_raw
            events.append((r.submit_ns, order, _TRACE.pack(
                _MAGIC, 0, r.submit_ns, 0, 0, lib.BLK_TN_PROCESS, r.pid, dev, 0, 0, len(note)
            ) + note))
            order += 1
        cats = _categories(r)
        for kind, when, action, error in (
            ("queue", r.submit_ns, lib.BLK_TA_QUEUE, 0),
            ("complete", r.complete_ns, lib.BLK_TA_COMPLETE, r.status & 0xFFFF),
        ):
            events.append((when, order, _TRACE.pack(
                _MAGIC, 0, when, r.sector, r.size, action | cats, r.pid, dev, 0, error, 0)))
            order += 1
            counts[kind] += 1
        counts["bytes"] += r.size
    events.sort(key=lambda e: (e[0], e[1]))
    for seq, (_, _, ev) in enumerate(events, start=1):
        out.write(ev[:4] + struct.pack("<I", seq) + ev[8:])
    return counts


LOG_WRITES_MAGIC = 0x6A736677736872
LOG_WRITES_VERSION = 1
LW_FLUSH, LW_FUA, LW_DISCARD, LW_MARK, LW_META = 1, 2, 4, 8, 16
LW_END_MARK = "dm-log-writes-end"
_LW_SUPER = struct.Struct("<QQQI")
_LW_ENTRY = struct.Struct("<QQQQ")
SECTOR = 512


def _sector(data: bytes) -> bytes:
    return data + bytes(-len(data) % SECTOR)


def _lw_order(items: Iterable[Item]) -> list[Item]:
    """The order dm-log-writes logs in: a mark at once; a FUA write when it
    completes; any other write (and a discard) when a flush made it durable:
    a flush takes the writes completed before it was mapped and logs them,
    then itself, when it completes; what no flush took comes last (the
    target logs it when it goes).  Failed bios are not logged."""
    events: list[tuple[int, int, int, Item]] = []
    for item in items:
        if isinstance(item, Drop):
            continue
        if isinstance(item, MarkRecord):
            events.append((item.time_ns, 1, item.seq, item))
            continue
        if item.status != 0 or item.op_name not in (
                "write", "write-zeroes", "discard", "secure-erase", "flush"):
            continue
        if "preflush" in item.flag_names or item.op_name == "flush":
            events.append((min(item.submit_ns, item.complete_ns), 0, item.seq, item))
        events.append((item.complete_ns, 2, item.seq, item))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    logged: list[Item] = []
    unflushed: list[Item] = []
    took: dict[int, list[Item]] = {}
    for _, kind, seq, item in events:
        if kind == 1:
            logged.append(item)
        elif kind == 0:
            took[seq], unflushed = unflushed, []
        elif isinstance(item, BioRecord) and seq in took:
            logged += [*took.pop(seq), item]
        elif isinstance(item, BioRecord) and "fua" in item.flag_names:
            logged.append(item)
        else:
            unflushed.append(item)
    return logged + unflushed


def log_writes(items: Iterable[Item], out: BinaryIO) -> int:
    """Write a dm-log-writes log of the changes and marks, in the target's
    own order (:func:`_lw_order`); returns its entries."""
    out.write(bytes(SECTOR))  # the super block, written last
    n = 0
    for item in _lw_order(items):
        if isinstance(item, MarkRecord):
            # as dm-log-writes writes it: the label inside the entry's own
            # sector, right after the 32-byte entry, and no sector of its own
            label = item.label.encode()[:SECTOR - _LW_ENTRY.size]
            out.write(_sector(_LW_ENTRY.pack(0, 0, LW_MARK, len(label)) + label))
            n += 1
            continue
        if isinstance(item, Drop):
            continue
        names = set(item.flag_names)
        flags = (LW_FLUSH if item.op_name == "flush" or "preflush" in names else 0) | (
            LW_FUA if "fua" in names else 0) | (LW_META if "meta" in names else 0)
        if item.op_name == "write":
            data = bytes(item.payload)
            # data_len is the target's only for marks (and DAX's inline data)
            out.write(_sector(_LW_ENTRY.pack(item.sector, item.sectors, flags, 0)))
            out.write(_sector(data))
        elif item.op_name == "write-zeroes":
            # logged as a write of zeros, so replaying it needs no special case
            out.write(_sector(_LW_ENTRY.pack(item.sector, item.sectors, flags, 0)))
            out.write(bytes(item.size))
        elif item.op_name in ("discard", "secure-erase"):
            out.write(_sector(_LW_ENTRY.pack(item.sector, item.sectors, flags | LW_DISCARD, 0)))
        else:  # an empty flush
            out.write(_sector(_LW_ENTRY.pack(0, 0, flags, 0)))
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
                   with_payload: bool = False) -> int:
    """Write ``capture`` to ``out`` in ``fmt`` (one of :data:`FORMATS`): the
    bios of a blktrace trace, the records of JSON lines (payloads as hex with
    ``with_payload``), or the entries of a dm-log-writes log; returns that
    count.  ``device`` is the major:minor blktrace events carry.  The whole
    capture is checked first (a damaged one writes nothing), a log-writes log
    must hold every write's data, and ``out`` is written whole or not at all
    (output.py), never over the capture itself."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    streams = fmt != "log-writes"
    check_writable(out, inputs=(capture,), stream_ok=streams)
    files.require_capture(capture, "export")
    with CaptureReader(capture) as reader:
        items = list(reader.items())  # checks every chunk and the trailer as it goes
        info = reader.info
    assert info is not None  # items() sets it at the trailer, or raises
    if fmt == "log-writes":
        missing = sum(isinstance(i, BioRecord) and i.op_name == "write"
                      and not i.has_payload for i in items)
        if missing or info.drops:
            raise IncrementError(
                f"{capture} lacks data ({missing} writes without payload, "
                f"{info.drops} drops): a log-writes log must hold every write"
            )
    with atomic_output(out, inputs=(capture,), stream_ok=streams) as f:
        if fmt == "blktrace":
            return blktrace(items, f, device)["queue"]
        if fmt == "jsonl":
            return jsonl(items, f, with_payload=with_payload)
        return log_writes(items, f)
