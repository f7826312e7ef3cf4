"""Races hammered, not met once by luck: each test here runs a contended path
for a while, and the debug kernel (KASAN, lockdep) runs them in every CI run.

STRESS_SECONDS sets how long the long ones run (default 60).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm._kernel_ffi import ffi, lib
from imgrement_dm.records import RecordReader, decode
from tests.guest.helpers import sh

SECONDS = int(os.environ.get("STRESS_SECONDS", "60"))

# Every 8 bytes of the written data read as a record header {size 0, type
# PAD, version 1}: a reader that took such bytes for a header would loop
# forever in the kernel on a PAD that never advances.
PAD_LOOKALIKE = "0x0000000003000100"

# A reader of the records file: blocking read(), or poll() then O_NONBLOCK
# read(); each batch's sequence numbers go to OUT, one per line, as it goes.
READER = r"""
import os, select, sys
from imgrement_dm.records import Drop, decode
path, mode, out = sys.argv[1:4]
flags = os.O_RDONLY | (os.O_NONBLOCK if mode == "poll" else 0)
fd = os.open(path, flags)
with open(out, "w") as f:
    print("ready", flush=True)
    while True:
        if mode == "poll":
            p = select.poll()
            p.register(fd, select.POLLIN)
            p.poll(1000)
            try:
                data = os.read(fd, 1 << 20)
            except (BlockingIOError, OSError):
                continue
        else:
            try:
                data = os.read(fd, 1 << 20)
            except OSError:
                continue
        if not data:
            break
        records, used = decode(data)
        assert used == len(data)
        f.write("".join(f"{r.seq}\n" for r in records if not isinstance(r, Drop)))
        f.flush()
"""


def _reader(path: Path, mode: str, out: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", READER, str(path), mode, str(out)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _seqs(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


@pytest.mark.stress
def test_two_consumers_while_the_buffer_wraps_over_pad_lookalikes(
    disk: str, tmp_path: Path,
) -> None:
    """One blocking reader and one poll + O_NONBLOCK reader share a 64 KiB
    stream that wraps over and over under fio, whose data reads as PAD
    headers.  Readiness must never read a record that another reader took
    and a writer overwrote: no lockup, both readers die at once when killed,
    and every record went to exactly one of them or was counted dropped."""
    dev = imgrement_dm.wrap(disk, buffer_kb=64)
    readers: list[subprocess.Popen[str]] = []
    try:
        sh("udevadm", "settle")
        with RecordReader.live(dev.name) as r:  # udev's probe of the new device
            while r.read(timeout=1):
                pass
        before = dev.status().dropped
        path = Path("/sys/kernel/debug/imgrement") / dev.name / "records"
        outs = [tmp_path / "blocking.seq", tmp_path / "poll.seq"]
        readers = [_reader(path, "block", outs[0]), _reader(path, "poll", outs[1])]
        # Writes of 4 to 32 KiB: a few fill the 64 KiB buffer, so the space a
        # reader has just taken is soon written over, and records of mixed
        # sizes start at new offsets each time round (with one size, every
        # lap puts a header exactly where the last lap had one, and a stale
        # walk would always find a header)
        fio = subprocess.run(
            ["fio", "--name=pads", f"--filename={dev.node}", "--rw=randwrite",
             "--bsrange=4k-32k",
             "--direct=1", "--ioengine=libaio", "--iodepth=4", "--size=64M",
             "--time_based", f"--runtime={SECONDS}", f"--buffer_pattern={PAD_LOOKALIKE}"],
            capture_output=True, text=True, timeout=SECONDS + 120, check=False)
        assert fio.returncode == 0, fio.stderr
        end = dev.mark("end")
        deadline = time.monotonic() + 60
        while end not in _seqs(outs[0]) + _seqs(outs[1]):
            assert time.monotonic() < deadline, "the readers stopped taking records"
            time.sleep(0.2)
        time.sleep(1)  # let the other reader write down its last batch
        # both killable at once: neither is stuck in the kernel
        for p in readers:
            p.send_signal(signal.SIGKILL)
        for p in readers:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                raise AssertionError("a reader did not die: stuck in the kernel") from None
        a, b = _seqs(outs[0]), _seqs(outs[1])
        assert a and b, "both readers took records"
        union = set(a) | set(b)
        assert len(union) == len(a) + len(b), "a record went to both readers"
        first = min(union)
        dropped = dev.status().dropped - before
        taken = len([s for s in union if s <= end])
        assert taken + dropped == end - first + 1, "records lost without being counted"
    finally:
        for p in readers:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=20)
        dev.unwrap()


def _message_race_once(dev: imgrement_dm.TracedDevice) -> list[str]:
    """Two options set by message at once while the table is read; the lines read."""
    go = threading.Barrier(3)
    lines: list[str] = []

    def capture() -> None:
        go.wait()
        dev.set_capture("meta")

    def log() -> None:
        go.wait()
        dev.set_log(False)

    def table() -> None:
        go.wait()
        for _ in range(5):
            lines.append(sh("dmsetup", "table", dev.name).split(None, 3)[3])

    threads = [threading.Thread(target=f) for f in (capture, log, table)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return lines


@pytest.mark.stress
def test_concurrent_messages_keep_the_table_line_whole(disk: str) -> None:
    """Two threads set different options by message at once, while a third
    reads the table line: every option set stays set, and the line's count
    always matches the options it lists."""
    for _ in range(10):
        dev = imgrement_dm.wrap(disk)
        try:
            for line in _message_race_once(dev):
                words = line.split()
                if len(words) > 2:
                    assert int(words[2]) == len(words) - 3, line
            final = sh("dmsetup", "table", dev.name).split(None, 3)[3].split()
            assert final[2:] == ["2", "capture:meta", "log:off"]
        finally:
            dev.unwrap()


# Opens the stream, reads for a moment, closes it, again and again: the count
# of readers goes to zero and back, which decides whether bios may wait.
FLICKERING_READER = r"""
import os, sys, time
path = sys.argv[1]
print("ready", flush=True)
while True:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        try:
            if not os.read(fd, 1 << 20):
                sys.exit(0)
        except BlockingIOError:
            time.sleep(0.01)
    os.close(fd)
    time.sleep(0.2)
"""


@pytest.mark.stress
def test_wait_mode_while_everything_changes(disk: str) -> None:
    """The lossless mode's paths at once: for half of STRESS_SECONDS, fio fills
    a 64 KiB buffer in wait mode while a reader comes and goes (bios wait, then must move on when it
    leaves), the policy flips between wait and drop by message, and the table
    is suspended and resumed.  The disk never hangs (fio finishes with every
    write done), nothing is left waiting, and the device goes away cleanly."""
    dev = imgrement_dm.wrap(disk, buffer_kb=64, overflow="wait", wait_ms=200)
    reader = None
    stop = threading.Event()
    try:
        sh("udevadm", "settle")
        path = Path("/sys/kernel/debug/imgrement") / dev.name / "records"
        reader = subprocess.Popen([sys.executable, "-c", FLICKERING_READER, str(path)],
                                  stdout=subprocess.PIPE, text=True)
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"

        def churn() -> None:
            i = 0
            while not stop.is_set():
                dev.set_overflow("drop" if i % 3 == 2 else "wait")
                if i % 4 == 3:
                    sh("dmsetup", "suspend", dev.name)
                    sh("dmsetup", "resume", dev.name)
                i += 1
                time.sleep(0.3)

        t = threading.Thread(target=churn)
        t.start()
        try:
            fio = subprocess.run(
                ["fio", "--name=churn", f"--filename={dev.node}", "--rw=randwrite",
                 "--bsrange=4k-64k", "--direct=1", "--ioengine=libaio", "--iodepth=16",
                 "--size=64M", "--time_based", f"--runtime={SECONDS // 2}",
                 "--output-format=json"],
                capture_output=True, text=True, timeout=SECONDS * 3 + 300, check=False)
        finally:
            stop.set()
            t.join(timeout=120)
        assert fio.returncode == 0, fio.stderr
        job = json.loads(fio.stdout[fio.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["total_ios"] > 0
        dev.set_overflow("wait")
        st = dev.status()
        assert st.waiting == 0, "bios left waiting after the load ended"
        assert st.waited > 0, "nothing ever waited: the test proves nothing"
    finally:
        stop.set()
        if reader is not None:
            reader.kill()
            reader.wait(timeout=30)
        dev.unwrap()


@pytest.mark.stress
def test_two_threads_on_one_fd_get_every_window_exactly_once(disk: str) -> None:
    """Two threads take windows (IMGREMENT_IOC_NEXT) from one open records
    file while fio keeps records coming; one of them passes a bad address
    every third call.  The lend used to be dropped with the lock before the
    window reached user space, so the other thread could take the next
    window in between and the failed call then took back that one: a window
    lost, the next delivered twice.  Every sequence number must come exactly
    once.  (A 64 MiB buffer that this run never fills: no window's bytes are
    reused while a thread still parses them.)"""
    libc = ctypes.CDLL(None, use_errno=True)  # ctypes lets go of the GIL in ioctl
    seconds = max(SECONDS // 4, 5)
    dev = imgrement_dm.wrap(disk, buffer_kb=64 << 10, capture="meta")
    fd = -1
    ring = None
    try:
        sh("udevadm", "settle")
        fd = os.open(Path("/sys/kernel/debug/imgrement") / dev.name / "records", os.O_RDONLY)
        size = os.fstat(fd).st_size
        ring = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        seqs: list[int] = []
        faults = [0]
        failed: list[BaseException] = []
        stop = threading.Event()

        def take(bad_every: int) -> None:
            try:
                take_windows(bad_every)
            except BaseException as e:  # the test thread reports it
                failed.append(e)
                stop.set()

        def take_windows(bad_every: int) -> None:
            win = ffi.new("struct imgrement_window *")
            good = int(ffi.cast("uintptr_t", win))
            n = 0
            while not stop.is_set():
                n += 1
                bad = bad_every and n % bad_every == 0
                r = libc.ioctl(fd, lib.IMGREMENT_IOC_NEXT, ctypes.c_void_p(8 if bad else good))
                if r < 0:
                    err = ctypes.get_errno()
                    assert err in (errno.EAGAIN, errno.EFAULT, errno.EBUSY), os.strerror(err)
                    faults[0] += err == errno.EFAULT
                    continue
                assert not bad, "a bad address was accepted"
                assert ring is not None
                recs, used = decode(bytes(ring[win.offset:win.offset + win.length]))
                assert used == win.length
                seqs.extend(r.seq for r in recs)

        threads = [threading.Thread(target=take, args=(k,)) for k in (3, 0)]
        for t in threads:
            t.start()
        try:
            fio = subprocess.run(
                ["fio", "--name=windows", f"--filename={dev.node}", "--rw=randwrite",
                 "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=4",
                 "--size=64M", "--time_based", f"--runtime={seconds}",
                 "--output-format=json"],
                capture_output=True, text=True, timeout=seconds * 4 + 300, check=False)
            assert fio.returncode == 0, fio.stderr
            end = dev.mark("end")
            deadline = time.monotonic() + 60
            while end not in seqs and not failed:
                assert time.monotonic() < deadline, "the end mark never came"
                time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        st = dev.status()
        assert st.dropped == 0
        assert faults[0] > 0, "no call failed: the test proves nothing"
        assert not failed, failed[0]
        dupes = sorted(s for s, n in Counter(seqs).items() if n > 1)
        assert not dupes, f"delivered twice: {dupes[:20]}"
        # (records after the end mark, udev's among them, are not counted)
        upto = sorted(s for s in seqs if s <= end)
        assert upto == list(range(upto[0], end + 1)), "a window was lost"
    finally:
        if ring is not None:
            ring.close()
        if fd >= 0:
            os.close(fd)
        dev.unwrap()
