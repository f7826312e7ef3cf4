"""Records taken in place: the mapped buffer and IMGREMENT_IOC_NEXT.

The protocol is driven here with raw ioctl() and mmap() calls, so that each
rule of dm_target/imgrement_record.h is checked against the kernel, not
against our own wrapper; the last test reads through RecordReader.read_view
as `imgrement-dm trace -o` does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

import imgrement_dm
from imgrement_dm._kernel_ffi import lib
from imgrement_dm.records import (
    BioRecord,
    Item,
    MarkRecord,
    Record,
    RecordReader,
    decode,
    stream_path,
)
from tests.guest.helpers import aligned, pattern, sh

RING = 64 * 1024  # buffer_kb=64: small, so the windows wrap around


class Writer:
    """4 KiB O_DIRECT writes through one open fd: closing a device written
    to makes udev probe it, which would put its reads among our records."""

    def __init__(self, dev: imgrement_dm.TracedDevice) -> None:
        self.dev = dev
        self.fd = os.open(dev.node, os.O_WRONLY | os.O_DIRECT)

    def __call__(self, seeds: range) -> int:
        """Block ``seed`` gets pattern(seed), then a mark; returns the mark's seq."""
        for s in seeds:
            assert os.pwrite(self.fd, aligned(pattern(s, 4096)), s * 4096) == 4096
        return self.dev.mark(f"after-{seeds.stop}")

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def traced(disk: str) -> Iterator[tuple[imgrement_dm.TracedDevice, Writer]]:
    dev = imgrement_dm.wrap(disk, buffer_kb=RING // 1024)
    sh("udevadm", "settle")
    with dev.records() as reader:  # udev's probe of the new device
        while reader.read(timeout=1):
            pass
    writer = Writer(dev)
    yield dev, writer
    writer.close()
    dev.unwrap()


def next_window(fd: int) -> tuple[int, int, int]:
    """(offset, length, ring size) of the next window."""
    arg = bytearray(24)
    fcntl.ioctl(fd, lib.IMGREMENT_IOC_NEXT, arg, True)
    off, length, size = struct.unpack("<QQQ", arg)
    return off, length, size


def open_stream(flags: int = os.O_RDONLY) -> int:
    return os.open(stream_path("traced"), flags | os.O_NONBLOCK | os.O_CLOEXEC)


def errno_of(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(OSError) as e:
        call(*args, **kwargs)
    assert e.value.errno is not None
    return e.value.errno


def mmap_errno(fd: int, length: int, prot: int, offset: int = 0) -> int:
    """errno of mmap(2) itself (Python's mmap checks sizes before the kernel can)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr == ctypes.c_void_p(-1).value:
        return ctypes.get_errno()
    libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(length))
    return 0


def mapped(fd: int) -> mmap.mmap:
    """The whole buffer, read-only.  Python's mmap keeps a dup() of ``fd``, and
    closing that (at unmap) is a close of the file: it gives the window back."""
    return mmap.mmap(fd, RING, mmap.MAP_SHARED, mmap.PROT_READ)


def take_until(fd: int, seq: int, m: mmap.mmap | None = None) -> list[Record]:
    """Take windows (checking each) until the one that ends with record ``seq``.

    Without a mapping ``m`` it maps and unmaps the buffer itself, which gives
    the last window back; pass one to keep holding it.
    """
    out: list[Record] = []
    view = m if m is not None else mapped(fd)
    try:
        while not out or out[-1].seq != seq:
            assert select.select([fd], [], [], 30)[0] == [fd], f"record {seq} never came"
            off, length, size = next_window(fd)
            assert size == RING and off % 8 == 0 and length > 0 and off + length <= RING
            records, used = decode(view[off:off + length])
            assert used == length  # whole records only
            out += records
    finally:
        if m is None:
            view.close()
    return out


def mine(items: Sequence[Item]) -> list[BioRecord]:
    return [r for r in items if isinstance(r, BioRecord) and r.pid == os.getpid()]


@pytest.mark.smoke
def test_a_window_is_what_read_would_return(
    traced: tuple[imgrement_dm.TracedDevice, Writer],
) -> None:
    dev, writes = traced
    a = open_stream()
    try:
        assert errno_of(next_window, a) == errno.EAGAIN  # nothing committed
        end = writes(range(3))
        records = take_until(a, end)
        assert [(r.op_name, r.sector, r.size, bytes(r.payload)) for r in mine(records)] == [
            ("write", s * 8, 4096, pattern(s, 4096)) for s in range(3)]
        assert isinstance(records[-1], MarkRecord) and records[-1].seq == end
        seqs = [r.seq for r in records]
        assert seqs == list(range(seqs[0], end + 1))
        # given back on the next call: nothing else is there
        assert errno_of(next_window, a) == errno.EAGAIN
        assert dev.status().used == 0
    finally:
        os.close(a)


def test_the_mapping_is_read_only_and_no_larger_than_the_buffer(
    traced: tuple[imgrement_dm.TracedDevice, Writer],
) -> None:
    rw = open_stream(os.O_RDWR)  # root may open it for writing; mapping must still refuse
    try:
        write = mmap.PROT_READ | mmap.PROT_WRITE
        assert mmap_errno(rw, RING, write) == errno.EPERM
        assert mmap_errno(rw, RING + mmap.PAGESIZE, mmap.PROT_READ) == errno.EINVAL
        assert mmap_errno(rw, mmap.PAGESIZE, mmap.PROT_READ, mmap.PAGESIZE) == errno.EINVAL
        assert mmap_errno(rw, RING, mmap.PROT_READ) == 0
        assert os.fstat(rw).st_size == RING  # the size to map
        assert errno_of(fcntl.ioctl, rw, 0x1234, bytearray(24), True) == errno.ENOTTY
        with mmap.mmap(rw, RING, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert len(m) == RING
    finally:
        os.close(rw)


def test_one_reader_holds_the_window_and_closing_gives_it_back(
    traced: tuple[imgrement_dm.TracedDevice, Writer],
) -> None:
    dev, writes = traced
    a, b = open_stream(), open_stream()
    m = mapped(a)
    try:
        end = writes(range(2))
        take_until(a, end, m)  # a now holds the window that ends with the mark
        # the other reader neither reads nor borrows while a holds a window
        assert errno_of(os.read, b, 1 << 20) == errno.EBUSY
        assert errno_of(next_window, b) == errno.EBUSY
        # and poll does not report the lent records as still to be read
        p = select.poll()
        p.register(a, select.POLLIN)
        assert p.poll(0) == []
        # a's next call gives the window back: b finds nothing left, not busy
        assert errno_of(next_window, a) == errno.EAGAIN
        assert errno_of(os.read, b, 1 << 20) == errno.EAGAIN

        # a takes the next window and closes, its mapping still there: those
        # records count as delivered at close(), not at the last munmap()
        end2 = writes(range(2, 4))
        lent = take_until(a, end2, m)
        assert lent[0].seq == end + 1
        os.close(a)
        a = -1
        assert errno_of(os.read, b, 1 << 20) == errno.EAGAIN
        assert dev.status().used == 0
        end3 = writes(range(4, 5))
        select.select([b], [], [], 30)
        after, _ = decode(os.read(b, 1 << 20))
        assert [r.seq for r in after] == [end2 + 1, end3]
        assert bytes(mine(after)[0].payload) == pattern(4, 4096)
    finally:
        m.close()
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)


def test_poll_does_not_promise_what_read_refuses(
    traced: tuple[imgrement_dm.TracedDevice, Writer],
) -> None:
    """While one reader holds a window, another's poll() reports nothing (its
    read would get EBUSY); when the window comes back, that reader is woken."""
    _, writes = traced
    a, b = open_stream(), open_stream()
    m = mapped(a)
    try:
        end = writes(range(2))
        take_until(a, end, m)  # a holds the window
        end2 = writes(range(2, 8))  # a batch for b to want: more than 1/16 of the buffer
        p = select.poll()
        p.register(b, select.POLLIN)
        assert p.poll(300) == [], "poll() reported records that read() refuses with EBUSY"
        assert errno_of(os.read, b, 1 << 20) == errno.EBUSY
        # b waits in poll(); a gives its window back (unmapping closes the
        # mapping's dup of the file); b is woken and reads the new batch
        woke: list[list[tuple[int, int]]] = []
        waiter = threading.Thread(target=lambda: woke.append(p.poll(30_000)))
        waiter.start()
        time.sleep(0.3)
        m.close()
        waiter.join(35)
        assert woke and woke[0] and woke[0][0][1] & select.POLLIN, "b was never woken"
        records, _ = decode(os.read(b, 1 << 20))
        assert [r.seq for r in records] == list(range(end + 1, end2 + 1))
    finally:
        m.close()
        os.close(a)
        os.close(b)


def test_a_window_the_caller_never_learnt_of_is_not_consumed(
    traced: tuple[imgrement_dm.TracedDevice, Writer],
) -> None:
    """IMGREMENT_IOC_NEXT with a bad address fails with EFAULT and lends
    nothing: read() then returns every record, no gap, nothing dropped."""
    dev, writes = traced
    a = open_stream()
    try:
        end = writes(range(3))
        assert select.select([a], [], [], 30)[0] == [a]
        # an address no process has mapped: the copy of the window's offsets fails
        assert errno_of(fcntl.ioctl, a, lib.IMGREMENT_IOC_NEXT, 8) == errno.EFAULT
        got: list[Record] = []
        while not got or got[-1].seq != end:
            assert select.select([a], [], [], 30)[0] == [a], "records were lost"
            got += decode(os.read(a, 1 << 20))[0]
        seqs = [r.seq for r in got]
        assert seqs == list(range(seqs[0], end + 1))
        assert [(r.sector, bytes(r.payload)) for r in mine(got)] == [
            (s * 8, pattern(s, 4096)) for s in range(3)]
        assert dev.status().dropped == 0
        # and the stream carries on as usual for windows
        end2 = writes(range(3, 4))
        assert take_until(a, end2)[-1].seq == end2
    finally:
        os.close(a)


def test_a_read_of_zero_bytes_returns_at_once(
    traced: tuple[imgrement_dm.TracedDevice, Writer],
) -> None:
    a = os.open(stream_path("traced"), os.O_RDONLY | os.O_CLOEXEC)  # blocking
    try:
        done: list[bytes] = []
        th = threading.Thread(target=lambda: done.append(os.read(a, 0)))
        th.start()
        th.join(10)
        assert not th.is_alive(), "read(fd, buf, 0) waited for a record"
        assert done == [b""]
    finally:
        if th.is_alive():  # release it before closing: a record ends the read
            traced[1](range(1))
            th.join(30)
        os.close(a)


def test_windows_wrap_around_and_end_with_the_stream(disk: str) -> None:
    dev: imgrement_dm.TracedDevice | None = imgrement_dm.wrap(disk, buffer_kb=RING // 1024)
    assert dev is not None
    writes = Writer(dev)
    try:
        sh("udevadm", "settle")
        reader = RecordReader.live("traced", first_seq=0)
        chunks: list[bytes] = []
        ends = []
        for batch in range(8):  # 8 x 10 records of 4200 bytes: the 64 KiB wraps 5 times
            seeds = range(batch * 10, batch * 10 + 10)
            ends.append(writes(seeds))
            while True:
                view = reader.read_view(timeout=30)
                assert view, "the mark never came"
                assert len(view) <= RING
                chunks.append(bytes(view))
                last, used = decode(chunks[-1])
                assert used == len(view)
                if isinstance(last[-1], MarkRecord) and last[-1].seq == ends[-1]:
                    break
            # A lent window keeps its space until the next call: give it back
            # (and take anything behind the mark) before the next batch.
            while view := reader.read_view(timeout=0):
                chunks.append(bytes(view))
            assert dev.status().dropped == 0
        assert reader._mapped is not None, "read_view fell back to copying"
        writes.close()
        dev.unwrap()
        dev = None
        while view := reader.read_view(timeout=30):  # the device's last probe, if any
            chunks.append(bytes(view))
        assert reader.eof
        reader.close()
    finally:
        if dev is not None:
            writes.close()
            dev.unwrap()
    items: list[Record] = []
    for c in chunks:
        items += decode(c)[0]
    seqs = [i.seq for i in items]
    assert seqs == list(range(len(seqs))), "every record once, in order, no drop"
    assert sum(len(c) for c in chunks) > 5 * RING
    got = mine(items)
    assert [(r.sector, bytes(r.payload)) for r in got] == [
        (s * 8, pattern(s, 4096)) for s in range(80)]


def test_poll_reports_a_lone_record_that_came_while_nobody_waited(
    traced: tuple[imgrement_dm.TracedDevice, Writer],
) -> None:
    dev, writes = traced
    dev.set_capture("meta")  # a 4 KiB write's data alone would be a batch (1/16 of 64 KiB)
    a = open_stream()
    try:
        # One record, no mark, far below the batch size, committed while
        # nobody polls: no wake-up was due.  poll() itself must arm the
        # deferred one, or it would sleep until more records came.
        assert os.pwrite(writes.fd, aligned(pattern(7, 4096)), 7 * 4096) == 4096
        p = select.poll()
        p.register(a, select.POLLIN)
        ready = p.poll(30_000)
        assert ready and ready[0][1] & select.POLLIN, "poll() never reported the record"
        records, _ = decode(os.read(a, 1 << 20))
        assert [(r.op_name, r.sector, r.size) for r in mine(records)] == [("write", 56, 4096)]
    finally:
        os.close(a)
