"""The checksum of a capture chunk: XXH3 (64-bit), computed in C (_stream.c).

Captures of format 1 and 2 used zlib's crc32, which cost `record` about
2.5 s of CPU per GB in the guest (under emulation), more than storing the
bytes with O_DIRECT. Format 3 used XXH64 (0.3 s there), whose loop is four
chains of 64-bit multiplies, 28 instructions for 32 bytes: in the cost
bench's counted instructions it was most of what `record` added to a 4 KiB
write. Format 4 uses XXH3, whose long-input loop is eight independent
32x32->64 multiplies that AVX2 does four at a time (about 14 instructions
for 64 bytes): on this project's build host (AMD EPYC) 0.034 s/GB against
XXH64's 0.094. Under QEMU's software emulation the vector instructions cost
more host time each (qemu-x86_64 -cpu max: 1.0 s/GB against 0.22), which
only the guests of this project's tests pay. Both are the xxHash
specification's, seed 0: `xxhsum -H3` and `xxhsum -H64` print them, so a
chunk can be checked by a tool other than this one.
"""

from __future__ import annotations

import mmap

from imgrement_dm._kernel_ffi import ffi, lib


def xxh64(data: bytes | memoryview | mmap.mmap) -> int:
    """XXH64 of ``data`` (seed 0), without copying it."""
    return int(lib.imgrement_xxh64(ffi.from_buffer("uint8_t[]", data), len(data)))


def xxh3(data: bytes | memoryview | mmap.mmap) -> int:
    """XXH3, 64-bit, of ``data`` (seed 0), without copying it: the AVX2 loop
    where the CPU has it."""
    return int(lib.imgrement_xxh3(ffi.from_buffer("uint8_t[]", data), len(data)))


def xxh3_scalar(data: bytes | memoryview | mmap.mmap) -> int:
    """XXH3 by the scalar loop alone, which a CPU without AVX2 runs: the
    same value, so tests can hold one to the other."""
    return int(lib.imgrement_xxh3_scalar(ffi.from_buffer("uint8_t[]", data), len(data)))
