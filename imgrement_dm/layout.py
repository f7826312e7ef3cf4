"""struct formats for the record stream, derived from the compiled header.

cffi knows the real offsets and sizes of the structures in
dm_target/imgrement_record.h.  Decoding through cffi objects is slow, so we
turn each structure into a :class:`struct.Struct` format (little-endian,
with explicit padding) once at import: fast decoding, with the layout still
coming from the one header.
"""

from __future__ import annotations

import struct
from typing import Any

from imgrement_dm._kernel_ffi import ffi, lib

_CODES = {
    ("primitive", 1): "B",
    ("primitive", 2): "H",
    ("primitive", 4): "I",
    ("primitive", 8): "Q",
}


def _flatten(ctype: Any, base: int = 0, prefix: str = "") -> list[tuple[int, str, str, int]]:
    """(offset, name, struct code, size) of every scalar field, nested structs flattened."""
    out = []
    for name, field in ctype.fields:
        ftype = field.type
        off = base + field.offset
        if ftype.kind == "struct":
            out += _flatten(ftype, off, f"{prefix}{name}.")
        elif ftype.kind == "array":
            size = ffi.sizeof(ftype)
            out.append((off, prefix + name, f"{size}s", size))
        else:
            size = ffi.sizeof(ftype)
            out.append((off, prefix + name, _CODES[(ftype.kind, size)], size))
    return out


def struct_for(cname: str) -> tuple[struct.Struct, tuple[str, ...]]:
    """A Struct decoding ``cname`` and the field names, in order."""
    ctype = ffi.typeof(cname)
    fmt = "<"
    pos = 0
    names = []
    for off, name, code, size in sorted(_flatten(ctype)):
        if off < pos:
            raise AssertionError(f"overlapping fields in {cname} at {name}")
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += code
        names.append(name)
        pos = off + size
    total = ffi.sizeof(ctype)
    if total > pos:
        fmt += f"{total - pos}x"
    st = struct.Struct(fmt)
    assert st.size == total, (cname, st.size, total)
    return st, tuple(names)


HEADER, HEADER_FIELDS = struct_for("struct imgrement_record_header")
BIO, BIO_FIELDS = struct_for("struct imgrement_bio_record")
SEGMENT, SEGMENT_FIELDS = struct_for("struct imgrement_segment")
MARK, MARK_FIELDS = struct_for("struct imgrement_mark_record")

RECORD_VERSION: int = lib.IMGREMENT_RECORD_VERSION
#: Record versions this package reads: its own, and version 1, whose segment
#: entries were one segment each where version 2's are runs of them.
READS_RECORD_VERSIONS: tuple[int, ...] = (RECORD_VERSION, 1)


def record_versions_read() -> str:
    """The record versions this package reads, for an error message."""
    return " or ".join(map(str, sorted(READS_RECORD_VERSIONS)))


REC_BIO: int = lib.IMGREMENT_REC_BIO
REC_MARK: int = lib.IMGREMENT_REC_MARK
REC_PAD: int = lib.IMGREMENT_REC_PAD
PAYLOAD_FLAG: int = lib.IMGREMENT_R_PAYLOAD
NO_ROOM_FLAG: int = lib.IMGREMENT_R_NO_ROOM
MARK_MAX: int = lib.IMGREMENT_MARK_MAX

OPS: dict[int, str] = {
    lib.IMGREMENT_OP_READ: "read",
    lib.IMGREMENT_OP_WRITE: "write",
    lib.IMGREMENT_OP_FLUSH: "flush",
    lib.IMGREMENT_OP_DISCARD: "discard",
    lib.IMGREMENT_OP_SECURE_ERASE: "secure-erase",
    lib.IMGREMENT_OP_WRITE_ZEROES: "write-zeroes",
    lib.IMGREMENT_OP_ZONE_APPEND: "zone-append",
    lib.IMGREMENT_OP_ZONE_MGMT: "zone-mgmt",
    lib.IMGREMENT_OP_OTHER: "other",
}

FLAGS: dict[int, str] = {
    lib.IMGREMENT_F_FUA: "fua",
    lib.IMGREMENT_F_PREFLUSH: "preflush",
    lib.IMGREMENT_F_SYNC: "sync",
    lib.IMGREMENT_F_META: "meta",
    lib.IMGREMENT_F_PRIO: "prio",
    lib.IMGREMENT_F_RAHEAD: "rahead",
    lib.IMGREMENT_F_BACKGROUND: "background",
    lib.IMGREMENT_F_NOWAIT: "nowait",
    lib.IMGREMENT_F_NOUNMAP: "nounmap",
    lib.IMGREMENT_F_IDLE: "idle",
    lib.IMGREMENT_F_NOMERGE: "nomerge",
}


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAGS.items() if flags & bit]
