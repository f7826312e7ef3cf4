"""An increment as a qcow2 overlay: only the clusters the capture changed.

``apply --format qcow2 --backing BASE`` writes a qcow2 (version 3) image
whose backing file is BASE (raw): QEMU, qemu-img and libvirt read every
cluster the capture did not touch from BASE, and the changed ones from the
overlay, so the file costs about the changed data, not the disk.

The file is written here directly, in the layout the qcow2 specification
(docs/interop/qcow2.txt in QEMU) allows, in one pass over the changes and in
memory that does not grow with them:

    cluster 0          header, backing-format extension, backing file name
    data clusters      each changed 64 KiB cluster, in the order first changed
                       (a slot whose cluster ended all zeros is a hole)
    L2 tables          one per 512 MiB region the capture touched
    L1 table           one 8-byte entry per 512 MiB of the disk
    refcount table     one 8-byte entry per refcount block
    refcount blocks    16-bit refcounts (refcount_order 4), one per cluster

A changed cluster holds BASE's bytes with the capture's writes (and zeroed
ranges: write-zeroes and discards) applied in completion order, as
``apply`` does to a raw copy; one that ends all zeros (mkfs discards the
whole disk) is only marked so in its L2 entry and stores nothing.  Every
allocated cluster has refcount 1, and L1/L2 entries carry the COPIED flag, as
QEMU itself writes them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from imgrement_dm.errors import IncrementError

if TYPE_CHECKING:
    from imgrement_dm.changes import Change

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFCOUNTS_PER_BLOCK = CLUSTER * 8 // (1 << REFCOUNT_ORDER)
COPIED = 1 << 63
ZERO_CLUSTER = 1  # L2 entry, version 3: reads as zeros, nothing allocated
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
_EXT = struct.Struct(">II")
BACKING_FORMAT_EXT = 0xE2792ACA
_ZEROS = bytes(CLUSTER)
ZERO_SLOT = 0xFFFFFFFF  # _Image.slot: a cluster made all zeros, stored nowhere


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


#: The qcow2 format's limit on the backing file's name (QEMU refuses more).
BACKING_NAME_MAX = 1023


def backing_name_bytes(name: str) -> bytes:
    """``name`` as the image records it: the file system's bytes, as the OS
    gave them (a name that is not UTF-8 stays itself), at most 1023."""
    raw = os.fsencode(name)
    if not raw or len(raw) > BACKING_NAME_MAX:
        raise IncrementError(f"the backing file name is {len(raw)} bytes; qcow2 allows 1 to "
                             f"{BACKING_NAME_MAX}: give a shorter --backing (a relative path "
                             "is resolved against the image's folder)")
    return raw


def write(fd: int, base: Path, size: int, changes: Iterable[Change], source: int,
          backing_name: str) -> tuple[int, int]:
    """Write the overlay to ``fd`` (a regular file, empty, open to read and
    write); returns how many clusters it
    stores data for and how many it marks as reading zero (changed to all zeros:
    discarded, zeroed, or written with zeros; they cost an L2 entry, not a
    cluster).

    ``changes`` come in completion order, their payloads read from the
    capture ``source`` (changes.py). ``size`` is the virtual disk size in
    bytes; ``backing_name`` is what the image records as its backing file
    (QEMU resolves a relative one against the overlay's own directory).
    """
    name = backing_name_bytes(backing_name)
    base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        image = _Image(fd, base_fd, size)
        for c in changes:
            image.apply(c, source)
        return image.finish(name)
    finally:
        os.close(base_fd)


class _Image:
    """The overlay while it is written: each changed cluster gets the next
    free cluster of the file (a *slot*) when first changed, filled with BASE's
    bytes unless the change covers it whole; the changes go into the slots.

    ``slot`` holds, per cluster of the disk, 0 (unchanged), ZERO_SLOT (all
    zeros, nothing stored: a discard or write-zeroes covered it whole) or
    its slot: 4 bytes a cluster, 256 KiB for 16 GiB, 256 MiB for a 4 TiB disk
    every cluster of which changed (the pages of clusters never changed are
    never touched, so never resident).
    """

    def __init__(self, fd: int, base_fd: int, size: int) -> None:
        self.fd, self.base_fd, self.size = fd, base_fd, size
        self.clusters = _ceil(size, CLUSTER)
        self._raw = bytearray(4 * self.clusters)
        self.slot = memoryview(self._raw).cast("I")
        self.next = 1  # cluster 0 is the header's
        self.in_kernel = True

    def _new_slot(self, cl: int, fill: bool) -> int:
        s = self.next
        self.next += 1
        self.slot[cl] = s
        if fill:  # the parts the change leaves are BASE's (zeros written too: a
            # stored cluster has no holes, which qemu-img map would list)
            data = os.pread(self.base_fd, CLUSTER, cl * CLUSTER)
            os.pwrite(self.fd, data.ljust(CLUSTER, b"\0"), s * CLUSTER)
        return s

    def apply(self, c: Change, source: int) -> None:
        start, end = c.sector * 512, c.sector * 512 + c.size
        write = c.op_name == "write"
        for cl in range(start // CLUSTER, _ceil(end, CLUSTER)):
            at = cl * CLUSTER
            lo, hi = max(start, at), min(end, at + CLUSTER)
            whole = lo == at and hi >= min(at + CLUSTER, self.size)
            s = self.slot[cl]
            if not write and whole:
                if s not in (0, ZERO_SLOT):
                    _punch(self.fd, s * CLUSTER, CLUSTER)  # freed: nothing refers to it
                self.slot[cl] = ZERO_SLOT
                continue
            if s == 0:
                s = self._new_slot(cl, fill=not whole)
            elif s == ZERO_SLOT:
                s = self._new_slot(cl, fill=False)
                if not whole:
                    os.pwrite(self.fd, _ZEROS, s * CLUSTER)
            to = s * CLUSTER + lo - at
            if write:
                self.in_kernel = _copy(source, c.data_at + lo - start, self.fd, to, hi - lo,
                                       self.in_kernel)
            else:  # write-zeroes, discard: read back as zeros (see increment.apply)
                os.pwrite(self.fd, _ZEROS[:hi - lo], to)

    def finish(self, name: bytes) -> tuple[int, int]:
        """The tables after the slots, then the header; returns (stored, zeroed)."""
        fd, slot = self.fd, self.slot
        l1_size = max(1, _ceil(self.size, CLUSTER * L2_ENTRIES))
        span = 4 * L2_ENTRIES  # a region's bytes in the slot map
        regions = [r for r in range(l1_size)
                   if self._raw[r * span:(r + 1) * span].count(0) != 4 * min(
                       L2_ENTRIES, self.clusters - r * L2_ENTRIES)]
        l1_clusters = _ceil(l1_size * 8, CLUSTER)
        l2_at = self.next
        l1_at = l2_at + len(regions)
        rt_at = l1_at + l1_clusters
        # the refcount structures count themselves: grow them to a fixed point
        rt_clusters, rblocks = 1, 1
        while True:
            total = rt_at + rt_clusters + rblocks
            need_blocks = _ceil(total, REFCOUNTS_PER_BLOCK)
            need_rt = _ceil(need_blocks * 8, CLUSTER)
            if (need_blocks, need_rt) == (rblocks, rt_clusters):
                break
            rblocks, rt_clusters = need_blocks, need_rt
        rb_at = rt_at + rt_clusters

        used = bytearray(total)  # 1: refcount 1
        used[0] = 1
        used[l2_at:total] = b"\1" * (total - l2_at)
        stored = zeroed = 0
        l1 = bytearray(l1_clusters * CLUSTER)
        for i, r in enumerate(regions):
            struct.pack_into(">Q", l1, r * 8, ((l2_at + i) * CLUSTER) | COPIED)
            l2 = bytearray(CLUSTER)
            lo = r * L2_ENTRIES
            for cl in range(lo, min(lo + L2_ENTRIES, self.clusters)):
                s = slot[cl]
                if s == 0:
                    continue
                if s != ZERO_SLOT and os.pread(fd, CLUSTER, s * CLUSTER) != _ZEROS:
                    entry = (s * CLUSTER) | COPIED
                    used[s] = 1
                    stored += 1
                else:  # made all zeros, by a discard or by its bytes
                    if s != ZERO_SLOT:
                        _punch(fd, s * CLUSTER, CLUSTER)
                    entry = ZERO_CLUSTER
                    zeroed += 1
                struct.pack_into(">Q", l2, (cl - lo) * 8, entry)
            os.pwrite(fd, l2, (l2_at + i) * CLUSTER)
        os.pwrite(fd, l1, l1_at * CLUSTER)
        rt = bytearray(rt_clusters * CLUSTER)
        for b in range(rblocks):
            struct.pack_into(">Q", rt, b * 8, (rb_at + b) * CLUSTER)
            block = bytearray(CLUSTER)
            part = used[b * REFCOUNTS_PER_BLOCK:(b + 1) * REFCOUNTS_PER_BLOCK]
            block[1:2 * len(part):2] = part  # 16-bit big-endian: the low byte
            os.pwrite(fd, block, (rb_at + b) * CLUSTER)
        os.pwrite(fd, rt, rt_at * CLUSTER)

        fmt = b"raw"
        ext = _EXT.pack(BACKING_FORMAT_EXT, len(fmt)) + fmt.ljust(_ceil(len(fmt), 8) * 8, b"\0")
        ext += _EXT.pack(0, 0)
        header_length = _HEADER.size
        backing_offset = header_length + len(ext)
        head = _HEADER.pack(b"QFI\xfb", 3, backing_offset, len(name), CLUSTER_BITS, self.size,
                            0, l1_size, l1_at * CLUSTER, rt_at * CLUSTER, rt_clusters, 0, 0,
                            0, 0, 0, REFCOUNT_ORDER, header_length)
        os.pwrite(fd, (head + ext + name).ljust(CLUSTER, b"\0"), 0)
        os.ftruncate(fd, total * CLUSTER)
        return stored, zeroed


def _copy(src: int, at: int, dst: int, to: int, size: int, in_kernel: bool) -> bool:
    from imgrement_dm.increment import copy_payload
    return copy_payload(src, at, dst, to, size, in_kernel=in_kernel)


def _punch(fd: int, start: int, size: int) -> None:
    from imgrement_dm.increment import _zero_range
    _zero_range(fd, start, size, False)
