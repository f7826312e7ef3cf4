"""What the target records, checked exactly against the I/O the test made.

Every test drives I/O from this process (or a named tool) and matches the
records it made by pid or comm, since udev's probes read the device too.
Marks bracket each step, so a record is judged by where it stands.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import re
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm import kmsg
from imgrement_dm.directio import address_of
from imgrement_dm.records import (
    BioRecord,
    Drop,
    Item,
    MarkRecord,
    RecordReader,
    decode,
    stream_path,
)
from tests.guest.helpers import aligned, direct_read, direct_write, pattern, sh

PAGE = mmap.PAGESIZE
STREAMS = Path("/sys/kernel/debug/imgrement")


@dataclass
class Traced:
    dev: imgrement_dm.TracedDevice
    reader: RecordReader

    def until_mark(self, label: str, timeout: float = 20) -> list[Item]:
        """Everything up to and including the mark ``label``, which it sets now."""
        seq = self.dev.mark(label)
        out: list[Item] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.reader.read(timeout=1):
                out.append(item)
                if isinstance(item, MarkRecord) and item.seq == seq:
                    assert item.label == label
                    return out
        raise AssertionError(f"mark {label!r} (seq {seq}) never arrived")


def quiet(reader: RecordReader) -> list[Item]:
    """Read until nothing more comes for a second."""
    out: list[Item] = []
    while batch := reader.read(timeout=1):
        out += batch
    return out


@pytest.fixture
def make_traced(disk: str) -> Iterator[Callable[..., Traced]]:
    made: list[Traced] = []

    def make(**options: object) -> Traced:
        dev = imgrement_dm.wrap(disk, **options)  # type: ignore[arg-type]
        sh("udevadm", "settle")
        t = Traced(dev, dev.records(first_seq=0))
        made.append(t)
        quiet(t.reader)  # udev's probe of the new device
        return t

    yield make
    for t in made:
        t.reader.close()
        t.dev.unwrap()


def mine(items: Sequence[Item], pid: int | None = None) -> list[BioRecord]:
    pid = os.getpid() if pid is None else pid
    return [r for r in items if isinstance(r, BioRecord) and r.pid == pid]


def by_comm(items: Sequence[Item], comm: str) -> list[BioRecord]:
    return [r for r in items if isinstance(r, BioRecord) and r.comm == comm]


def page_pieces(buffers: list[tuple[int, int]], sector: int) -> list[tuple[int, int, int]]:
    """Expected (len, page offset, sector) segments of buffers at (address, length)."""
    out = []
    for addr, length in buffers:
        while length:
            off = addr % PAGE
            n = min(length, PAGE - off)
            out.append((n, off, sector))
            sector += n // 512
            addr += n
            length -= n
    return out


def page_runs(pieces: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The runs a record keeps for these segments: a segment continues the run
    before it when it starts a page and that run ended one (empty ones never)."""
    out: list[tuple[int, int, int]] = []
    for length, offset, sector in pieces:
        if out and length and not offset and out[-1][0] and not sum(out[-1][:2]) % PAGE:
            out[-1] = (out[-1][0] + length, out[-1][1], out[-1][2])
        else:
            out.append((length, offset, sector))
    return out


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class Buffers:
    """O_DIRECT buffers in separate pages, starting at chosen page offsets."""

    def __init__(self, specs: list[tuple[int, bytes]]) -> None:
        self.maps = []
        self.views = []
        for page_offset, data in specs:
            m = mmap.mmap(-1, page_offset + len(data) + PAGE)
            m[page_offset : page_offset + len(data)] = data
            self.maps.append(m)
            self.views.append(memoryview(m)[page_offset : page_offset + len(data)])

    def layout(self) -> list[tuple[int, int]]:
        import ctypes

        out = []
        for v in self.views:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(v))
            out.append((addr, len(v)))
        return out

    def close(self) -> None:
        for v in self.views:
            v.release()
        for m in self.maps:
            m.close()


# (name, offset in bytes, [(page offset of buffer, length)])
SCRIPT = [
    ("one-sector", 512 * 3, [(0, 512)]),
    ("page", 4096 * 5, [(0, 4096)]),
    ("unaligned-page-offset", 512 * 101, [(512, 8192)]),
    ("odd-page-offset", 4096 * 40, [(3584, 1536)]),
    ("vectored", 4096 * 100, [(0, 4096), (1024, 2048), (0, 16384)]),
    # more runs than the target's walk keeps on its stack: it walks again
    ("six-runs", 4096 * 200, [(1024, 2048)] * 6),
    ("64k", 1 << 20, [(0, 64 << 10)]),
    ("1m", 4 << 20, [(0, 1 << 20)]),
]


@pytest.mark.smoke
@pytest.mark.parametrize("name,offset,specs", SCRIPT, ids=[s[0] for s in SCRIPT])
def test_direct_writes_and_reads_recorded_exactly(
    make_traced: Callable[..., Traced], name: str, offset: int, specs: list[tuple[int, int]]
) -> None:
    t = make_traced(capture="all")
    data = [pattern(zlib.crc32(f"{name}{i}".encode()), n) for i, (_, n) in enumerate(specs)]
    whole = b"".join(data)
    bufs = Buffers([(po, d) for (po, _), d in zip(specs, data)])
    fd = os.open(t.dev.node, os.O_RDWR | os.O_DIRECT)
    try:
        t.until_mark(f"{name}-start")
        assert os.pwritev(fd, bufs.views, offset) == len(whole)
        writes = mine(t.until_mark(f"{name}-written"))
        rbufs = Buffers([(po, bytes(len(d))) for (po, _), d in zip(specs, data)])
        assert os.preadv(fd, rbufs.views, offset) == len(whole)
        assert b"".join(bytes(v) for v in rbufs.views) == whole
        reads = mine(t.until_mark(f"{name}-read"))
        expected_segments = page_pieces(bufs.layout(), offset // 512)
    finally:
        os.close(fd)
    for kind, recs, op in (("write", writes, "write"), ("read", reads, "read")):
        assert recs, f"no {kind} records"
        assert all(r.op_name == op for r in recs)
        assert all(r.status == 0 and r.has_payload for r in recs)
        assert "fua" not in recs[0].flag_names and "preflush" not in recs[0].flag_names
        # The bios tile the range exactly, in order, and their data is the data.
        assert recs[0].sector == offset // 512
        for a, b in zip(recs, recs[1:]):
            assert b.sector == a.sector + a.sectors
        assert sum(r.size for r in recs) == len(whole)
        assert sha(b"".join(bytes(r.payload) for r in recs)) == sha(whole)
        segs = [(s.len, s.offset, s.sector) for r in recs for s in r.segments]
        assert segs == (
            expected_segments if kind == "write"
            else page_pieces(rbufs.layout(), offset // 512)
        )
        # Kept as runs, as few entries as the pieces allow: one a bio of one
        # buffer (its pieces end and start pages where they meet), three for
        # the vectored write's buffers (the second neither starts nor ends
        # one), six for six buffers in the middle of their pages.
        for r in recs:
            assert r.entries == page_runs([(x.len, x.offset, x.sector) for x in r.segments])
        runs = {"vectored": 3, "six-runs": 6}.get(name, 1)
        assert [r.nr_entries for r in recs] == [runs] * len(recs)
        assert all(r.complete_ns >= r.submit_ns > 0 for r in recs)
        assert all(r.comm == "python" and r.tid > 0 for r in recs)
    if len(whole) <= 64 << 10:
        assert len(writes) == 1 and len(reads) == 1
        assert "sync" in writes[0].flag_names
    # What the reads returned is what is on the disk below.
    assert direct_read(t.dev.source, offset, len(whole)) == whole
    bufs.close()
    rbufs.close()


def page_frames(view: memoryview) -> list[int]:
    """The page frame numbers behind ``view`` (/proc/self/pagemap; root sees them)."""
    addr = address_of(view)
    first, last = addr // PAGE, (addr + len(view) - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read((last - first + 1) * 8)
    entries = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
    assert all(e >> 63 for e in entries), "a page of the buffer is not present"
    return [e & ((1 << 55) - 1) for e in entries]


#: Pages a 1 MiB buffer 512 bytes into its first page spans.
BUFFER_PAGES = (512 + (1 << 20)) // PAGE + 1
#: The anonymous mapping searched for consecutive frames: its pages come
#: mostly in long runs of them (the buddy allocator splits big free blocks in
#: order; a distro kernel's transparent huge pages are 512 frames each), but
#: late in a suite less so: the debug kernel's whole suite once found no run
#: of 257 in 64 MiB at this test, which had found 12,179 early in a boot.
SEARCH_BYTES = 256 << 20
#: The run of consecutive frames the buffer must hold at least: bvecs of 16
#: pages and more, which a walk that does not cut them gets wrong.
MIN_RUN = 16


def longest_run(frames: Sequence[int]) -> tuple[int, int]:
    """(index, length) of the first longest stretch of ``frames`` that are
    consecutive frame numbers ((0, 0) for none)."""
    best = (0, 0)
    start = 0
    for i in range(1, len(frames) + 1):
        if i == len(frames) or frames[i] != frames[i - 1] + 1:
            if i - start > best[1]:
                best = (start, i - start)
            start = i
    return best


@pytest.fixture
def contiguous_pages() -> Iterator[memoryview]:
    """BUFFER_PAGES pages of ordinary memory starting at the longest run of
    consecutive frames found (all of them, mostly): physically contiguous
    memory for O_DIRECT, which the block layer puts in bvecs many pages
    long. Found by reading /proc/self/pagemap over an anonymous mapping
    after dropping the page cache (which frees big blocks), not taken from
    hugetlbfs: the debug kernel has none."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    m = mmap.mmap(-1, SEARCH_BYTES,
                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    whole = memoryview(m)
    try:
        at, length = longest_run(page_frames(whole))
        if length < MIN_RUN:
            pytest.fail(f"no {MIN_RUN} physically contiguous pages in "
                        f"{SEARCH_BYTES >> 20} MiB of anonymous memory (longest {length})")
        at = min(at, SEARCH_BYTES // PAGE - BUFFER_PAGES)
        run = whole[at * PAGE:(at + BUFFER_PAGES) * PAGE]
        try:
            yield run
        finally:
            run.release()
    finally:
        whole.release()
        m.close()


def test_longest_run_finds_the_first_longest_stretch() -> None:
    assert longest_run([7, 8, 3, 4, 5, 9]) == (2, 3)
    assert longest_run([3, 4, 5]) == (0, 3)
    assert longest_run([1, 2, 5, 6]) == (0, 2)
    assert longest_run([4]) == (0, 1)
    assert longest_run([]) == (0, 0)


@pytest.mark.smoke
def test_a_multipage_bvec_is_recorded_page_by_page(make_traced: Callable[..., Traced],
                                                   contiguous_pages: memoryview) -> None:
    """A buffer in physically contiguous pages reaches the target as bvecs many pages long
    (the block layer merges contiguous pages), which the target counts and
    cuts into page pieces a bvec at a time: the segments must be the pieces
    bio_for_each_segment() gives, with exact sectors, for a buffer starting
    512 bytes into a page, for writes and reads."""
    t = make_traced(capture="all")
    size = 1 << 20
    offset = 8 << 20
    view = contiguous_pages[512:512 + size]
    addr = address_of(view)
    data = pattern(4242, size)
    view[:] = data
    frames = page_frames(view)
    # The control: without consecutive frames the bios would hold one-page bvecs.
    assert longest_run(frames)[1] >= MIN_RUN, "the buffer's frames are not contiguous"
    fd = os.open(t.dev.node, os.O_RDWR | os.O_DIRECT)
    try:
        t.until_mark("thp-start")
        assert os.pwritev(fd, [view], offset) == size
        writes = mine(t.until_mark("thp-written"))
        view[:] = bytes(size)
        assert os.preadv(fd, [view], offset) == size
        assert bytes(view) == data
        reads = mine(t.until_mark("thp-read"))
        # Nothing moved the pages while the bios held them.
        assert page_frames(view) == frames
    finally:
        os.close(fd)
        view.release()
    assert len(page_pieces([(addr, size)], 0)) == 257
    for recs, op in ((writes, "write"), (reads, "read")):
        assert recs and all(r.op_name == op and r.status == 0 for r in recs)
        assert recs[0].sector == offset // 512
        for a, b in zip(recs, recs[1:]):
            assert b.sector == a.sector + a.sectors
        assert sum(r.size for r in recs) == size
        for r in recs:
            # A bio split inside a page starts its pieces there, as the kernel's walk does.
            at = addr + (r.sector - offset // 512) * 512
            assert r.nr_entries == 1 and r.nr_segments == len(r.segments)
            assert [(s.len, s.offset, s.sector) for s in r.segments] == \
                page_pieces([(at, r.size)], r.sector)
        assert recs[0].segments[0].len == PAGE - 512 and recs[0].segments[0].offset == 512
        assert sha(b"".join(bytes(r.payload) for r in recs)) == sha(data)


@pytest.mark.smoke
def test_fua_flush_discard_and_write_zeroes(make_traced: Callable[..., Traced]) -> None:
    t = make_traced()
    node = str(t.dev.node)
    t.until_mark("start")
    fd = os.open(node, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    try:
        assert os.pwrite(fd, aligned(pattern(1, 4096)), 8192) == 4096
    finally:
        os.close(fd)
    dsync = mine(t.until_mark("dsync"))
    assert dsync[0].op_name == "write" and dsync[0].sector == 16 and dsync[0].size == 4096
    # every flag exactly, each from its own bit of bi_opf (record_flags' table):
    # a direct write is REQ_SYNC | REQ_IDLE, O_DSYNC adds REQ_FUA
    assert dsync[0].flag_names == ["fua", "sync", "idle"]
    # O_DSYNC may add a cache flush after the FUA write, depending on kernel
    assert all(r.op_name == "flush" for r in dsync[1:])

    fd = os.open(node, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    flushes = mine(t.until_mark("fsync"))
    assert flushes and all(
        r.op_name == "flush" and r.size == 0 and r.nr_segments == 0
        and not r.has_payload and "preflush" in r.flag_names
        for r in flushes
    )

    sh("blkdiscard", "--offset", str(1 << 20), "--length", str(1 << 20), node)
    discards = [r for r in by_comm(t.until_mark("discard"), "blkdiscard")
                if r.op_name != "read"]
    assert [r.op_name for r in discards] == ["discard"] * len(discards)
    assert discards[0].sector == 2048
    assert sum(r.size for r in discards) == 1 << 20
    assert all(r.nr_segments == 0 and not r.has_payload for r in discards)

    sh("blkdiscard", "--zeroout", "--offset", str(4 << 20), "--length", str(64 << 10), node)
    zeroes = [r for r in by_comm(t.until_mark("zeroout"), "blkdiscard")
              if r.op_name != "read"]
    assert [(r.op_name, r.sector, r.size) for r in zeroes] == [
        ("write-zeroes", 8192, 64 << 10)
    ]
    assert not zeroes[0].has_payload
    assert direct_read(t.dev.source, 4 << 20, 64 << 10) == bytes(64 << 10)


@pytest.mark.smoke
def test_capture_modes_switch_at_once(make_traced: Callable[..., Traced]) -> None:
    t = make_traced(capture="meta")
    node = t.dev.node
    assert t.dev.status().capture == "meta"
    direct_write(node, 0, pattern(5, 4096))
    (w,) = mine(t.until_mark("meta"))
    assert w.op_name == "write" and not w.has_payload and w.payload_len == 0

    t.dev.set_capture("all")
    assert t.dev.status().capture == "all"
    assert direct_read(node, 0, 4096) == pattern(5, 4096)
    (r,) = mine(t.until_mark("all"))
    assert r.op_name == "read" and bytes(r.payload) == pattern(5, 4096)

    t.dev.set_capture("writes")
    direct_write(node, 4096, pattern(6, 4096))
    direct_read(node, 4096, 4096)
    w, r = mine(t.until_mark("writes"))
    assert (w.op_name, bytes(w.payload)) == ("write", pattern(6, 4096))
    assert (r.op_name, r.has_payload) == ("read", False)
    assert t.dev.table().capture == "writes"
    with pytest.raises(imgrement_dm.ImgrementError, match="capture mode 'bogus'"):
        t.dev.set_capture("bogus")


def test_write_payload_is_what_was_submitted(make_traced: Callable[..., Traced]) -> None:
    """Writes are copied in .map: changing the buffer afterwards changes nothing."""
    t = make_traced()
    buf = aligned(pattern(7, 65536))
    fd = os.open(t.dev.node, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwrite(fd, buf, 0)
        buf[:] = bytes(65536)
    finally:
        os.close(fd)
    (w,) = mine(t.until_mark("written"))
    assert bytes(w.payload) == pattern(7, 65536)


def test_comm_is_the_submitters_name_nul_padded(make_traced: Callable[..., Traced]) -> None:
    """comm is read without the task lock (copy_comm): after a long name, a
    short one must come NUL-padded, with nothing of the old name behind it
    (a kernel whose rename does not pad would leave it there)."""
    t = make_traced()
    libc = ctypes.CDLL(None, use_errno=True)
    tids: list[int] = []

    def named_writes() -> None:
        tids.append(threading.get_native_id())
        for i, name in enumerate((b"abcdefghijklmno", b"xy")):
            assert libc.prctl(15, name, 0, 0, 0) == 0  # PR_SET_NAME
            direct_write(t.dev.node, i * 4096, pattern(i, 4096))

    worker = threading.Thread(target=named_writes)
    worker.start()
    worker.join()
    recs = [r for r in mine(t.until_mark("named")) if r.tid == tids[0]]
    assert [(r.sector, bytes(r.comm_raw)) for r in recs] == [
        (0, b"abcdefghijklmno\0"), (8, b"xy" + bytes(14))]


@pytest.mark.smoke
def test_marks_land_between_the_right_records(make_traced: Callable[..., Traced]) -> None:
    t = make_traced()
    direct_write(t.dev.node, 0, pattern(1, 4096))
    m1 = t.dev.mark("after first write")
    direct_write(t.dev.node, 4096, pattern(2, 4096))
    items = t.until_mark("end")
    assert not [i for i in items if isinstance(i, Drop)]
    seqs = [
        ("BioRecord", i.sector) if isinstance(i, BioRecord) else ("MarkRecord", i.label)
        for i in items
        if isinstance(i, MarkRecord) or (isinstance(i, BioRecord) and i.pid == os.getpid())
    ]
    assert seqs == [
        ("BioRecord", 0),
        ("MarkRecord", "after first write"),
        ("BioRecord", 8),
        ("MarkRecord", "end"),
    ]
    mark = next(i for i in items if isinstance(i, MarkRecord))
    assert mark.seq == m1
    assert mark.time_ns > 0


def test_sequence_gapless_under_load_with_a_reader(make_traced: Callable[..., Traced]) -> None:
    t = make_traced()
    got: list[Item] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            got.extend(t.reader.read(timeout=0.2))

    th = threading.Thread(target=consume)
    th.start()
    fd = os.open(t.dev.node, os.O_WRONLY | os.O_DIRECT)
    buf = aligned(pattern(3, 4096))
    try:
        for i in range(400):
            os.pwrite(fd, buf, (i % 1000) * 4096)
    finally:
        os.close(fd)
    end = t.dev.mark("end")
    deadline = time.monotonic() + 30
    while not any(isinstance(i, MarkRecord) and i.seq == end for i in got):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stop.set()
    th.join()
    assert not [i for i in got if isinstance(i, Drop)]
    seqs = [i.seq for i in got if not isinstance(i, Drop)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert len(mine(got)) == 400
    assert t.dev.status().dropped == 0


def test_stalled_reader_drops_are_counted_exactly(make_traced: Callable[..., Traced]) -> None:
    t = make_traced(buffer_kb=64)
    dropped_file = STREAMS / "traced" / "dropped"
    before = int(dropped_file.read_text())
    assert before == 0
    n = 200
    fd = os.open(t.dev.node, os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(n):  # each record is 4096 + 104 bytes: 15 fit in 64 KiB
            os.pwrite(fd, aligned(pattern(i, 4096)), i * 4096)
    finally:
        os.close(fd)
    sh("udevadm", "settle")  # udev re-reads the device after our close
    # Every I/O completed, with its data, though the trace overflowed.
    for i in (0, 77, n - 1):
        assert direct_read(t.dev.source, i * 4096, 4096) == pattern(i, 4096)
    dropped = int(dropped_file.read_text())
    assert dropped > 100
    status = t.dev.status()
    assert status.dropped == dropped and status.used > 0

    # Drain; a drop shows as a gap once the next stored record arrives,
    # so put one (a mark) behind everything.
    items = quiet(t.reader)
    end = t.dev.mark("drained")
    while not any(isinstance(i, MarkRecord) and i.seq == end for i in items):
        items += t.reader.read(timeout=5) or pytest.fail("the mark never came")
    assert t.dev.status().used == 0
    drops = [i for i in items if isinstance(i, Drop)]
    recs = [i for i in items if not isinstance(i, Drop)]
    dropped = int(dropped_file.read_text())
    assert sum(d.count for d in drops) == dropped == t.dev.status().dropped
    # every sequence number is a record or inside a drop, exactly once
    covered = sorted([r.seq for r in recs] + [d.first_seq + k for d in drops
                                              for k in range(d.count)])
    assert covered == list(range(covered[0], end + 1))
    assert len(mine(recs)) + sum(d.count for d in drops) >= n

    # Reading resumes cleanly: new records follow with no further gap.
    direct_write(t.dev.node, 0, pattern(9, 4096))
    after = t.until_mark("resumed")
    assert not [i for i in after if isinstance(i, Drop)]
    first = after[0]
    assert not isinstance(first, Drop) and first.seq == end + 1
    assert bytes(mine(after)[0].payload) == pattern(9, 4096)
    assert int(dropped_file.read_text()) == dropped


def test_nonblocking_poll_and_whole_records(make_traced: Callable[..., Traced]) -> None:
    t = make_traced()
    assert t.reader.read(timeout=0) == []  # O_NONBLOCK: EAGAIN, no wait
    timer = threading.Timer(0.5, direct_write, (t.dev.node, 0, pattern(4, 4096)))
    timer.start()
    began = time.monotonic()
    # one record is far below the wake-up watermark: the deferred wake-up
    # (the ring's timer) is what ends this poll()
    items = t.reader.read(timeout=30)
    timer.join()
    assert [(r.op_name, r.sector) for r in mine(items)] == [("write", 0)]
    assert time.monotonic() - began < 30

    # the same for a blocking read() (no O_NONBLOCK), which sleeps in the
    # kernel: it reads until our write comes (other I/O, such as udev's, may
    # wake it first; each read must still hold whole records)
    woke: list[bytes] = []

    def read_until_ours() -> None:
        while not mine(decode(b"".join(woke))[0]):
            woke.append(os.read(fd, 1 << 20))

    fd = os.open(STREAMS / "traced" / "records", os.O_RDONLY)
    try:
        reader = threading.Thread(target=read_until_ours)
        reader.start()
        time.sleep(0.5)
        direct_write(t.dev.node, 8192, pattern(6, 4096))
        reader.join(30)
        assert not reader.is_alive(), "a blocking read() was never woken"
    finally:
        os.close(fd)
    for chunk in woke:
        assert decode(chunk)[1] == len(chunk)
    records, _ = decode(b"".join(woke))
    assert [(r.op_name, r.sector) for r in mine(records)] == [("write", 16)]

    # A read() never splits a record: too small a buffer is refused.
    direct_write(t.dev.node, 0, pattern(4, 4096))
    direct_write(t.dev.node, 4096, pattern(5, 4096))
    fd = os.open(STREAMS / "traced" / "records", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.read(fd, 100)
        assert e.value.errno == 22
        size = 88 + 16 + 4096  # one 4 KiB write record with its data
        got = os.read(fd, size)
        records, used = decode(got)
        assert records and used == len(got) <= size
    finally:
        os.close(fd)


def test_two_readers_share_the_stream_without_duplicates(
    make_traced: Callable[..., Traced],
) -> None:
    t = make_traced()
    second = RecordReader.live("traced")
    seen: list[list[int]] = [[], []]
    stop = threading.Event()

    def consume(reader: RecordReader, out: list[int]) -> None:
        while not stop.is_set():
            out.extend(i.seq for i in reader.read(timeout=0.2) if not isinstance(i, Drop))

    threads = [threading.Thread(target=consume, args=(r, s))
               for r, s in zip((t.reader, second), seen)]
    for th in threads:
        th.start()
    fd = os.open(t.dev.node, os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(300):
            os.pwrite(fd, aligned(pattern(i, 4096)), i * 4096)
    finally:
        os.close(fd)
    end = t.dev.mark("end")
    deadline = time.monotonic() + 30
    while end not in seen[0] + seen[1]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stop.set()
    for th in threads:
        th.join()
    second.close()
    union = seen[0] + seen[1]
    assert len(union) == len(set(union)), "a record was delivered twice"
    # (udev's probe after our close may add records past the mark)
    assert sorted(s for s in union if s <= end) == list(range(min(union), end + 1))
    assert seen[0] and seen[1], "both readers got records"


def test_reload_suspend_and_rename_lose_nothing(make_traced: Callable[..., Traced]) -> None:
    t = make_traced()
    node = t.dev.node
    direct_write(node, 0, pattern(1, 4096))
    table = t.dev.table()
    length = table.length
    # reload with new arguments, while the reader keeps its file open
    new = f"0 {length} imgrement {table.device} 0 1 capture:all"
    subprocess.run(["dmsetup", "reload", "traced", "--table", new], check=True)
    subprocess.run(["dmsetup", "suspend", "traced"], check=True)
    subprocess.run(["dmsetup", "resume", "traced"], check=True)
    assert sh("dmsetup", "table", "traced").strip() == new
    direct_read(node, 0, 4096)
    items = t.until_mark("reloaded")
    recs = mine(items)
    assert [(r.op_name, r.has_payload) for r in recs] == [("write", True), ("read", True)]
    assert bytes(recs[1].payload) == pattern(1, 4096)
    seqs = [i.seq for i in items if not isinstance(i, Drop)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    # the buffer size cannot change under a live stream
    bad = f"0 {length} imgrement {table.device} 0 1 buffer_kb:128"
    r = subprocess.run(["dmsetup", "reload", "traced", "--table", bad],
                       capture_output=True, text=True, check=False)
    assert r.returncode != 0
    assert "buffer size of an existing device cannot change" in sh("dmesg")
    subprocess.run(["dmsetup", "clear", "traced"], check=True)

    # a rename: the open reader goes on, status moves nothing (a plain
    # report), a new reader finds the stream by its dev file, and the
    # directory takes the new name at the next resume
    subprocess.run(["dmsetup", "rename", "traced", "renamed"], check=True)
    sh("udevadm", "settle")
    t.dev.name = "renamed"
    t.dev.status()
    assert (STREAMS / "traced" / "records").exists()
    assert not (STREAMS / "renamed").exists()
    rdev = os.stat("/dev/mapper/renamed").st_rdev
    devno = f"{os.major(rdev)}:{os.minor(rdev)}"
    assert (STREAMS / "traced" / "dev").read_text() == devno + "\n"
    assert stream_path("renamed") == STREAMS / "traced" / "records"
    RecordReader.live("renamed").close()  # opens the right file
    direct_write(Path("/dev/mapper/renamed"), 8192, pattern(2, 4096))
    assert [r.sector for r in mine(t.until_mark("renamed"))] == [16]
    subprocess.run(["dmsetup", "suspend", "renamed"], check=True)
    subprocess.run(["dmsetup", "resume", "renamed"], check=True)
    assert (STREAMS / "renamed" / "records").exists()
    assert not (STREAMS / "traced").exists()
    assert stream_path("renamed") == STREAMS / "renamed" / "records"


@pytest.mark.smoke
def test_stream_ends_when_the_device_goes(disk: str) -> None:
    dev = imgrement_dm.wrap(disk)
    sh("udevadm", "settle")
    reader = dev.records()
    result: list[Item] = []
    th = threading.Thread(target=lambda: result.extend(reader))  # blocks until EOF
    th.start()
    direct_write(dev.node, 0, pattern(1, 4096))
    time.sleep(0.5)
    dev.unwrap()
    th.join(timeout=30)
    assert not th.is_alive(), "a blocked reader was not released by removal"
    assert reader.eof
    assert [r.sector for r in mine(result)] == [0]
    reader.close()
    assert not (STREAMS / "traced").exists()


def test_stream_files_are_root_only(make_traced: Callable[..., Traced]) -> None:
    make_traced()
    for name in ("records", "dropped", "stats"):
        st = os.stat(STREAMS / "traced" / name)
        assert oct(st.st_mode & 0o777) == "0o400" and st.st_uid == 0
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "cat", str(STREAMS / "traced" / "records")],
                       capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    stats = dict(line.split() for line in (STREAMS / "traced" / "stats").read_text().splitlines())
    assert int(stats["buffer_size"]) == 16 << 20


def test_kernel_log_mode_prints_the_prototype_shape(
    make_traced: Callable[..., Traced],
) -> None:
    t = make_traced()
    log = kmsg.Cursor()
    t.dev.set_log(True)
    assert t.dev.status().log is True
    direct_write(t.dev.node, 4096 * 10, pattern(1, 8192))
    lines = log.read_new()
    assert "imgrement: W, bytes to transfer: 8192, delta count: 2" in lines
    assert "imgrement: bv #0: len 4096, offset 0, 8 sectors (80..87)" in lines
    assert "imgrement: bv #1: len 4096, offset 0, 8 sectors (88..95)" in lines

    # A flood is rate-limited: at most 20 bios per 5 s window reach the log.
    began = time.monotonic()
    fd = os.open(t.dev.node, os.O_WRONLY | os.O_DIRECT)
    buf = aligned(pattern(2, 4096))
    try:
        for i in range(500):
            os.pwrite(fd, buf, i * 4096)
    finally:
        os.close(fd)
    windows = int((time.monotonic() - began) // 5) + 2
    printed = sum("bytes to transfer" in line for line in log.read_new())
    assert 0 < printed <= 20 * windows
    # When the table goes (here replaced by a reload), the log says how many
    # lines the limit held back: a quiet log must not look like quiet I/O.
    line = f"0 {t.dev.table().length} imgrement {t.dev.table().device} 0 1 log:on"
    subprocess.run(["dmsetup", "reload", "traced", "--table", line], check=True)
    subprocess.run(["dmsetup", "resume", "traced"], check=True)
    held = [m for m in log.read_new() if re.search(r": \d+ output lines suppressed", m)]
    assert len(held) == 1, "the rate limit's count of held-back lines was never printed"
    t.dev.set_log(False)
    direct_write(t.dev.node, 0, pattern(3, 4096))
    assert not [line for line in log.read_new() if "bytes to transfer" in line]
    log.close()
