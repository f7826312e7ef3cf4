"""What -o names decides how it is written (output.py): an input is never
the output, a device node or a symlink to one is never replaced by a
regular file, a user's FILE.part is never taken, new outputs are the owner's
alone, and trace shows a command name with escapes as text, not as a
terminal sequence.  Each ran through the CLI (click's runner)."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imgrement_dm import cli
from imgrement_dm.formats.capture import write_capture
from imgrement_dm.output import atomic_output
from imgrement_dm.records import STREAM_MAGIC
from tests.host import streams

W = 1
DATA = b"D" * 4096


@pytest.fixture
def cap(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "k.cap"
    with write_capture(path, "traced", 64) as w:
        w.add(streams.bio(0, sector=0, op=W, payload=DATA, complete_ns=10))
        w.add(streams.bio(1, sector=8, op=2, flags=2, complete_ns=11))
    yield path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(64 * 512))
    return path


def run(*args: object) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=True)


def _refused(r: Result, *words: str) -> None:
    assert r.exit_code == 13, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def _commands(cap: Path, base: Path, out: Path) -> list[list[object]]:
    return [
        ["apply", cap, base, "-o", out],
        ["apply", cap, base, "--format", "qcow2", "-o", out],
        ["export", cap, "--format", "jsonl", "-o", out],
        ["export", cap, "--format", "log-writes", "-o", out],
        ["plot", cap, "-o", out],
    ]


@pytest.mark.parametrize("which", range(5))
def test_an_output_that_is_the_capture_is_refused(cap: Path, base: Path, which: int) -> None:
    before = cap.read_bytes()
    if which == 4:
        pytest.importorskip("matplotlib")
    _refused(run(*_commands(cap, base, cap)[which]), "an input of this command")
    assert cap.read_bytes() == before


def test_an_output_that_is_the_base_through_a_link_is_refused(cap: Path, base: Path,
                                                               tmp_path: Path) -> None:
    link = tmp_path / "link.img"
    link.symlink_to(base)
    hard = tmp_path / "hard.img"
    os.link(base, hard)
    for out in (base, link, hard):
        _refused(run("apply", cap, base, "-o", out), "an input of this command")
    assert base.read_bytes() == bytes(64 * 512)


def test_a_block_device_is_refused_and_replay_named(cap: Path, base: Path,
                                                    tmp_path: Path) -> None:
    dev = tmp_path / "blk"
    os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(7, 200))
    _refused(run("apply", cap, base, "-o", dev), "is a block device", "replay")
    assert stat.S_ISBLK(os.lstat(dev).st_mode)


def test_a_character_device_or_fifo_is_a_stream_where_the_command_streams(
        cap: Path, base: Path, tmp_path: Path) -> None:
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    r = run("export", cap, "--format", "jsonl", "-o", null)
    assert r.exit_code == 0, r.output
    assert stat.S_ISCHR(os.lstat(null).st_mode), "the node was replaced by a file"
    # a file that must be seekable: refused, the node kept
    _refused(run("apply", cap, base, "-o", null), "character device")
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    t.start()
    r = run("export", cap, "--format", "jsonl", "-o", fifo)
    t.join(timeout=30)
    assert r.exit_code == 0, r.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    lines = [json.loads(line) for line in got[0].decode().splitlines()]
    assert [x["seq"] for x in lines] == [0, 1]


def test_dash_is_standard_output(cap: Path) -> None:
    r = run("export", cap, "--format", "jsonl", "-o", "-")
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == [0, 1]
    assert "2 entries" in r.stderr and not Path("-").exists()


def test_a_symlink_is_followed_only_to_a_regular_file(cap: Path, tmp_path: Path) -> None:
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert run("export", cap, "--format", "jsonl", "-o", link).exit_code == 0
    assert link.is_symlink() and len(target.read_text().splitlines()) == 2
    dev = tmp_path / "dev-link"
    dev.symlink_to("/dev/null")
    _refused(run("export", cap, "--format", "log-writes", "-o", dev), "not a regular file")
    assert dev.is_symlink()


def test_a_users_part_file_is_not_taken(cap: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "res.img"
    notes = tmp_path / "res.img.part"
    notes.write_text("notes\n")
    assert run("apply", cap, base, "-o", out).exit_code == 0
    assert notes.read_text() == "notes\n"
    assert out.read_bytes()[:4096] == DATA
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == ["res.img.part"]


def test_two_writers_of_one_output_do_not_collide(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    with atomic_output(out) as a, atomic_output(out) as b:
        a.write(b"a")
        b.write(b"b")
    assert out.read_bytes() in (b"a", b"b")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_new_outputs_are_the_owners_alone_and_replaced_ones_keep_their_mode(
        cap: Path, base: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "new.img"
        assert run("apply", cap, base, "-o", out).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        shared = tmp_path / "shared.jsonl"
        shared.write_text("x")
        shared.chmod(0o644)
        assert run("export", cap, "--format", "jsonl", "-o", shared).exit_code == 0
        assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_trace_escapes_control_characters_in_a_command_name(tmp_path: Path) -> None:
    evil = b"\x1b]0;owned\x07x"
    saved = tmp_path / "s.rec"
    saved.write_bytes(STREAM_MAGIC + streams.bio(0, sector=0, op=W, comm=evil, complete_ns=5))
    r = run("trace", "-f", saved)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "\\x1b]0;owned\\x07x" in r.stdout
    r = run("trace", "-f", saved, "--json")
    assert json.loads(r.stdout.splitlines()[0])["comm"] == evil.decode()
