"""Decoding the record stream, from bytes laid out as the header defines."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from imgrement_dm import layout, render
from imgrement_dm.errors import StreamError
from imgrement_dm.records import (
    STREAM_MAGIC,
    BioRecord,
    Drop,
    MarkRecord,
    RecordReader,
    Segment,
    decode,
)
from tests.host import streams


def test_layout_matches_the_documented_sizes() -> None:
    assert layout.HEADER.size == 16
    assert layout.BIO.size == 88
    assert layout.SEGMENT.size == 16
    assert layout.MARK.size == 32
    assert layout.BIO_FIELDS[:5] == ("hdr.size", "hdr.type", "hdr.version",
                                     "hdr.reserved", "hdr.seq")


def test_bio_record_fields_segments_and_payload() -> None:
    data = bytes(range(256)) * 4
    raw = streams.bio(
        7, sector=1 << 40, op=1, flags=0b11, status=-5,
        segments=[(512, 3584, 1 << 40), (512, 0, (1 << 40) + 1)], payload=data[:1024],
        submit_ns=10, complete_ns=1510, pid=99, comm=b"dd",
    )
    (r,), used = decode(raw)
    assert used == len(raw)
    assert isinstance(r, BioRecord)
    assert (r.seq, r.sector, r.size, r.op_name) == (7, 1 << 40, 1024, "write")
    assert r.flag_names == ["fua", "preflush"]
    assert r.status == -5
    assert r.latency_ns == 1500
    assert (r.pid, r.comm) == (99, "dd")
    assert r.segments == [Segment(512, 3584, 1 << 40), Segment(512, 0, (1 << 40) + 1)]
    assert r.has_payload and bytes(r.payload) == data[:1024]
    assert isinstance(r.payload, memoryview) and r.payload.obj is raw  # no copy


def test_marks_pads_and_order() -> None:
    raw = streams.bio(0) + streams.pad(24) + streams.mark(1, "snap 1") + streams.bio(2)
    recs, used = decode(raw)
    assert used == len(raw)
    assert [type(r).__name__ for r in recs] == ["BioRecord", "MarkRecord", "BioRecord"]
    assert recs[1] == MarkRecord(1, 5000, "snap 1")


def test_partial_record_is_left_for_the_next_read() -> None:
    raw = streams.bio(0, payload=b"x" * 512) + streams.bio(1, payload=b"y" * 512)
    recs, used = decode(raw[:-10])
    assert [r.seq for r in recs] == [0]
    assert used == len(streams.bio(0, payload=b"x" * 512))


@pytest.mark.parametrize(
    "raw,message",
    [
        (bytes([12, 0, 0, 0, 1, 0, 1, 0]) + bytes(8), "record size 12"),
        (streams.bio(0)[:6] + bytes([9]) + streams.bio(0)[7:], "record version 9"),
        (streams.bio(0)[:4] + bytes([77, 0]) + streams.bio(0)[6:], "unknown record type 77"),
    ],
)
def test_corrupt_streams_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        decode(raw)


def _saved(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "s.rec"
    path.write_bytes(STREAM_MAGIC + body)
    return path


def test_reader_reports_gaps_as_drops(tmp_path: Path) -> None:
    body = streams.bio(0) + streams.bio(1) + streams.bio(5) + streams.mark(6, "m")
    with RecordReader.from_file(_saved(tmp_path, body)) as reader:
        items = list(reader)
    assert [getattr(i, "seq", None) for i in items] == [0, 1, None, 5, 6]
    assert items[2] == Drop(first_seq=2, count=3)


def test_reader_from_file_in_small_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"".join(streams.bio(i, payload=bytes([i]) * 4096) for i in range(20))
    monkeypatch.setattr("imgrement_dm.records.READ_SIZE", 1000)
    with RecordReader.from_file(_saved(tmp_path, body)) as reader:
        items = list(reader)
    assert [i.seq for i in items if isinstance(i, BioRecord)] == list(range(20))
    assert all(bytes(i.payload) == bytes([i.seq]) * 4096
               for i in items if isinstance(i, BioRecord))


def test_reader_refuses_other_files_and_truncation(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a stream at all")
    with pytest.raises(StreamError, match="is not a saved imgrement record stream"):
        RecordReader.from_file(junk)
    cut = _saved(tmp_path, streams.bio(0, payload=b"z" * 4096)[:-100])
    with RecordReader.from_file(cut) as reader, pytest.raises(StreamError,
                                                              match="ends inside a record"):
        list(reader)


def test_save_writes_a_stream_that_reads_back(tmp_path: Path) -> None:
    out = io.BytesIO()
    src = _saved(tmp_path, streams.bio(0, payload=b"a" * 512) + streams.mark(1, "x"))
    with RecordReader.from_file(src) as reader:
        reader._save = out  # what a live reader with save= does per read
        first = list(reader)
    copy = tmp_path / "copy.rec"
    copy.write_bytes(STREAM_MAGIC + out.getvalue())
    with RecordReader.from_file(copy) as again:
        assert [repr(i) for i in again] == [repr(i) for i in first]


def test_trace_line_and_json() -> None:
    (r,), _ = decode(streams.bio(3, sector=2048, op=1, flags=1 | 4,
                                 segments=[(4096, 0, 2048)], payload=b"\xab" * 4096,
                                 submit_ns=1_000_000_000, complete_ns=1_000_250_000))
    line = render.trace_line(r, t0=0)
    assert line.split() == ["3", "1.000000", "fio", "42", "W", "FS", "2048", "+", "8",
                            "1", "250.0", "ok"]
    assert "ab ab ab" in render.trace_line(r, t0=0, hexdump=True)
    j = render.item_json(r)
    assert j["op"] == "write" and j["flags"] == ["fua", "sync"] and "payload" not in j
    assert render.item_json(r, with_payload=True)["payload"] == "ab" * 4096
    assert "3 record(s) dropped (seq 4..6)" in render.trace_line(Drop(4, 3), 0)


def test_stats_histograms() -> None:
    st = render.Stats()
    raw = b"".join(streams.bio(i, op=i % 2, size=4096 << (i % 3), submit_ns=0,
                               complete_ns=1000 * (1 << i)) for i in range(6))
    for r in decode(raw)[0]:
        st.add(r)
    st.add(Drop(6, 2))
    j = st.as_json()
    assert j["dropped"] == 2
    assert j["ops"]["read"]["count"] == 3 and j["ops"]["write"]["count"] == 3
    assert j["ops"]["read"]["latency_us_log2"] == {"1": 1, "4": 1, "16": 1}
    assert j["ops"]["write"]["size_bytes_log2"] == {"4096": 1, "8192": 1, "16384": 1}
    text = "\n".join(render.stats_lines(st))
    assert "usecs" in text and "|****" in text


def test_scan_counts_records_and_gaps_from_headers() -> None:
    from imgrement_dm.records import scan

    raw = streams.bio(4) + streams.pad(24) + streams.mark(5, "m") + streams.bio(9)
    assert scan(raw) == (3, 4, 9, 3)
    with pytest.raises(StreamError, match="ends inside a record"):
        scan(raw[:-8])


def test_read_view_copies_where_the_stream_cannot_be_mapped() -> None:
    # A pipe answers the window ioctl with ENOTTY, as a stream from a target
    # without it would: read_view falls back to reading into its own buffer.
    body = streams.bio(0) + streams.mark(1, "m")
    r, w = os.pipe()
    os.write(w, body)
    os.close(w)
    with RecordReader(r, live=True) as reader:
        view = reader.read_view(timeout=0)
        assert bytes(view) == body
        assert reader._mapped is None
        assert not reader.read_view(timeout=0) and reader.eof
