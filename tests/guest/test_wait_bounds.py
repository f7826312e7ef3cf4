"""The lossless mode's bounds: a suspend never waits for the reader, no bio
waits longer than wait_ms however the reader trickles, bios that waited are
accounted once (inflight reads 0 0 when idle), a stall's kernel log lines
are few however many stalls there are; and segment sectors stay exact when
a segment is not whole sectors."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm.records import BioRecord, Drop, RecordReader, _Gaps, decode
from tests.guest.helpers import SLOWDOWN, idle_inflight, sh
from tests.guest.test_lossless import STOPPED_READER, _mark, end_stopped_reader

#: the size of one 4 KiB write's record: the bio record (88 bytes), one
#: segment (16) and the data; a read of this many bytes takes one record
ONE_WRITE_RECORD = 88 + 16 + 4096


def _drain(name: str) -> None:
    """Take what udev's probe of the new device left in the stream."""
    with RecordReader.live(name) as r:
        while r.read(timeout=1):
            pass


def _fio(node: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["fio", "--name=bounds", f"--filename={node}", "--bs=4k", "--direct=1",
         "--ioengine=libaio", "--output-format=json", "--randrepeat=0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fio_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    result: dict[str, object] = json.loads(out[out.index("{"):])
    return result


def _wait_for(what: str, cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout * SLOWDOWN
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def waiting_device(disk: str) -> Iterator[imgrement_dm.TracedDevice]:
    # wait_ms 10 s: five times the 2 s a suspend may take here, and what the
    # old presuspend-less target made it wait
    dev = imgrement_dm.wrap(disk, buffer_kb=64, overflow="wait", wait_ms=10000)
    try:
        sh("udevadm", "settle")
        _drain(dev.name)
        yield dev
    finally:
        if dev.name in [d.name for d in imgrement_dm.list_devices()]:
            dev.unwrap()


@pytest.mark.stress
def test_a_suspend_does_not_wait_for_the_reader(waiting_device: imgrement_dm.TracedDevice,
                                                 disk: str) -> None:
    """wait_ms 10 s, a 64 KiB buffer, a reader stopped with SIGSTOP that holds
    the stream open, fio at QD4: once its bios wait, `dmsetup suspend` returns
    within 2 s (it waited the whole wait_ms for them before presuspend); the
    waiting bios went on, recorded where their records fitted and dropped
    otherwise, counted in status; after SIGCONT and resume fio's crc32c data
    verifies, nothing fell back, idle the device's inflight is 0 0, and the
    stream shows exactly the dropped records as gaps, the first at lost_from."""
    dev = waiting_device
    path = Path("/sys/kernel/debug/imgrement") / dev.name / "records"
    reader = subprocess.Popen([sys.executable, "-c", STOPPED_READER, str(path)],
                              stdout=subprocess.PIPE)
    fio = None
    try:
        assert reader.stdout is not None and reader.stdout.readline() == b"ready\n"
        fio = _fio(dev.node, "--rw=randwrite", "--iodepth=4", "--size=1M",
                   "--verify=crc32c", "--do_verify=1")
        # the first waiting bio starts the clock of its 10 s bound: suspend
        # well before it runs out (fio's others, and udev's probe reads, join
        # it meanwhile)
        _wait_for("no bio ever waited", lambda: dev.status().waiting >= 1, 60)
        time.sleep(1)
        before = dev.status()
        assert before.waiting >= 1 and before.fallbacks == 0, before
        start = time.monotonic()
        subprocess.run(["dmsetup", "suspend", dev.name], check=True, timeout=120)
        took = time.monotonic() - start
        mid = dev.status()
        # The reader goes on before the resume: dmsetup resume waits for
        # udev, whose probe reads of the resumed device wait for space like
        # any bio, and with the reader still stopped one waited its whole
        # wait_ms and the device fell back (what the test allowed before).
        reader.send_signal(signal.SIGCONT)  # it reads on, to the end of the stream
        subprocess.run(["dmsetup", "resume", dev.name], check=True, timeout=120)
        assert took < 2 * SLOWDOWN, f"dmsetup suspend took {took:.1f} s"
        assert mid.waiting == 0
        lost = mid.dropped - before.dropped
        # each bio that waited went on, recorded where its record fitted (a
        # small read's may), dropped otherwise; and so did each bio fio sent
        # between the presuspend and dm holding new I/O back (fio resubmits
        # as each of its 4 completes: one run saw 10 of them): every one
        # counted once, as a record or a drop
        settled = lost + mid.records - before.records
        assert settled == before.waiting + mid.bios - before.bios, (before, mid)
        assert lost >= 1 and mid.lost_from is not None
        _fio_result(fio, 300 * SLOWDOWN)  # verify=crc32c: fio read back every block
        end = dev.status()
        # with the reader reading, nothing waits out its wait_ms after the resume
        assert end.fallbacks == 0, end
        assert idle_inflight(dev.node) == "0 0"
        # a mark after the last drop: a drop shows as a gap only before a record
        _mark(dev, "end")
        dev.unwrap()  # the reader takes the rest and sees the end
        out, _ = reader.communicate(timeout=120 * SLOWDOWN)
        recs, used = decode(out)
        assert used == len(out)
        drops = [i for i in _Gaps(None).feed(recs) if isinstance(i, Drop)]
        assert sum(d.count for d in drops) == end.dropped - before.dropped
        assert drops[0].first_seq == mid.lost_from
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.communicate()
        end_stopped_reader(reader)


#: one record a second: each freed record used to restart the stall's clock
TRICKLING_READER_PERIOD = 1.0
#: three periods, so that the two reads a record needs where the buffer
#: wraps (its padding, then itself) never looked like a stall: the old clock
#: never ran out, and only the per-bio bound can end the waits
TRICKLE_WAIT_MS = 3000


@pytest.mark.stress
def test_no_bio_waits_longer_than_wait_ms(disk: str) -> None:
    """wait_ms 3000, fio at QD32, a reader that takes one record a second:
    each freed record used to restart the stall's clock, so the N-th waiting
    bio waited about N seconds (32 at QD32); now the oldest waiting bio's age
    is the bound, so no write's completion latency passes wait_ms plus
    emulation's slack, the device falls back (counted), and idle, inflight
    is 0 0."""
    dev = imgrement_dm.wrap(disk, buffer_kb=64, overflow="wait", wait_ms=TRICKLE_WAIT_MS)
    stop = threading.Event()
    try:
        sh("udevadm", "settle")
        _drain(dev.name)
        fd = os.open(f"/sys/kernel/debug/imgrement/{dev.name}/records", os.O_RDONLY)

        def trickle() -> None:
            while not stop.wait(TRICKLING_READER_PERIOD):
                try:
                    os.read(fd, ONE_WRITE_RECORD)
                except OSError:  # EINVAL: the next record is larger (not a 4 KiB write)
                    os.read(fd, 1 << 20)

        t = threading.Thread(target=trickle)
        t.start()
        try:
            result = _fio_result(_fio(dev.node, "--rw=randwrite", "--iodepth=32",
                                      "--size=16M", "--time_based", "--runtime=8"),
                                 300 * SLOWDOWN)
        finally:
            stop.set()
            t.join(timeout=60)
            os.close(fd)
        job = result["jobs"][0]  # type: ignore[index]
        max_ms = job["write"]["clat_ns"]["max"] / 1e6
        # the bound, plus what emulation adds to one I/O and to the work item
        assert max_ms < TRICKLE_WAIT_MS + 1500 * SLOWDOWN, max_ms
        st = dev.status()
        assert st.fallbacks >= 1 and st.waited > 32, st
        assert idle_inflight(dev.node) == "0 0"
    finally:
        stop.set()
        dev.unwrap()


def test_a_thousand_stalls_leave_few_kernel_log_lines(disk: str) -> None:
    """wait_ms 10, a 64 KiB buffer and a reader that drains it only between
    writes: each 64 KiB write stalls (its fourth 16 KiB piece finds no room),
    falls back, and the next drain ends the fallback.  1000 of them leave
    1000 fallbacks in status and fewer than 20 lines in the kernel log (one
    warning and one note per stall before)."""
    stalls = 1000
    dev = imgrement_dm.wrap(disk, buffer_kb=64, overflow="wait", wait_ms=10)
    try:
        sh("udevadm", "settle")
        _drain(dev.name)
        lines_before = len(sh("dmesg").splitlines())
        buf = mmap.mmap(-1, 64 << 10)
        buf[:] = os.urandom(64 << 10)
        out = os.open(dev.node, os.O_WRONLY | os.O_DIRECT)
        with dev.records() as reader:
            try:
                for i in range(stalls):
                    os.pwrite(out, buf, (i % 64) * (64 << 10))
                    reader.read(timeout=0)
            finally:
                os.close(out)
        st = dev.status()
        assert st.fallbacks == stalls, st
        new = sh("dmesg").splitlines()[lines_before:]
        ours = [line for line in new if dev.name in line]
        assert len(ours) < 20, "\n".join(ours[:40])
    finally:
        dev.unwrap()


SCSI_DEBUG = Path("/sys/bus/pseudo/drivers/scsi_debug")


@pytest.fixture
def scsi_disk() -> Iterator[str]:
    """A scsi_debug disk, whose own DMA alignment is 4 bytes."""
    subprocess.run(["modprobe", "scsi_debug", "dev_size_mb=8"], check=True)
    try:
        sh("udevadm", "settle")
        disks = sorted(SCSI_DEBUG.glob("adapter*/host*/target*/*/block/*"))
        assert len(disks) == 1, disks
        yield f"/dev/{disks[0].name}"
    finally:
        sh("udevadm", "settle")
        subprocess.run(["rmmod", "scsi_debug"], check=False)


def _pwritev_direct(node: Path, buffers: list[memoryview], offset: int) -> int:
    fd = os.open(node, os.O_WRONLY | os.O_DIRECT)
    try:
        return os.pwritev(fd, buffers, offset)
    finally:
        os.close(fd)


def test_segment_sectors_count_bytes(scsi_disk: str) -> None:
    """Each segment's sector is the bio's plus the bytes before it // 512,
    counted in bytes (the target added bv_len >> 9 per segment, which drifts
    once a segment is not whole sectors), and the payload is the data byte for
    byte: an O_DIRECT writev of two 1 KiB buffers, each starting 512 bytes
    before a page's end, gives segments of 512 bytes at page offset 3584 and
    512 at 0, twice.  A buffer that would split a sector across two pages (512
    bytes at page offset 4032: 64 + 448) never reaches the target: the mapped
    device's DMA alignment is 511 on every kernel from 6.1 (measured over
    scsi_debug, whose own is 3), 5.10 wants the logical block size's (512),
    and the kernel refuses it with EINVAL."""
    dev = imgrement_dm.wrap(scsi_disk)
    try:
        sh("udevadm", "settle")
        _drain(dev.name)
        dm = os.path.basename(os.path.realpath(dev.node))
        queue = Path(f"/sys/block/{dm}/queue")
        if (queue / "dma_alignment").exists():
            alignment = int((queue / "dma_alignment").read_text())
        else:
            # 5.10 has no such file (6.0 added it); its O_DIRECT wants every
            # buffer aligned to the logical block size, which is the same 511
            alignment = int((queue / "logical_block_size").read_text()) - 1
        assert alignment == 511
        area = mmap.mmap(-1, 4 * 4096)
        data = [os.urandom(1024) for _ in range(2)]
        views = []
        for n, chunk in enumerate(data):
            at = 2 * n * 4096 + 4096 - 512  # page offset 3584
            area[at:at + 1024] = chunk
            views.append(memoryview(area)[at:at + 1024])
        crossing = memoryview(area)[4096 - 64:4096 + 448]
        with dev.records() as reader:
            with pytest.raises(OSError) as refused:
                _pwritev_direct(dev.node, [crossing], 0)
            assert refused.value.errno == errno.EINVAL
            assert _pwritev_direct(dev.node, views, 64 << 10) == 2048
            deadline = time.monotonic() + 30 * SLOWDOWN
            writes: list[BioRecord] = []
            while not writes:
                assert time.monotonic() < deadline, "the write's record never came"
                writes = [i for i in reader.read(timeout=1)
                          if isinstance(i, BioRecord) and i.op_name == "write"]
        for v in [*views, crossing]:
            v.release()
        assert len(writes) == 1
        rec = writes[0]
        assert rec.sector == 128 and rec.size == 2048
        segs = rec.segments
        assert [(s.len, s.offset) for s in segs] == [(512, 3584), (512, 0)] * 2
        done = 0
        for s in segs:
            assert s.sector == rec.sector + done // 512, (s, done)
            done += s.len
        assert bytes(rec.payload) == b"".join(data)
    finally:
        dev.unwrap()


@pytest.mark.stress
def test_switching_to_wait_under_large_writes_never_stalls(disk: str) -> None:
    """1 MiB writes at QD4 into a 256 KiB buffer while the policy flips
    between drop and wait every 50 ms and a reader keeps reading.  dm used to
    split a bio by the max_io_len that the policy had set when dm looked, and
    .map read the policy later: a whole 1 MiB bio mapped in wait mode has a
    record that can never fit, so it waited wait_ms and forced a fallback.
    Now .map splits by the policy it reads: no fallback, ever."""
    seconds = 20
    dev = imgrement_dm.wrap(disk, buffer_kb=256, overflow="drop", wait_ms=2000)
    stop = threading.Event()
    try:
        sh("udevadm", "settle")
        with dev.records() as reader:

            def read() -> None:
                while not stop.is_set():
                    reader.read(timeout=0.1)

            def flip() -> None:
                while not stop.is_set():
                    dev.set_overflow("wait")
                    time.sleep(0.05)
                    dev.set_overflow("drop")
                    time.sleep(0.05)

            threads = [threading.Thread(target=read), threading.Thread(target=flip)]
            for t in threads:
                t.start()
            try:
                result = _fio_result(_fio(dev.node, "--rw=write", "--bs=1M", "--iodepth=4",
                                          "--size=128M", "--time_based",
                                          f"--runtime={seconds}"), 300 * SLOWDOWN)
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=60)
        job = result["jobs"][0]  # type: ignore[index]
        assert job["write"]["total_ios"] > 50, "too few writes to prove anything"
        st = dev.status()
        assert st.fallbacks == 0 and st.waiting == 0, st
    finally:
        stop.set()
        dev.unwrap()
