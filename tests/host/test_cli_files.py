"""The file commands through the CLI itself (click's runner, no kernel):
good input gives exact output; bad input gives one error line, the
documented exit code, and leaves every file as it was, with no .part."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imgrement_dm import cli
from imgrement_dm.formats import export as export_fmt
from imgrement_dm.formats.capture import write_capture
from imgrement_dm.records import STREAM_MAGIC
from tests.host import streams

W, R, FLUSH = 1, 0, 2
A, B = b"A" * 4096, b"B" * 1024
PRECIOUS = b"precious\n"


def _records() -> list[bytes]:
    return [
        streams.bio(0, sector=0, op=W, payload=A, complete_ns=10)
        + streams.bio(1, sector=8, op=R, segments=[(4096, 0, 8)], complete_ns=11),
        streams.mark(2, "one", time_ns=12) + streams.bio(3, sector=2, op=W, payload=B,
                                                         complete_ns=14),
        streams.bio(4, sector=0, op=FLUSH, flags=2, complete_ns=15),
    ]


@pytest.fixture
def files(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A good capture, the same records as a saved stream, one with a drop, a base
    image, a foreign file, and a file the user cares about."""
    cap = tmp_path / "s.cap"
    with write_capture(cap, "traced", 2048) as w:
        for raw in _records():
            w.add(raw)
    gap = tmp_path / "gap.cap"
    with write_capture(gap, "traced", 2048) as w:
        w.add(streams.bio(0, sector=0, op=W, payload=A))
        w.add(streams.bio(5, sector=100, op=W, payload=A))
    stream = tmp_path / "s.rec"
    stream.write_bytes(STREAM_MAGIC + b"".join(_records()))
    base = tmp_path / "base.img"
    base.write_bytes(bytes(2048 * 512))
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("hello\n")
    old = tmp_path / "old.rec"
    old.write_bytes(PRECIOUS)
    yield {"cap": cap, "gap": gap, "stream": stream, "base": base, "foreign": foreign,
           "old": old, "dir": tmp_path}


def run(*args: object) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=True)


def _fails(r: Result, code: int, *words: str) -> str:
    """The one error line of a failed command, after checking it."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    err = r.stderr.strip()
    assert "Traceback" not in r.output
    lines = err.splitlines()
    assert lines, "no error message"
    text = lines[-1]
    assert text.startswith(("imgrement-dm: error: ", "Error: ")), err
    for w in words:
        assert w in err, (w, err)
    return err


def _untouched(old: Path) -> None:
    assert old.read_bytes() == PRECIOUS
    assert not old.with_name(old.name + ".part").exists()


def _no_parts(d: Path) -> None:
    assert not list(d.rglob("*.part"))


# -- output files are never damaged ---------------------------------------------------

def test_a_failed_trace_leaves_the_output_file_as_it_was(files: dict[str, Path]) -> None:
    r = run("trace", "nosuch", "-o", files["old"])
    assert r.exit_code not in (0, 2)
    _untouched(files["old"])
    r = run("trace", "nosuch", "-q", "-o", files["old"])
    assert r.exit_code not in (0, 2)
    _untouched(files["old"])
    _no_parts(files["dir"])


def test_trace_without_a_name_is_a_usage_error(files: dict[str, Path]) -> None:
    out = files["dir"] / "f.rec"
    _fails(run("trace", "-q", "-o", out), 2, "give a device NAME or --file FILE")
    assert not out.exists()
    _fails(run("trace", "x", "--file", files["cap"]), 2, "give a device NAME or --file FILE")
    _fails(run("trace", "--file", files["cap"], "-o", files["old"]), 2,
           "is saved already")
    _untouched(files["old"])


@pytest.mark.parametrize("make", ["missing dir", "is a dir"])
def test_unwritable_outputs_are_refused_before_any_work(files: dict[str, Path],
                                                        make: str) -> None:
    d = files["dir"]
    missing = make == "missing dir"
    out, why = (d / "nowhere" / "x.out", "the directory does not exist") if missing else (
        d, "is a directory")
    for args in (["apply", files["cap"], files["base"], "-o", out],
                 ["export", files["cap"], "--format", "jsonl", "-o", out],
                 ["plot", files["cap"], "-o", out],
                 ["trace", "nosuch", "-o", out],
                 ["record", "nosuch", "-o", out]):
        # click refuses a directory for -o itself (a usage error), except for
        # export, whose -o may be a blktrace prefix
        code = 13 if missing or args[0] == "export" else 2
        err = _fails(run(*args), code, why)
        assert code == 2 or "cannot write" in err
    _no_parts(d)


def _as_user(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """The CLI run as an unprivileged user (nobody, when the tests run as root)."""
    prefix = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
              if os.geteuid() == 0 else [])
    proc = subprocess.run([*prefix, sys.executable, "-m", "imgrement_dm.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    return proc.returncode, proc.stderr


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="imgrement-cli-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_no_permission_to_write_the_output(files: dict[str, Path], open_dir: Path) -> None:
    ro = open_dir / "ro"
    ro.mkdir(mode=0o555)
    cap, base = shutil.copy(files["cap"], open_dir), shutil.copy(files["base"], open_dir)
    for f in (cap, base):
        os.chmod(f, 0o644)  # captures are made 0600: this one is shared on purpose
    code, err = _as_user("apply", str(cap), str(base), "-o", str(ro / "x.img"))
    assert code == 13, err
    assert err.startswith("imgrement-dm: error: cannot write")
    assert "permission denied" in err and "Traceback" not in err
    assert not list(ro.iterdir())


def test_enospc_while_writing_leaves_nothing(files: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def full(items: object, f: object, **kw: object) -> int:
        f.write(b"half of it")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_fmt, "jsonl", full)
    err = _fails(run("export", files["cap"], "--format", "jsonl", "-o", files["old"]), 13,
                 "no space left")
    assert f"{files['old']} was left as it was" in err
    _untouched(files["old"])


def test_apply_replaces_its_output_whole(files: dict[str, Path]) -> None:
    out = files["old"]
    r = run("apply", files["cap"], files["base"], "-o", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().endswith(f"{out}: 2 changes applied")
    img = out.read_bytes()
    assert len(img) == 2048 * 512
    assert img[:1024] == A[:1024] and img[1024:2048] == B and img[2048:4096] == A[2048:]
    assert img[4096:] == bytes(len(img) - 4096)
    _no_parts(files["dir"])


# -- one file family ------------------------------------------------------------------

def test_trace_and_stats_read_captures_and_saved_streams_alike(files: dict[str, Path]) -> None:
    outs = []
    for kind in ("cap", "stream"):
        r = run("trace", "--file", files[kind], "--json")
        assert r.exit_code == 0, r.output
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        assert [x["seq"] for x in lines] == [0, 1, 2, 3, 4]
        assert [(x.get("op"), x.get("sector")) for x in lines if "op" in x] == [
            ("write", 0), ("read", 8), ("write", 2), ("flush", 0)]
        stats = json.loads(run("stats", "--file", files[kind], "--json").stdout)
        outs.append((lines, stats))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("command", ["apply", "replay", "diff", "export", "plot"])
def test_capture_commands_name_the_kind_they_were_given(files: dict[str, Path],
                                                        command: str) -> None:
    def args(f: Path) -> list[object]:
        return {
            "apply": ["apply", f, files["base"], "-o", files["old"]],
            "replay": ["replay", f, files["old"]],
            "diff": ["diff", f],
            "export": ["export", f, "--format", "jsonl", "-o", files["old"]],
            "plot": ["plot", f, "-o", files["old"]],
        }[command]

    _fails(run(*args(files["stream"])), 9, "is a saved stream", f"'{command}' needs a capture")
    _fails(run(*args(files["foreign"])), 9, "not an imgrement file",
           "a capture file (from 'imgrement-dm record') or a saved stream")
    empty = files["dir"] / "empty"
    empty.write_bytes(b"")
    _fails(run(*args(empty)), 9, "is empty")
    short = files["dir"] / "short.cap"
    short.write_bytes(files["cap"].read_bytes()[:15])
    _fails(run(*args(short)), 9, "truncated: 15 bytes")
    _fails(run(*args(files["dir"] / "absent.cap")), 9, "cannot open",
           "No such file or directory")
    _untouched(files["old"])
    _no_parts(files["dir"])


def test_trace_and_stats_refuse_foreign_files(files: dict[str, Path]) -> None:
    for command in ("trace", "stats"):
        _fails(run(command, "--file", files["foreign"]), 9, "not an imgrement file")
        _fails(run(command, "--file", files["dir"]), 2)  # click: a directory


# -- diff and drops -------------------------------------------------------------------

def test_diff_refuses_a_capture_with_drops_unless_forced(files: dict[str, Path]) -> None:
    _fails(run("diff", files["gap"]), 11, "lost 4 record(s)", "would miss blocks", "--force")
    r = run("diff", files["gap"], "--force")
    assert r.exit_code == 0
    assert r.stdout.splitlines() == ["0+8", "100+8"]
    assert "lost 4 record(s): this map is incomplete" in r.stderr
    r = run("diff", files["cap"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == [[0, 8]] and not r.stderr


# -- replay onto an image --------------------------------------------------------------

def test_replay_onto_an_image(files: dict[str, Path]) -> None:
    img = files["dir"] / "t.img"
    shutil.copyfile(files["base"], img)
    r = run("replay", files["cap"], img, "--until-mark", "one")
    assert r.exit_code == 0, r.output
    assert img.read_bytes()[:4096] == A and img.stat().st_size == 2048 * 512


def test_replay_refuses_an_image_smaller_than_the_device(files: dict[str, Path]) -> None:
    small = files["dir"] / "small.img"
    small.write_bytes(bytes(4096))
    _fails(run("replay", files["cap"], small), 11, "4096 bytes, smaller than the traced device",
           "(1048576 bytes)")
    assert small.read_bytes() == bytes(4096)
    _fails(run("replay", files["cap"], files["dir"]), 11,
           "neither a disk image file nor a block device")


# -- export and plot --------------------------------------------------------------------

def test_export_each_format(files: dict[str, Path]) -> None:
    d = files["dir"]
    r = run("export", files["cap"], "--format", "jsonl", "-o", d / "x.jsonl")
    assert r.exit_code == 0 and r.stdout.strip() == f"{d / 'x.jsonl'}: 5 entries"
    assert len((d / "x.jsonl").read_text().splitlines()) == 5
    r = run("export", files["cap"], "--format", "log-writes", "-o", d / "x.lw")
    assert r.exit_code == 0, r.output
    r = run("export", files["cap"], "--format", "blktrace", "-o", d / "bt")
    assert r.exit_code == 0 and (d / "bt.blktrace.0").stat().st_size > 0
    assert r.stdout.strip() == (f"{d / 'bt.blktrace.0'}: 4 bios; read it with "
                                f"'blkparse -i {d / 'bt'}'")
    _fails(run("export", files["gap"], "--format", "log-writes", "-o", files["old"]), 11,
           "lost 4 record(s)", "must hold every write")
    _fails(run("export", files["cap"], "--format", "blktrace", "--device", "x", "-o",
               d / "bt2"), 2, "is not major:minor")
    _untouched(files["old"])
    _no_parts(d)


def test_plot_of_a_damaged_capture_leaves_no_png(files: dict[str, Path]) -> None:
    pytest.importorskip("matplotlib")
    bad = files["dir"] / "bad.cap"
    raw = files["cap"].read_bytes()
    bad.write_bytes(raw[:-10])
    _fails(run("plot", bad, "-o", files["old"]), 9, "truncated")
    _untouched(files["old"])
    r = run("plot", files["cap"], "-o", files["dir"] / "p.png")
    assert r.exit_code == 0 and (files["dir"] / "p.png").read_bytes()[:4] == b"\x89PNG"
    _no_parts(files["dir"])


def test_autowrap_enable_as_a_user_says_it_needs_root(open_dir: Path) -> None:
    rules = open_dir / "rules"
    rules.mkdir(mode=0o555)
    env = {**os.environ, "IMGREMENT_UDEV_RULES_DIR": str(rules),
           "IMGREMENT_SYSTEMD_DIR": str(open_dir / "units")}
    code, err = _as_user("autowrap", "enable", env=env)
    assert code == 3, err
    assert err.strip() == (f"imgrement-dm: error: installing the udev rule and unit needs "
                           f"root ({open_dir / 'units'}: permission denied): run it with sudo")
    assert not list(rules.iterdir())
