"""An increment as a qcow2 overlay: only the clusters the capture changed.

``apply --format qcow2 --backing BASE`` writes a qcow2 (version 3) image
whose backing file is BASE (raw): QEMU, qemu-img and libvirt read every
cluster the capture did not touch from BASE, and the changed ones from the
overlay, so the file costs about the changed data, not the disk.

The file is written here directly, in the layout the qcow2 specification
(docs/interop/qcow2.txt in QEMU) gives, all in one pass and with every
table's size known in advance:

    cluster 0          header, backing-format extension, backing file name
    refcount table     one 8-byte entry per refcount block
    refcount blocks    16-bit refcounts (refcount_order 4), one per cluster
    L1 table           one 8-byte entry per 512 MiB of the disk
    L2 tables          one per 512 MiB region the capture touched
    data clusters      each changed 64 KiB cluster that is not all zeros, whole

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
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

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


def write(out: BinaryIO, base: Path, size: int, changes: Iterable[Change], source: int,
          backing_name: str, *, scratch: Path) -> tuple[int, int]:
    """Write the overlay to ``out`` (a regular file); returns how many clusters it
    stores data for and how many it marks as reading zero (changed to all zeros:
    discarded, zeroed, or written with zeros; they cost an L2 entry, not a
    cluster).

    ``changes`` come in completion order, their payloads read from the
    capture ``source`` (changes.py). ``size`` is the virtual disk size in
    bytes; ``backing_name`` is what the image records as its backing file
    (QEMU resolves a relative one against the overlay's own directory).

    One pass over the changes, in memory that does not grow with them: each
    changed cluster is made in a sparse scratch file (unnamed, in
    ``scratch``: it holds the changed clusters only), a byte per cluster of
    the disk says which; then the clusters go out in order, with each
    table written as soon as its part of the disk is done.
    """
    name = backing_name_bytes(backing_name)
    clusters = _ceil(size, CLUSTER)
    touched = bytearray(clusters)  # 1: changed
    base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with tempfile.TemporaryFile(dir=scratch) as tmp:
            fd = tmp.fileno()
            os.ftruncate(fd, clusters * CLUSTER)
            in_kernel = True
            for c in changes:
                start, end = c.sector * 512, c.sector * 512 + c.size
                first, last = start // CLUSTER, _ceil(end, CLUSTER)
                for cl in (first, last - 1):  # only these may be partly changed
                    if cl < last and not touched[cl]:
                        base_data = os.pread(base_fd, CLUSTER, cl * CLUSTER)
                        if base_data.count(0) != len(base_data):
                            os.pwrite(fd, base_data, cl * CLUSTER)
                touched[first:last] = b"\1" * (last - first)
                if c.op_name == "write":
                    in_kernel = _copy(source, c.data_at, fd, start, c.size, in_kernel)
                else:  # write-zeroes, discard: read back as zeros (see increment.apply)
                    _zero(fd, start, c.size)
            out.flush()
            return _write(out.fileno(), fd, size, touched, name)
    finally:
        os.close(base_fd)


def _copy(src: int, at: int, dst: int, to: int, size: int, in_kernel: bool) -> bool:
    from imgrement_dm.increment import copy_payload
    return copy_payload(src, at, dst, to, size, in_kernel=in_kernel)


def _zero(fd: int, start: int, size: int) -> None:
    from imgrement_dm.increment import _zero_range
    _zero_range(fd, start, size, False)


def _write(out: int, fd: int, size: int, touched: bytearray, name: bytes) -> tuple[int, int]:
    """Lay the image out around the changed clusters (``touched``) held in ``fd``.

    The tables' sizes are fixed before the clusters are read, with every
    changed cluster counted as stored: those that turn out all zeros are
    marked so and the refcount blocks keep a little room they do not use.
    """
    l1_size = max(1, _ceil(size, CLUSTER * L2_ENTRIES))
    regions = [r for r in range(l1_size)
               if touched[r * L2_ENTRIES:(r + 1) * L2_ENTRIES].count(0) !=
               len(touched[r * L2_ENTRIES:(r + 1) * L2_ENTRIES])]
    most = len(touched) - touched.count(0)  # at most this many stored
    l1_clusters = _ceil(l1_size * 8, CLUSTER)

    # the refcount structures count themselves: grow them to a fixed point
    rt_clusters, rblocks = 1, 1
    while True:
        total = 1 + rt_clusters + rblocks + l1_clusters + len(regions) + most
        need_blocks = _ceil(total, REFCOUNTS_PER_BLOCK)
        need_rt = _ceil(need_blocks * 8, CLUSTER)
        if (need_blocks, need_rt) == (rblocks, rt_clusters):
            break
        rblocks, rt_clusters = need_blocks, need_rt

    rt_at = 1
    rb_at = rt_at + rt_clusters
    l1_at = rb_at + rblocks
    l2_at = l1_at + l1_clusters
    data_at = l2_at + len(regions)

    fmt = b"raw"
    ext = _EXT.pack(BACKING_FORMAT_EXT, len(fmt)) + fmt.ljust(_ceil(len(fmt), 8) * 8, b"\0")
    ext += _EXT.pack(0, 0)
    header_length = _HEADER.size
    backing_offset = header_length + len(ext)
    head = _HEADER.pack(b"QFI\xfb", 3, backing_offset, len(name), CLUSTER_BITS, size, 0,
                        l1_size, l1_at * CLUSTER, rt_at * CLUSTER, rt_clusters, 0, 0,
                        0, 0, 0, REFCOUNT_ORDER, header_length)

    stored = zeroed = 0
    l1 = bytearray(l1_clusters * CLUSTER)
    for i, r in enumerate(regions):
        struct.pack_into(">Q", l1, r * 8, ((l2_at + i) * CLUSTER) | COPIED)
        l2 = bytearray(CLUSTER)
        lo = r * L2_ENTRIES
        hi = min(lo + L2_ENTRIES, len(touched))
        cl = touched.find(1, lo, hi)
        while cl >= 0:
            data = os.pread(fd, CLUSTER, cl * CLUSTER).ljust(CLUSTER, b"\0")
            if data == _ZEROS:
                entry = ZERO_CLUSTER
                zeroed += 1
            else:
                at = (data_at + stored) * CLUSTER
                os.pwrite(out, data, at)
                entry = at | COPIED
                stored += 1
            struct.pack_into(">Q", l2, (cl - lo) * 8, entry)
            cl = touched.find(1, cl + 1, hi)
        os.pwrite(out, l2, (l2_at + i) * CLUSTER)
    os.pwrite(out, l1, l1_at * CLUSTER)

    used = data_at + stored  # every cluster below has refcount 1
    rt = bytearray(rt_clusters * CLUSTER)
    for b in range(rblocks):
        struct.pack_into(">Q", rt, b * 8, (rb_at + b) * CLUSTER)
        lo = b * REFCOUNTS_PER_BLOCK
        n = max(0, min(used - lo, REFCOUNTS_PER_BLOCK))
        block = (b"\0\1" * n).ljust(CLUSTER, b"\0")
        os.pwrite(out, block, (rb_at + b) * CLUSTER)
    os.pwrite(out, rt, rt_at * CLUSTER)
    os.pwrite(out, (head + ext + name).ljust(CLUSTER, b"\0"), 0)
    os.ftruncate(out, used * CLUSTER)
    return stored, zeroed
