"""Values that used to end in a traceback (exit 1) or be taken silently:
each now gives one line naming the problem, with the documented exit code,
or, where the value is fine after all, the right result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imgrement_dm import cli
from imgrement_dm.formats.capture import write_capture
from imgrement_dm.records import STREAM_MAGIC
from tests.host import streams

W, FLUSH, DISCARD = 1, 2, 3


@pytest.fixture
def cap(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "s.cap"
    with write_capture(path, "traced", 64) as w:
        w.add(streams.bio(0, sector=0, op=W, payload=b"A" * 4096, complete_ns=10))
        w.add(streams.bio(1, sector=8, op=W, payload=b"B" * 4096, complete_ns=11))
        w.add(streams.bio(2, sector=0, op=FLUSH, flags=2, complete_ns=12))
    yield path


def run(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(cli.main, [str(a) for a in args], catch_exceptions=True)


def _fails(r: Result, code: int, *words: str) -> None:
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_a_base_whose_name_is_not_utf8_makes_a_qcow2(cap: Path, tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/\xe9t\xe9.img"
    with open(raw, "wb") as f:
        f.truncate(64 * 512)
    out = tmp_path / "inc.qcow2"
    r = run("apply", cap, os.fsdecode(raw), "--format", "qcow2", "-o", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert raw in out.read_bytes()[:65536]  # the backing name, byte for byte


def test_a_backing_name_longer_than_qcow2_allows(cap: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(64 * 512))
    out = tmp_path / "inc.qcow2"
    _fails(run("apply", cap, base, "--format", "qcow2", "--backing", "b" * 70000, "-o", out),
           11, "backing file name is 70000 bytes")
    assert not out.exists()


@pytest.mark.parametrize("state", ["0:abc", "0:1,,2", "0:-1"])
def test_a_malformed_state_id(cap: Path, tmp_path: Path, state: str) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(64 * 512))
    _fails(run("apply", cap, base, "--state", state, "-o", tmp_path / "x.img"), 11,
           "is not a state id")


@pytest.mark.parametrize("device", ["4096:0", "1:1048576"])
def test_a_device_number_linux_cannot_have(cap: Path, tmp_path: Path, device: str) -> None:
    _fails(run("export", cap, "--format", "blktrace", "--device", device, "-o",
               tmp_path / "t"), 2, "major below 4096")
    assert not list(tmp_path.glob("t*"))


@pytest.mark.parametrize("command", ["trace", "stats"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_duration_that_is_not_a_number_of_seconds(cap: Path, command: str,
                                                    value: str) -> None:
    _fails(run(command, "-f", cap, "-d", value), 2, "--duration")


def test_a_policy_that_is_not_utf8_or_is_a_folder(tmp_path: Path) -> None:
    bad = tmp_path / "autowrap.conf"
    bad.write_bytes(b"[match]\nID_MODEL = \xff\xfe\n")
    _fails(run("autowrap", "handle", "/dev/null", env={"IMGREMENT_AUTOWRAP_CONF": str(bad)}),
           12, "is not UTF-8 text")
    _fails(run("autowrap", "handle", "/dev/null",
               env={"IMGREMENT_AUTOWRAP_CONF": str(tmp_path)}), 12, "is a directory")
    junk = tmp_path / "junk.conf"
    junk.write_text("no section\n")
    r = run("autowrap", "handle", "/dev/null", env={"IMGREMENT_AUTOWRAP_CONF": str(junk)})
    _fails(r, 12, str(junk))
    assert "PosixPath" not in r.stderr


@pytest.fixture
def loop_base(tmp_path: Path) -> Iterator[str]:
    """A block device as BASE: a loop device over a 32 KiB image of "Z"s (the
    host kernel has loop built in; the suite runs as root)."""
    img = tmp_path / "dev.img"
    img.write_bytes(b"Z" * (64 * 512))
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_block_device_serves_as_base(cap: Path, tmp_path: Path, loop_base: str) -> None:
    """Its st_size is 0: it used to be refused as 'smaller than the traced
    device', and crashcheck's copy of it found no data in it."""
    want = bytearray(b"Z" * (64 * 512))
    want[0:4096] = b"A" * 4096
    want[4096:8192] = b"B" * 4096
    out = tmp_path / "applied.img"
    r = run("apply", cap, loop_base, "-o", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert out.read_bytes() == bytes(want)
    state = tmp_path / "state.img"
    r = run("apply", cap, loop_base, "--state", "0:all", "-o", state)
    assert r.exit_code == 0, (r.output, r.exception)
    assert state.read_bytes() == bytes(want)
    r = run("crashcheck", cap, loop_base, "--", "true")
    assert r.exit_code == 0, (r.output, r.exception)


def test_a_capture_with_no_boundary_has_nothing_to_check(tmp_path: Path) -> None:
    cap = tmp_path / "plain.cap"
    with write_capture(cap, "traced", 64) as w:
        w.add(streams.bio(0, sector=0, op=W, payload=b"A" * 4096, complete_ns=10))
    base = tmp_path / "base.img"
    base.write_bytes(bytes(64 * 512))
    _fails(run("crashcheck", cap, base, "--", "true"), 11, "nothing to check")


def test_max_states_equal_to_the_states_is_not_said_to_stop(cap: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(64 * 512))
    r = run("crashcheck", cap, base, "--max-states", "1000", "--", "true")
    assert r.exit_code == 0, r.output
    n = int(r.stderr.split(" states enumerated, ")[1].split()[0])
    r = run("crashcheck", cap, base, "--max-states", n, "--", "true")
    assert r.exit_code == 0 and "stopped" not in r.stderr, r.stderr
    if n > 1:
        r = run("crashcheck", cap, base, "--max-states", n - 1, "--", "true")
        assert "stopped at --max-states" in r.stderr, r.stderr


def test_a_saved_stream_through_a_pipe_is_read_once(tmp_path: Path) -> None:
    saved = tmp_path / "s.rec"
    saved.write_bytes(STREAM_MAGIC + streams.bio(0, sector=8, op=W, complete_ns=5))
    r = subprocess.run(["bash", "-c", f'"$0" -m imgrement_dm.cli trace -f <(cat {saved}) --json',
                        sys.executable], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["sector"] == 8


def test_a_truncated_capture_names_no_option_that_does_not_exist(cap: Path,
                                                                 tmp_path: Path) -> None:
    cut = tmp_path / "cut.cap"
    cut.write_bytes(cap.read_bytes()[:-40])
    r = run("export", cut, "--format", "jsonl", "-o", tmp_path / "x.jsonl")
    _fails(r, 9, "record again")
    assert "--force" not in r.stderr


def test_apply_takes_the_capture_first_and_the_old_order_with_a_warning(
        cap: Path, tmp_path: Path) -> None:
    """FILE BASE, as crashcheck, replay and export take theirs; BASE FILE still
    works this release, told apart by the capture's magic, with a warning."""
    base = tmp_path / "base.img"
    base.write_bytes(bytes(64 * 512))
    new, old = tmp_path / "new.img", tmp_path / "old.img"
    r = run("apply", cap, base, "-o", new)
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    r = run("apply", base, cap, "-o", old)
    assert r.exit_code == 0, r.output
    assert "'apply BASE FILE' is the old order" in r.stderr
    assert new.read_bytes() == old.read_bytes() and new.read_bytes()[:4096] == b"A" * 4096


def test_discards_punch_holes_and_holes_stay_holes(tmp_path: Path) -> None:
    """A sparse 64 MiB base whose first 8 MiB hold data; a capture that
    discards them and writes 4 KiB at 16 MiB.  The applied image is sparse:
    the discarded range and the base's holes read as zeros and are holes
    (it used to be a full copy, every discard written as zeros)."""
    base = tmp_path / "base.img"
    with base.open("wb") as f:
        f.write(b"\xaa" * (8 << 20))
        f.truncate(64 << 20)
    cap = tmp_path / "d.cap"
    with write_capture(cap, "traced", (64 << 20) // 512) as w:
        w.add(streams.bio(0, sector=0, op=DISCARD, size=8 << 20, complete_ns=10)
              + streams.bio(1, sector=(16 << 20) // 512, op=W, payload=b"W" * 4096,
                            complete_ns=11))
    out = tmp_path / "out.img"
    r = run("apply", cap, base, "-o", out)
    assert r.exit_code == 0, (r.output, r.exception)
    with out.open("rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 16 << 20  # a hole up to the write
        assert os.lseek(f.fileno(), 16 << 20, os.SEEK_HOLE) <= (16 << 20) + (64 << 10)
        f.seek(0)
        assert f.read(8 << 20) == bytes(8 << 20)
    assert out.stat().st_blocks * 512 <= 1 << 20, out.stat().st_blocks
    assert out.stat().st_size == 64 << 20
