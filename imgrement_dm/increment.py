"""What captured writes are for: images at a point, changed extents, replay.

A capture holds every write with its data, and every discard and
write-zeroes.  Applied in completion order onto a copy of the disk as it was
when the capture started, they give the disk as it was at any later point:
a mark, the Nth flush, the Nth FUA write, or the end.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from imgrement_dm.errors import ImgrementError
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.layout import FLAGS
from imgrement_dm.records import BioRecord, Drop, Item, MarkRecord

_FUA = next(bit for bit, name in FLAGS.items() if name == "fua")
_PREFLUSH = next(bit for bit, name in FLAGS.items() if name == "preflush")
CHANGING_OPS = {"write", "write-zeroes", "discard", "secure-erase"}
ZERO = bytes(1 << 20)


class IncrementError(ImgrementError):
    """The capture cannot be used as asked."""

    exit_code = 11


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


def select(items: Iterable[Item], stop: StopAt) -> Selection:
    """Changing records up to ``stop``, sorted by completion (then sequence)."""
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
            include = False
        if include:
            changes.append(item)
        if item.op_name == "flush" or item.flags & _PREFLUSH:
            flushes += 1
            if stop.flush is not None and flushes == stop.flush:
                reached = True
                break
        if item.op_name == "write" and item.flags & _FUA:
            fuas += 1
            if stop.fua is not None and fuas == stop.fua:
                reached = True
                break
    changes.sort(key=lambda r: (r.complete_ns, r.seq))
    return Selection(changes, drops, failed, without_data, reached)


def _load(capture: Path, stop: StopAt, *, force: bool) -> tuple[CaptureReader, Selection]:
    """Validate the whole capture, then select what to apply from it."""
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


def _apply_to_fd(fd: int, changes: list[BioRecord], limit: int,
                 progress: Callable[[int, int], None] | None) -> None:
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
            left = r.size
            pos = start
            while left:
                n_bytes = min(left, len(ZERO))
                os.pwrite(fd, ZERO[:n_bytes], pos)
                pos += n_bytes
                left -= n_bytes
        if progress and (n % 256 == 0 or n == len(changes) - 1):
            progress(n + 1, len(changes))


def _size_of(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def apply(base: Path, capture: Path, out: Path, stop: StopAt = StopAt(), *,
          force: bool = False, progress: Callable[[int, int], None] | None = None) -> Selection:
    """Copy ``base`` to ``out`` and apply the capture up to ``stop``.

    The result is written to OUT.part and renamed only when complete, so an
    interrupted apply never leaves a half-made image under the final name.
    """
    reader, sel = _load(capture, stop, force=force)
    part = out.with_name(out.name + ".part")
    try:
        with reader:
            if base.stat().st_size < reader.sectors * 512:
                raise IncrementError(
                    f"{base} is {base.stat().st_size} bytes, smaller than the traced device "
                    f"({reader.sectors * 512} bytes): it is not a copy of that disk"
                )
            shutil.copyfile(base, part)
            fd = os.open(part, os.O_RDWR)
            try:
                _apply_to_fd(fd, sel.changes, _size_of(fd), progress)
                os.fsync(fd)
            finally:
                os.close(fd)
        part.rename(out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return sel


def replay(capture: Path, target: Path, stop: StopAt = StopAt(), *, force: bool = False,
           progress: Callable[[int, int], None] | None = None) -> Selection:
    """Write the capture up to ``stop`` onto ``target`` (a device or image) in place."""
    reader, sel = _load(capture, stop, force=force)
    with reader:
        try:
            fd = os.open(target, os.O_RDWR)
        except OSError as e:
            raise IncrementError(f"cannot open {target}: {e.strerror}") from None
        try:
            _apply_to_fd(fd, sel.changes, _size_of(fd), progress)
            os.fsync(fd)
        finally:
            os.close(fd)
    return sel


def extents(capture: Path, stop: StopAt = StopAt()) -> list[tuple[int, int]]:
    """Changed (start sector, sectors) ranges up to ``stop``, merged and sorted."""
    with CaptureReader(capture) as check:
        check.validate()
    with CaptureReader(capture) as reader:
        sel = select(reader.items(), stop)
        if not sel.reached:
            raise IncrementError(f"{capture} has no {stop.describe()}")
        spans = sorted((r.sector, r.sector + r.sectors) for r in sel.changes if r.sectors)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b - a) for a, b in merged]
