"""Build record streams byte by byte, in the layout the header defines,
for host tests and the decoder benchmark."""

from __future__ import annotations

from imgrement_dm import layout


def _pad(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def bio(seq: int, *, sector: int = 0, op: int = 1, flags: int = 0, status: int = 0,
        segments: list[tuple[int, int, int]] | None = None, payload: bytes = b"",
        submit_ns: int = 1000, complete_ns: int = 2000, pid: int = 42, comm: bytes = b"fio",
        size: int | None = None, version: int = layout.RECORD_VERSION,
        page_shift: int = 12) -> bytes:
    """A bio record; ``segments`` are its entries as the record holds them
    (version 2: runs, cut at pages of ``1 << page_shift`` bytes)."""
    segments = segments if segments is not None else []
    nbytes = size if size is not None else (sum(s[0] for s in segments) or len(payload))
    body = b"".join(layout.SEGMENT.pack(*s) for s in segments) + payload
    total = layout.BIO.size + len(body)
    total += -total % 8
    head = layout.BIO.pack(
        total, layout.REC_BIO, version, page_shift, seq, sector, nbytes, op, op,
        len(segments), flags, layout.PAYLOAD_FLAG if payload else 0, submit_ns,
        complete_ns, status & 0xFFFFFFFF, pid, pid, len(payload), comm,
    )
    return _pad(head + body)


def mark(seq: int, label: str, time_ns: int = 5000) -> bytes:
    raw = label.encode()
    total = layout.MARK.size + len(raw)
    total += -total % 8
    head = layout.MARK.pack(total, layout.REC_MARK, layout.RECORD_VERSION, 0, seq,
                            time_ns, len(raw), 0)
    return _pad(head + raw)


def pad(size: int) -> bytes:
    """A buffer-internal filler; only size and type are meaningful."""
    return layout.HEADER.pack(size, layout.REC_PAD, 0, 0, 0) + bytes(size - layout.HEADER.size)


def meta_stream(n: int) -> bytes:
    """n metadata-only 4 KiB read records with one segment each."""
    return b"".join(bio(i, sector=i * 8, op=0, segments=[(4096, 0, i * 8)]) for i in range(n))
