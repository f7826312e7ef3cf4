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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from imgrement_dm import devices
from imgrement_dm.errors import IncrementError
from imgrement_dm.formats import files, qcow2
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.layout import FLAGS
from imgrement_dm.output import atomic_output, atomic_path, check_writable
from imgrement_dm.records import BioRecord, Drop, Item, MarkRecord

FUA_FLAG = next(bit for bit, name in FLAGS.items() if name == "fua")
PREFLUSH_FLAG = next(bit for bit, name in FLAGS.items() if name == "preflush")
CHANGING_OPS = {"write", "write-zeroes", "discard", "secure-erase"}
ZERO = bytes(1 << 20)


@dataclass(frozen=True)
class StopAt:
    """Where to stop: at a mark, after the Nth flush or FUA write, or at the end."""

    mark: str | None = None
    flush: int | None = None
    fua: int | None = None

    def describe(self) -> str:
        if self.mark is not None:
            return f"mark {self.mark!r}"
        if self.flush is not None:
            return f"flush {self.flush}"
        if self.fua is not None:
            return f"FUA write {self.fua}"
        return "the end of the capture"


@dataclass
class Selection:
    """The records to apply (in completion order) and what was found on the way."""

    changes: list[BioRecord]
    drops: int
    failed: int
    without_data: int
    reached: bool


def select(items: Iterable[Item], stop: StopAt, *,
           keep_without_data: bool = False) -> Selection:
    """Changing records up to ``stop``, sorted by completion (then sequence).

    Writes without their data are counted and left out, unless
    ``keep_without_data`` (for a map of where, not what).
    """
    changes: list[BioRecord] = []
    drops = failed = without_data = flushes = fuas = 0
    reached = stop == StopAt()
    for item in items:
        if isinstance(item, Drop):
            drops += item.count
            continue
        if isinstance(item, MarkRecord):
            if stop.mark is not None and item.label == stop.mark:
                reached = True
                break
            continue
        include = item.op_name in CHANGING_OPS
        if include and item.status != 0:
            failed += 1  # the device refused it; it changed nothing we can know
            include = False
        if include and item.op_name == "write" and not item.has_payload:
            without_data += 1
            include = keep_without_data
        if include:
            changes.append(item)
        if item.op_name == "flush" or item.flags & PREFLUSH_FLAG:
            flushes += 1
            if stop.flush is not None and flushes == stop.flush:
                reached = True
                break
        if item.op_name == "write" and item.flags & FUA_FLAG:
            fuas += 1
            if stop.fua is not None and fuas == stop.fua:
                reached = True
                break
    changes.sort(key=lambda r: (r.complete_ns, r.seq))
    return Selection(changes, drops, failed, without_data, reached)


def _load(capture: Path, stop: StopAt, *, force: bool,
          command: str) -> tuple[CaptureReader, Selection]:
    """Validate the whole capture, then select what to apply from it."""
    files.require_capture(capture, command)
    with CaptureReader(capture) as check:
        check.validate()
    reader = CaptureReader(capture)
    try:
        sel = select(reader.items(), stop)
    except BaseException:
        reader.close()
        raise
    if not sel.reached:
        reader.close()
        raise IncrementError(f"{capture} has no {stop.describe()}")
    if sel.drops and not force:
        reader.close()
        raise IncrementError(
            f"{capture} lost {sel.drops} record(s) (the buffer overflowed while recording): "
            "the result would be wrong. Record again with a larger --buffer-kb, or pass "
            "--force to apply what is there"
        )
    if sel.without_data and not force:
        reader.close()
        raise IncrementError(
            f"{capture} has {sel.without_data} write(s) without their data (recorded in "
            "capture mode meta): record with capture writes or all"
        )
    return reader, sel


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


def apply_to_fd(fd: int, changes: list[BioRecord], limit: int,
                 progress: Callable[[int, int], None] | None) -> None:
    device = stat.S_ISBLK(os.fstat(fd).st_mode)
    for n, r in enumerate(changes):
        start = r.sector * 512
        if start + r.size > limit:
            raise IncrementError(
                f"record {r.seq} writes past the end of the target ({start + r.size} > {limit} "
                "bytes): is it the right disk?"
            )
        if r.op_name == "write":
            view = r.payload
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], start + done)
        else:
            # write-zeroes reads back zeros; discard on the disks we trace
            # (QEMU, loop, SSDs with deterministic TRIM) does too.
            _zero_range(fd, start, r.size, device)
        if progress and (n % 256 == 0 or n == len(changes) - 1):
            progress(n + 1, len(changes))


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


def apply(base: Path, capture: Path, out: Path, stop: StopAt = StopAt(), *,
          force: bool = False, progress: Callable[[int, int], None] | None = None) -> Selection:
    """Copy ``base`` to ``out`` and apply the capture up to ``stop``.

    The result is written to a temporary file beside OUT and renamed only
    when complete (output.py), so an interrupted apply never leaves a
    half-made image under the final name, a failed one leaves OUT as it was,
    and OUT may not be BASE or the capture.
    """
    inputs = (base, capture)
    check_writable(out, inputs=inputs)
    reader, sel = _load(capture, stop, force=force, command="apply")
    with reader:
        check_base(base, reader.sectors * 512)
        with atomic_path(out, inputs=inputs) as part:
            clone(base, part)  # holes stay holes, extents shared where they can be
            fd = os.open(part, os.O_RDWR | os.O_CLOEXEC)
            try:
                apply_to_fd(fd, sel.changes, _size_of(fd), progress)
            finally:
                os.close(fd)
    return sel


def apply_qcow2(base: Path, capture: Path, out: Path, stop: StopAt = StopAt(), *,
                backing_name: str | None = None,
                force: bool = False) -> tuple[Selection, int, int]:
    """The increment as a qcow2 overlay on ``base``; returns the selection, the
    number of 64 KiB clusters stored and of those marked zero
    (see imgrement_dm.formats.qcow2).

    ``backing_name`` is the backing file the overlay names, by default
    ``base`` as an absolute path; BASE itself is only read, never changed.
    """
    inputs = (base, capture)
    check_writable(out, inputs=inputs)
    reader, sel = _load(capture, stop, force=force, command="apply")
    with reader:
        size = reader.sectors * 512
        check_base(base, size)
        for r in sel.changes:
            if r.sector * 512 + r.size > size:
                raise IncrementError(f"record {r.seq} writes past the end of the traced "
                                     f"device ({r.sector * 512 + r.size} > {size} bytes)")
        name = backing_name or str(base.resolve())
        qcow2.backing_name_bytes(name)  # refused before any work
        with atomic_output(out, inputs=inputs) as f:
            stored, zeroed = qcow2.write(f, base, size, sel.changes, name)
    return sel, stored, zeroed


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


def replay(capture: Path, target: Path, stop: StopAt = StopAt(), *, force: bool = False,
           progress: Callable[[int, int], None] | None = None) -> Selection:
    """Write the capture up to ``stop`` onto ``target`` (a device or image) in place.

    A block device is refused, as ``wrap`` refuses one, if it is mounted, held
    (dm, md, LVM), swapped on or wrapped, and is held with O_EXCL meanwhile.
    """
    reader, sel = _load(capture, stop, force=force, command="replay")
    with reader:
        fd = _open_target(target, reader.sectors * 512)
        try:
            apply_to_fd(fd, sel.changes, _size_of(fd), progress)
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


def extents(capture: Path, stop: StopAt = StopAt(), *, force: bool = False) -> Extents:
    """Changed ranges up to ``stop``.

    A capture that lost records is refused unless ``force``: the map would
    silently miss blocks, which is what an incremental backup must not do.
    Writes recorded without data (capture mode meta) still count: the map
    needs where, not what.
    """
    files.require_capture(capture, "diff")
    with CaptureReader(capture) as check:
        check.validate()
    with CaptureReader(capture) as reader:
        sel = select(reader.items(), stop, keep_without_data=True)
        size = reader.sectors * 512
        if not sel.reached:
            raise IncrementError(f"{capture} has no {stop.describe()}")
    if sel.drops and not force:
        raise IncrementError(
            f"{capture} lost {sel.drops} record(s) (the buffer overflowed while recording): "
            "the changed-block map would miss blocks. Record again with a larger "
            "--buffer-kb, or pass --force for the extents it has"
        )
    spans = sorted((r.sector, r.sector + r.sectors) for r in sel.changes if r.sectors)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return Extents([(a, b - a) for a, b in merged], sel.drops, sel.without_data, size)


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
