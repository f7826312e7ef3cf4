"""Progress of the long runs: apply (raw, qcow2), replay, export and
crashcheck say how far they are with ``--progress json`` (lines on stderr,
bytes of the capture read; crashcheck's states checked of how many), leave
stdout to the command's own output, and say nothing with ``none`` or when
stderr is not a terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from imgrement_dm import cli, layout, progress
from tests.host import streams
from tests.host.test_streaming import _write_capture

N = 2000  # fsynced writes: past progress.EVERY several times over
MIB = 1 << 20


OP = {name: code for code, name in layout.OPS.items()}
BIT = {name: bit for bit, name in layout.FLAGS.items()}


def _records(n: int) -> list[bytes]:
    """n 4 KiB writes, each followed by a flush, 10 ms apart: the reorder
    heap (a second of submit time) releases them as the capture is read."""
    out = []
    for i in range(n):
        t = i * 10_000_000
        out.append(streams.bio(2 * i, sector=(i % 2048) * 8, op=OP["write"],
                               payload=i.to_bytes(8, "little") * 512, submit_ns=t,
                               complete_ns=t + 100_000))
        out.append(streams.bio(2 * i + 1, op=OP["flush"], flags=BIT["preflush"],
                               submit_ns=t + 200_000, complete_ns=t + 300_000))
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("progress")
    cap = d / "f.cap"
    _write_capture(cap, 8 * MIB // 512, _records(N), per_chunk=100)
    base = d / "base.img"
    base.write_bytes(bytes(8 * MIB))
    return cap, base


def _lines(text: str, what: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{") and '"progress"' in line:
            obj = json.loads(line)
            if obj["progress"] == what:
                out.append(obj)
    return out


def _bytes_ok(lines: list[dict[str, Any]], cap: Path) -> None:
    size = cap.stat().st_size
    assert lines, "no progress line"
    assert all(x["unit"] == "bytes" and x["total"] == size for x in lines)
    done = [x["done"] for x in lines]
    assert done == sorted(done) and done[-1] == size


@pytest.fixture(autouse=True)
def every_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every report a line (no half-second pacing): the test sees each step."""
    monkeypatch.setattr(progress, "JSON_EVERY", 0.0)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_apply_reports_bytes_of_the_capture_read(case: tuple[Path, Path], tmp_path: Path,
                                                 fmt: str) -> None:
    cap, base = case
    out = tmp_path / "out.img"
    r = CliRunner().invoke(cli.main, ["apply", str(cap), str(base), "-o", str(out),
                                      "--format", fmt, "--progress", "json"])
    assert r.exit_code == 0, r.output
    lines = _lines(r.stderr, "apply")
    _bytes_ok(lines, cap)
    # one line every EVERY changes and the last: more than one along the way
    assert len(lines) >= N // progress.EVERY
    assert "changes" in r.stdout and '"progress"' not in r.stdout


def test_replay_reports_progress(case: tuple[Path, Path], tmp_path: Path) -> None:
    cap, _ = case
    target = tmp_path / "t.img"
    target.write_bytes(bytes(8 * MIB))
    r = CliRunner().invoke(cli.main, ["replay", str(cap), str(target), "--progress", "json"])
    assert r.exit_code == 0, r.output
    _bytes_ok(_lines(r.stderr, "replay"), cap)


@pytest.mark.parametrize("fmt", ["jsonl", "blktrace", "log-writes"])
def test_export_reports_progress_and_keeps_stdout_for_data(case: tuple[Path, Path],
                                                           tmp_path: Path, fmt: str) -> None:
    cap, _ = case
    out = "-" if fmt == "jsonl" else str(tmp_path / "x")
    r = CliRunner().invoke(cli.main, ["export", str(cap), "--format", fmt, "-o", out,
                                      "--progress", "json"])
    assert r.exit_code == 0, r.output
    _bytes_ok(_lines(r.stderr, "export"), cap)
    if fmt == "jsonl":  # stdout is the records, every one, and nothing else
        recs = [json.loads(x) for x in r.stdout.splitlines()]
        assert len(recs) == 2 * N and "progress" not in recs[0]


def test_crashcheck_reports_the_listing_and_the_states(case: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    cap, base = case
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--max-states",
                                      "300", "-j", "2", "--workdir", str(tmp_path / "w"),
                                      "--progress", "json", "--json", "--", "true"])
    assert r.exit_code == 0, r.output
    _bytes_ok(_lines(r.stderr, "listing"), cap)
    states = _lines(r.stderr, "checking")
    assert all(x["unit"] == "states" and x["total"] == 300 for x in states)
    assert [x["done"] for x in states] == list(range(301))
    # stdout: one object a state, as before
    assert len(r.stdout.splitlines()) == 300
    assert all("state" in json.loads(x) for x in r.stdout.splitlines())


@pytest.mark.parametrize("mode", ["none", "auto"])
def test_no_progress_when_asked_or_not_a_terminal(case: tuple[Path, Path], tmp_path: Path,
                                                  mode: str) -> None:
    cap, base = case
    r = CliRunner().invoke(cli.main, ["apply", str(cap), str(base), "-o",
                                      str(tmp_path / "o.img"), "--progress", mode])
    assert r.exit_code == 0, r.output
    assert r.stderr == ""


def test_json_lines_are_paced(case: tuple[Path, Path], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """At most one line per JSON_EVERY seconds, and the end once: with a
    pace no run reaches, exactly the first and the last."""
    monkeypatch.setattr(progress, "JSON_EVERY", 3600.0)
    cap, base = case
    r = CliRunner().invoke(cli.main, ["apply", str(cap), str(base), "-o",
                                      str(tmp_path / "o.img"), "--progress", "json"])
    assert r.exit_code == 0, r.output
    lines = _lines(r.stderr, "apply")
    assert len(lines) == 2 and lines[-1]["done"] == cap.stat().st_size
