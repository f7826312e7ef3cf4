"""crashcheck's acknowledgement oracle, on a capture whose answer is known.

Records, in completion order: write A (sector 0), a flush, mark ``ack:a``,
write B (sector 8, never flushed before it is acknowledged), mark ``ack:b``,
a flush, mark ``note``.  The application acknowledged b before B was
durable: the one state that drops B at ``ack:b`` lost acknowledged data,
and no other state does.  The guest suite proves the same with SQLite.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgrement_dm import api, cli, layout, markfifo
from imgrement_dm import crashcheck as crash
from imgrement_dm.errors import ImgrementError, OutputError
from imgrement_dm.formats.capture import write_capture
from tests.host import streams

OP = {name: code for code, name in layout.OPS.items()}
BIT = {name: bit for bit, name in layout.FLAGS.items()}
SECTORS = 64
#: Where each label's data is, and the byte it holds.
WHERE = {"a": (0, 1), "b": (8, 2)}


def _w(seq: int, sector: int, fill: int, submit: int, complete: int) -> bytes:
    return streams.bio(seq, sector=sector, op=OP["write"], payload=bytes([fill]) * 512,
                       submit_ns=submit, complete_ns=complete)


def _flush(seq: int, submit: int, complete: int) -> bytes:
    return streams.bio(seq, op=OP["flush"], flags=BIT["preflush"], submit_ns=submit,
                       complete_ns=complete)


RECORDS = [
    _w(0, 0, 1, 1, 10),
    _flush(1, 11, 12),
    streams.mark(2, "ack:a", time_ns=13),
    _w(3, 8, 2, 14, 20),
    streams.mark(4, "ack:b", time_ns=21),
    _flush(5, 22, 23),
    streams.mark(6, "note", time_ns=24),
]

#: A command check in the documented protocol: labels in $IMGREMENT_ACKED,
#: the missing ones written to $IMGREMENT_LOST.
SHELL_CHECK = r"""
img=$1
while read -r label; do
    case $label in a) off=0 want=1 ;; b) off=4096 want=2 ;; esac
    got=$(od -An -tu1 -j "$off" -N1 "$img" | tr -d ' ')
    [ "$got" = "$want" ] || echo "$label" >> "$IMGREMENT_LOST"
done < "$IMGREMENT_ACKED"
echo "last=$IMGREMENT_LAST_ACK"
"""


def _capture(path: Path, records: list[bytes]) -> Path:
    with write_capture(path, "traced", SECTORS) as w:
        for raw in records:
            w.add(raw)
    return path


@pytest.fixture
def cap(tmp_path: Path) -> Path:
    return _capture(tmp_path / "s.cap", RECORDS)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(SECTORS * 512))
    return path


def _holds(img: Path, state: crash.State) -> bool:
    data = img.read_bytes()
    lost = [a for a in state.acked if data[WHERE[a][0] * 512] != WHERE[a][1]]
    if lost:
        raise crash.LostAcknowledged(lost)
    return True


def test_what_each_boundary_must_hold(cap: Path) -> None:
    bounds, _ = crash.load(cap)
    assert [(b.kind, b.label) for b in bounds] == [
        ("flush", ""), ("mark", "ack:a"), ("mark", "ack:b"), ("flush", ""), ("mark", "note")]
    assert [b.acked for b in bounds] == [[], ["a"], ["a", "b"], ["a", "b"], ["a", "b"]]
    assert [[w.seq for w in b.unflushed] for b in bounds] == [[], [], [3], [], []]


def test_the_one_state_that_lost_acknowledged_data(cap: Path, base: Path,
                                                   tmp_path: Path) -> None:
    bounds, size = crash.load(cap)
    summary = crash.check_capture(bounds, base, size, _holds, workdir=tmp_path / "w")
    # ack:a's state has the same bytes as the first flush's but must hold a:
    # checked, not folded into it; ack:b's "all" is the flush after it (same
    # bytes, same acks), and "note" adds no ack: both folded
    assert [r.state.id for r in summary.results] == ["0:all", "1:all", "2:all", "2:none"]
    assert [(r.state.id, r.lost, r.verdict) for r in summary.failed] == [
        ("2:none", ("b",), crash.LOST)]
    assert summary.lost == summary.failed and summary.acks == 2
    text = summary.describe()
    assert "5 boundaries, 2 acknowledgements" in text
    assert "4 checked, 1 failed (1 lost acknowledged data)" in text
    assert "states/min" in text
    assert not list((tmp_path / "w").iterdir())


def test_a_command_check_reads_acked_and_names_what_is_lost(cap: Path, base: Path,
                                                            tmp_path: Path) -> None:
    script = tmp_path / "check.sh"
    script.write_text(SHELL_CHECK)
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--json", "-j", "2",
                                      "--workdir", str(tmp_path / "w"), "--",
                                      "sh", str(script), "{}"])
    assert r.exit_code == 1, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(x["state"], x["verdict"], x["acked"], x["last_ack"], x["lost"]) for x in rows] == [
        ("0:all", "passed", 0, None, []),
        ("1:all", "passed", 1, "a", []),
        ("2:all", "passed", 2, "b", []),
        ("2:none", crash.LOST, 2, "b", ["b"]),
    ]
    assert [x["output"] for x in rows] == ["last=", "last=a", "last=b", "last=b"]
    assert "1 lost acknowledged data" in r.stderr
    # the per-state files went with the images
    assert not list((tmp_path / "w").iterdir())

    plain = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "-j", "1",
                                          "--", "sh", str(script), "{}"])
    assert plain.exit_code == 1
    assert ("LOST state 2:none: after mark 'ack:b' (record 4), 0 of 1 unflushed write(s) "
            "kept: 1 of 2 acknowledged missing: b") in plain.stdout


def test_without_acks_the_states_are_as_before(tmp_path: Path, base: Path) -> None:
    """Marks that are not acks change nothing: states are folded by bytes
    alone (2:none holds what 0:all holds; with acks it must hold more, and
    is checked)."""
    plain = [r.replace(b"ack:", b"xyz:") for r in RECORDS]
    cap = _capture(tmp_path / "plain.cap", plain)
    bounds, _ = crash.load(cap)
    assert all(b.acked == [] for b in bounds)
    ids = [s.id for s in crash.unique_states(bounds).states]
    assert ids == ["0:all", "2:all"]


def _many(path: Path, n: int) -> Path:
    """n rounds of a flush submitted before three writes complete, so each
    flush leaves them unflushed: up to 8 states a round."""
    recs, seq, t = [], 0, 1
    for i in range(n):
        for k in range(3):
            recs.append(_w(seq, (i * 3 + k) % SECTORS, i + 1, t + 1 + k, t + 2 + k))
            seq += 1
        recs.append(_flush(seq, t, t + 6))
        seq, t = seq + 1, t + 10
    return _capture(path, recs)


def test_a_sample_is_reproducible(tmp_path: Path, base: Path) -> None:
    cap = _many(tmp_path / "many.cap", 10)
    every = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--json",
                                          "--", "true"])
    all_ids = [json.loads(x)["state"] for x in every.stdout.splitlines()]
    assert every.exit_code == 0 and len(all_ids) > 20

    def sample(seed: int) -> tuple[list[str], str]:
        r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--json",
                                          "--sample", "7", "--seed", str(seed), "--max-states",
                                          "3", "--", "true"])
        assert r.exit_code == 0, r.output
        return [json.loads(x)["state"] for x in r.stdout.splitlines()], r.stderr

    first, text = sample(7)
    again, _ = sample(7)
    other, _ = sample(8)
    assert first == again and len(first) == 7 and len(set(first)) == 7
    assert set(first) <= set(all_ids)
    assert first == [i for i in all_ids if i in first]  # in the states' own order
    assert other != first
    assert f"a sample of 7 of {len(all_ids)} distinct (seed 7)" in text
    assert "--max-states" not in text  # the sample drew from every state


def test_bad_combinations_are_refused(cap: Path, base: Path) -> None:
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base)])
    assert r.exit_code == 2 and "give a CHECK command after --, or --fsck" in r.output
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--fsck", "--",
                                      "true"])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--fsck",
                                      "--timeout", "5"])
    assert r.exit_code == 2 and "cannot be cut short" in r.output


def test_the_fifo_turns_lines_into_marks(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines from writers that come and go, partial lines, empty lines; the
    FIFO is gone afterwards. (The guest suite makes them marks in a real
    stream; here api.mark is the recorder's only dependency, replaced.)"""
    made: list[str] = []
    def mark(name: str, label: str) -> int:
        made.append(label)
        return 1

    monkeypatch.setattr(api, "mark", mark)
    path = tmp_path / "acks"
    with markfifo.mark_fifo("traced", path) as fifo:
        assert fifo is not None and stat.S_ISFIFO(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for i in range(50):
            with path.open("w") as w:  # a writer per line, as `echo ack:N > FIFO`
                w.write(f"ack:{i}\n")
        with path.open("w") as w:
            w.write("ack:split-")
            w.flush()
            time.sleep(0.3)
            w.write("line\n\n  \nack:last")
    assert not path.exists()
    assert made == [f"ack:{i}" for i in range(50)] + ["ack:split-line", "ack:last"]
    assert fifo.made == 52 and fifo.failed == 0


def test_the_fifo_refuses_a_path_that_exists(tmp_path: Path) -> None:
    path = tmp_path / "acks"
    path.write_text("mine")
    with pytest.raises(OutputError, match="exists"), markfifo.mark_fifo("traced", path):
        pass
    assert path.read_text() == "mine"


def test_a_fifo_that_cannot_be_opened_is_removed(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Made, then its second open refused (out of file descriptors): the
    error names the FIFO, the first descriptor is closed, nothing is left."""
    real_open = os.open
    opened: list[int] = []

    def fake_open(path: object, flags: int, *args: int) -> int:
        if Path(str(path)).name == "acks" and opened:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        fd = real_open(path, flags, *args)  # type: ignore[arg-type]
        opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", fake_open)
    path = tmp_path / "acks"
    with pytest.raises(OutputError, match=f"cannot open the FIFO {path}: Too many open"), \
            markfifo.mark_fifo("traced", path):
        pass
    assert not path.exists() and len(opened) == 1
    with pytest.raises(OSError):
        os.fstat(opened[0])


def test_a_mark_that_fails_is_reported_and_the_rest_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    def mark(name: str, label: str) -> int:
        if label == "bad":
            raise ImgrementError("a mark label needs 1 to 64 bytes")
        made.append(label)
        return 1

    monkeypatch.setattr(api, "mark", mark)
    warned: list[str] = []
    path = tmp_path / "acks"
    with markfifo.mark_fifo("traced", path, warned.append) as fifo, path.open("w") as w:
        w.write("one\nbad\ntwo\n")
    assert made == ["one", "two"] and fifo is not None and fifo.failed == 1
    assert warned == ["mark 'bad' not made: a mark label needs 1 to 64 bytes"]


def test_a_check_that_fails_otherwise_is_inconsistent(cap: Path, base: Path) -> None:
    """Lost acknowledged data is named apart: a check failing without naming
    labels leaves its state inconsistent, not lost."""
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--json", "--",
                                      "sh", "-c", 'test "$IMGREMENT_LAST_ACK" != b'])
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(x["state"], x["verdict"]) for x in rows] == [
        ("0:all", "passed"), ("1:all", "passed"), ("2:all", "inconsistent"),
        ("2:none", "inconsistent")]
    assert r.exit_code == 1 and "2 failed, " in r.stderr and "lost" not in r.stderr
