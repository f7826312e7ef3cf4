"""Capture files: a durable, checksummed record of one device's stream.

Layout (all little-endian; docs/capture-format.md):

    file header   96 bytes: magic "IMGRCAP1", format version, record version,
                  device sectors, start time, device name, header crc32
    chunks        "CHNK", payload length, record count, checksum of the
                  payload (XXH3 from version 4, XXH64 in version 3, zlib's
                  crc32 before), then the
                  payload: records exactly as the kernel gave them
    padding       "PAD ", length, that many zero bytes (from version 2): put
                  before a large chunk so that its payload can be written
                  with O_DIRECT from where the kernel left it (directio.py)
    trailer       "DONE", records, drops, last sequence number, crc32

A reader checks every checksum and the trailer, so a truncated or corrupted file
is reported (with how much of it is intact), never silently used. A writer
writes FILE.part and renames it only when the trailer is down (output.py).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imgrement_dm import layout
from imgrement_dm.checksum import xxh3, xxh64
from imgrement_dm.directio import BLOCK, DirectAppender, address_of
from imgrement_dm.errors import CaptureError, StreamError, cannot_open
from imgrement_dm.output import atomic_appender
from imgrement_dm.records import Buf, Drop, Item, Record, _Gaps, decode, scan

MAGIC = b"IMGRCAP1"
FORMAT_VERSION = 4
#: Versions this module reads: 1 has no padding chunks, 2 may have them,
#: 3 checksums chunks with XXH64 instead of crc32, 4 with XXH3 (64-bit).
READS_VERSIONS = (1, 2, 3, 4)
_HEADER = struct.Struct("<8sIIQQ32sI")  # magic, version, record version, sectors, ns, name, crc
_HEADER_SIZE = 96  # the struct, then zeros (room to grow)
_CHUNK = struct.Struct("<4sIIQ")  # tag, payload bytes, records, checksum(payload)
_CHUNK_CRC32 = struct.Struct("<4sIII")  # the same in versions 1 and 2, with crc32
_TRAILER = struct.Struct("<4sQQqI")  # tag, records, drops, last seq (-1: none), crc32
_PAD = struct.Struct("<4sI")  # tag, bytes of zeros that follow
#: A window at least this large is written in place (padded to line up);
#: smaller ones are copied, and the padding (under a block) would cost more.
IN_PLACE_MIN = 256 << 10
_MAX_PAD = 2 * BLOCK  # a reader refuses more: no writer makes it
_MAP_MIN = 1 << 20  # a chunk at least this large is read into a mapping of its own
#: Its pages made at once: a fault a page cost 0.6 s per GiB read.
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0x8000)


@dataclass(frozen=True)
class CaptureInfo:
    device: str
    sectors: int
    started_ns: int  # CLOCK_REALTIME
    records: int
    drops: int
    last_seq: int


class CaptureWriter:
    """Writes a capture into ``f``; :meth:`finish` adds the trailer.

    ``f`` is FILE.part, renamed to FILE only once the trailer is down (see
    :func:`write_capture`). A large chunk's payload is written in place
    (:meth:`DirectAppender.write_in_place`), after a padding chunk that
    lines its file offset up with its address in memory.
    """

    def __init__(self, f: DirectAppender, device: str, sectors: int) -> None:
        self.records = 0
        self.drops = 0
        self.bytes = 0
        self.last_seq = -1
        self._f = f
        name = device.encode()[:32]
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, layout.RECORD_VERSION, sectors,
                            time.time_ns(), name, 0)
        crc = zlib.crc32(head[: _HEADER.size - 4])
        head = head[: _HEADER.size - 4] + struct.pack("<I", crc)
        self._f.write(head + bytes(_HEADER_SIZE - len(head)))

    def add(self, raw: bytes | memoryview) -> None:
        """Append whole records as read from the stream (headers checked, not decoded)."""
        try:
            count, first, last, gaps = scan(raw)
        except StreamError as e:
            raise CaptureError(f"a chunk must hold whole records: {e}") from None
        if not count:
            return
        if self.last_seq >= 0 and first != self.last_seq + 1:
            gaps += first - self.last_seq - 1
        head = _CHUNK.pack(b"CHNK", len(raw), count, xxh3(raw))
        if len(raw) >= IN_PLACE_MIN and self._f.direct:
            pad = (address_of(raw) - self._f.tell() - _PAD.size - len(head)) % BLOCK
            self._f.write(_PAD.pack(b"PAD ", pad) + bytes(pad))
        self._f.write(head)
        if len(raw) >= IN_PLACE_MIN:
            self._f.write_in_place(raw)
        else:
            self._f.write(raw)
        self.records += count
        self.bytes += len(raw)
        self.last_seq = last
        self.drops += gaps

    def finish(self) -> None:
        """Write the trailer: from here on the file is a complete capture."""
        body = struct.pack("<4sQQq", b"DONE", self.records, self.drops, self.last_seq)
        self._f.write(body + struct.pack("<I", zlib.crc32(body)))


@contextlib.contextmanager
def write_capture(path: Path, device: str, sectors: int) -> Iterator[CaptureWriter]:
    """A capture written to PATH.part and renamed to PATH, with its trailer, if the block ends well.

    On any failure PATH is left as it was and no .part remains. Written
    with O_DIRECT where the file system allows it (see directio.py).
    """
    with atomic_appender(path) as out:
        writer = CaptureWriter(out, device, sectors)
        yield writer
        writer.finish()


class CaptureReader:
    """Validates a capture file while iterating its records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._f: io.BufferedReader = path.open("rb")
        except OSError as e:
            raise cannot_open(CaptureError, path, e) from None
        head = self._f.read(_HEADER_SIZE)
        if head[:8] != MAGIC:
            self._f.close()
            raise CaptureError(f"{path} is not an imgrement capture file")
        if len(head) < _HEADER_SIZE:
            self._f.close()
            raise CaptureError(f"{path} is truncated: {len(head)} bytes, less than a "
                               f"capture's {_HEADER_SIZE}-byte header")
        _, version, rec_version, sectors, started, name, crc = _HEADER.unpack_from(head)
        if zlib.crc32(head[: _HEADER.size - 4]) != crc:
            self._f.close()
            raise CaptureError(f"{path}: the file header is corrupted (checksum mismatch)")
        if version not in READS_VERSIONS or rec_version not in layout.READS_RECORD_VERSIONS:
            self._f.close()
            raise CaptureError(
                f"{path} is capture format {version} with record version {rec_version}; "
                f"this tool reads {' or '.join(map(str, READS_VERSIONS))} / "
                f"{layout.record_versions_read()}"
            )
        self.version = version
        self._chunk = _CHUNK if version >= 3 else _CHUNK_CRC32
        self._checksum: Callable[[Buf], int] = (xxh3 if version >= 4 else xxh64
                                                if version == 3 else zlib.crc32)
        self._size = os.fstat(self._f.fileno()).st_size
        self.device = name.rstrip(b"\0").decode("utf-8", "replace")
        self.sectors = sectors
        self.started_ns = started
        self.info: CaptureInfo | None = None
        #: The file offset of the chunk whose records :meth:`items` is
        #: yielding: with :attr:`BioRecord.payload_start`, where a payload is
        #: in the file, for tools that read it again instead of keeping it.
        self.chunk_at = 0

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, what: str, chunks: int, records: int) -> CaptureError:
        return CaptureError(
            f"{self.path} is {what} after {chunks} intact chunk(s) ({records} records); "
            "it was refused whole, and nothing was written from it: record again (the "
            "tools take only captures that end with their trailer)"
        )

    def _left(self) -> int:
        """Bytes from here to the end of the file (a capture does not grow)."""
        return self._size - self._f.tell()

    def items(self) -> Iterator[Item]:
        """Records and drops, in stream order; raises CaptureError on any damage."""
        gaps = _Gaps(None)
        chunks = records = drops = 0
        while True:
            tag = self._f.read(4)
            if tag == b"CHNK":
                rest = self._f.read(self._chunk.size - 4)
                if len(rest) < self._chunk.size - 4:
                    raise self._fail("truncated", chunks, records)
                _, length, count, crc = self._chunk.unpack(tag + rest)
                if length > self._left():
                    # checked before reading: a damaged length must not make
                    # us allocate gigabytes for a file that does not hold them
                    raise self._fail("truncated", chunks, records)
                self.chunk_at = self._f.tell()
                raw: Buf
                if length >= _MAP_MIN:
                    # its own mapping: unmapped when its last record goes, where
                    # a heap block would stay with the process (glibc keeps
                    # freed blocks of this size: 35 MiB of RSS for a 1 GiB
                    # capture grew to 41 at 8 GiB; 31 flat this way)
                    raw = mmap.mmap(-1, length, flags=_MAP_FLAGS)
                    got = self._f.readinto(raw)
                else:
                    raw = self._f.read(length)
                    got = len(raw)
                if got < length:
                    raise self._fail("truncated", chunks, records)
                if self._checksum(raw) != crc:
                    raise self._fail("corrupted (chunk checksum mismatch)", chunks, records)
                recs, used = decode(raw)
                if used != length or len(recs) != count:
                    raise self._fail("corrupted (chunk does not hold its records)",
                                     chunks, records)
                chunks += 1
                records += count
                for item in gaps.feed(recs):
                    if isinstance(item, Drop):
                        drops += item.count
                    yield item
            elif tag == b"PAD " and self.version >= 2:
                rest = self._f.read(_PAD.size - 4)
                if len(rest) < _PAD.size - 4:
                    raise self._fail("truncated", chunks, records)
                (pad,) = struct.unpack("<I", rest)
                if pad > _MAX_PAD:
                    raise self._fail("corrupted (padding too long)", chunks, records)
                if pad > self._left():
                    raise self._fail("truncated", chunks, records)
                if self._f.read(pad).count(0) != pad:
                    raise self._fail("corrupted (padding not zeros)", chunks, records)
            elif tag == b"DONE":
                rest = self._f.read(_TRAILER.size - 4)
                if len(rest) < _TRAILER.size - 4:
                    raise self._fail("truncated", chunks, records)
                _, n, d, last, crc = _TRAILER.unpack(tag + rest)
                if zlib.crc32(tag + rest[:-4]) != crc:
                    raise self._fail("corrupted (trailer checksum mismatch)", chunks, records)
                if (n, d) != (records, drops):
                    raise self._fail("inconsistent (trailer counts differ)", chunks, records)
                if self._f.read(1):
                    raise self._fail("corrupted (data after the trailer)", chunks, records)
                self.info = CaptureInfo(self.device, self.sectors, self.started_ns,
                                        n, d, last)
                return
            elif not tag:
                raise self._fail("truncated (no trailer: the recording did not finish)",
                                 chunks, records)
            else:
                raise self._fail("corrupted (unknown chunk tag)", chunks, records)

    @property
    def size(self) -> int:
        """The capture file's size in bytes."""
        return self._size

    def position(self) -> int:
        """Bytes read so far (for progress)."""
        return self._f.tell()

    def fileno(self) -> int:
        """The capture's descriptor, for reading payloads again by offset."""
        return self._f.fileno()

    def validate(self) -> CaptureInfo:
        """Read the whole file, checking every checksum and the trailer."""
        for _ in self.items():
            pass
        assert self.info is not None
        return self.info

    def records(self) -> list[Record]:
        """All records, after validating the whole file; drops counted in :attr:`info`."""
        return [i for i in self.items() if not isinstance(i, Drop)]
