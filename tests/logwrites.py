"""A strict reader of dm-log-writes' log, written from the kernel target's
rules, not from our exporter's: the tests read the kernel's own log with it
(tests/guest/test_log_writes.py) and hold our export to the same reader.

The rules (drivers/md/dm-log-writes.c, and xfstests' replay-log that reads
it): sector 0 holds the super block {magic, version 1, entry count, sector
size}, zero-padded; entries start at sector 1.  Each entry is one sector: the
32-byte {sector, nr_sectors, flags, data_len}, then, for a mark only, its
label (data_len bytes) in the same sector, and zeros to the sector's end;
any other entry has data_len 0.  A write's data follows in nr_sectors
sectors of its own; a discard, a flush and a mark have none.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
_SUPER = struct.Struct("<QQQI")
_ENTRY = struct.Struct("<QQQQ")


class MalformedLogError(AssertionError):
    """The log breaks one of the format's rules."""


@dataclass(frozen=True)
class Entry:
    sector: int
    nr_sectors: int
    flags: int
    data: bytes  # a write's data, or a mark's label

    @property
    def kind(self) -> str:
        if self.flags & MARK:
            return "mark"
        if self.flags & DISCARD:
            return "discard"
        if not self.nr_sectors:
            return "flush"
        return "write"


def read(log: bytes) -> list[Entry]:
    """Every entry the super block counts, checked against the rules above."""
    magic, version, count, size = _SUPER.unpack_from(log, 0)
    if magic != MAGIC or version != VERSION:
        raise MalformedLogError(f"super block: magic {magic:#x}, version {version}")
    if size < _ENTRY.size or size & (size - 1):
        raise MalformedLogError(f"super block: sector size {size}")
    if any(log[_SUPER.size:size]):
        raise MalformedLogError("super block: not zero-padded")
    entries: list[Entry] = []
    pos = size
    for n in range(count):
        if pos + size > len(log):
            raise MalformedLogError(f"entry {n}: past the end of the log")
        sector, nr_sectors, flags, data_len = _ENTRY.unpack_from(log, pos)
        rest = log[pos + _ENTRY.size:pos + size]
        if flags & MARK:
            if nr_sectors or not 0 < data_len <= len(rest):
                raise MalformedLogError(f"entry {n}: a mark with {nr_sectors} sectors, {data_len} "
                                "bytes of label")
            data, pad = rest[:data_len], rest[data_len:]
        else:
            if data_len:
                raise MalformedLogError(f"entry {n}: data_len {data_len} outside a mark")
            data, pad = b"", rest
        if any(pad):
            raise MalformedLogError(f"entry {n}: its sector is not zero-padded")
        pos += size
        if not flags & (MARK | DISCARD) and nr_sectors:
            end = pos + nr_sectors * size
            if end > len(log):
                raise MalformedLogError(f"entry {n}: its data runs past the end of the log")
            data, pos = log[pos:end], end
        entries.append(Entry(sector, nr_sectors, flags, data))
    return entries
