"""The record stream: decode it, read it live or from a file, save it.

A live stream comes from /sys/kernel/debug/imgrement/<name>/records, where
every read() returns whole records.  A saved stream is the same bytes behind
a 16-byte file header.  Either way the reader yields :class:`BioRecord`,
:class:`MarkRecord` and, where sequence numbers jump, :class:`Drop`: a drop
is never silent.  Payloads are memoryviews into the bytes that were read,
not copies.
"""

from __future__ import annotations

import errno
import gc
import mmap
import os
import select
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, Union

from imgrement_dm import layout
from imgrement_dm._kernel_ffi import ffi, lib
from imgrement_dm.errors import StreamError, StreamNotFoundError, cannot_open
from imgrement_dm.window import UNSUPPORTED, MappedStream

DEBUGFS = Path("/sys/kernel/debug")
STREAM_DIR = DEBUGFS / "imgrement"
#: A saved stream starts with these 16 bytes; the last is the record version
#: (of the tool that saved it: each record carries its own too).
STREAM_MAGIC = b"IMGREMENT-RECS\0" + bytes([layout.RECORD_VERSION])
READ_SIZE = 4 << 20

T = TypeVar("T")
#: What records are decoded from: bytes read, or a chunk read into its own
#: anonymous mapping (formats.capture), which goes back to the system whole.
Buf = Union[bytes, mmap.mmap]

_HDR = layout.HEADER
_BIO = layout.BIO
_SEG = layout.SEGMENT
_MARK = layout.MARK


@dataclass(frozen=True)
class Segment:
    """One piece of one page of a bio."""

    # slots by hand (dataclass(slots=True) needs Python 3.10): a record
    # gives up to 65,535 of them
    __slots__ = ("len", "offset", "sector")

    len: int
    offset: int
    sector: int


#: The most segments a record gives: version 1 kept the first this many.
MAX_SEGMENTS = 0xFFFF
#: The least and most page sizes a version 2 record may name (512 B, 1 MiB):
#: a corrupt shift would otherwise cut a run into billions of pieces, or none.
_PAGE_SHIFTS = range(9, 21)


def _cut(run: tuple[int, int, int], done: int, page: int) -> Iterator[Segment]:
    """The segments of one run (version 2): ``len`` bytes from ``offset``,
    cut at every ``page`` boundary.  ``done`` is the bytes of the bio before
    the run; each segment's sector is the bio's plus the bytes before it, as
    the target computes it, so a segment that starts inside a sector keeps
    that sector."""
    length, offset, sector = run
    if not length:
        yield Segment(0, offset, sector)
        return
    first = done >> 9
    while length:
        piece = min(length, page - offset)
        yield Segment(piece, offset, sector + (done >> 9) - first)
        done += piece
        length -= piece
        offset = 0


def _field(name: str, doc: str) -> property:
    index = layout.BIO_FIELDS.index(name)
    return property(lambda self: self._f[index], doc=doc)


_STATUS = layout.BIO_FIELDS.index("status")
_VERSION = layout.BIO_FIELDS.index("hdr.version")
_PAGE_SHIFT = layout.BIO_FIELDS.index("hdr.page_shift")


class BioRecord:
    """One bio, as the target saw it.

    The fixed part is unpacked in one call when the record is decoded;
    segments and payload are read from the stream's bytes only when asked.
    """

    __slots__ = ("_at", "_buf", "_f")

    _buf: Buf
    _at: int
    _f: tuple[Any, ...]

    seq = _field("hdr.seq", "per-device sequence number")
    sector = _field("sector", "start sector (512 bytes) on the traced device")
    size = _field("bytes", "bytes in the bio")
    op = _field("op", "operation (layout.OPS)")
    raw_op = _field("raw_op", "the kernel's REQ_OP_* value")
    nr_entries = _field("nr_segments", "segment entries in the record (runs, version 2)")
    flags = _field("flags", "IMGREMENT_F_* bits")
    rflags = _field("rflags", "IMGREMENT_R_* bits")
    submit_ns = _field("submit_ns", "CLOCK_MONOTONIC at map")
    complete_ns = _field("complete_ns", "CLOCK_MONOTONIC at completion")
    pid = _field("pid", "submitter's thread group id")
    tid = _field("tid", "submitter's thread id")
    payload_len = _field("payload_len", "bytes of payload")
    comm_raw = _field("comm", "submitter's command, NUL-padded")

    @property
    def status(self) -> int:
        """0 or a negative errno."""
        v: int = self._f[_STATUS]
        return v - (1 << 32) if v & 0x80000000 else v

    @property
    def op_name(self) -> str:
        return layout.OPS.get(self.op, f"op{self.op}")

    @property
    def flag_names(self) -> list[str]:
        return layout.flag_names(self.flags)

    @property
    def comm(self) -> str:
        raw: bytes = self.comm_raw
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def latency_ns(self) -> int:
        return int(self.complete_ns - self.submit_ns)

    @property
    def sectors(self) -> int:
        return int(self.size) >> 9

    @property
    def has_payload(self) -> bool:
        return bool(self.rflags & layout.PAYLOAD_FLAG)

    @property
    def payload_lost(self) -> bool:
        """The data was to be kept but could never fit the buffer (drop mode)."""
        return bool(self.rflags & layout.NO_ROOM_FLAG)

    def _parts_end(self) -> int:
        """Where segments and payload end; StreamError if they overrun the record.

        Checked here, when they are read, not in :func:`decode`: the check
        there cost a fifth of the decoder's speed, and most records are
        never asked for their parts.
        """
        end: int = self._at + _BIO.size + self.nr_entries * _SEG.size + self.payload_len
        size: int = self._f[0]
        if end > self._at + size:
            raise StreamError(
                f"corrupt record stream: bio record {self.seq} of {size} bytes claims "
                f"{self.nr_entries} segment entries and {self.payload_len} payload bytes")
        return end

    @property
    def entries(self) -> list[tuple[int, int, int]]:
        """The segment entries as the record holds them, (len, page offset,
        sector): version 2's runs, version 1's segments."""
        self._parts_end()
        at = self._at + _BIO.size
        return [_SEG.unpack_from(self._buf, at + i * _SEG.size)
                for i in range(self.nr_entries)]

    @property
    def segments(self) -> list[Segment]:
        """The bio's segments, the pieces of pages ``bio_for_each_segment()``
        gives: a version 2 record keeps them as runs, cut here at its page
        size (a 1 MiB write is one entry of 16 bytes, not 256).  At most
        the first :data:`MAX_SEGMENTS`, as many as a version 1 record kept."""
        if self._f[_VERSION] == 1:
            return [Segment(*e) for e in self.entries]
        runs, page = self._runs()
        out: list[Segment] = []
        done = 0
        for run in runs:
            out.extend(islice(_cut(run, done, page), MAX_SEGMENTS - len(out)))
            if len(out) == MAX_SEGMENTS:
                break
            done += run[0]
        return out

    @property
    def nr_segments(self) -> int:
        """How many segments :attr:`segments` gives, counted without making them."""
        if self._f[_VERSION] == 1:
            return int(self.nr_entries)
        runs, page = self._runs()
        n = sum(-(-(offset + length) // page) if length else 1 for length, offset, _ in runs)
        return min(n, MAX_SEGMENTS)

    def _runs(self) -> tuple[list[tuple[int, int, int]], int]:
        """A version 2 record's runs and page size, checked: a corrupt one
        would otherwise be cut into pieces without end."""
        shift: int = self._f[_PAGE_SHIFT]
        if shift not in _PAGE_SHIFTS:
            raise StreamError(
                f"corrupt record stream: bio record {self.seq} names a page of 2**{shift} "
                "bytes")
        page = 1 << shift
        runs = self.entries
        if any(offset >= page for _, offset, _ in runs):
            raise StreamError(
                f"corrupt record stream: bio record {self.seq} has a segment starting past "
                f"its {page}-byte page")
        if sum(length for length, _, _ in runs) > self.size:
            raise StreamError(
                f"corrupt record stream: bio record {self.seq}'s segments cover more than "
                f"its {self.size} bytes")
        return runs, page

    @property
    def payload_start(self) -> int:
        """Where the payload starts in the bytes the record was decoded from."""
        return self._parts_end() - int(self.payload_len)

    @property
    def payload(self) -> memoryview:
        """The data (empty unless :attr:`has_payload`); a view, not a copy."""
        end = self._parts_end()
        return memoryview(self._buf)[end - self.payload_len : end]

    def __repr__(self) -> str:
        return (
            f"BioRecord(seq={self.seq}, {self.op_name}, sector={self.sector}, "
            f"size={self.size}, flags={self.flag_names}, status={self.status})"
        )


@dataclass(frozen=True)
class MarkRecord:
    """A mark set with ``mark <label>``."""

    seq: int
    time_ns: int
    label: str


@dataclass(frozen=True)
class Drop:
    """``count`` records from ``first_seq`` on were dropped (buffer full)."""

    first_seq: int
    count: int


Record = Union[BioRecord, MarkRecord]
Item = Union[BioRecord, MarkRecord, Drop]


_new_bio = object.__new__


def _mark(buf: Buf, at: int) -> MarkRecord:
    _size, _type, _ver, _res, seq, time_ns, label_len, _r = _MARK.unpack_from(buf, at)
    start = at + _MARK.size
    return MarkRecord(seq, time_ns, buf[start : start + label_len].decode("utf-8", "replace"))


def decode(buf: Buf, start: int = 0) -> tuple[list[Record], int]:
    """Decode whole records from ``buf``; return them and the offset after the last.

    Raises :class:`StreamError` for anything that is not a valid record.
    The common case (a well-formed bio record) takes the short path; every
    other case goes through :func:`_decode_other`, which does the checks.

    The garbage collector is paused meanwhile: records hold no cycles, and
    its passes over the growing list of new objects took half the time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _decode(buf, start)
    finally:
        if enabled:
            gc.enable()


def _decode(buf: Buf, start: int) -> tuple[list[Record], int]:
    out: list[Record] = []
    append = out.append
    at = start
    end = len(buf)
    bio = _BIO.unpack_from
    new = _new_bio
    bio_type, bio_min = layout.REC_BIO, _BIO.size
    versions = layout.READS_RECORD_VERSIONS
    last_bio = end - bio_min  # where the fixed part of a bio still fits
    while at <= last_bio:
        f = bio(buf, at)  # (size, type, version, ...): read as a bio, checked below
        size = f[0]
        if (f[1] == bio_type and f[2] in versions and size >= bio_min and not size & 7
                and at + size <= end):
            r = new(BioRecord)
            r._buf = buf
            r._at = at
            r._f = f
            append(r)
            at += size
            continue
        at, done = _other_at(buf, at, out)
        if done:
            return out, at
    while at + _HDR.size <= end:  # records too short to be bios, near the end
        at, done = _other_at(buf, at, out)
        if done:
            break
    return out, at


def _other_at(buf: Buf, at: int, out: list[Record]) -> tuple[int, bool]:
    """Whatever is at ``at`` that is not a whole bio: (next offset, stop here)."""
    size, rtype, version, _res, _seq = _HDR.unpack_from(buf, at)
    if at + size > len(buf) and size >= _HDR.size and not size & 7:
        return at, True  # the rest of this record has not arrived yet
    other = _decode_other(buf, at, size, rtype, version)
    if other is not None:
        out.append(other)
    return at + size, False


def _decode_other(buf: Buf, at: int, size: int, rtype: int, version: int) -> Record | None:
    if size < _HDR.size or size % 8:
        raise StreamError(f"corrupt record stream: record size {size} at byte {at}")
    if rtype == layout.REC_PAD:
        return None  # only size and type of a pad are meaningful
    if version not in layout.READS_RECORD_VERSIONS:
        raise StreamError(
            f"record version {version} at byte {at}; this tool reads version "
            f"{layout.record_versions_read()}: use the imgrement-dm that matches the module"
        )
    if rtype == layout.REC_MARK:
        if size < _MARK.size or _MARK.unpack_from(buf, at)[6] > size - _MARK.size:
            raise StreamError(f"corrupt record stream: mark record of {size} bytes at "
                              f"byte {at}")
        return _mark(buf, at)
    if rtype == layout.REC_BIO:
        raise StreamError(f"corrupt record stream: bio record of {size} bytes (or parts "
                          f"larger than it) at byte {at}")
    raise StreamError(f"unknown record type {rtype} at byte {at}")


def scan(buf: bytes | memoryview) -> tuple[int, int, int, int]:
    """Walk only the headers of whole records: (records, first seq, last seq, gaps).

    ``gaps`` counts sequence numbers missing inside ``buf``. A consumer that
    only stores the stream (record) needs no more than this. The walk is in
    C (_stream.c): in Python it cost about 8 us per record in the guest,
    2 s of CPU per GB of 4 KiB writes, taken from the disk being recorded.
    """
    out = ffi.new("struct imgrement_scan *")
    rc = lib.imgrement_scan(ffi.from_buffer("uint8_t[]", buf), len(buf), out)
    if rc == lib.IMGREMENT_SCAN_BAD_SIZE:
        raise StreamError(f"corrupt record stream: record size {out.bad_size} at byte {out.at}")
    if rc != lib.IMGREMENT_SCAN_OK:
        raise StreamError("the stream ends inside a record")
    if not out.records:
        return 0, -1, -1, 0
    return out.records, out.first, out.last, out.gaps


class _Gaps:
    """Turns jumps in sequence numbers into explicit :class:`Drop` items."""

    def __init__(self, next_seq: int | None) -> None:
        self.next_seq = next_seq

    def feed(self, records: list[Record]) -> list[Item]:
        out: list[Item] = []
        for r in records:
            if self.next_seq is not None and r.seq != self.next_seq:
                if r.seq < self.next_seq:
                    raise StreamError(
                        f"sequence went back from {self.next_seq} to {r.seq}: "
                        "two streams mixed?"
                    )
                out.append(Drop(self.next_seq, r.seq - self.next_seq))
            out.append(r)
            self.next_seq = r.seq + 1
        return out


def _devno(name: str) -> str | None:
    """``major:minor`` of /dev/mapper/NAME, or None if there is no such node."""
    try:
        rdev = os.stat(Path("/dev/mapper") / name).st_rdev
    except (OSError, ValueError):
        return None
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _dev_of(folder: Path) -> str | None:
    try:
        return (folder / "dev").read_text().strip()
    except OSError:
        return None


def stream_path(name: str) -> Path:
    """The records file of traced device ``name``.

    The stream's folder carries the device's name, but the target renames it
    only at the device's next resume (a rename reaches no target hook, and
    the target's status is a plain report), so after ``dmsetup rename`` the
    folder of the new name is missing, or, if another device took the old
    name meanwhile, someone else's.  Each folder's ``dev`` file holds the
    mapped device's major:minor: the folder whose ``dev`` is this device's is
    the one.  Without a /dev/mapper node, or with a module too old to have
    ``dev`` files, the folder of the name.
    """
    named = STREAM_DIR / name
    want = _devno(name)
    have = _dev_of(named)
    if want is None or have == want or (have is None and named.is_dir()):
        return named / "records"
    try:
        folders = sorted(STREAM_DIR.iterdir())
    except OSError:
        folders = []
    for folder in folders:
        if _dev_of(folder) == want:
            return folder / "records"
    return named / "records"


class RecordReader:
    """Reads records from a live device stream or a saved file.

    ``first_seq``: the sequence number the reader expects first (0 for a
    stream read from its start); ``None`` learns it from the first record.

    A reader that waits is woken in batches by the kernel (at most 200 ms
    after a record, at once for a mark or a sixteenth of the buffer), so
    keeping up with a busy disk costs a few reads a second, not one per bio.
    """

    def __init__(self, fd: int, *, live: bool, first_seq: int | None = None,
                 save: BinaryIO | None = None) -> None:
        self._fd = fd
        self._live = live
        self._gaps = _Gaps(first_seq)
        self._save = save
        self._rest = b""
        self._eof = False
        self._read_size = READ_SIZE
        self._buf = bytearray()
        # In place where the target lends windows; None once it cannot.
        self._mapped: MappedStream | None = MappedStream(fd) if live else None
        if save is not None:
            self.save_to(save)

    def save_to(self, save: BinaryIO) -> None:
        """From now on, also write what is read to ``save`` (a saved stream file)."""
        save.write(STREAM_MAGIC)
        self._save = save

    @classmethod
    def live(cls, name: str, *, first_seq: int | None = None,
             save: BinaryIO | None = None) -> RecordReader:
        """The stream of traced device ``name``."""
        path = stream_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            if not STREAM_DIR.exists():
                raise StreamNotFoundError(
                    f"{STREAM_DIR} does not exist: mount debugfs ('mount -t debugfs none "
                    f"{DEBUGFS}') and load the imgrement module"
                ) from None
            raise StreamNotFoundError(
                f"no record stream for {name!r} ({path}): is it an imgrement device? "
                "'imgrement-dm list' shows them"
            ) from None
        except PermissionError:
            raise StreamError(f"cannot open {path}: record streams are root-only") from None
        return cls(fd, live=True, first_seq=first_seq, save=save)

    @classmethod
    def from_file(cls, path: str | Path) -> RecordReader:
        """A stream saved with ``save=`` (or ``imgrement-dm trace -o``)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise cannot_open(StreamError, path, e) from None
        return cls.from_open(fd, path, os.read(fd, len(STREAM_MAGIC)))

    @classmethod
    def from_open(cls, fd: int, path: str | Path, magic: bytes) -> RecordReader:
        """A saved stream open at ``fd``, whose first bytes, ``magic``, were
        read already: a pipe (``trace -f <(...)``) can be read only once.
        The reader owns ``fd`` from here on, and closes it on any error."""
        if magic[:15] != STREAM_MAGIC[:15]:
            os.close(fd)
            raise StreamError(f"{path} is not a saved imgrement record stream")
        if len(magic) < len(STREAM_MAGIC):
            os.close(fd)
            raise StreamError(f"{path} is a saved record stream cut short inside its "
                              f"{len(STREAM_MAGIC)}-byte header: it holds no records")
        if magic[15] not in layout.READS_RECORD_VERSIONS:
            os.close(fd)
            raise StreamError(
                f"{path} holds record version {magic[15]}; this tool reads "
                f"{layout.record_versions_read()}"
            )
        return cls(fd, live=False)

    def close(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def eof(self) -> bool:
        return self._eof

    def _poll(self, timeout: float | None) -> bool:
        """Wait for the kernel to report a batch (see ring.h); False on timeout."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        ms = -1 if timeout is None else max(1, int(timeout * 1000))
        return bool(poller.poll(ms))

    def _read_once(self, timeout: float | None, read: Callable[[], T], *,
                   batch: bool = False) -> T | None:
        """One ``read()`` (the call given), waiting for records as ``timeout`` says.

        None on timeout; whatever ``read`` returns otherwise (empty at the end).
        ``batch``: wait for a batch before reading even if records are there,
        so that a consumer that always finds a few new records does not
        spin taking them one or two at a time.
        """
        if batch and timeout != 0 and not self._poll(timeout):
            timeout = 0  # waited already: take whatever is there
        while True:
            try:
                return read()
            except BlockingIOError:
                if timeout == 0 or not self._poll(timeout):
                    return None
            except OSError as e:
                if e.errno == errno.EINVAL and self._live and self._read_size < (1 << 30):
                    self._read_size *= 2  # the next record is larger than our buffer
                    continue
                raise StreamError(f"reading the record stream failed: {e.strerror}") from None

    def _read_raw(self, timeout: float | None) -> bytes | None:
        """One read() as new bytes; None on timeout, b"" at end of stream."""
        return self._read_once(timeout, lambda: os.read(self._fd, self._read_size))

    def _readv_buf(self) -> int:
        if len(self._buf) != self._read_size:
            self._buf = bytearray(self._read_size)
        return os.readv(self._fd, [self._buf])

    def _next_window(self) -> memoryview | None:
        """The next window in place, or None when the target cannot lend one."""
        assert self._mapped is not None
        try:
            return self._mapped.next()
        except BlockingIOError:
            raise
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
        self._mapped.close()
        self._mapped = None
        return None

    def read_view(self, timeout: float | None = None) -> memoryview:
        """Like :meth:`read_raw`, as a view that is not a copy.

        The records in place in the kernel's buffer (mapped read-only), or
        in the reader's own buffer with a target that cannot lend them.
        Valid until the next read; for consumers that store the stream,
        which then copy each byte once, into their file.
        """
        if not self._live:
            raise StreamError("read_view is for live streams")
        if self._mapped is not None:
            view = self._read_once(timeout, self._next_window,
                                   batch=self._mapped.holds_little())
            if self._mapped is not None:  # the target lends windows
                if view is None:
                    return memoryview(b"")  # timeout
                if not view:
                    self._eof = True
                return view
        n = self._read_once(timeout, self._readv_buf, batch=True)
        if n == 0:
            self._eof = True
        return memoryview(self._buf)[: n or 0]

    def read_raw(self, timeout: float | None = None) -> bytes:
        """One read() of a live stream as bytes: whole records, b"" on timeout or end.

        Sequence tracking is left to the caller (a capture file writer).
        """
        if not self._live:
            raise StreamError("read_raw is for live streams")
        raw = self._read_raw(timeout)
        if raw == b"":
            self._eof = True
        return raw or b""

    def read(self, timeout: float | None = None) -> list[Item]:
        """What one read() brings: records, with drops made explicit.

        ``timeout`` None waits for records, 0 does not wait; returns [] when
        nothing came in time, and [] with :attr:`eof` set at the end.
        """
        if self._eof:
            return []
        raw = self._read_raw(timeout)
        if raw is None:
            return []
        if not raw:
            self._eof = True
            if self._rest:
                raise StreamError(f"stream ends inside a record ({len(self._rest)} bytes)")
            return []
        if self._save is not None:
            self._save.write(raw)
        buf = self._rest + raw if self._rest else raw
        records, used = decode(buf)
        if self._live and used != len(buf):
            raise StreamError("the kernel returned a partial record")
        self._rest = buf[used:]
        return self._gaps.feed(records)

    def __iter__(self) -> Iterator[Item]:
        """Everything until the end of the stream (a live one ends when unwrapped)."""
        while not self._eof:
            yield from self.read()
