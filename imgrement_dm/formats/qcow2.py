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
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from imgrement_dm.errors import IncrementError
from imgrement_dm.records import BioRecord

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


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _clusters_of(change: BioRecord) -> range:
    start = change.sector * 512
    return range(start // CLUSTER, _ceil(start + change.size, CLUSTER))


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


def write(out: BinaryIO, base: Path, size: int, changes: Sequence[BioRecord],
          backing_name: str) -> tuple[int, int]:
    """Write the overlay to ``out``; returns how many clusters it stores data for
    and how many it marks as reading zero (changed to all zeros: discarded,
    zeroed, or written with zeros; they cost an L2 entry, not a cluster).

    ``size`` is the virtual disk size in bytes; ``backing_name`` is what the
    image records as its backing file (QEMU resolves a relative one against
    the overlay's own directory).
    """
    touched: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(changes):
        for cl in _clusters_of(c):
            touched[cl].append(i)
    fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        zero = {cl for cl in touched
                if not any(_cluster(fd, cl, [changes[i] for i in touched[cl]]))}
        data = sorted(set(touched) - zero)
        _write(out, fd, size, changes, touched, data, zero, backing_name)
    finally:
        os.close(fd)
    return len(data), len(zero)


def _write(out: BinaryIO, fd: int, size: int, changes: Sequence[BioRecord],
           touched: dict[int, list[int]], data: list[int], zero: set[int],
           backing_name: str) -> None:
    l1_size = max(1, _ceil(size, CLUSTER * L2_ENTRIES))
    l2_regions = sorted({cl // L2_ENTRIES for cl in [*data, *zero]})
    l1_clusters = _ceil(l1_size * 8, CLUSTER)

    # the refcount structures count themselves: grow them to a fixed point
    rt_clusters, rblocks = 1, 1
    while True:
        total = 1 + rt_clusters + rblocks + l1_clusters + len(l2_regions) + len(data)
        need_blocks = _ceil(total, REFCOUNTS_PER_BLOCK)
        need_rt = _ceil(need_blocks * 8, CLUSTER)
        if (need_blocks, need_rt) == (rblocks, rt_clusters):
            break
        rblocks, rt_clusters = need_blocks, need_rt

    rt_at = 1
    rb_at = rt_at + rt_clusters
    l1_at = rb_at + rblocks
    l2_at = l1_at + l1_clusters
    data_at = l2_at + len(l2_regions)

    name = backing_name_bytes(backing_name)
    fmt = b"raw"
    ext = _EXT.pack(BACKING_FORMAT_EXT, len(fmt)) + fmt.ljust(_ceil(len(fmt), 8) * 8, b"\0")
    ext += _EXT.pack(0, 0)
    header_length = _HEADER.size
    backing_offset = header_length + len(ext)
    head = _HEADER.pack(b"QFI\xfb", 3, backing_offset, len(name), CLUSTER_BITS, size, 0,
                        l1_size, l1_at * CLUSTER, rt_at * CLUSTER, rt_clusters, 0, 0,
                        0, 0, 0, REFCOUNT_ORDER, header_length)
    cluster0 = (head + ext + name).ljust(CLUSTER, b"\0")

    rt = bytearray(rt_clusters * CLUSTER)
    for b in range(rblocks):
        struct.pack_into(">Q", rt, b * 8, (rb_at + b) * CLUSTER)
    rb = bytearray(rblocks * CLUSTER)
    for cl in range(total):
        struct.pack_into(">H", rb, cl * 2, 1)
    l1 = bytearray(l1_clusters * CLUSTER)
    l2 = bytearray(len(l2_regions) * CLUSTER)
    region_index = {r: i for i, r in enumerate(l2_regions)}
    for r, i in region_index.items():
        struct.pack_into(">Q", l1, r * 8, ((l2_at + i) * CLUSTER) | COPIED)
    for n, cl in enumerate(data):
        i = region_index[cl // L2_ENTRIES]
        struct.pack_into(">Q", l2, i * CLUSTER + (cl % L2_ENTRIES) * 8,
                         ((data_at + n) * CLUSTER) | COPIED)
    for cl in zero:
        i = region_index[cl // L2_ENTRIES]
        struct.pack_into(">Q", l2, i * CLUSTER + (cl % L2_ENTRIES) * 8, ZERO_CLUSTER)

    out.write(cluster0)
    out.write(rt)
    out.write(rb)
    out.write(l1)
    out.write(l2)
    for cl in data:
        out.write(_cluster(fd, cl, [changes[i] for i in touched[cl]]))


def _cluster(base_fd: int, cl: int, changes: list[BioRecord]) -> bytes:
    """Cluster ``cl`` as the capture left it: the base's bytes, the changes on top."""
    at = cl * CLUSTER
    buf = bytearray(os.pread(base_fd, CLUSTER, at).ljust(CLUSTER, b"\0"))
    for c in changes:
        start = c.sector * 512
        lo, hi = max(start, at), min(start + c.size, at + CLUSTER)
        if c.op_name == "write":
            buf[lo - at:hi - at] = c.payload[lo - start:hi - start]
        else:  # write-zeroes, discard: read back as zeros (see increment.apply)
            buf[lo - at:hi - at] = bytes(hi - lo)
    return bytes(buf)
