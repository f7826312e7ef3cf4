"""The checksum of a capture chunk: XXH64, computed in C (_stream.c).

Captures of format 1 and 2 used zlib's crc32, which cost `record` about
2.5 s of CPU per GB in the guest (under emulation), more than storing the
bytes with O_DIRECT; XXH64 costs about 0.3 s. It is the xxHash
specification's 64-bit hash with seed 0, the value `xxhsum -H64` prints,
so a chunk can be checked by a tool other than this one.
"""

from __future__ import annotations

import mmap

from imgrement_dm._kernel_ffi import ffi, lib


def xxh64(data: bytes | memoryview | mmap.mmap) -> int:
    """XXH64 of ``data`` (seed 0), without copying it."""
    return int(lib.imgrement_xxh64(ffi.from_buffer("uint8_t[]", data), len(data)))
