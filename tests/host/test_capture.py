"""Capture files, apply/diff on images, and the exports, on the host.

The streams are built byte for byte in the header's layout; blkparse (the
real one, from Debian's blktrace package) reads the blktrace export.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from imgrement_dm import increment
from imgrement_dm.errors import CaptureError, IncrementError
from imgrement_dm.formats import export
from imgrement_dm.formats.capture import CaptureReader, write_capture
from imgrement_dm.records import BioRecord, Drop
from tests import logwrites
from tests.host import streams

W, R, FLUSH, DISCARD, ZEROES = 1, 0, 2, 3, 5


def _capture(tmp_path: Path, chunks: list[bytes], sectors: int = 2048) -> Path:
    path = tmp_path / "c.cap"
    with write_capture(path, "traced", sectors) as w:
        for raw in chunks:
            w.add(raw)
    assert not path.with_name("c.cap.part").exists()
    return path


def _workload() -> list[bytes]:
    a, b, c = b"A" * 4096, b"B" * 1024, b"C" * 4096
    return [
        streams.bio(0, sector=0, op=W, payload=a, complete_ns=10)
        + streams.bio(1, sector=8, op=R, segments=[(4096, 0, 8)], complete_ns=11),
        streams.mark(2, "one", time_ns=12)
        + streams.bio(3, sector=2, op=W, payload=b, complete_ns=14)
        + streams.bio(4, sector=100, op=W, payload=c, complete_ns=13, flags=1),
        streams.bio(5, sector=0, op=FLUSH, flags=2, complete_ns=15)
        + streams.bio(6, sector=200, op=ZEROES, size=8192, complete_ns=16)
        + streams.bio(7, sector=300, op=W, payload=c, status=-5, complete_ns=17)
        + streams.mark(8, "two", time_ns=18),
    ]


def _expected_image(until_two: bool) -> bytes:
    img = bytearray(b"\xee" * (2048 * 512))
    img[0:4096] = b"A" * 4096
    img[100 * 512 : 100 * 512 + 4096] = b"C" * 4096  # completed before seq 3
    img[2 * 512 : 2 * 512 + 1024] = b"B" * 1024
    if until_two:
        img[200 * 512 : 200 * 512 + 8192] = bytes(8192)
    return bytes(img)


def test_capture_round_trip_and_apply(tmp_path: Path) -> None:
    cap = _capture(tmp_path, _workload())
    with CaptureReader(cap) as r:
        info = r.validate()
    assert (info.device, info.sectors, info.records, info.drops, info.last_seq) == (
        "traced", 2048, 9, 0, 8)
    base = tmp_path / "base.img"
    base.write_bytes(b"\xee" * (2048 * 512))
    out = tmp_path / "out.img"
    sel = increment.apply(base, cap, out, increment.StopAt(mark="one"))
    assert out.read_bytes()[:4096] == b"A" * 4096 and sel.applied == 1
    sel = increment.apply(base, cap, out)
    assert sel.failed == 1  # the write that failed is not applied
    assert hashlib.sha256(out.read_bytes()).digest() == \
        hashlib.sha256(_expected_image(True)).digest()
    assert increment.extents(cap).spans == [(0, 8), (100, 8), (200, 16)]
    assert increment.extents(cap, increment.StopAt(mark="one")).spans == [(0, 8)]
    # replay to the first FUA write, in place
    img = tmp_path / "replay.img"
    shutil.copyfile(base, img)
    increment.replay(cap, img, increment.StopAt(fua=1))
    data = img.read_bytes()
    assert data[100 * 512 : 100 * 512 + 4096] == b"C" * 4096  # the FUA write itself
    assert data[2 * 512 : 4 * 512] == b"B" * 1024  # submitted before it
    assert data[200 * 512 : 216 * 512] == b"\xee" * 8192  # after it: not replayed
    with pytest.raises(IncrementError, match="has no mark 'nope'"):
        increment.apply(base, cap, out, increment.StopAt(mark="nope"))


def test_truncated_and_corrupted_captures_are_refused(tmp_path: Path) -> None:
    cap = _capture(tmp_path, _workload())
    raw = cap.read_bytes()
    base = tmp_path / "base.img"
    base.write_bytes(bytes(2048 * 512))
    cases = {
        "truncated": raw[:-30],
        "no trailer": raw[: raw.index(b"DONE")],
        "chunk checksum": raw[:200] + bytes([raw[200] ^ 1]) + raw[201:],
        "header": raw[:20] + bytes([raw[20] ^ 1]) + raw[21:],
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.cap"
        bad.write_bytes(data)
        out = tmp_path / f"{name}.img"
        with pytest.raises(CaptureError) as e:
            increment.apply(base, bad, out)
        assert "intact chunk" in str(e.value) or "header is corrupted" in str(e.value), name
        assert not out.exists() and not out.with_name(out.name + ".part").exists()


def _with_record_version(cap: Path, version: int) -> None:
    """Rewrite a capture's header to say its records are of ``version``."""
    raw = bytearray(cap.read_bytes())
    struct.pack_into("<I", raw, 12, version)
    struct.pack_into("<I", raw, 64, zlib.crc32(bytes(raw[:64])))
    cap.write_bytes(bytes(raw))


def test_captures_of_version_1_records_still_read(tmp_path: Path) -> None:
    """Captures made before record version 2 hold one entry a segment and
    page_shift 0; they read, their segments as stored.  A record version the
    tool does not know is refused by name."""
    pieces = [(3584, 512, 8), (4096, 0, 15)]
    cap = _capture(tmp_path, [streams.bio(0, sector=8, op=W, segments=pieces, version=1,
                                          page_shift=0, payload=b"v" * 7680)])
    _with_record_version(cap, 1)
    with CaptureReader(cap) as r:
        (rec,) = list(r.items())
    assert isinstance(rec, BioRecord)
    assert [(s.len, s.offset, s.sector) for s in rec.segments] == pieces
    assert bytes(rec.payload) == b"v" * 7680
    _with_record_version(cap, 9)
    with pytest.raises(CaptureError, match=r"with record version 9; this tool reads .* / 1 or 2"):
        CaptureReader(cap)


def test_drops_refuse_apply_unless_forced(tmp_path: Path) -> None:
    cap = _capture(tmp_path, [streams.bio(0, payload=b"x" * 512),
                              streams.bio(3, payload=b"y" * 512)])
    with CaptureReader(cap) as r:
        items = list(r.items())
    assert Drop(1, 2) in items
    base = tmp_path / "b.img"
    base.write_bytes(bytes(2048 * 512))
    with pytest.raises(IncrementError, match="lost 2 record"):
        increment.apply(base, cap, tmp_path / "o.img")
    increment.apply(base, cap, tmp_path / "o.img", force=True)


def test_meta_captures_cannot_be_applied(tmp_path: Path) -> None:
    cap = _capture(tmp_path, [streams.bio(0, op=W, size=4096, segments=[(4096, 0, 0)])])
    base = tmp_path / "b.img"
    base.write_bytes(bytes(2048 * 512))
    with pytest.raises(IncrementError, match="without their data"):
        increment.apply(base, cap, tmp_path / "o.img")


def test_blktrace_export_reads_in_blkparse(tmp_path: Path) -> None:
    if not shutil.which("blkparse"):
        pytest.fail("blkparse is missing: scripts/install-host-deps installs blktrace")
    cap = _capture(tmp_path, _workload())
    with CaptureReader(cap) as r:
        items = list(r.items())
    with (tmp_path / "t.blktrace.0").open("wb") as f:
        counts = export.blktrace(items, f, (253, 0))
    assert counts["queue"] == counts["complete"] == 7
    out = subprocess.run(["blkparse", "-i", str(tmp_path / "t"), "-f",
                          "%M,%m %a %3d %S %n %C\n"],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    lines = [ln.split() for ln in out.splitlines() if ln.startswith("253,0 ")]
    q = [ln for ln in lines if ln[1] == "Q"]
    assert len(q) == 7 and len([ln for ln in lines if ln[1] == "C"]) == 7
    writes = [ln for ln in q if ln[2].startswith("W") and "D" not in ln[2]]
    assert sum(int(ln[4]) for ln in writes) == (4096 + 1024 + 4096 + 8192 + 4096) // 512
    assert {ln[5] for ln in q} == {"fio"}
    assert [ln[3] for ln in q][:2] == ["0", "8"]


def test_log_writes_export_layout(tmp_path: Path) -> None:
    """Our export, read by the strict reader of dm-log-writes' rules
    (tests/logwrites.py): a mark's label in its entry's sector, write data in
    sectors of its own, the super block's count.  The export used to put the
    label in a sector of its own, which replay-log took for the next entry."""
    cap = _capture(tmp_path, _workload())
    buf = io.BytesIO()
    with CaptureReader(cap) as r:
        n = export.log_writes(r, buf)
    entries = logwrites.read(buf.getvalue())
    assert len(entries) == n
    # dm-log-writes' order: a mark at once, a FUA write when it completes,
    # other writes when a flush makes them durable (before the flush), and
    # what no flush took at the end
    assert [(e.kind, e.sector, e.nr_sectors, e.flags, e.data[:1]) for e in entries] == [
        ("mark", 0, 0, logwrites.MARK, b"o"),
        ("write", 100, 8, logwrites.FUA, b"C"),
        ("write", 0, 8, 0, b"A"),
        ("write", 2, 2, 0, b"B"),
        ("flush", 0, 0, logwrites.FLUSH, b""),
        ("mark", 0, 0, logwrites.MARK, b"t"),
        ("write", 200, 16, 0, b"\0"),  # write-zeroes, as zeros, never flushed
        ("mark", 0, 0, logwrites.MARK, b"d"),  # the target's own end mark
    ]
    assert [e.data for e in entries if e.kind == "mark"] == [b"one", b"two",
                                                             b"dm-log-writes-end"]
    assert entries[6].data == bytes(8192)


def test_plot_draws_a_png(tmp_path: Path) -> None:
    # plot is an extra ([plot]): a host without matplotlib skips this one (make
    # installs it, so make test runs it)
    pytest.importorskip("matplotlib")
    from imgrement_dm.formats.plot import plot

    cap = _capture(tmp_path, _workload())
    out = tmp_path / "access.png"
    with CaptureReader(cap) as r, out.open("wb") as f:
        counts = plot(r.items(), f)
    assert counts == {"reads": 1, "writes": 5, "marks": 2}  # the failed write too
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 500)
