"""The lossless overflow policy (wait): under load with a slow reader nothing
is dropped and the capture rebuilds the disk byte for byte; a bio larger than
the buffer is split so that every piece is kept; with no reader, or a reader
stopped for longer than wait_ms, the disk goes on and status and the stream
say from which record the capture is incomplete."""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm.errors import ImgrementError
from imgrement_dm.formats.capture import FORMAT_VERSION, IN_PLACE_MIN, CaptureReader
from imgrement_dm.output import parts_of
from imgrement_dm.records import BioRecord, Drop, Item, MarkRecord, RecordReader, _Gaps, decode
from tests.guest.helpers import (
    CLI,
    SLOWDOWN,
    cli,
    direct_read,
    direct_write,
    holds_open,
    idle_inflight,
    open_flags,
    pattern,
    reading_in_background,
    sh,
    sha256,
    start_record,
)

SIZE = 32 << 20  # the part of the disk the workloads write


@contextmanager
def _reading(dev: imgrement_dm.TracedDevice, *, skip: bool = True) -> Iterator[list[Item]]:
    """A reader thread that keeps taking records while the block runs (a write
    that waits for space needs one); everything it took, once the block ends.
    ``skip``: leave out what the stream held when it started."""
    with dev.records() as reader:
        if skip:
            reader.read(timeout=0)
        with reading_in_background(reader) as items:
            yield items


def _mark(dev: imgrement_dm.TracedDevice, label: str) -> int:
    """A mark; in wait mode a full buffer says "try again", so do."""
    deadline = time.monotonic() + 30 * SLOWDOWN
    while True:
        try:
            return dev.mark(label)
        except ImgrementError as e:
            if "the record buffer" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _until_mark(items: list[Item], seq: int) -> list[Item]:
    deadline = time.monotonic() + 60 * SLOWDOWN
    while not any(isinstance(i, MarkRecord) and i.seq == seq for i in list(items)):
        assert time.monotonic() < deadline, f"mark {seq} never came"
        time.sleep(0.1)
    return list(items)


def _drain(dev: imgrement_dm.TracedDevice) -> None:
    """Take what udev's probe of the new device left in the stream."""
    with RecordReader.live(dev.name) as r:
        while r.read(timeout=1):
            pass


def _fio(node: Path, *extra: str, runtime: int = 15) -> dict[str, object]:
    proc = subprocess.run(
        ["fio", "--name=lossless", f"--filename={node}", "--rw=randwrite", "--bs=4k",
         "--direct=1", "--ioengine=libaio", "--iodepth=16", f"--size={SIZE}",
         "--time_based", f"--runtime={runtime}", "--output-format=json",
         "--randrepeat=0", *extra],
        capture_output=True, text=True, timeout=runtime * 4 + 300, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout[proc.stdout.index("{"):])
    return result


@pytest.mark.stress
def test_record_loses_nothing_and_rebuilds_the_disk(loopdev: str, tmp_path: Path) -> None:
    """fio at queue depth 16 into a 64 KiB buffer (16 records of 4 KiB fill
    it) while `record` writes the capture from Python under emulation: the
    buffer is full most of the time.  The device was wrapped with the
    default policy (drop): record switches it to wait for its duration and
    back.  No record is lost, and the capture applied to the disk as it was
    gives the disk as it is, byte for byte."""
    dev = imgrement_dm.wrap(loopdev, buffer_kb=64, wait_ms=30000)  # over an all-zero file
    try:
        sh("udevadm", "settle")
        _drain(dev)
        assert dev.status().overflow == "drop"
        cap = tmp_path / "s.cap"
        rec = subprocess.Popen([*CLI, "record", dev.name, "-o", str(cap), "-q"],
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60 * SLOWDOWN
        while dev.status().overflow != "wait":
            assert rec.poll() is None, rec.stderr.read() if rec.stderr else ""
            assert time.monotonic() < deadline, "record did not switch to wait"
            time.sleep(0.2)
        before = dev.status()
        _fio(dev.node, runtime=int(os.environ.get("STRESS_SECONDS", "60")) // 4)
        during = dev.status()
        assert during.dropped == before.dropped and during.lost_from is None
        assert during.waited > before.waited, "the buffer never filled: the test proves nothing"
        want = sha256(dev.node, SIZE)
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=120 * SLOWDOWN)
        assert rec.returncode == 0, err
        assert "dropped" not in err
        assert dev.status().overflow == "drop", "record did not switch the device back"
    finally:
        dev.unwrap()
    _applied_equals(loopdev, cap, want, tmp_path)


# A deliberately slow consumer: it stores the stream as a capture file, but
# sleeps a second after each batch, so the buffer fills between its reads
# even on the debug kernel, where fio manages a few hundred writes a second
# (with 50 ms, there the reader kept up and nothing ever waited).
SLOW_RECORDER = r"""
import signal, sys, time
from pathlib import Path
from imgrement_dm.formats.capture import write_capture
from imgrement_dm.records import RecordReader
name, out, sectors = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
with RecordReader.live(name) as reader, write_capture(out, name, sectors) as w:
    print("ready", flush=True)
    while not stop:
        w.add(reader.read_view(timeout=0.2))
        time.sleep(1)
    while view := reader.read_view(timeout=0):
        w.add(view)
"""


@pytest.mark.stress
def test_a_slow_reader_in_wait_mode_loses_nothing(loopdev: str, tmp_path: Path) -> None:
    """The issue's measure of done: fio randwrite 4k at QD32 for a minute
    through a device in wait mode with a 1 MiB buffer, read by a consumer
    that sleeps a second after every batch: bios waited, nothing dropped,
    and the capture applied to the base equals the device's sha256."""
    seconds = int(os.environ.get("STRESS_SECONDS", "60"))
    # wait_ms: the emulated debug kernel can keep the reader off the CPU for
    # seconds; this test is about a slow reader, not a stopped one (below)
    dev = imgrement_dm.wrap(loopdev, buffer_kb=1024, overflow="wait", wait_ms=30000)
    rec = None
    try:
        sh("udevadm", "settle")
        _drain(dev)
        cap = tmp_path / "slow.cap"
        rec = subprocess.Popen([sys.executable, "-c", SLOW_RECORDER, dev.name, str(cap),
                                str(sectors_of(loopdev))], stdout=subprocess.PIPE, text=True)
        assert rec.stdout is not None and rec.stdout.readline() == "ready\n"
        before = dev.status()
        _fio(dev.node, "--iodepth=32", runtime=seconds)
        st = dev.status()
        assert st.dropped == before.dropped and st.lost_from is None and st.fallbacks == 0
        assert st.waited > before.waited, "the buffer never filled: the test proves nothing"
        want = sha256(dev.node, SIZE)
        rec.send_signal(signal.SIGTERM)
        assert rec.wait(timeout=120 * SLOWDOWN) == 0
    finally:
        if rec is not None:
            if rec.poll() is None:
                rec.kill()
                rec.wait(timeout=30)
            if rec.stdout is not None:
                rec.stdout.close()
        dev.unwrap()
    _applied_equals(loopdev, cap, want, tmp_path)


def _applied_equals(dev: str, cap: Path, want: str, tmp_path: Path) -> None:
    """The capture applied to the base (``dev`` was all zeros) gives sha256 ``want``."""
    base = tmp_path / "base.img"
    with base.open("wb") as f:
        f.truncate(sectors_of(dev) * 512)
    out = tmp_path / "applied.img"
    r = cli("apply", str(cap), str(base), "-o", str(out))
    assert r.returncode == 0, r.stderr  # apply refuses a capture with a single drop
    assert sha256(out, SIZE) == want


def sectors_of(dev: str) -> int:
    return int(sh("blockdev", "--getsz", dev))


def test_the_same_load_in_drop_mode_drops(disk: str) -> None:
    """The control for the test above: what wait mode kept, drop mode loses."""
    dev = imgrement_dm.wrap(disk, buffer_kb=64)
    try:
        sh("udevadm", "settle")
        _drain(dev)
        with dev.records() as reader:  # a reader that never reads
            reader.read(timeout=0)
            _fio(dev.node, runtime=3)
        st = dev.status()
        assert st.dropped > 0 and st.waited == 0 and st.lost_from is None
    finally:
        dev.unwrap()


def _write_and_read(dev: imgrement_dm.TracedDevice, offset: int, data: bytes,
                    label: str) -> tuple[list[Item], list[BioRecord]]:
    """One O_DIRECT write while a reader takes records; everything up to a mark
    set after it, and this process's write records among them."""
    with _reading(dev) as taken:
        direct_write(dev.node, offset, data)
        items = _until_mark(taken, _mark(dev, label))
    writes = [i for i in items if isinstance(i, BioRecord) and i.pid == os.getpid()
              and i.op_name == "write"]
    return items, writes


@pytest.mark.smoke
def test_a_bio_larger_than_the_buffer_is_split_and_kept(disk: str) -> None:
    """1 MiB in one O_DIRECT write into a 64 KiB buffer: in wait mode dm
    splits it into pieces of at most 16 KiB (a quarter of the buffer), each
    recorded with its data, in order; in drop mode the same write's records
    could never fit with their data, so they are kept without it, flagged."""
    data = pattern(7, 1 << 20)
    dev = imgrement_dm.wrap(disk, buffer_kb=64, overflow="wait")
    try:
        sh("udevadm", "settle")
        _drain(dev)
        items, writes = _write_and_read(dev, 1 << 20, data, "end")
        assert not [i for i in items if isinstance(i, Drop)]
        assert all(w.size <= 16 << 10 for w in writes), [w.size for w in writes]
        assert sum(w.size for w in writes) == len(data)
        writes.sort(key=lambda w: w.sector)
        assert writes[0].sector == (1 << 20) // 512
        assert all(a.sector + a.sectors == b.sector for a, b in zip(writes, writes[1:]))
        assert b"".join(bytes(w.payload) for w in writes) == data
        st = dev.status()
        assert st.dropped == 0 and st.lost_from is None

        # drop mode does not split: each piece the queue limits make is larger than
        # the buffer, so it is recorded without its data (flagged), not dropped
        dev.set_overflow("drop")
        items, writes = _write_and_read(dev, 1 << 20, data, "end2")
        assert not [i for i in items if isinstance(i, Drop)]
        assert sum(w.size for w in writes) == len(data)
        assert all(w.size > 64 << 10 for w in writes), [w.size for w in writes]
        assert all(w.payload_lost and not w.has_payload and w.payload_len == 0
                   for w in writes)
    finally:
        dev.unwrap()


def test_with_no_reader_wait_mode_never_waits(disk: str) -> None:
    """Nobody has the stream open: waiting would only hang the disk.  Writes
    go on at once; the records that do not fit are dropped, and status says
    from which one the capture is incomplete."""
    dev = imgrement_dm.wrap(disk, buffer_kb=64, overflow="wait")
    try:
        sh("udevadm", "settle")
        _drain(dev)
        before = dev.status()
        for i in range(40):  # 40 records of 4 KiB into 64 KiB
            direct_write(dev.node, i * 4096, pattern(i, 4096))
        st = dev.status()
        assert st.waited == before.waited
        assert st.dropped > before.dropped
        with _reading(dev, skip=False) as taken:  # what is in it since _drain
            items = _until_mark(taken, _mark(dev, "end"))
        drops = [i for i in items if isinstance(i, Drop)]
        assert drops and st.lost_from == drops[0].first_seq
        # (udev's probes after the writes may have dropped a few more meanwhile)
        assert sum(d.count for d in drops) == dev.status().dropped - before.dropped
    finally:
        dev.unwrap()


STOPPED_READER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
os.kill(os.getpid(), 19)  # SIGSTOP: holds the stream open, reads nothing
data = b""
while True:
    chunk = os.read(fd, 1 << 20)
    if not chunk:
        break
    data += chunk
sys.stdout.buffer.write(data)
"""


def end_stopped_reader(reader: subprocess.Popen[bytes]) -> None:
    """Kill a STOPPED_READER that is still there (stopped or not) and close its pipe."""
    if reader.poll() is None:
        reader.send_signal(signal.SIGCONT)
        reader.kill()
        reader.wait(timeout=30)
    if reader.stdout is not None:
        reader.stdout.close()


@pytest.mark.smoke
def test_a_stopped_reader_stalls_io_at_most_wait_ms(disk: str, tmp_path: Path) -> None:
    """A reader that holds the stream open and is stopped: fio's writes
    wait at most wait_ms (1 s here), then the device drops records until the
    reader catches up, says so in the kernel log and in status (lost_from),
    and the stream, once the reader runs again, shows the gap right there."""
    dev = imgrement_dm.wrap(disk, buffer_kb=64, overflow="wait", wait_ms=1000)
    reader = None
    try:
        sh("udevadm", "settle")
        _drain(dev)
        path = Path("/sys/kernel/debug/imgrement") / dev.name / "records"
        reader = subprocess.Popen([sys.executable, "-c", STOPPED_READER, str(path)],
                                  stdout=subprocess.PIPE)
        assert reader.stdout is not None and reader.stdout.readline() == b"ready\n"
        said = f"{dev.name}: a bio waited 1000 ms for space"
        before = sh("dmesg").count(said)
        result = _fio(dev.node, "--iodepth=4", runtime=10)
        job = result["jobs"][0]  # type: ignore[index]
        assert job["write"]["total_ios"] > 200, "I/O did not go on after the stall"
        max_ms = job["write"]["clat_ns"]["max"] / 1e6
        # the bound, plus what emulation adds to one I/O
        assert max_ms < 1000 + 4000 * SLOWDOWN, max_ms
        st = dev.status()
        assert st.fallbacks >= 1 and st.waited > 0 and st.lost_from is not None
        assert sh("dmesg").count(said) > before
        reader.send_signal(signal.SIGCONT)  # it drains the buffer, and goes on reading
        end = _mark(dev, "end")
        idle = idle_inflight(dev.node)
        dev.unwrap()  # the reader takes the rest and sees the end
        out, _ = reader.communicate(timeout=120 * SLOWDOWN)
        recs, used = decode(out)
        assert used == len(out)
        items = _Gaps(None).feed(recs)
        drops = [i for i in items if isinstance(i, Drop)]
        assert drops and drops[0].first_seq == st.lost_from
        assert any(getattr(i, "seq", -1) == end for i in items)
        # bios that waited were accounted once: the mapped device was idle at
        # unwrap, and its last inflight reading (before unwrap) says so
        assert idle == "0 0", f"/sys/block/dm-N/inflight read {idle!r} when idle"
    finally:
        if reader is not None:
            end_stopped_reader(reader)
        if dev.name in [d.name for d in imgrement_dm.list_devices()]:
            dev.unwrap()


def test_overflow_by_message_table_and_cli(disk: str) -> None:
    r = cli("wrap", disk, "--overflow", "wait", "--wait-ms", "250")
    assert r.returncode == 0, r.stderr
    try:
        table = sh("dmsetup", "table", "traced").split()
        assert table[-2:] == ["overflow:wait", "wait_ms:250"]
        assert "overflow wait (0 bios waiting now" in cli("status", "traced").stdout
        assert cli("overflow", "traced", "drop").returncode == 0
        assert json.loads(cli("status", "traced", "--json").stdout)["overflow"] == "drop"
        assert sh("dmsetup", "table", "traced").split()[-2:] == ["overflow:drop",
                                                                  "wait_ms:250"]
        r = cli("overflow", "traced", "sometimes")
        assert r.returncode == 2 and "Invalid value" in r.stderr
        r = subprocess.run(["dmsetup", "message", "traced", "0", "overflow", "x"],
                           capture_output=True, text=True, check=False)
        assert r.returncode != 0
    finally:
        assert cli("unwrap", "traced").returncode == 0
    for bad in (["--overflow", "x"], ["--wait-ms", "5"]):
        r = cli("wrap", disk, *bad)
        assert r.returncode == 2, r.stderr


def test_a_nowait_write_that_would_wait_gets_eagain(disk: str) -> None:
    """RWF_NOWAIT promises not to block: in wait mode, a write whose record
    does not fit fails at once with EAGAIN (and changes nothing) instead of
    waiting; with room it goes through and is recorded."""
    direct_write(disk, 0, bytes(64 * 4096))
    dev = imgrement_dm.wrap(disk, buffer_kb=64, overflow="wait", wait_ms=60000)
    try:
        sh("udevadm", "settle")
        _drain(dev)
        with dev.records() as reader:  # open: bios may wait; not read yet
            fd = os.open(dev.node, os.O_WRONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 4096)
                buf[:] = pattern(3, 4096)
                assert os.pwritev(fd, [buf], 0, os.RWF_NOWAIT) == 4096  # room: goes
                n = 1
                while True:  # fill the buffer: 4 KiB records until one would wait
                    try:
                        os.pwritev(fd, [buf], n * 4096, os.RWF_NOWAIT)
                    except BlockingIOError:
                        break
                    n += 1
                    assert n < 64, "a 64 KiB buffer never filled"
            finally:
                os.close(fd)
            st = dev.status()
            assert st.waited == 0  # it failed, it did not wait
            assert st.used > (64 << 10) - 2 * 4200, "EAGAIN came before the buffer was full"
            items: list[Item] = []
            end = _mark_after_reading(dev, reader, items)
        writes = [i for i in items if isinstance(i, BioRecord) and i.op_name == "write"
                  and i.pid == os.getpid()]
        assert [w.sector for w in writes] == [k * 8 for k in range(n)]
        assert all("nowait" in w.flag_names for w in writes)
        assert not [i for i in items if isinstance(i, Drop)]
        assert any(isinstance(i, MarkRecord) and i.seq == end for i in items)
        assert direct_read(disk, n * 4096, 4096) == bytes(4096)  # the refused one
    finally:
        dev.unwrap()


def _mark_after_reading(dev: imgrement_dm.TracedDevice, reader: RecordReader,
                        items: list[Item]) -> int:
    """Take what the stream holds, then mark its end and read up to the mark."""
    items += reader.read(timeout=1)
    end = _mark(dev, "end")
    deadline = time.monotonic() + 60 * SLOWDOWN
    while not any(isinstance(i, MarkRecord) and i.seq == end for i in items):
        assert time.monotonic() < deadline, "the mark never came"
        items += reader.read(timeout=1)
    return end


def _chunk_tags(cap: Path) -> list[tuple[bytes, int]]:
    """(tag, payload bytes) of every chunk of a capture file, in order."""
    raw = cap.read_bytes()
    version = struct.unpack_from("<I", raw, 8)[0]
    # what record writes now; chunk headers are 20 bytes from version 3 on
    assert version == FORMAT_VERSION and version >= 3, version
    at, tags = 96, []
    while at < len(raw):
        tag = raw[at:at + 4]
        if tag == b"DONE":
            tags.append((tag, 0))
            break
        (n,) = struct.unpack_from("<I", raw, at + 4)
        tags.append((tag, n))
        at += (8 if tag == b"PAD " else 20) + n
    return tags


@pytest.mark.parametrize("command", ["record", "trace"])
def test_large_windows_are_stored_with_o_direct_from_the_buffer(
        command: str, disk: str, disk2: str, tmp_path: Path) -> None:
    """`record`, and `trace -q -o`, into ext4 on a real disk: the output is
    open with O_DIRECT, every large window went in place (after a padding
    chunk, or a pad record in a saved stream, that lines it up with its
    address in the mapped buffer, so the disk reads the records from where
    the target wrote them), and the file holds every byte written, sector
    for sector, the last write too (Ctrl-C stores what the buffer holds:
    before that, the capture held 31,591,200 of the 33,554,432 bytes; with
    it but without the signals held, 32,655,376)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    sh("mkfs.ext4", "-q", "-F", disk2)
    sh("mount", disk2, str(fs))
    # trace does not switch to wait mode itself
    dev = imgrement_dm.wrap(disk, capture="writes", buffer_kb=16384, overflow="wait")
    try:
        sh("udevadm", "settle")
        _drain(dev)
        out = fs / "out"
        if command == "record":
            proc = start_record(dev.name, out)
        else:
            proc = subprocess.Popen([*CLI, "trace", dev.name, "-q", "-o", str(out)],
                                    stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 120 * SLOWDOWN
            # created, closed and opened again with O_DIRECT: open, not just there
            while not holds_open(proc.pid, parts_of(out)):
                assert proc.poll() is None and time.monotonic() < deadline, "trace did not start"
                time.sleep(0.2)
        [part] = parts_of(out)
        try:
            flags = open_flags(proc.pid, part)
            assert flags is not None, f"process {proc.pid} does not hold {part} open"
            assert flags & os.O_DIRECT, f"output opened without O_DIRECT: {flags:o}"
            data = pattern(11, 32 << 20)
            for off in range(0, len(data), 1 << 20):
                direct_write(dev.node, off, data[off:off + (1 << 20)])
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120 * SLOWDOWN)
        assert proc.returncode == 0, err
        if command == "record":
            tags = _chunk_tags(out)
            chunks = [n for tag, n in tags if tag == b"CHNK"]
            large = [i for i, (tag, n) in enumerate(tags)
                     if tag == b"CHNK" and n >= IN_PLACE_MIN]
            assert large, f"no window reached {IN_PLACE_MIN} bytes: {chunks}"
            # each large chunk comes right after its padding: written in place
            assert all(tags[i - 1][0] == b"PAD " for i in large), tags
            with CaptureReader(out) as r:
                records = r.records()
                assert r.info is not None and r.info.drops == 0
        else:
            assert _pad_records(out) >= 1, "no pad record: no window was written in place"
            records = []
            with RecordReader.from_file(out) as reader:
                while not reader.eof:
                    items = reader.read()
                    assert not any(isinstance(i, Drop) for i in items)
                    records += [i for i in items if not isinstance(i, Drop)]
        writes = [x for x in records if isinstance(x, BioRecord) and x.op == 1]
        assert sum(w.size for w in writes) == len(data)
        for w in writes:
            assert w.payload == data[w.sector * 512:w.sector * 512 + w.size], w.sector
    finally:
        dev.unwrap()
        sh("umount", str(fs))


def _pad_records(path: Path) -> int:
    """How many pad records a saved stream holds (walking the record headers)."""
    raw = path.read_bytes()
    at, pads = 16, 0
    while at < len(raw):
        size, rtype = struct.unpack_from("<IH", raw, at)
        pads += rtype == 3
        at += size
    return pads


def test_ctrl_c_at_any_moment_leaves_a_whole_capture_with_every_finished_write(
        disk: str, disk2: str, tmp_path: Path) -> None:
    """`record` stopped by SIGINT at random moments while 1 MiB writes stream
    through the device: every time, the capture reads back whole (no chunk
    cut by the interrupt: seen before the fix, "truncated after 31 intact
    chunk(s)"), with nothing dropped, and holds every write that had
    finished before the signal, with its data."""
    fs = tmp_path / "fs"
    fs.mkdir()
    sh("mkfs.ext4", "-q", "-F", disk2)
    sh("mount", disk2, str(fs))
    rnd = random.Random(5)
    dev = imgrement_dm.wrap(disk, capture="writes", buffer_kb=16384)
    try:
        sh("udevadm", "settle")
        _drain(dev)
        for attempt in range(8):
            # what the last attempt's writes left after its record ended (in
            # drop mode again, so with a gap) is not this capture's
            _drain(dev)
            cap = fs / f"c{attempt}.cap"
            done: list[tuple[int, float]] = []  # (offset, when it finished)
            stop = threading.Event()
            rec = start_record(dev.name, cap)
            t = threading.Thread(target=_write_until, args=(dev.node, attempt, stop, done))
            t.start()
            try:
                time.sleep(rnd.uniform(0.2, 3.0))
                signalled = time.monotonic()
                rec.send_signal(signal.SIGINT)
                _, err = rec.communicate(timeout=120 * SLOWDOWN)
            finally:
                stop.set()
                t.join(timeout=120)
            assert rec.returncode == 0, err
            with CaptureReader(cap) as r:
                records = r.records()  # raises on a cut chunk
                assert r.info is not None and r.info.drops == 0
            image = bytearray(64 << 20)
            for w in records:
                if isinstance(w, BioRecord) and w.op == 1 and w.payload is not None:
                    image[w.sector * 512:w.sector * 512 + len(w.payload)] = w.payload
            finished = {off for off, when in done if when < signalled}
            assert finished, "no write finished before the signal: the test proves nothing"
            for off in finished:
                assert image[off:off + (1 << 20)] == _chunk_data(attempt, off), \
                    f"attempt {attempt}: the write at {off}, finished before the signal"
            cap.unlink()
    finally:
        dev.unwrap()
        sh("umount", str(fs))


def _chunk_data(attempt: int, off: int) -> bytes:
    return pattern(attempt * 1000 + off // (1 << 20), 1 << 20)


def _write_until(node: Path, attempt: int, stop: threading.Event,
                 done: list[tuple[int, float]]) -> None:
    """1 MiB direct writes over the first 64 MiB until ``stop``, noting each finish."""
    off = 0
    while not stop.is_set():
        direct_write(node, off, _chunk_data(attempt, off))
        done.append((off, time.monotonic()))
        off = (off + (1 << 20)) % (64 << 20)
