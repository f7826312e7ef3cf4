"""crashcheck as a long-running tool: Ctrl-C and SIGTERM end it cleanly (the
checks ended, no state image left, the summary so far, exit 130 or 143),
--timeout fails a hung check as timed out, and --keep-failing keeps the
failing images even in the folder crashcheck made itself, and says where."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgrement_dm import cli
from imgrement_dm.formats.capture import write_capture
from tests.host import streams

W, FLUSH = 1, 2


def _capture(path: Path, writes: int) -> None:
    """``writes`` 4 KiB writes, each followed by a flush: that many distinct states."""
    with write_capture(path, "traced", writes * 8) as w:
        for i in range(writes):
            w.add(streams.bio(2 * i, sector=8 * i, op=W, payload=bytes([i % 256]) * 4096,
                              complete_ns=10 + 2 * i)
                  + streams.bio(2 * i + 1, sector=0, op=FLUSH, flags=2,
                                complete_ns=11 + 2 * i))


@pytest.fixture
def many(tmp_path: Path) -> tuple[Path, Path]:
    cap, base = tmp_path / "many.cap", tmp_path / "base.img"
    _capture(cap, 200)
    base.write_bytes(bytes(200 * 4096))
    return cap, base


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(("state-", ".imgrement-crash"))]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_run_cleanly(many: tuple[Path, Path], sig: int) -> None:
    cap, base = many
    proc = subprocess.Popen([sys.executable, "-m", "imgrement_dm.cli", "crashcheck", str(cap),
                             str(base), "-j", "2", "--", "sleep", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(3)  # checks are running
    assert proc.poll() is None
    sent = time.monotonic()
    os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: the whole group
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + sig, err
    assert took < 10, f"{took:.1f} s to stop"
    assert f"interrupted by {signal.Signals(sig).name}" in err
    assert "200 distinct to check" in err and " failed" in err
    assert not _leftovers(base.parent), _leftovers(base.parent)
    assert subprocess.run(["pgrep", "-f", "sleep 0.3"], capture_output=True).returncode != 0


def test_a_check_past_its_timeout_fails_as_timed_out(tmp_path: Path) -> None:
    cap, base = tmp_path / "two.cap", tmp_path / "base.img"
    _capture(cap, 2)
    base.write_bytes(bytes(2 * 4096))
    start = time.monotonic()
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--timeout", "0.5",
                                      "--", "sleep", "30"])
    assert time.monotonic() - start < 20
    assert r.exit_code == 1, r.output
    assert r.stdout.count("timed out after 0.5 s") == 2
    assert "2 checked, 2 failed (2 timed out)" in r.stderr


def test_keep_failing_keeps_the_images_without_a_workdir(tmp_path: Path) -> None:
    cap, base = tmp_path / "two.cap", tmp_path / "base.img"
    _capture(cap, 2)
    base.write_bytes(bytes(2 * 4096))
    r = CliRunner().invoke(cli.main, ["crashcheck", str(cap), str(base), "--keep-failing",
                                      "--", "false"])
    assert r.exit_code == 1, r.output
    line = [x for x in r.stderr.splitlines() if x.startswith("failing states' images kept in ")]
    assert line, r.stderr
    folder = Path(line[0].removeprefix("failing states' images kept in "))
    assert sorted(p.name for p in folder.iterdir()) == ["state-0-all.img", "state-1-all.img"]
    assert (folder / "state-1-all.img").read_bytes()[4096:] == bytes([1]) * 4096


def test_a_slow_check_is_waited_for_without_spinning(tmp_path: Path) -> None:
    """The first state's check takes 3 s, the others none, two at a time: the
    states behind it are built and checked meanwhile, and crashcheck itself
    sleeps while it waits. Waiting on every pending check, a finished one made
    wait() return at once: the main thread spun for the 3 s (3 s of CPU)."""
    cap, base = tmp_path / "c.cap", tmp_path / "base.img"
    _capture(cap, 20)
    base.write_bytes(bytes(20 * 4096))
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from imgrement_dm import crashcheck as crash\n"
        f"bounds, size = crash.load(Path({str(cap)!r}))\n"
        "todo = crash.unique_states(bounds).states\n"
        "check = ['sh', '-c', 'if [ \"$IMGREMENT_STATE_ID\" = 0:all ]; then sleep 3; fi']\n"
        f"rs = crash.check_all(todo, Path({str(base)!r}), size, check, jobs=2)\n"
        "u = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(len(rs), sum(r.passed for r in rs), [r.state.id for r in rs][:2], "
        "u.ru_utime + u.ru_stime)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False, cwd=Path(__file__).parents[2], timeout=120)
    assert r.returncode == 0, r.stderr
    n, passed = r.stdout.split()[:2]
    cpu = float(r.stdout.split()[-1])
    assert (n, passed) == ("20", "20") and "'0:all', '1:all'" in r.stdout
    assert cpu < 1.5, f"{cpu:.2f} s of CPU while one check slept 3 s"
