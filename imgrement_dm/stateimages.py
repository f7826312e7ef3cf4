"""Crash-state images made by difference, in a few reusable files.

crashcheck checks thousands of states of one disk.  A copy of BASE per state
costs BASE's data each time on a file system without reflinks (ext4, tmpfs):
64 MiB of writes a state for a 64 MiB image whose capture changed a few
blocks.  Instead:

- one image of the durable writes (``durable.img``) moves forward with the
  boundaries (their durable writes are a prefix of the completion order,
  longer at each);
- a state's image is one of at most ``jobs`` *slots*: files that hold the
  durable image as of some prefix plus some tail.  Between two states a slot
  is brought up to date by copying from the durable image only the ranges
  that differ (the old tail's, and the durable writes since), then taking
  the new tail; so a state costs what changed, not BASE;
- a check may change its image (``e2fsck -y``, a mount replaying a journal).
  Before a check runs, the slot's mtime is set to a stamp no write can leave
  (1970); a slot whose mtime, inode or size is no longer the stamped one was
  written by its check, and is compared with the durable image block by block
  (holes of both skipped) and only the differing blocks written.  A check that
  writes and then sets the mtime back to the stamp would defeat this: none
  does by accident.

A failing state's image that is kept leaves the slots (it is the user's);
a new slot is a copy of the durable image.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imgrement_dm import increment
from imgrement_dm.changes import Change
from imgrement_dm.errors import CrashCheckError

#: The mtime a slot gets before its check: no write leaves a 1970 mtime.
STAMP_NS = 1_000_000_000
#: Compared a chunk at a time; a chunk that differs is written by 4 KiB blocks.
CHUNK = 1 << 20
BLOCK = 4096


def data_extents(fd: int, size: int, at: int = 0) -> Iterator[tuple[int, int]]:
    """The [start, end) byte ranges of ``fd`` between ``at`` and ``size`` that
    hold data (SEEK_DATA / SEEK_HOLE; all of it where the file system cannot
    say)."""
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past here
                return
            yield at, size  # EINVAL: no hole finding here; all of it is data
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        at = end


def _union(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted([*a, *b]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _is_zero(buf: bytes) -> bool:
    return not buf.strip(b"\0")


def sync(src: int, dst: int, size: int) -> int:
    """Make ``dst``'s first ``size`` bytes ``src``'s, writing only the 4 KiB
    blocks that differ (a differing block of zeros is punched); returns the
    bytes written.  Ranges where both are holes are not read."""
    written = 0
    spans = _union(list(data_extents(src, size)), list(data_extents(dst, size)))
    for start, end in spans:
        at = start
        while at < end:
            n = min(CHUNK, end - at)
            want, have = os.pread(src, n, at), os.pread(dst, n, at)
            if len(want) < n:
                want += bytes(n - len(want))
            if want != have:
                written += _write_differing(dst, want, have, at)
            at += n
    if os.fstat(dst).st_size != size:
        os.ftruncate(dst, size)
    return written


def _write_differing(dst: int, want: bytes, have: bytes, at: int) -> int:
    written = 0
    i, n = 0, len(want)
    while i < n:
        if want[i:i + BLOCK] == have[i:i + BLOCK]:
            i += BLOCK
            continue
        j = i + BLOCK  # a run of differing blocks, written at once
        while j < n and want[j:j + BLOCK] != have[j:j + BLOCK]:
            j += BLOCK
        j = min(j, n)
        run = want[i:j]
        if _is_zero(run):
            increment._zero_range(dst, at + i, j - i, device=False)
        else:
            os.pwrite(dst, run, at + i)
            written += j - i
        i = j
    return written


def copy_ranges(src: int, dst: int, spans: Sequence[tuple[int, int]]) -> int:
    """Copy the byte ranges ``spans`` of ``src`` to ``dst``, holes as holes;
    returns the bytes of data copied."""
    written = 0
    for a, b in spans:
        at = a
        for s, e in data_extents(src, b, a):
            if e <= at:
                continue
            s = max(s, at)
            if s > at:
                increment._zero_range(dst, at, s - at, device=False)
            increment.copy_payload(src, s, dst, s, e - s)
            written += e - s
            at = e
        if at < b:
            increment._zero_range(dst, at, b - at, device=False)
    return written


def _spans(writes: Sequence[Change]) -> list[tuple[int, int]]:
    """The byte ranges ``writes`` touch, merged."""
    ranges = increment.ExtentSet()
    for w in writes:
        if w.size:
            ranges.add(w.sector, w.sector + (w.size + 511) // 512)
    return [(a * 512, (a + n) * 512) for a, n in ranges.spans()]


@dataclass
class _Slot:
    path: Path
    fd: int = -1  # open on its file while it is a slot (a rename keeps it valid)
    at: int = -1  # the durable prefix it holds; -1: unknown, compare it whole
    tail: list[Change] = field(default_factory=list)  # applied over that prefix
    ino: tuple[int, int] = (0, 0)

    def open(self) -> int:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StateImages:
    """Images of crash states of one capture, made by difference (module doc).

    ``make`` (one thread) brings a free slot to a state and renames it to
    ``dest``; ``give_back`` (any thread, once the check is done) returns it.
    ``written`` counts the bytes written to the work folder, the first copy
    of BASE (the durable image) and each new slot's copy included."""

    def __init__(self, base: Path, size: int, workdir: Path, capture: Path) -> None:
        self.base, self.size, self.workdir = base, size, workdir
        increment.check_base(base, size)
        try:
            self.source = os.open(capture, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CrashCheckError(f"cannot read {capture}: {e.strerror}") from None
        self.path = workdir / "durable.img"
        self.fd = -1
        try:
            increment.clone(base, self.path)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(self.source)
            self.path.unlink(missing_ok=True)
            raise
        self.at = 0
        self.written = self._allocated(self.fd)
        self.free: list[_Slot] = []
        self.lent: dict[Path, _Slot] = {}
        self.made = 0
        self.lock = threading.Lock()

    @staticmethod
    def _allocated(fd: int) -> int:
        return os.fstat(fd).st_blocks * 512

    def _apply(self, fd: int, writes: Sequence[Change]) -> int:
        if not writes:
            return 0
        increment.apply_to_fd(fd, writes, self.source, self.size)
        return sum(w.size for w in writes if w.op_name == "write")

    def make(self, writes: Sequence[Change], prefix: int, tail: Sequence[Change],
             dest: Path) -> None:
        """``dest``: BASE with ``writes[:prefix]`` and then ``tail`` applied
        (``writes``: every completed write, in completion order)."""
        with self.lock:
            slot = self.free.pop() if self.free else None
        if slot is None:
            self.made += 1
            slot = _Slot(self.workdir / f"slot-{self.made}.img")
        if prefix < self.at:  # behind the durable image (out of order): from BASE
            slot.close()
            increment.clone(self.base, slot.path)
            fd = slot.open()
            self.written += self._allocated(fd) + self._apply(fd, [*writes[:prefix], *tail])
        else:
            self.written += self._apply(self.fd, writes[self.at:prefix])
            self.at = prefix
            self._refresh(slot, writes, prefix)
            self.written += self._apply(slot.fd, tail)
        slot.at, slot.tail = prefix, list(tail)
        os.utime(slot.fd, ns=(STAMP_NS, STAMP_NS))
        st = os.fstat(slot.fd)
        slot.ino = (st.st_dev, st.st_ino)
        os.rename(slot.path, dest)
        with self.lock:
            self.lent[dest] = slot

    def _refresh(self, slot: _Slot, writes: Sequence[Change], prefix: int) -> None:
        """Make the slot's file the durable image (now at ``prefix``)."""
        if slot.fd < 0 and not slot.path.exists():
            increment.clone(self.path, slot.path)
            self.written += self._allocated(slot.open())
            return
        fd = slot.open()
        if slot.at < 0:
            self.written += sync(self.fd, fd, self.size)
        else:
            spans = _spans([*slot.tail, *writes[slot.at:prefix]])
            self.written += copy_ranges(self.fd, fd, spans)

    def give_back(self, dest: Path, *, keep: bool = False) -> None:
        """The check on ``dest`` is over: its file becomes a free slot again,
        unless ``keep`` (a failing state's image kept for the user) or it is
        gone (the check removed it)."""
        with self.lock:
            slot = self.lent.pop(dest)
        if keep:
            slot.close()
            return
        try:
            st = os.stat(dest)
        except FileNotFoundError:
            slot.close()
            return
        if (st.st_dev, st.st_ino) != slot.ino:
            slot.close()  # replaced: the open one is the old file's
            slot.at = -1
        elif st.st_mtime_ns != STAMP_NS or st.st_size != self.size:
            slot.at = -1  # the check wrote to it: compare it whole
        os.rename(dest, slot.path)
        with self.lock:
            self.free.append(slot)

    def close(self) -> None:
        """Remove the durable image and the free slots (lent ones stay with
        their checks' callers)."""
        os.close(self.fd)
        os.close(self.source)
        self.path.unlink(missing_ok=True)
        with self.lock:
            for slot in self.free:
                slot.close()
                slot.path.unlink(missing_ok=True)
            self.free.clear()
