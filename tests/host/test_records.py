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
                                     "hdr.page_shift", "hdr.seq")


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


def test_a_run_is_cut_into_the_segments_of_its_pages() -> None:
    """Version 2 keeps segments as runs: one entry for a write of whole pages
    (256 entries of a 1 MiB write took 4 KiB of record).  Cut at the record's
    page size, each segment's sector counts the bytes before it, so a run
    that starts 512 bytes before a page's end gives 512 at 3584, then pages."""
    runs = [(512 + 3 * 4096 + 1024, 3584, 100), (0, 17, 108), (1024, 512, 108)]
    (r,), _ = decode(streams.bio(0, sector=100, segments=runs, size=1536 + 3 * 4096 + 1024))
    assert isinstance(r, BioRecord)
    assert (r.nr_entries, r.entries) == (3, runs)
    assert r.segments == [
        Segment(512, 3584, 100), Segment(4096, 0, 101), Segment(4096, 0, 109),
        Segment(4096, 0, 117), Segment(1024, 0, 125),
        Segment(0, 17, 108),  # an empty segment is its own entry, and stays one
        Segment(1024, 512, 108),
    ]
    assert r.nr_segments == len(r.segments) == 7
    # Another page size: the same entry cut at 16 KiB pages.
    (big,), _ = decode(streams.bio(1, sector=0, segments=[(40960, 8192, 0)], page_shift=14))
    assert isinstance(big, BioRecord)
    assert big.segments == [Segment(8192, 8192, 0), Segment(16384, 0, 16),
                            Segment(16384, 0, 48)]
    assert big.nr_segments == 3


def test_a_segment_that_starts_inside_a_sector_keeps_the_bio_s_byte_count() -> None:
    """The target computes a segment's sector from the bio's bytes before it:
    a run of 64 + 4096 + 448 bytes (a buffer 64 bytes before a page's end)
    gives sectors 0, 0 and 8, as the version 1 records had them."""
    (r,), _ = decode(streams.bio(0, sector=0, segments=[(64 + 4096 + 448, 4032, 0)]))
    assert isinstance(r, BioRecord)
    assert r.segments == [Segment(64, 4032, 0), Segment(4096, 0, 0), Segment(448, 0, 8)]


def test_version_1_records_and_streams_still_read(tmp_path: Path) -> None:
    """Captures made before runs hold version 1 records, one entry a segment."""
    pieces = [(3584, 512, 0), (4096, 0, 7)]
    v1 = streams.bio(0, segments=pieces, version=1, page_shift=0) + streams.mark(1, "m")
    (r, m), _ = decode(v1)
    assert isinstance(r, BioRecord) and isinstance(m, MarkRecord)
    assert r.segments == [Segment(*p) for p in pieces] and r.nr_segments == 2
    old = tmp_path / "old.rec"
    old.write_bytes(STREAM_MAGIC[:15] + bytes([1]) + v1)
    with RecordReader.from_file(old) as reader:
        assert [i.seq for i in reader if isinstance(i, BioRecord)] == [0]
    newer = tmp_path / "newer.rec"
    newer.write_bytes(STREAM_MAGIC[:15] + bytes([9]) + v1)
    with pytest.raises(StreamError, match="holds record version 9; this tool reads 1 or 2"):
        RecordReader.from_file(newer)


@pytest.mark.parametrize(
    "raw,message",
    [
        (streams.bio(0, segments=[(4096, 0, 0)], page_shift=0), "names a page of 2\\*\\*0 bytes"),
        (streams.bio(0, segments=[(512, 4096, 0)]), "segment starting past its 4096-byte page"),
        (streams.bio(0, segments=[(8192, 0, 0)], size=4096), "segments cover more than its 4096"),
    ],
)
def test_corrupt_runs_are_refused_when_read(raw: bytes, message: str) -> None:
    (r,), _ = decode(raw)
    assert isinstance(r, BioRecord)
    for part in ("segments", "nr_segments"):
        with pytest.raises(StreamError, match=message):
            getattr(r, part)


def test_a_run_gives_at_most_as_many_segments_as_version_1_kept() -> None:
    huge = 0xFFFFF000  # a bio of almost 4 GiB in one run: 1,048,575 pages
    (r,), _ = decode(streams.bio(0, segments=[(huge, 0, 0)], size=huge))
    assert isinstance(r, BioRecord)
    segs = r.segments
    assert len(segs) == r.nr_segments == 0xFFFF
    assert segs[-1] == Segment(4096, 0, 0xFFFE * 8)


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
