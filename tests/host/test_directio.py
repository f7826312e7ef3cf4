"""The O_DIRECT appender and the padded capture files it writes.

The appender must produce exactly the bytes appended, whichever way each
piece went (staged copy or in place from the caller's memory), with
O_DIRECT and without; a capture written from windows of a mapped buffer at
any offset must read back record for record, its large chunks written in
place.  Files of versions 1 (no padding) and 2 (crc32 chunks) still read.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from imgrement_dm import layout
from imgrement_dm.directio import BLOCK, DirectAppender, address_of, open_direct
from imgrement_dm.errors import CaptureError
from imgrement_dm.formats import capture
from imgrement_dm.formats.capture import CaptureReader, write_capture
from imgrement_dm.recording import add_to_stream
from imgrement_dm.records import STREAM_MAGIC, BioRecord, RecordReader
from tests.host import streams


def _mapped(data: bytes) -> mmap.mmap:
    m = mmap.mmap(-1, len(data) + 2 * BLOCK)
    m[: len(data)] = data
    return m


@pytest.mark.parametrize("want_direct", [True, False], ids=["o_direct", "buffered"])
def test_appender_writes_exactly_what_was_appended(tmp_path: Path, want_direct: bool) -> None:
    rnd = random.Random(7)
    source = rnd.randbytes(8 << 20)
    ring = _mapped(source)
    view = memoryview(ring)
    path = tmp_path / "out"
    if want_direct:
        fd, direct = open_direct(path)
    else:
        fd, direct = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), False
    expected = bytearray()
    out = DirectAppender(fd, direct=direct)
    try:
        for _ in range(60):
            size = rnd.choice([1, 7, 100, BLOCK - 1, BLOCK, BLOCK + 1, 65536, 300_000, 1 << 20])
            start = rnd.randrange(0, len(source) - size)
            piece = view[start:start + size]
            if rnd.random() < 0.5:
                out.write(piece)
            else:
                # line the file up with the piece's address, as the capture writer does
                pad = (address_of(piece) - out.tell()) % BLOCK if out.direct else 0
                out.write(bytes(pad))
                expected += bytes(pad)
                out.write_in_place(piece)
            expected += piece
            del piece
        length = out.tell()
        out.close()
    finally:
        os.close(fd)
        view.release()
        ring.close()
    assert length == len(expected)
    assert path.read_bytes() == bytes(expected)
    if direct:
        assert out.direct, "O_DIRECT was refused midway on a file system that opened with it"
        assert out.in_place > 0


def test_in_place_refuses_a_misaligned_piece(tmp_path: Path) -> None:
    fd, direct = open_direct(tmp_path / "out")
    out = DirectAppender(fd, direct=direct)
    try:
        if not direct:
            pytest.fail(f"{tmp_path} refused O_DIRECT: this test needs a file system that has it")
        buf = _mapped(bytes(3 * BLOCK))
        with pytest.raises(ValueError, match="not aligned alike"):
            out.write_in_place(memoryview(buf)[1:])
    finally:
        out.close()
        os.close(fd)


def _records(n: int, payload_size: int) -> bytes:
    rnd = random.Random(n)
    return b"".join(streams.bio(i, sector=8 * i, op=1, payload=rnd.randbytes(payload_size),
                                complete_ns=i) for i in range(n))


def test_a_capture_of_large_windows_is_padded_written_in_place_and_reads_back(
        tmp_path: Path) -> None:
    stream = _records(200, 8192)  # about 1.6 MiB of records
    ring = _mapped(stream)
    view = memoryview(ring)
    # windows of whole records, at unaligned offsets, some large, some small
    bounds, at, sizes = [], 0, [1, 40, 2, 60, 3, 94]
    for k in sizes:
        end = at
        for _ in range(k):
            end += struct.unpack_from("<I", stream, end)[0]
        bounds.append((at, end))
        at = end
    assert at == len(stream)
    path = tmp_path / "c.cap"
    with write_capture(path, "traced", 4096) as w:
        for a, b in bounds:
            window = view[a:b]
            w.add(window)
            del window
        appender = w._f
    view.release()
    ring.close()
    raw = path.read_bytes()
    if appender.direct:
        big = sum(b - a for a, b in bounds if b - a >= capture.IN_PLACE_MIN)
        assert big > 0 and appender.in_place >= big - 2 * BLOCK * len(bounds)
        assert raw.count(b"PAD ") >= 1
    with CaptureReader(path) as r:
        records = r.records()
        info = r.info
    assert info is not None and (info.records, info.drops, info.last_seq) == (200, 0, 199)
    assert [rec.seq for rec in records] == list(range(200))
    rnd = random.Random(200)
    assert all(isinstance(rec, BioRecord) for rec in records)
    assert b"".join(rec.payload or b"" for rec in records
                    if isinstance(rec, BioRecord)) == b"".join(
        rnd.randbytes(8192) for _ in range(200))


def _old_capture(version: int, *parts: bytes) -> bytes:
    """A capture as versions 1 and 2 wrote them: crc32 chunk checksums."""
    head = struct.pack("<8sIIQQ32sI", b"IMGRCAP1", version, 1, 4096, 0, b"old", 0)
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    body = struct.pack("<4sQQq", b"DONE", 3, 0, 2)
    return (head + bytes(96 - len(head)) + b"".join(parts) + body
            + struct.pack("<I", zlib.crc32(body)))


@pytest.mark.parametrize("version", [1, 2])
def test_crc32_versions_still_read(tmp_path: Path, version: int) -> None:
    recs = _records(3, 512)
    chunk = struct.pack("<4sIII", b"CHNK", len(recs), 3, zlib.crc32(recs)) + recs
    pad = struct.pack("<4sI", b"PAD ", 8) + bytes(8)
    path = tmp_path / "old.cap"
    path.write_bytes(_old_capture(version, pad, chunk) if version == 2
                     else _old_capture(version, chunk))
    with CaptureReader(path) as r:
        assert [rec.seq for rec in r.records()] == [0, 1, 2]
        assert r.version == version
    # a byte flipped in the payload: the crc32 catches it
    bad = bytearray(path.read_bytes())
    bad[-200] ^= 1
    path.write_bytes(bad)
    with CaptureReader(path) as r, pytest.raises(CaptureError, match="checksum mismatch"):
        r.validate()
    if version == 1:
        # padding is a version 2 thing: in a version 1 file it is damage
        path.write_bytes(_old_capture(1, pad, chunk))
        with CaptureReader(path) as r, pytest.raises(CaptureError, match="unknown chunk tag"):
            r.validate()


@pytest.mark.parametrize("damage, reason", [
    (b"PAD \x08\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00", "padding not zeros"),
    (b"PAD \x00\x00\x01\x00", "padding too long"),
    (b"PAD \x00\x10\x00\x00", "truncated"),
])
def test_damaged_padding_is_refused(tmp_path: Path, damage: bytes, reason: str) -> None:
    path = tmp_path / "c.cap"
    with write_capture(path, "traced", 4096) as w:
        w.add(_records(2, 512))
    raw = path.read_bytes()
    tail = raw[96:] if reason != "truncated" else b""
    path.write_bytes(raw[:96] + damage + tail)
    with CaptureReader(path) as r, pytest.raises(CaptureError, match=reason):
        r.validate()


def test_a_saved_stream_of_large_windows_is_padded_and_reads_back(tmp_path: Path) -> None:
    """What `trace -q -o` writes: magic, then windows, a large one after a pad
    record that lines it up; the pads are skipped when the file is read."""
    stream = _records(120, 8192)
    ring = _mapped(stream)
    view = memoryview(ring)
    bounds, at = [], 0
    for k in (3, 50, 1, 66):
        end = at
        for _ in range(k):
            end += struct.unpack_from("<I", stream, end)[0]
        bounds.append((at + 0, end))
        at = end
    path = tmp_path / "s.rec"
    fd, direct = open_direct(path)
    out = DirectAppender(fd, direct=direct)
    try:
        out.write(STREAM_MAGIC)
        for a, b in bounds:
            window = view[a:b]
            add_to_stream(out, window)
            del window
        out.close()
    finally:
        os.close(fd)
        view.release()
        ring.close()
    raw = path.read_bytes()
    pads = raw.count(struct.pack("<HBB", layout.REC_PAD, layout.RECORD_VERSION, 0))
    if direct:
        assert out.in_place > 0 and pads >= 1
    items = []
    with RecordReader.from_file(path) as r:
        while not r.eof:
            items += r.read()
    bios = [i for i in items if isinstance(i, BioRecord)]
    assert len(bios) == len(items)  # no drop, no mark: the pads were skipped
    assert [i.seq for i in bios] == list(range(120))
    rnd = random.Random(120)
    assert [i.payload for i in bios] == [rnd.randbytes(8192) for _ in range(120)]
