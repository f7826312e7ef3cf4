"""What captured writes are for: images at a point, changed extents, replay.

A capture holds every write with its data, and every discard and
write-zeroes.  Applied in completion order onto a copy of the disk as it was
when the capture started, they give the disk as it was at any later point:
a mark, the Nth flush, the Nth FUA write, or the end.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from imgrement_dm import devices
from imgrement_dm.changes import (
    CHANGING_OPS,
    END,
    FUA_FLAG,
    PREFLUSH_FLAG,
    Change,
    Changes,
    ReorderedError,
    Selection,
    StopAt,
)
from imgrement_dm.errors import IncrementError
from imgrement_dm.formats import files, qcow2
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.output import atomic_path, check_writable
from imgrement_dm.progress import Progress, metered

__all__ = ["CHANGING_OPS", "FUA_FLAG", "PREFLUSH_FLAG", "Extents", "Selection", "StopAt",
           "apply", "apply_qcow2", "extents", "replay"]

ZERO = bytes(1 << 20)
#: Bytes read from the capture at a time where the kernel cannot copy them.
COPY_CHUNK = 1 << 20
#: How often (in changes) progress is reported.
PROGRESS_EVERY = 256

T = TypeVar("T")


def _passes(capture: Path, stop: StopAt, *, force: bool, command: str,
            job: Callable[[CaptureReader, Changes], T]) -> tuple[T, Selection]:
    """Run ``job`` over the capture's changes in one pass, and again, sorted
    whole, in the rare capture whose bios outran the reorder horizon
    (changes.py); returns the job's result and what the pass found.

    The job writes only into a file renamed into place after it returns (or
    starts its target over), so the second pass starts from nothing.
    """
    files.require_capture(capture, command)
    for exact in (False, True):
        with CaptureReader(capture) as reader:
            changes = Changes(reader, stop, force=force, exact=exact)
            try:
                result = job(reader, changes)
            except ReorderedError:
                continue
            return result, changes.selection
    raise AssertionError("the exact pass does not reorder")


FICLONE = 0x40049409
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)


def clone(base: Path, dest: Path) -> None:
    """``dest``: a copy of ``base`` that costs what it must: a reflink where the
    file system shares extents (btrfs, xfs), else a sparse copy (holes stay holes),
    in the kernel (copy_file_range) when both are on one file system."""
    with base.open("rb") as src, dest.open("wb") as out:
        try:
            fcntl.ioctl(out.fileno(), FICLONE, src.fileno())
            return
        except OSError:
            pass
        size = size_of(base)
        device = stat.S_ISBLK(os.fstat(src.fileno()).st_mode)
        in_kernel = True
        at = 0
        while at < size:
            if device:  # no holes to find: all of it is data
                start, end = at, size
            else:
                try:
                    start = os.lseek(src.fileno(), at, os.SEEK_DATA)
                except OSError:
                    break  # no data past here
                end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                n = 0
                if in_kernel:
                    try:
                        n = os.copy_file_range(src.fileno(), out.fileno(), end - start,
                                               start, start)
                    except OSError:  # EXDEV across file systems, EINVAL, ENOSYS, ...
                        in_kernel = False
                if not in_kernel:
                    chunk = os.pread(src.fileno(), min(end - start, 1 << 20), start)
                    n = os.pwrite(out.fileno(), chunk, start) if chunk else 0
                if n <= 0:
                    raise OSError(f"copying {base} stopped at byte {start}")
                start += n
            at = end
        out.truncate(size)


def _zero_range(fd: int, start: int, size: int, device: bool) -> None:
    """Make [start, start + size) read back zeros, keeping holes holes: a hole
    punched in an image file, BLKZEROOUT on a device (which may unmap), zeros
    written where neither is offered."""
    if device:
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", start, size))
            return
        except OSError:
            pass
    elif _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                         ctypes.c_int64(start), ctypes.c_int64(size)) == 0:
        return
    pos, left = start, size
    while left:
        n_bytes = min(left, len(ZERO))
        os.pwrite(fd, ZERO[:n_bytes], pos)
        pos += n_bytes
        left -= n_bytes


def copy_payload(src: int, at: int, dst: int, to: int, size: int, *,
                 in_kernel: bool = True) -> bool:
    """Copy ``size`` bytes at ``at`` in the capture ``src`` to ``to`` in ``dst``:
    in the kernel (copy_file_range) where it can, else through a 1 MiB buffer.
    Returns whether the kernel may be asked again (it refuses, e.g., a block
    device or a copy across file systems on old kernels)."""
    while size:
        n = 0
        if in_kernel:
            try:
                n = os.copy_file_range(src, dst, size, at, to)
            except OSError:  # EXDEV, EINVAL (a device), ENOSYS, ...
                in_kernel = False
        if not in_kernel:
            data = os.pread(src, min(size, COPY_CHUNK), at)
            n = os.pwrite(dst, data, to) if data else 0
        if n <= 0:
            raise IncrementError(f"the capture ended inside a payload (byte {at})")
        at += n
        to += n
        size -= n
    return in_kernel


def apply_to_fd(fd: int, changes: Iterable[Change], source: int, limit: int,
                progress: Callable[[int], None] | None = None) -> int:
    """Apply ``changes`` (their payloads read from the capture ``source``) to
    ``fd``, an image or a device of ``limit`` bytes; returns how many."""
    device = stat.S_ISBLK(os.fstat(fd).st_mode)
    in_kernel = True
    n = 0
    for n, c in enumerate(changes, 1):
        start = c.sector * 512
        if start + c.size > limit:
            raise IncrementError(
                f"record {c.seq} writes past the end of the target ({start + c.size} > {limit} "
                "bytes): is it the right disk?"
            )
        if c.op_name == "write":
            in_kernel = copy_payload(source, c.data_at, fd, start, c.size, in_kernel=in_kernel)
        else:
            # write-zeroes reads back zeros; discard on the disks we trace
            # (QEMU, loop, SSDs with deterministic TRIM) does too.
            _zero_range(fd, start, c.size, device)
        if progress and n % PROGRESS_EVERY == 0:
            progress(n)
    return n


def _size_of(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def size_of(path: Path) -> int:
    """Bytes in ``path``: an image file's size, or a block device's (whose
    st_size is 0)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IncrementError(f"cannot read {path}: {e.strerror}") from None
    try:
        return _size_of(fd)
    finally:
        os.close(fd)


def check_base(base: Path, needed: int) -> None:
    """Refuse a BASE (an image file or a block device) smaller than the traced
    device: it cannot be a copy of that disk."""
    size = size_of(base)
    if size < needed:
        raise too_small(base, size, needed)


def too_small(what: Path, size: int, needed: int) -> IncrementError:
    return IncrementError(
        f"{what} is {size} bytes, smaller than the traced device ({needed} bytes): it is "
        "not a copy of that disk"
    )


def _reporter(reader: CaptureReader,
              progress: Progress | None) -> Callable[[int], None] | None:
    """Progress as bytes of the capture read so far, of its size."""
    if progress is None:
        return None
    total = reader.size
    return lambda _n: progress(reader.position(), total)


def apply(base: Path, capture: Path, out: Path, stop: StopAt = END, *,
          force: bool = False, progress: Progress | None = None) -> Selection:
    """Copy ``base`` to ``out`` and apply the capture up to ``stop``.

    The capture is read once, front to back (changes.py), and checked on the
    way: the result is written to a temporary file beside OUT and renamed
    only when the capture proved whole, so an interrupted or refused apply
    never leaves a half-made image under the final name, a failed one leaves
    OUT as it was, and OUT may not be BASE or the capture.
    """
    inputs = (base, capture)
    check_writable(out, inputs=inputs)
    files.require_capture(capture, "apply")
    with atomic_path(out, inputs=inputs) as part:
        def job(reader: CaptureReader, changes: Changes) -> None:
            check_base(base, reader.sectors * 512)
            clone(base, part)  # holes stay holes, extents shared where they can be
            fd = os.open(part, os.O_RDWR | os.O_CLOEXEC)
            try:
                apply_to_fd(fd, changes, reader.fileno(), _size_of(fd),
                            _reporter(reader, progress))
            finally:
                os.close(fd)
            if progress is not None:
                progress(reader.size, reader.size)

        _, sel = _passes(capture, stop, force=force, command="apply", job=job)
    return sel


def apply_qcow2(base: Path, capture: Path, out: Path, stop: StopAt = END, *,
                backing_name: str | None = None, force: bool = False,
                progress: Progress | None = None) -> tuple[Selection, int, int]:
    """The increment as a qcow2 overlay on ``base``; returns the selection, the
    number of 64 KiB clusters stored and of those marked zero
    (see imgrement_dm.formats.qcow2).

    ``backing_name`` is the backing file the overlay names, by default
    ``base`` as an absolute path; BASE itself is only read, never changed.
    """
    inputs = (base, capture)
    check_writable(out, inputs=inputs)
    name = backing_name or str(base.resolve())
    qcow2.backing_name_bytes(name)  # refused before any work
    files.require_capture(capture, "apply")
    with atomic_path(out, inputs=inputs) as part:
        def job(reader: CaptureReader, changes: Changes) -> tuple[int, int]:
            size = reader.sectors * 512
            check_base(base, size)
            fd = os.open(part, os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC)
            try:
                return qcow2.write(fd, base, size,
                                   metered(_inside(changes, size), reader, progress),
                                   reader.fileno(), name)
            finally:
                os.close(fd)

        (stored, zeroed), sel = _passes(capture, stop, force=force, command="apply", job=job)
    return sel, stored, zeroed


def _inside(changes: Iterable[Change], size: int) -> Iterator[Change]:
    for c in changes:
        if c.sector * 512 + c.size > size:
            raise IncrementError(f"record {c.seq} writes past the end of the traced "
                                 f"device ({c.sector * 512 + c.size} > {size} bytes)")
        yield c


def _open_target(target: Path, needed: int) -> int:
    """``target`` opened for writing: an image file at least ``needed`` bytes long, or a
    block device nobody uses, held exclusively while the replay runs."""
    try:
        st = os.stat(target)
    except OSError as e:
        raise IncrementError(f"cannot replay onto {target}: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        dev = devices.resolve(str(target))
        devices.check_unused(dev, doing="replay")
        fd = devices.open_exclusive(dev, os.O_RDWR)
    elif stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise IncrementError(f"cannot open {target}: {e.strerror}") from None
    else:
        raise IncrementError(f"{target} is neither a disk image file nor a block device")
    size = _size_of(fd)
    if size < needed:
        os.close(fd)
        raise too_small(target, size, needed)
    return fd


def replay(capture: Path, target: Path, stop: StopAt = END, *, force: bool = False,
           progress: Progress | None = None) -> Selection:
    """Write the capture up to ``stop`` onto ``target`` (a device or image) in place.

    A block device is refused, as ``wrap`` refuses one, if it is mounted, held
    (dm, md, LVM), swapped on or wrapped, and is held with O_EXCL meanwhile.
    The one tool that reads the capture twice: a write in place cannot be
    taken back, so the whole capture is checked (and the stop point found)
    before the target is opened.
    """
    files.require_capture(capture, "replay")
    with CaptureReader(capture) as check:
        for _ in Changes(check, stop, force=force, ordered=False):
            pass
        needed = check.sectors * 512
    fd = _open_target(target, needed)
    try:
        def job(reader: CaptureReader, changes: Changes) -> None:
            apply_to_fd(fd, changes, reader.fileno(), _size_of(fd), _reporter(reader, progress))
            if progress is not None:
                progress(reader.size, reader.size)

        _, sel = _passes(capture, stop, force=force, command="replay", job=job)
        os.fsync(fd)
    finally:
        os.close(fd)
    return sel


@dataclass
class Extents:
    """Changed (start sector, sectors) ranges, merged and sorted, and what is missing."""

    spans: list[tuple[int, int]]
    drops: int
    without_data: int
    size: int  # bytes of the traced device (what qemu_map covers)


class ExtentSet:
    """Disjoint, sorted sector ranges; adding one merges it with those it
    touches. Its memory is the map's (two 8-byte numbers an extent), not the
    capture's: a whole disk written once is one extent."""

    def __init__(self) -> None:
        self.starts: array[int] = array("q")
        self.ends: array[int] = array("q")

    def add(self, a: int, b: int) -> None:
        """Add sectors [a, b)."""
        starts, ends = self.starts, self.ends
        if not ends or a > ends[-1]:  # past the end: the common, sequential case
            starts.append(a)
            ends.append(b)
            return
        i = bisect_left(ends, a)  # the first that ends at or after a (touching merges)
        j = bisect_right(starts, b)  # past the last that starts at or before b
        if i < j:
            a, b = min(a, starts[i]), max(b, ends[j - 1])
        starts[i:j] = array("q", [a])
        ends[i:j] = array("q", [b])

    def spans(self) -> list[tuple[int, int]]:
        return [(a, b - a) for a, b in zip(self.starts, self.ends)]


def extents(capture: Path, stop: StopAt = END, *, force: bool = False) -> Extents:
    """Changed ranges up to ``stop``, read in one pass in bounded memory.

    A capture that lost records is refused unless ``force``: the map would
    silently miss blocks, which is what an incremental backup must not do.
    Writes recorded without data (capture mode meta) still count: the map
    needs where, not what.
    """
    files.require_capture(capture, "diff")
    found = ExtentSet()
    with CaptureReader(capture) as reader:
        changes = Changes(reader, stop, force=force, keep_without_data=True, ordered=False,
                          loss="the changed-block map would miss blocks")
        for c in changes:
            if c.size >= 512:
                found.add(c.sector, c.end)
        sel = changes.selection
        size = reader.sectors * 512
    return Extents(found.spans(), sel.drops, sel.without_data, size)


def qemu_map(spans: list[tuple[int, int]], size: int) -> list[dict[str, object]]:
    """The disk as ``qemu-img map --output=json`` shows an overlay holding the
    changes: changed ranges at depth 0, the rest at depth 1 (the backing file).

    Exact to the sector, where the qcow2 overlay itself is mapped in 64 KiB
    clusters; tools that read qemu-img's map read this one.
    """
    out: list[dict[str, object]] = []

    def entry(start: int, length: int, depth: int) -> None:
        if length > 0:
            out.append({"start": start, "length": length, "depth": depth, "present": True,
                        "zero": False, "data": True})

    at = 0
    for a, n in spans:
        entry(at, a * 512 - at, 1)
        entry(a * 512, n * 512, 0)
        at = (a + n) * 512
    entry(at, size - at, 1)
    return out
