"""Every CLI command against the real target: output, JSON, files, filters,
refusals and exit codes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm.output import parts_of
from imgrement_dm.records import STREAM_DIR, BioRecord, RecordReader
from imgrement_dm.udevsync import udev_running
from tests.guest.helpers import CLI, cli, direct_read, direct_write, dm_devices, pattern, sh


@pytest.fixture
def wrapped(disk: str) -> Iterator[str]:
    r = cli("wrap", disk, "--capture", "all", "--buffer-kb", "32768")
    assert r.returncode == 0, r.stderr
    yield "traced"
    if "traced" in dm_devices():
        assert cli("unwrap", "traced").returncode == 0


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _holds_stream(pid: int) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(f"{STREAM_DIR}/"):
                return True
        except FileNotFoundError:
            pass  # closed meanwhile
    return False


def _start(*args: str) -> subprocess.Popen[str]:
    """A CLI command that reads a record stream, once it holds the stream.

    Starting Python takes seconds under emulation; a signal or I/O sent
    before the command has the stream open would test nothing.
    """
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while not _holds_stream(p.pid):
        assert p.poll() is None, f"{args[0]} exited early: {p.communicate()}"
        assert time.monotonic() < deadline, f"{args[0]} never opened the stream"
        time.sleep(0.1)
    return p


def test_wrap_options_status_mark_capture(wrapped: str, disk: str) -> None:
    """Some steps run as the installed module in a process of its own: the
    entry point end to end (output, a usage error's exit status)."""
    table = sh("dmsetup", "table", wrapped).split()
    assert table[3:] == [table[3], "0", "2", "capture:all", "buffer_kb:32768"]
    st = json.loads(cli("status", wrapped, "--json", process=True).stdout)
    assert (st["capture"], st["buffer"], st["dropped"], st["log"]) == ("all", 32 << 20, 0, False)
    text = cli("status", wrapped).stdout
    assert text.startswith("traced: capture all, log off\n") and "  bios " in text

    r = cli("capture", wrapped, "meta")
    assert r.returncode == 0 and r.stdout == ""
    assert json.loads(cli("status", wrapped, "--json").stdout)["capture"] == "meta"
    r = cli("capture", wrapped, "bogus", process=True)
    assert r.returncode == 2 and "Invalid value" in r.stderr

    first = cli("mark", wrapped, "one", process=True)
    second = cli("mark", wrapped, "two words", "--json")
    assert first.returncode == 0 and second.returncode == 0
    seq = int(first.stdout)
    assert json.loads(second.stdout) == {"name": wrapped, "label": "two words", "seq": seq + 1}


def test_trace_live_json_count_and_filters(wrapped: str) -> None:
    node = f"/dev/mapper/{wrapped}"
    tracer = _start("trace", wrapped, "--json", "-x", "--op", "write",
                    "--sector", "16-23", "--count", "2")
    direct_write(node, 0, pattern(1, 4096))          # sectors 0-7: filtered out
    direct_write(node, 8192, pattern(2, 4096))       # sectors 16-23
    direct_read(node, 8192, 4096)                    # a read: filtered out
    direct_write(node, 8192 + 2048, pattern(3, 512))  # sector 20
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    recs = _json_lines(out)
    assert [r["type"] for r in recs] == ["bio", "bio"]
    assert [(r["op"], r["sector"], r["bytes"]) for r in recs] == [
        ("write", 16, 4096), ("write", 20, 512)
    ]
    assert bytes.fromhex(str(recs[0]["payload"])) == pattern(2, 4096)
    assert recs[0]["segments"] == [{"len": 4096, "offset": 0, "sector": 16}]
    assert recs[0]["comm"] == "python" and recs[0]["status"] == 0


def test_trace_to_file_then_read_back_and_stats(wrapped: str, tmp_path: Path) -> None:
    node = f"/dev/mapper/{wrapped}"
    saved = tmp_path / "t.rec"
    tracer = _start("trace", wrapped, "-o", str(saved), "--quiet")
    for i in range(10):
        direct_write(node, i * 4096, pattern(i, 4096))
    for i in range(5):
        direct_read(node, i * 4096, 4096)
    end = imgrement_dm.mark(wrapped, "end")
    time.sleep(1)
    tracer.send_signal(signal.SIGINT)
    _, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    assert saved.exists() and not parts_of(saved)

    with RecordReader.from_file(saved) as reader:
        items = list(reader)
    mine = [i for i in items if isinstance(i, BioRecord) and i.comm == "python"]
    assert [(r.op_name, r.sector) for r in mine] == (
        [("write", i * 8) for i in range(10)] + [("read", i * 8) for i in range(5)]
    )
    assert all(bytes(r.payload) == pattern(r.sector // 8, 4096) for r in mine)
    assert any(getattr(i, "seq", None) == end for i in items)

    text = cli("trace", "--file", str(saved)).stdout.splitlines()
    assert text[0].split()[:3] == ["SEQ", "TIME(s)", "COMM"]
    assert sum(" python " in line and " W " in line for line in text) == 10

    stats = json.loads(cli("stats", "--file", str(saved), "--json").stdout)
    ops = stats["ops"]
    assert ops["write"]["count"] >= 10 and ops["write"]["bytes"] >= 40960
    assert stats["dropped"] == 0 and stats["marks"] == 1
    human = cli("stats", "--file", str(saved)).stdout
    assert "usecs" in human and "write" in human


def test_trace_ends_when_the_device_is_unwrapped(wrapped: str) -> None:
    tracer = _start("trace", wrapped)
    assert tracer.stdout is not None
    assert tracer.stdout.readline().split()[:2] == ["SEQ", "TIME(s)"]  # it has the stream
    direct_write(f"/dev/mapper/{wrapped}", 0, pattern(1, 4096))
    time.sleep(1)
    assert cli("unwrap", wrapped).returncode == 0
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    assert any(" W " in line and " python " in line for line in out.splitlines())


def test_stats_live_for_a_duration(wrapped: str) -> None:
    p = _start("stats", wrapped, "--duration", "4", "--json")
    for i in range(3):
        direct_write(f"/dev/mapper/{wrapped}", i * 4096, pattern(i, 4096))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert json.loads(out)["ops"]["write"]["count"] >= 3


def test_deferred_unwrap_of_an_open_device(disk: str) -> None:
    dev = imgrement_dm.wrap(disk)
    fd = os.open(dev.node, os.O_RDONLY)
    try:
        r = cli("unwrap", "traced", "--deferred")
        assert r.returncode == 0, r.stderr
        assert dm_devices() == ["traced"]  # still open, so still there
    finally:
        os.close(fd)
    sh("udevadm", "settle")
    deadline = time.monotonic() + 10
    while dm_devices() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dm_devices() == []


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["status", "nosuch"], 6, "no device-mapper device named 'nosuch'"),
        (["mark", "nosuch", "x"], 6, "no device-mapper device named 'nosuch'"),
        (["trace"], 2, "give a device NAME or --file FILE"),
        (["trace", "--file", "/nonexistent.rec"], 9, "cannot open /nonexistent.rec"),
        (["stats", "--file", "/etc/hostname"], 9,
         "is not an imgrement file; give a capture file (from 'imgrement-dm record') or a "
         "saved stream"),
        (["trace", "x", "--sector", "9-1"], 2, "is not a range START-END"),
        (["wrap", "/dev/vda", "--buffer-kb", "1"], 2, "Invalid value"),
        (["unwrap", "a/b"], 5, "invalid device name"),
    ],
)
def test_refusals_have_messages_and_exit_codes(args: list[str], code: int, message: str) -> None:
    r = cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_outputs_on_a_read_only_file_system_are_refused(wrapped: str, tmp_path: Path) -> None:
    """EROFS is named as such (not as a permission problem), before any work,
    and nothing is written there."""
    ro = tmp_path / "ro"
    ro.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro))
    try:
        for args in (["record", wrapped, "-o", str(ro / "s.cap")],
                     ["trace", wrapped, "-q", "-o", str(ro / "s.rec")]):
            r = cli(*args)
            assert r.returncode == 13, (args, r.returncode, r.stderr)
            assert r.stderr == (f"imgrement-dm: error: cannot write {args[-1]}: the file "
                                "system is read-only: choose another path; "
                                f"{args[-1]} was left as it was\n")
        assert list(ro.iterdir()) == []
    finally:
        sh("umount", str(ro))


def test_mark_refuses_devices_that_are_not_ours(disk2: str) -> None:
    length = sh("blockdev", "--getsz", disk2).strip()
    subprocess.run(["dmsetup", "create", "other", "--table", f"0 {length} linear {disk2} 0"],
                   check=True)
    try:
        r = cli("mark", "other", "x")
        assert r.returncode == 4 and "not an imgrement device" in r.stderr
        r = cli("trace", "other")
        assert r.returncode == 4 and "not an imgrement device" in r.stderr
    finally:
        subprocess.run(["dmsetup", "remove", "other"], check=True)


def test_a_device_whose_table_was_changed_by_hand(wrapped: str, disk: str,
                                                  tmp_path: Path) -> None:
    """Ours by uuid, but someone loaded another table: every command says so (it
    traces nothing now) instead of misreading the other target's status, and
    unwrap still removes it."""
    length = sh("blockdev", "--getsz", disk).strip()
    sh("dmsetup", "reload", wrapped, "--table", f"0 {length} linear {disk} 0")
    sh("dmsetup", "resume", wrapped)
    sh("udevadm", "settle")
    out = tmp_path / "x.cap"
    for args in (["status", wrapped], ["mark", wrapped, "x"], ["capture", wrapped, "meta"],
                 ["trace", wrapped, "-c", "1"], ["record", wrapped, "-o", str(out)],
                 ["trace", wrapped, "-q", "-o", str(out)]):
        r = cli(*args)
        assert r.returncode == 4, (args, r.returncode, r.stderr)
        assert r.stderr == (
            f"imgrement-dm: error: '{wrapped}' was made by imgrement-dm but its table was "
            f"changed (now: linear 0+{length}): it traces nothing. Remove it with "
            f"'imgrement-dm unwrap {wrapped}' and wrap the disk again\n"), args
    assert not list(tmp_path.iterdir())
    assert cli("unwrap", wrapped).returncode == 0
    assert wrapped not in dm_devices()


def test_debug_shows_the_traceback() -> None:
    r = cli("--debug", "status", "nosuch", process=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "NoSuchMappingError" in r.stderr


def _udev_now(running: bool) -> None:
    """Stop systemd-udevd, or start it, and return once it is so (a restart
    took over 5 s on the debug kernel: the next test then wrapped without
    udev and unwrapped with it, and CI saw the node stay)."""
    if running:
        subprocess.run(["/usr/lib/systemd/systemd-udevd", "--daemon"], check=True)
    else:
        sh("udevadm", "settle")
        subprocess.run(["udevadm", "control", "--exit"], check=True)
        # gone means its process gone: until then it may hold its control
        # socket, which then answers as a busy udevd does
        deadline = time.monotonic() + 120
        while subprocess.run(["pgrep", "-x", "systemd-udevd"], capture_output=True,
                             check=False).returncode == 0:
            assert time.monotonic() < deadline, "systemd-udevd still runs 120 s after --exit"
            time.sleep(0.2)
    deadline = time.monotonic() + 60
    while udev_running() != running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert udev_running() == running, f"systemd-udevd {'start' if running else 'exit'} took 60 s"
    if running:
        sh("udevadm", "settle")


def test_wrap_and_unwrap_without_udev(disk: str, disk2: str) -> None:
    """Without udev, the node is made and removed by us, as libdm does; and
    a node made one way is gone after an unwrap made the other: "under"
    wrapped under udev, unwrapped without it (udev's symlink, dangling
    once the kernel's /dev/dm-N is gone), "noudev" wrapped without udev and
    unwrapped under it (our node, which udev's remove rules do not know)."""
    assert cli("wrap", disk2, "--name", "under").returncode == 0
    under = Path("/dev/mapper/under")
    assert under.is_symlink()  # udev's
    _udev_now(running=False)
    try:
        r = cli("wrap", disk, "--name", "noudev")
        assert r.returncode == 0, r.stderr
        node = Path("/dev/mapper/noudev")
        st = node.lstat()
        assert stat.S_ISBLK(st.st_mode)  # ours, not a symlink
        info = next(d for d in imgrement_dm.list_devices() if d.name == "noudev")
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (info.major, info.minor)
        direct_write(node, 0, pattern(1, 4096))
        assert direct_read(disk, 0, 4096) == pattern(1, 4096)
        assert cli("unwrap", "under").returncode == 0
        assert not under.is_symlink() and not under.exists()
    finally:
        _udev_now(running=True)
    assert cli("unwrap", "noudev").returncode == 0
    assert not node.exists()
    assert dm_devices() == []


def test_docs_api_examples_run(scratch_disks: list[str]) -> None:
    """docs/api.md's examples are run as they are written (they use /dev/vdb)."""
    assert "/dev/vdb" in scratch_disks
    doc = Path(__file__).resolve().parents[2] / "docs" / "api.md"
    blocks = doc.read_text().split("```python\n")[1:]
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        code = block.split("```", 1)[0]
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, f"docs/api.md example {i + 1} failed:\n{r.stderr}"
        sh("udevadm", "settle")
        assert dm_devices() == [], f"example {i + 1} left a device behind"
