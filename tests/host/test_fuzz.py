"""Property-based tests of every reader of untrusted bytes: the record decoder,
saved streams and capture files.  Whatever the bytes (random, truncated,
flipped, with lengths made huge), the result is records or the reader's own
error, never another exception, a hang or an allocation out of proportion
to the input."""

from __future__ import annotations

import contextlib
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgrement_dm import layout
from imgrement_dm.errors import CaptureError, StreamError
from imgrement_dm.formats import files
from imgrement_dm.formats.capture import CaptureReader, write_capture
from imgrement_dm.records import STREAM_MAGIC, BioRecord, decode, scan
from tests.host import streams

#: Far more than any reader needs for inputs of a few KiB, far less than a
#: length field taken at its word (up to 4 GiB).
ALLOC_LIMIT = 32 << 20

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _valid_stream(seed: int) -> bytes:
    recs = [
        streams.bio(0, sector=seed, op=1, payload=bytes([seed % 256]) * 512),
        streams.mark(1, "m"),
        streams.bio(2, sector=8, op=0, segments=[(4096, 0, 8)]),
        streams.bio(3, sector=16, op=1, payload=b"x" * 1024, flags=3),
    ]
    return b"".join(recs)


def _valid_capture(seed: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.cap"
        with write_capture(path, "traced", 4096) as w:
            w.add(_valid_stream(seed))
            w.add(streams.bio(4, sector=32, op=1, payload=b"y" * 512))
        return path.read_bytes()


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None,
            words: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % len(b)] ^= val or 1
    for pos, val in words:  # whole 32-bit fields: lengths and counts made wild
        at = pos % max(len(b) - 4, 1)
        struct.pack_into("<I", b, at, val)
    if cut is not None:
        del b[cut % (len(b) + 1):]
    return bytes(b)


def _bounded(fn: Callable[[], object]) -> None:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < ALLOC_LIMIT, f"allocated {peak} bytes"


def _read_all(source: Callable[[], Any], *, capture: bool = False) -> None:
    """Every item of ``source()`` and every part of it, or the readers' own error."""
    try:
        with source() as opened:
            items = opened.items() if capture else opened
            for item in items:
                repr(item)
                if isinstance(item, BioRecord):
                    item.segments  # noqa: B018
                    item.payload  # noqa: B018
    except (StreamError, CaptureError):
        pass


mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4),
    st.none() | st.integers(0, 1 << 20),
    st.lists(st.tuples(st.integers(0, 1 << 20),
                       st.sampled_from([0, 1, 7, 8, 16, 88, 0x7FFFFFFF, 0xFFFFFFF8,
                                        0xFFFFFFFF])), max_size=2),
)


@FUZZ
@given(st.binary(max_size=4096))
def test_decode_random_bytes(data: bytes) -> None:
    def run() -> None:
        try:
            recs, used = decode(data)
            assert 0 <= used <= len(data)
            for r in recs:
                repr(r)
        except StreamError:
            pass
        with contextlib.suppress(StreamError):
            scan(data)

    _bounded(run)


@FUZZ
@given(st.integers(0, 255), mutations)
def test_decode_damaged_streams(seed: int, m: tuple[list[tuple[int, int]], int | None,
                                                    list[tuple[int, int]]]) -> None:
    data = _mutate(_valid_stream(seed), *m)

    _bounded(lambda: _read_all(lambda: contextlib.nullcontext(decode(data)[0])))


@FUZZ
@given(st.integers(0, 255), mutations)
def test_saved_streams(seed: int, m: tuple[list[tuple[int, int]], int | None,
                                           list[tuple[int, int]]]) -> None:
    data = _mutate(STREAM_MAGIC + _valid_stream(seed), *m)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.rec"
        path.write_bytes(data)

        _bounded(lambda: _read_all(lambda: files.file_items(path)))


@FUZZ
@given(st.integers(0, 255), mutations)
def test_capture_files(seed: int, m: tuple[list[tuple[int, int]], int | None,
                                           list[tuple[int, int]]]) -> None:
    data = _mutate(_valid_capture(seed), *m)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.cap"
        path.write_bytes(data)
        _bounded(lambda: _read_all(lambda: contextlib.closing(CaptureReader(path)),
                                   capture=True))


def test_a_huge_chunk_length_is_truncation_not_an_allocation(tmp_path: Path) -> None:
    """The case the fuzzer found: a chunk claiming 4 GiB made the reader ask for 4 GiB."""
    raw = bytearray(_valid_capture(1))
    at = raw.index(b"CHNK")
    struct.pack_into("<I", raw, at + 4, 0xFFFFFF00)
    path = tmp_path / "huge.cap"
    path.write_bytes(bytes(raw))

    def run() -> None:
        try:
            with CaptureReader(path) as r:
                r.validate()
        except CaptureError as e:
            assert "truncated after 0 intact chunk(s)" in str(e)
        else:
            raise AssertionError("a damaged capture was accepted")

    _bounded(run)



def test_a_saved_stream_cut_inside_its_header_is_named(tmp_path: Path) -> None:
    """Found by the fuzzer (some seeds only): a saved stream cut to its first 15
    bytes made the version check index past the end (IndexError)."""
    path = tmp_path / "cut.rec"
    path.write_bytes(STREAM_MAGIC[:-1])
    with pytest.raises(StreamError, match="cut short inside its"), \
            files.file_items(path) as items:
        list(items)


def test_a_bio_whose_parts_overrun_it_is_an_error_when_read() -> None:
    """Also found by the fuzzer: a flipped segment count made ``segments`` raise
    struct.error, and ``payload`` would have returned the next record's bytes."""
    first = bytearray(streams.bio(0, op=1, payload=b"z" * 512))
    fields = list(layout.BIO.unpack_from(first))
    fields[layout.BIO_FIELDS.index("nr_segments")] = 7  # 112 bytes more than it holds
    layout.BIO.pack_into(first, 0, *fields)
    raw = bytes(first) + streams.bio(1, payload=b"n" * 8)
    recs, _ = decode(raw)
    assert isinstance(recs[0], BioRecord) and isinstance(recs[1], BioRecord)
    with pytest.raises(StreamError, match="claims 7 segment entries and 512 payload bytes"):
        recs[0].segments  # noqa: B018
    with pytest.raises(StreamError, match="claims 7 segment entries"):
        recs[0].payload  # noqa: B018
    assert bytes(recs[1].payload) == b"n" * 8
