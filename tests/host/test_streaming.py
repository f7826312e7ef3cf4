"""The capture tools read a capture once, in memory that does not grow with it.

- apply (raw and qcow2), replay and diff of a capture larger than the memory
  the process may have at all (RLIMIT_AS, in a subprocess) are exact;
- the reorder heap (changes.py) gives exactly the completion order a full
  sort gives, on random captures with overlapping bios, and falls back to
  the sort when a capture breaks its horizon;
- crashcheck's listing (one walk, keys by difference) gives the boundaries,
  unflushed sets and distinct states of the old quadratic one, checked
  against a brute-force model on random captures, and lists a
  100,000-write fsync capture with exact counts.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgrement_dm import changes, increment, layout
from imgrement_dm import crashcheck as crash
from imgrement_dm.formats import export
from imgrement_dm.formats.capture import CaptureReader, write_capture
from imgrement_dm.records import BioRecord
from tests.host import streams

OP = {name: code for code, name in layout.OPS.items()}
BIT = {name: bit for bit, name in layout.FLAGS.items()}
W, FLUSH, DISCARD, ZEROES = OP["write"], OP["flush"], OP["discard"], OP["write-zeroes"]
MIB = 1 << 20


def _write_capture(path: Path, sectors: int, records: list[bytes], per_chunk: int = 64) -> None:
    with write_capture(path, "traced", sectors) as w:
        for i in range(0, len(records), per_chunk):
            w.add(b"".join(records[i:i + per_chunk]))


# -- bounded memory -------------------------------------------------------------

#: The address space the tools get: a fifth of the capture below.
LIMIT = 96 * MIB
CAPTURE_WRITES = 500  # 1 MiB each: 500 MiB of data, more than five times LIMIT


def _big_case(tmp_path: Path) -> tuple[Path, Path, bytes, set[int]]:
    """A 1 GiB sparse base, a capture of 500 one-MiB writes (every 97th a
    discard) over its first 512 MiB, overlapping, in shuffled completion
    order; and the SHA-256 of the image they leave."""
    size = 1 << 30
    base = tmp_path / "base.img"
    with base.open("wb") as f:
        f.truncate(size)
        f.write(b"\x5a" * MIB)
    rng = random.Random(29)
    recs: list[bytes] = []
    model: dict[int, list[tuple[int, int, int]]] = {}  # MiB slot: (done, seq, fill byte)
    order = list(range(CAPTURE_WRITES))
    completes = sorted(rng.sample(range(10 * CAPTURE_WRITES), CAPTURE_WRITES))
    rng.shuffle(order)  # seq i completes at completes[order[i]]
    for i in range(CAPTURE_WRITES):
        slot = rng.randrange(512)
        done = completes[order[i]]
        if i % 97 == 0:
            recs.append(streams.bio(i, sector=slot * 2048, op=DISCARD, size=MIB,
                                    submit_ns=i, complete_ns=done))
            fill = 0
        else:
            fill = 1 + i % 250
            recs.append(streams.bio(i, sector=slot * 2048, op=W, payload=bytes([fill]) * MIB,
                                    submit_ns=i, complete_ns=done))
        model.setdefault(slot, []).append((done, i, fill))
    cap = tmp_path / "big.cap"
    _write_capture(cap, size // 512, recs, per_chunk=4)
    h = hashlib.sha256()
    for slot in range(size // MIB):
        if slot in model:
            h.update(bytes([max(model[slot])[2]]) * MIB)
        else:
            h.update(b"\x5a" * MIB if slot == 0 else bytes(MIB))
    return base, cap, h.digest(), set(model)


def _limited(code: str) -> subprocess.CompletedProcess[str]:
    prog = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))\n" + code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).parents[2], timeout=600)


def _sha(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.digest()


def test_a_capture_five_times_the_address_space_is_applied_exactly(tmp_path: Path) -> None:
    base, cap, want, slots = _big_case(tmp_path)
    assert cap.stat().st_size > 5 * LIMIT
    out, ovl, rep = tmp_path / "out.img", tmp_path / "out.qcow2", tmp_path / "rep.img"
    lw, bt = tmp_path / "out.lw", tmp_path / "bt.blktrace.0"
    with rep.open("wb") as dst:  # a copy of BASE to replay onto
        dst.write(b"\x5a" * MIB)
        dst.truncate(1 << 30)
    r = _limited(
        "from pathlib import Path\n"
        "from imgrement_dm import increment\n"
        f"sel = increment.apply(Path({str(base)!r}), Path({str(cap)!r}), Path({str(out)!r}))\n"
        f"q = increment.apply_qcow2(Path({str(base)!r}), Path({str(cap)!r}), "
        f"Path({str(ovl)!r}))\n"
        f"increment.replay(Path({str(cap)!r}), Path({str(rep)!r}))\n"
        f"e = increment.extents(Path({str(cap)!r}))\n"
        "from imgrement_dm.formats import export\n"
        f"export.export_capture(Path({str(cap)!r}), 'log-writes', Path({str(lw)!r}))\n"
        f"export.export_capture(Path({str(cap)!r}), 'blktrace', Path({str(bt)!r}))\n"
        "print(sel.applied, q[1], q[2], len(e.spans), e.spans[0])\n")
    assert r.returncode == 0, r.stderr[-3000:]
    applied, stored, zeroed, spans, first = r.stdout.split("\n")[0].split(" ", 4)
    assert int(applied) == CAPTURE_WRITES
    assert _sha(out) == want and _sha(rep) == want
    # the overlay, read through QEMU's own code, is the same disk
    conv = tmp_path / "conv.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(ovl), str(conv)], check=True)
    assert _sha(conv) == want
    # the log holds every write's data: its size is the capture's data, plus
    # a sector per entry (the writes, discards and the super block and end mark)
    discards = len(range(0, CAPTURE_WRITES, 97))
    writes = CAPTURE_WRITES - discards
    assert lw.stat().st_size == writes * MIB + (CAPTURE_WRITES + 2) * 512
    assert bt.stat().st_size == 2 * CAPTURE_WRITES * 48 + 48 + 16  # Q, C; one process note
    # every changed MiB is 16 clusters, stored or (discarded last) marked zero
    assert int(stored) + int(zeroed) == 16 * len(slots)
    runs = sum(1 for s in slots if s - 1 not in slots)
    assert int(spans) == runs and first == f"({min(slots) * 2048}, {_run(slots) * 2048})"


def _run(slots: set[int]) -> int:
    """MiB in the run of changed slots that starts at the lowest."""
    n, s = 0, min(slots)
    while s + n in slots:
        n += 1
    return n


# -- the reorder heap ------------------------------------------------------------

def _reference(cap: Path, sectors: int) -> bytes:
    """Every change sorted whole by completion, applied to zeros in memory."""
    img = bytearray(sectors * 512)
    with CaptureReader(cap) as r:
        recs = [x for x in r.records() if isinstance(x, BioRecord)
                and x.op_name in changes.CHANGING_OPS and x.status == 0]
        recs.sort(key=lambda x: (x.complete_ns, x.seq))
        for x in recs:
            a = x.sector * 512
            img[a:a + x.size] = bytes(x.payload) if x.op_name == "write" else bytes(x.size)
    return bytes(img)


def _random_capture(path: Path, seed: int, n: int, sectors: int = 256,
                    spread_ns: int = 3_000_000_000) -> None:
    """n overlapping writes, discards and write-zeroes submitted 10 ms apart
    that take up to ``spread_ns`` to complete: completion order far from
    submission order, the heap holding and releasing all the way."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        start = rng.randrange(sectors - 8)
        length = rng.randrange(1, 9)
        submit = i * 10_000_000
        done = submit + rng.randrange(spread_ns)
        kind = rng.random()
        if kind < 0.8:
            recs.append(streams.bio(i, sector=start, op=W, payload=os.urandom(512 * length),
                                    submit_ns=submit, complete_ns=done))
        else:
            recs.append(streams.bio(i, sector=start, op=DISCARD if kind < 0.9 else ZEROES,
                                    size=512 * length, submit_ns=submit, complete_ns=done))
    _write_capture(path, sectors, recs, per_chunk=rng.randrange(1, 40))


@pytest.mark.parametrize("seed", range(6))
def test_the_heap_applies_in_exactly_the_completion_order(tmp_path: Path, seed: int,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    cap = tmp_path / "r.cap"
    _random_capture(cap, seed, 600)
    base = tmp_path / "zero.img"
    base.write_bytes(bytes(256 * 512))
    passes: list[bool] = []
    real = changes.Changes.__init__

    def spy(self: changes.Changes, *a: object, **k: object) -> None:
        real(self, *a, **k)  # type: ignore[arg-type]
        passes.append(self.exact)

    monkeypatch.setattr(changes.Changes, "__init__", spy)
    out = tmp_path / "o.img"
    increment.apply(base, cap, out)
    assert out.read_bytes() == _reference(cap, 256)
    assert passes == [False]  # the heap sufficed: no second, sorted pass
    # the heap released changes before the end (it is not a sort in disguise)
    with CaptureReader(cap) as r:
        it = iter(changes.Changes(r))
        first = next(it)
        assert r.position() < r.size - 4096, "nothing came out before the end"
    with CaptureReader(cap) as r:
        assert first == min(changes.Changes(r))


def test_a_capture_that_breaks_the_horizon_is_sorted_whole(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    """Record 2 says it was submitted 6 s in and completed at 5 ns (a stamp the
    horizon cannot foresee): record 0, completed at 10 ns, was released at 5 s.
    Record 0 completed last, so its bytes must win; without the sorted pass
    record 2's would."""
    cap = tmp_path / "h.cap"
    _write_capture(cap, 64, [
        streams.bio(0, sector=8, op=W, payload=b"R" * 512, submit_ns=0, complete_ns=10),
        streams.bio(1, sector=0, op=W, payload=b"M" * 512, submit_ns=5_000_000_000,
                    complete_ns=5_000_000_100),
        streams.bio(2, sector=8, op=W, payload=b"S" * 512, submit_ns=6_000_000_000,
                    complete_ns=5),
    ], per_chunk=1)
    base = tmp_path / "zero.img"
    base.write_bytes(bytes(64 * 512))
    with CaptureReader(cap) as r, pytest.raises(changes.ReorderedError, match="seq=2"):
        list(changes.Changes(r))
    out = tmp_path / "o.img"
    increment.apply(base, cap, out)
    data = out.read_bytes()
    assert data[8 * 512:9 * 512] == b"R" * 512 and data == _reference(cap, 64)
    rep = tmp_path / "rep.img"
    rep.write_bytes(bytes(64 * 512))
    increment.replay(cap, rep)
    assert rep.read_bytes() == data


@pytest.mark.parametrize("seed", range(3))
def test_exports_out_of_the_heap_are_the_sorted_ones(tmp_path: Path, seed: int) -> None:
    """blktrace and log-writes, released from the heap as the capture is read,
    are byte for byte what sorting every event first writes."""
    cap = tmp_path / "r.cap"
    _random_capture(cap, seed, 400)
    for fmt in ("blktrace", "log-writes"):
        outs = []
        for exact in (False, True):
            buf = io.BytesIO()
            with CaptureReader(cap) as r:
                if fmt == "blktrace":
                    export.blktrace(r.items(), buf, (253, 0), exact=exact)
                else:
                    export.log_writes(r, buf, exact=exact)
            outs.append(buf.getvalue())
        assert outs[0] == outs[1] and len(outs[0]) > 400 * 48, fmt


# -- crashcheck's listing ----------------------------------------------------------

def _model(cap: Path) -> list[tuple[str, int, list[int], list[int]]]:
    """The old, quadratic listing, as docs/crashcheck.md states the model:
    (kind, seq, completed seqs, unflushed seqs) per boundary."""
    with CaptureReader(cap) as r:
        recs = list(r.records())
    events = sorted(recs, key=lambda x: (x.complete_ns if isinstance(x, BioRecord)
                                         else x.time_ns, x.seq))
    completed: list[BioRecord] = []
    durable: set[int] = set()
    flush_submits: list[int] = []
    out = []

    def boundary(kind: str, seq: int) -> None:
        horizon = max(flush_submits, default=-1)
        for w in completed:
            if w.complete_ns <= horizon:
                durable.add(w.seq)
        out.append((kind, seq, [w.seq for w in completed],
                    [w.seq for w in completed if w.seq not in durable]))

    for ev in events:
        if not isinstance(ev, BioRecord):
            boundary("mark", ev.seq)
            continue
        if ev.status != 0:
            continue
        is_flush = ev.op_name == "flush" or bool(ev.flags & BIT["preflush"])
        if is_flush:
            flush_submits.append(ev.submit_ns)
        if ev.op_name in changes.CHANGING_OPS:
            completed.append(ev)
            if ev.op_name == "write" and ev.flags & BIT["fua"]:
                durable.add(ev.seq)
                boundary("fua", ev.seq)
                continue
        if is_flush:
            boundary("flush", ev.seq)
    return out


def _image_of(cap: Path, writes: list[changes.Change]) -> dict[int, bytes]:
    """Sector -> bytes of every sector the writes touched, applied in order."""
    img: dict[int, bytes] = {}
    fd = os.open(cap, os.O_RDONLY)
    try:
        for w in writes:
            data = os.pread(fd, w.size, w.data_at) if w.op_name == "write" else bytes(w.size)
            for i in range(w.size // 512):
                img[w.sector + i] = data[i * 512:(i + 1) * 512]
    finally:
        os.close(fd)
    return img


def _crash_capture(path: Path, seed: int) -> None:
    """Writes over a few sectors (so states coincide), some FUA, some with
    the same bytes as before, flushes with and without data, marks, discards;
    overlapping in flight."""
    rng = random.Random(seed)
    recs = []
    t = 0
    for i in range(60):
        t += rng.randrange(1, 50)
        done = t + rng.randrange(0, 120)
        r = rng.random()
        sector = rng.randrange(0, 24, 2)
        if r < 0.55:
            flags = BIT["fua"] if rng.random() < 0.15 else 0
            payload = bytes([rng.randrange(3)]) * (512 * rng.choice((1, 2, 4)))
            recs.append(streams.bio(i, sector=sector, op=W, payload=payload, flags=flags,
                                    submit_ns=t, complete_ns=done))
        elif r < 0.65:
            recs.append(streams.bio(i, sector=sector, op=DISCARD, size=1024, submit_ns=t,
                                    complete_ns=done))
        elif r < 0.85:
            recs.append(streams.bio(i, op=FLUSH, flags=BIT["preflush"], submit_ns=t,
                                    complete_ns=done))
        elif r < 0.92:
            recs.append(streams.bio(i, sector=sector, op=W, payload=b"\1" * 512,
                                    flags=BIT["preflush"] | BIT["fua"], submit_ns=t,
                                    complete_ns=done))
        else:
            recs.append(streams.mark(i, f"m{i}", time_ns=t))
    _write_capture(path, 32, recs, per_chunk=7)


@pytest.mark.parametrize("seed", range(8))
def test_the_listing_is_the_model_s_and_keys_are_content(tmp_path: Path, seed: int) -> None:
    cap = tmp_path / "c.cap"
    _crash_capture(cap, seed)
    bounds, _ = crash.load(cap)
    assert [(b.kind, b.seq, [w.seq for w in b.completed], [w.seq for w in b.unflushed])
            for b in bounds] == _model(cap)
    every = list(crash.states(bounds, exhaustive=3))
    images = [_image_of(cap, s.writes()) for s in every]
    keys = [s.key() for s in every]
    groups_by_bytes: dict[tuple[tuple[int, bytes], ...], set[int]] = {}
    for i, img in enumerate(images):
        groups_by_bytes.setdefault(tuple(sorted(img.items())), set()).add(i)
    groups_by_key: dict[int, set[int]] = {}
    for i, k in enumerate(keys):
        groups_by_key.setdefault(k, set()).add(i)
    assert sorted(map(sorted, groups_by_bytes.values())) == \
        sorted(map(sorted, groups_by_key.values()))
    assert len(groups_by_bytes) < len(every)  # the captures do make equal states


def _fsync_records(n: int) -> Iterator[bytes]:
    """n 4 KiB writes, each followed by a flush (what fsync sends), and a mark
    every 1,000."""
    seq = 0
    for i in range(n):
        t = i * 1000
        yield streams.bio(seq, sector=(i % 50_000) * 8, op=W,
                          payload=i.to_bytes(8, "little") * 512, submit_ns=t,
                          complete_ns=t + 100)
        yield streams.bio(seq + 1, op=FLUSH, flags=BIT["preflush"], submit_ns=t + 200,
                          complete_ns=t + 300)
        seq += 2
        if i % 1000 == 999:
            yield streams.mark(seq, f"k{i}", time_ns=t + 400)
            seq += 1


def test_a_100000_write_fsync_capture_lists_exactly(tmp_path: Path) -> None:
    """100,000 fsynced writes over 50,000 blocks (each block written twice),
    100 marks: 100,100 boundaries, each with nothing unflushed (the flush after
    each write made it durable), so one state each; a mark repeats the flush
    before it, so 100,000 distinct. The old listing took 87 s for 4,000."""
    cap = tmp_path / "f.cap"
    _write_capture(cap, 50_000 * 8, list(_fsync_records(100_000)), per_chunk=512)
    bounds, _ = crash.load(cap)
    assert len(bounds) == 100_100
    assert sum(b.kind == "mark" for b in bounds) == 100
    assert all(not b.unflushed for b in bounds)
    assert bounds[-1].upto == 100_000
    todo, enumerated, stopped = crash.unique_states(bounds, limit=None)
    assert (len(todo), enumerated, stopped) == (100_000, 100_100, False)
    last = crash.find(bounds, f"{len(bounds) - 1}:all")
    img = _image_of(cap, last.writes()[-3:])
    assert img[(99_999 % 50_000) * 8] == (99_999).to_bytes(8, "little") * 64
