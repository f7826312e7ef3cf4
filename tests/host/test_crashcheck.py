"""crashcheck's enumeration, exactly as docs/crashcheck.md states it, on a small capture.

Eight records: two writes, a flush, two writes, a mark, a FUA write, a flush.
The guest suite runs crashcheck on captures made through the target
(tests/guest/test_crashcheck.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgrement_dm import cli, layout
from imgrement_dm import crashcheck as crash
from imgrement_dm.formats.capture import write_capture
from tests.host import streams

OP = {name: code for code, name in layout.OPS.items()}
BIT = {name: bit for bit, name in layout.FLAGS.items()}
W, FLUSH = OP["write"], OP["flush"]


def _w(seq: int, sector: int, fill: int, submit: int, complete: int, flags: int = 0) -> bytes:
    return streams.bio(seq, sector=sector, op=W, payload=bytes([fill]) * 512, flags=flags,
                       submit_ns=submit, complete_ns=complete)


RECORDS = [
    _w(0, 0, 1, 1, 10),
    _w(1, 8, 2, 2, 11),
    streams.bio(2, op=FLUSH, flags=BIT["preflush"], submit_ns=12, complete_ns=13),
    _w(3, 16, 3, 14, 20),
    _w(4, 24, 4, 15, 21),
    streams.mark(5, "m", time_ns=22),
    _w(6, 32, 5, 23, 30, flags=BIT["fua"]),
    streams.bio(7, op=FLUSH, flags=BIT["preflush"], submit_ns=31, complete_ns=32),
]
SECTORS = 64

#: Fails when write 4 (sector 24) is on the disk without write 3 (sector 16).
ORDER_CHECK = """
import sys
d = open(sys.argv[1], "rb").read()
sys.exit(1 if d[24 * 512] == 4 and d[16 * 512] != 3 else 0)
"""
#: Fails once the FUA write (sector 32) is there.
FUA_CHECK = "import sys; sys.exit(open(sys.argv[1], 'rb').read()[32 * 512] == 5)"


@pytest.fixture
def cap(tmp_path: Path) -> Path:
    path = tmp_path / "s.cap"
    with write_capture(path, "traced", SECTORS) as w:
        for raw in RECORDS:
            w.add(raw)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(SECTORS * 512))
    return path


def test_boundaries_and_what_each_leaves(cap: Path) -> None:
    bounds, size = crash.load(cap)
    assert size == SECTORS * 512
    assert [(b.kind, b.seq) for b in bounds] == [("flush", 2), ("mark", 5), ("fua", 6),
                                                  ("flush", 7)]
    assert [[w.seq for w in b.completed] for b in bounds] == [
        [0, 1], [0, 1, 3, 4], [0, 1, 3, 4, 6], [0, 1, 3, 4, 6]]
    # the FUA write is durable at once; writes 3 and 4 only once the last flush is done
    assert [[w.seq for w in b.unflushed] for b in bounds] == [[], [3, 4], [3, 4], []]


@pytest.mark.parametrize("exhaustive,enumerated", [(6, 10), (1, 14)])
def test_the_state_count_is_what_the_rules_say(cap: Path, exhaustive: int,
                                               enumerated: int) -> None:
    """exhaustive >= 2: 1 + (1 + 3) + (1 + 3) + 1 = 10 (all, then none, {3}, {4});
    exhaustive 1: 1 + (1 + 5) + (1 + 5) + 1 = 14 (all, none, each alone, all but each).
    Either way 8 distinct: 1:none is 0:all's content, 3:all is 2:all's."""
    bounds, _ = crash.load(cap)
    todo, n, stopped = crash.unique_states(bounds, exhaustive=exhaustive)
    assert n == enumerated and not stopped
    assert [s.id for s in todo] == ["0:all", "1:all", "1:3", "1:4", "2:all", "2:none",
                                    "2:3", "2:4"]
    limited, _, stopped = crash.unique_states(bounds, exhaustive=exhaustive, limit=3)
    assert [s.id for s in limited] == ["0:all", "1:all", "1:3"] and stopped
    # exactly as many as the limit: all of them, and nothing left out
    exact, _, stopped = crash.unique_states(bounds, exhaustive=exhaustive, limit=8)
    assert [s.id for s in exact] == [s.id for s in todo] and not stopped


def test_crashcheck_names_exactly_the_failing_states(cap: Path, base: Path,
                                                     tmp_path: Path) -> None:
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--json", "-j", "2",
                                      "--workdir", str(tmp_path / "wd"), "--",
                                      sys.executable, "-c", ORDER_CHECK, "{}"])
    assert r.exit_code == 1, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [(x["state"], x["passed"]) for x in lines] == [
        ("0:all", True), ("1:all", True), ("1:3", True), ("1:4", False), ("2:all", True),
        ("2:none", True), ("2:3", True), ("2:4", False)]
    assert lines[3]["kind"] == "mark" and lines[3]["kept"] == [4]
    assert ("4 boundaries, 10 states enumerated, 8 distinct to check: 8 checked, "
            "2 failed") in r.stderr
    assert not list((tmp_path / "wd").iterdir())  # nothing left without --keep-failing


def test_apply_state_rebuilds_a_failing_state_alone(cap: Path, base: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "state.img"
    r = CliRunner().invoke(cli.main, ["apply", str(cap), str(base), "--state", "2:4",
                                      "-o", str(out)])
    assert r.exit_code == 0, r.output
    want = bytearray(SECTORS * 512)
    for sector, fill in ((0, 1), (8, 2), (24, 4), (32, 5)):  # not write 3
        want[sector * 512:(sector + 1) * 512] = bytes([fill]) * 512
    assert out.read_bytes() == bytes(want)
    for bad, why in (("9:all", "there is no boundary 9"), ("0:3", "not among boundary 0"),
                     ("x", "is not a state id")):
        r = CliRunner().invoke(cli.main, ["apply", str(cap), str(base), "--state", bad,
                                          "-o", str(tmp_path / "no.img")])
        assert r.exit_code == 11 and why in r.output, r.output
        assert not (tmp_path / "no.img").exists()


def test_bisect_finds_the_first_failing_boundary(cap: Path, base: Path) -> None:
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--bisect", "--",
                                      sys.executable, "-c", FUA_CHECK, "{}"])
    assert r.exit_code == 1, r.output
    assert "first failing boundary: 2 after FUA write (record 6) (state 2:all)" in r.stderr


def test_a_capture_with_drops_is_refused(tmp_path: Path, base: Path) -> None:
    gap = tmp_path / "gap.cap"
    with write_capture(gap, "traced", SECTORS) as w:
        w.add(RECORDS[0])
        w.add(_w(5, 0, 9, 40, 41))
    r = CliRunner().invoke(cli.main, ["crashcheck", str(gap), str(base), "--", "true"])
    assert r.exit_code == 11 and "lost 4 record(s)" in r.output, r.output


def test_clone_is_sparse_and_works_across_file_systems(tmp_path: Path) -> None:
    """Seen failing in the guest: BASE in /tmp and states in /var/tmp are on two file
    systems, where copy_file_range says EXDEV; the copy must fall back, not fail."""
    shm = Path("/dev/shm") / f"imgrement-test-{os.getpid()}.img"
    try:
        with shm.open("wb") as f:
            f.truncate(8 << 20)
            f.seek(3 << 20)
            f.write(b"data" * 1024)
        for dest in (tmp_path / "across.img", Path("/dev/shm") / f"{shm.name}.same"):
            try:
                crash.clone(shm, dest)
                assert dest.read_bytes() == shm.read_bytes()
                assert dest.stat().st_blocks * 512 < 1 << 20  # holes stayed holes
            finally:
                dest.unlink(missing_ok=True)
    finally:
        shm.unlink(missing_ok=True)
