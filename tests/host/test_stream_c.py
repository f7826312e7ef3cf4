"""The C helpers of a storing consumer (_stream.c): the header walk, XXH3
and XXH64.

The walk is checked against the Python walk it replaced, on generated
streams with gaps, pads, cut ends and impossible sizes; XXH3 and XXH64
against values printed by the reference tool, XXH3's vector loop against
its scalar loop at every length and alignment around its stripes and
blocks; a version 4 capture's chunks against XXH3, and a version 3 one
(XXH64) still read.
"""

from __future__ import annotations

import random
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from imgrement_dm import layout
from imgrement_dm.checksum import xxh3, xxh3_scalar, xxh64
from imgrement_dm.errors import CaptureError, StreamError
from imgrement_dm.formats import capture
from imgrement_dm.formats.capture import CaptureReader, write_capture
from imgrement_dm.records import scan
from tests.host import streams

#: ``xxhsum -H64`` (xxHash 0.8.1) of bytes((i * 131 + 7) & 255 for i in range(n)),
#: lengths chosen around the 32-byte stripe and the 8- and 4-byte tails.
XXHSUM = {
    0: 0xEF46DB3751D8E999, 1: 0xA96C7F0CE858BBB7, 3: 0xBED43740EE6332BB,
    4: 0xFA212AE44B3BB23D, 7: 0x2744460DD675D2C0, 8: 0x994B676B71CE94DD,
    9: 0x572B84C18B983AF8, 31: 0x6711D55E306B5D8F, 32: 0x07F7B8E3BC5D6E25,
    33: 0x09F85EEB4E1CBE9F, 63: 0xB7C9968C066CB6A5, 64: 0x50D4159A0411632E,
    100: 0x9DDADA11D3DC2D8F, 1000: 0x0BF0BDBCC82EB373, 65536: 0x42A4749843255CEC,
}


@pytest.mark.parametrize("n", sorted(XXHSUM))
def test_xxh64_is_what_xxhsum_prints(n: int) -> None:
    data = bytes((i * 131 + 7) & 255 for i in range(n))
    assert xxh64(data) == XXHSUM[n]
    assert xxh64(memoryview(bytearray(data))) == XXHSUM[n]


#: ``xxhsum -H3`` (xxHash 0.8.1) of the same bytes, lengths at the edges of
#: XXH3's cases: empty, 1-3, 4-8, 9-16, 17-128, 129-240, then stripes of 64
#: and blocks of 1024.
XXHSUM_H3 = {
    0: 0x2D06800538D394C2, 1: 0x4C5CCA45D0F4811F, 3: 0x6E3E2670E61106AC,
    4: 0x5C4C63133443D03F, 8: 0xF9FD4DD0B04D78F5, 9: 0x7C20DF9712C26EDF,
    16: 0x86ABF6BACCEA0858, 17: 0xB58BF5DC5022D071, 128: 0x10D17F72C0CCBA41,
    129: 0x1648BDC3DB49D1A2, 240: 0xB6CFAF343FAB81E6, 241: 0x956CAE592C67279E,
    1024: 0x70BD377D9574F4BB, 1025: 0x66C4487C41E127A7, 1088: 0xF43DC77E28A9ACBC,
    4096: 0x9DDD66C14AF0DAFF, 65536: 0x04404B28125B4786,
}


@pytest.mark.parametrize("n", sorted(XXHSUM_H3))
def test_xxh3_is_what_xxhsum_prints(n: int) -> None:
    data = bytes((i * 131 + 7) & 255 for i in range(n))
    assert xxh3(data) == xxh3_scalar(data) == XXHSUM_H3[n]
    assert xxh3(memoryview(bytearray(data))) == XXHSUM_H3[n]


def test_xxh3_loops_agree_at_every_length_and_alignment() -> None:
    """The vector loop (AVX2 where this host has it) and the scalar one,
    every length to 1100 (the first two blocks and the last stripe's
    overlap) and some beyond, at every misalignment of the start."""
    base = random.Random(3).randbytes(70_000)
    for n in [*range(1101), 2047, 2048, 2049, 4096, 4200, 65_536 + 61]:
        for off in range(0, 8, 3):
            data = memoryview(base)[off:off + n]
            assert xxh3(data) == xxh3_scalar(data), (n, off)


def _python_scan(buf: bytes) -> tuple[int, int, int, int]:
    """The walk as it was written in Python (records.py before _stream.c)."""
    at = n = gaps = 0
    first = last = -1
    while at + 16 <= len(buf):
        size, rtype, _v, _r, seq = struct.unpack_from("<IHBBQ", buf, at)
        if size < 16 or size % 8:
            raise StreamError(f"corrupt record stream: record size {size} at byte {at}")
        if at + size > len(buf):
            break
        if rtype != layout.REC_PAD:
            if last >= 0 and seq != last + 1:
                gaps += seq - last - 1
            if first < 0:
                first = seq
            last = seq
            n += 1
        at += size
    if at != len(buf):
        raise StreamError("the stream ends inside a record")
    return n, first, last, gaps


def _outcome(walk: Callable[[bytes], tuple[int, int, int, int]],
             buf: bytes) -> tuple[int, int, int, int] | str:
    try:
        return walk(buf)
    except StreamError as e:
        return str(e)


def _stream(rnd: random.Random) -> bytes:
    parts = []
    seq = rnd.randrange(1 << 40)
    for _ in range(rnd.randrange(40)):
        kind = rnd.random()
        if kind < 0.15:
            parts.append(streams.pad(8 * rnd.randrange(2, 40)))
            continue
        seq += 1 if rnd.random() < 0.8 else rnd.randrange(2, 1000)
        parts.append(streams.mark(seq, "m" * rnd.randrange(30)) if kind < 0.3
                     else streams.bio(seq))
    buf = bytearray(b"".join(parts))
    damage = rnd.random()
    if damage < 0.2 and buf:
        del buf[rnd.randrange(len(buf)):]  # cut anywhere
    elif damage < 0.3 and len(buf) >= 4:
        at = rnd.randrange(0, len(buf) - 3)
        buf[at:at + 4] = struct.pack("<I", rnd.choice([0, 8, 17, 1 << 31, 0xFFFFFFF8]))
    return bytes(buf)


def test_c_walk_agrees_with_the_python_walk() -> None:
    rnd = random.Random(2026)
    kinds = set()
    for _ in range(3000):
        buf = _stream(rnd)
        want = _outcome(_python_scan, buf)
        assert _outcome(scan, buf) == want, buf.hex()
        if isinstance(want, str):
            kinds.add("cut" if "ends inside" in want else "size")
        else:
            kinds.add("gaps" if want[3] else "whole")
    # the generator reached every outcome
    assert kinds == {"whole", "gaps", "size", "cut"}


def test_c_walk_takes_a_read_only_mapping() -> None:
    import mmap

    raw = streams.bio(4) + streams.pad(24) + streams.mark(5, "m") + streams.bio(9)
    m = mmap.mmap(-1, len(raw))
    m[:] = raw
    ro = mmap.mmap(-1, len(raw), prot=mmap.PROT_READ)  # unrelated, all zeros
    with pytest.raises(StreamError, match="record size 0 at byte 0"):
        scan(memoryview(ro))
    assert scan(memoryview(m)) == (3, 4, 9, 3)


def test_version_4_chunks_carry_the_xxh3_of_their_payload(tmp_path: Path) -> None:
    payloads = [streams.bio(i) + streams.mark(i + 1, "x" * i) for i in range(0, 40, 2)]
    path = tmp_path / "v4.cap"
    with write_capture(path, "dev", 4096) as w:
        for p in payloads:
            w.add(p)
    raw = path.read_bytes()
    assert struct.unpack_from("<I", raw, 8)[0] == capture.FORMAT_VERSION == 4
    at, seen = 96, []
    while raw[at:at + 4] == b"CHNK":
        _, n, count, digest = struct.unpack_from("<4sIIQ", raw, at)
        body = raw[at + 20:at + 20 + n]
        assert digest == xxh3(body) == xxh3_scalar(body) and count == 2
        seen.append(body)
        at += 20 + n
    assert seen == payloads and raw[at:at + 4] == b"DONE"
    with CaptureReader(path) as r:
        assert [rec.seq for rec in r.records()] == list(range(40))
    bad = bytearray(raw)
    bad[96 + 20 + 20] ^= 0x10  # inside the first payload
    path.write_bytes(bad)
    with CaptureReader(path) as r, pytest.raises(CaptureError,
                                                  match="chunk checksum mismatch"):
        r.validate()


def _capture_by_hand(version: int, payloads: list[bytes], digest: Callable[[bytes], int]) -> bytes:
    """A capture of ``version`` with 20-byte chunk headers (3 and 4), each
    chunk's checksum field set by ``digest``: two records a payload."""
    head = struct.pack("<8sIIQQ32sI", b"IMGRCAP1", version, layout.RECORD_VERSION, 4096, 0,
                       b"dev", 0)
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    chunks = b"".join(struct.pack("<4sIIQ", b"CHNK", len(p), 2, digest(p)) + p
                      for p in payloads)
    tail = struct.pack("<4sQQq", b"DONE", 2 * len(payloads), 0, 2 * len(payloads) - 1)
    return (head + bytes(96 - len(head)) + chunks + tail
            + struct.pack("<I", zlib.crc32(tail)))


def test_version_3_captures_still_read_with_xxh64(tmp_path: Path) -> None:
    """Files `record` wrote before format 4 read as they did, their chunks
    checked with XXH64; an XXH3 there, or an XXH64 in a version 4 file, is a
    mismatch: the version says which checksum, nothing is guessed."""
    payloads = [streams.bio(i) + streams.mark(i + 1, "y" * i) for i in range(0, 12, 2)]
    path = tmp_path / "v3.cap"
    path.write_bytes(_capture_by_hand(3, payloads, xxh64))
    with CaptureReader(path) as r:
        assert r.version == 3
        assert [rec.seq for rec in r.records()] == list(range(12))
    with CaptureReader(path) as r:
        r.validate()
    for version, wrong in ((3, xxh3), (4, xxh64)):
        path.write_bytes(_capture_by_hand(version, payloads, wrong))
        with CaptureReader(path) as r, pytest.raises(CaptureError,
                                                      match="chunk checksum mismatch"):
            r.validate()
    path.write_bytes(_capture_by_hand(4, payloads, xxh3))
    with CaptureReader(path) as r:
        r.validate()
        assert r.version == 4


def test_xxh3_without_a_128_bit_type_gives_the_same_values(tmp_path: Path) -> None:
    """32-bit targets (the Debian package is Architecture: any) have no
    ``unsigned __int128``: _stream.c built without it (the portable product
    of four 32x32->64 multiplies) gives XXH3's values still."""
    src = Path(__file__).resolve().parents[2]
    prog = tmp_path / "xxh3"
    (tmp_path / "main.c").write_text(
        '#include <stdio.h>\n#include <stdlib.h>\n#include "_stream.c"\n'
        "int main(int argc, char **argv)\n{\n"
        "\tsize_t n = strtoul(argv[1], NULL, 0), i;\n"
        "\tunsigned char *p = malloc(n + 1);\n\n"
        "\tfor (i = 0; i < n; i++)\n\t\tp[i] = (unsigned char)(i * 131 + 7);\n"
        '\tprintf("%llu\\n", (unsigned long long)imgrement_xxh3(p, n));\n\treturn 0;\n}\n')
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-DIMGREMENT_NO_INT128",
                    f"-I{src / 'dm_target'}", f"-I{src / 'imgrement_dm'}", "-o", str(prog),
                    str(tmp_path / "main.c")], check=True)
    for n in sorted(XXHSUM_H3):
        got = int(subprocess.run([str(prog), str(n)], capture_output=True, text=True,
                                 check=True).stdout)
        assert got == XXHSUM_H3[n], n
