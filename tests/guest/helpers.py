"""Small tools the guest tests share: direct I/O, the CLI, leftovers."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from imgrement_dm import api
from imgrement_dm.dm import Control
from imgrement_dm.output import parts_of
from imgrement_dm.records import Item, MarkRecord, RecordReader

CLI = [sys.executable, "-m", "imgrement_dm.cli"]

# The debug kernel (KASAN, lockdep, kmemleak, ...) runs everything several
# times slower under emulation; waits for things outside the test's control
# (udev, a hotplug watcher) scale by this so a slow kernel is not a failure.
DEBUG_KERNEL = os.uname().release.endswith("-imgrement-debug")
SLOWDOWN = 4 if DEBUG_KERNEL else 1


def pattern(seed: int, size: int) -> bytes:
    """Deterministic, incompressible test data."""
    return random.Random(seed).randbytes(size)


def aligned(data: bytes) -> mmap.mmap:
    """A page-aligned copy of ``data``, as O_DIRECT needs."""
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[: len(data)] = data
    return buf


def direct_write(path: str | Path, offset: int, data: bytes, *, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | flags)
    try:
        buf = aligned(data)
        with memoryview(buf) as view:
            assert os.pwrite(fd, view[: len(data)], offset) == len(data)
        buf.close()
    finally:
        os.close(fd)


def direct_read(path: str | Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        assert os.preadv(fd, [buf], offset) == size
        data = bytes(buf)
        buf.close()
        return data
    finally:
        os.close(fd)


def sha256(path: str | Path, size: int | None = None) -> str:
    """sha256 of a device as it is on the disk (read with O_DIRECT) or of an image
    file (tmpfs has no O_DIRECT): the whole of it, or its first ``size`` bytes."""
    h = hashlib.sha256()
    direct = os.O_DIRECT if stat.S_ISBLK(os.stat(path).st_mode) else 0
    fd = os.open(path, os.O_RDONLY | direct)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        left = size
        while left is None or left > 0:
            n = os.readv(fd, [buf])
            if not n:
                break
            take = n if left is None else min(n, left)
            h.update(buf[:take])
            if left is not None:
                left -= take
        buf.close()
    finally:
        os.close(fd)
    return h.hexdigest()


def cli(*args: str, user: int | None = None,
        process: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI's ``main`` with ``args``: in this process (through click's
    CliRunner), or as the installed module in a process of its own when
    ``process`` is set or ``user`` names another uid to run as.

    In-process is the default because a Python start and the CLI's imports
    cost 3-4 s each under emulation, 39% of a whole guest suite when every
    step was a process: the command's code, options and exit codes are the
    same either way; test_cli's entry-point tests keep the process.  An
    exception the CLI let out is shown as a process would show it, a traceback
    on standard error and exit status 1.
    """
    if process or user is not None:
        prefix: list[str] = []
        if user is not None:
            prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return subprocess.run([*prefix, *CLI, *args], capture_output=True, text=True,
                              check=False)
    from click.testing import CliRunner

    from imgrement_dm.cli import main

    r = CliRunner().invoke(main, list(args), prog_name="imgrement-dm")
    stderr = r.stderr
    if r.exc_info is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*r.exc_info))
    return subprocess.CompletedProcess(["imgrement-dm", *args], r.exit_code, r.stdout, stderr)


def sh(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def dm_devices() -> list[str]:
    """Names of every device-mapper device, as dmsetup sees them."""
    out = sh("dmsetup", "ls").strip()
    if not out or out == "No devices found":
        return []
    return sorted(line.split()[0] for line in out.splitlines())


def remove_leftovers() -> list[str]:
    """Remove every device-mapper device there is (the guest has none of its
    own): resumed first, in case a test left one suspended, whose I/O would
    otherwise wait for ever, then removed, with --force (its table replaced
    by one that fails I/O) where a plain removal is refused.  Their names."""
    left = dm_names_now()
    for name in left:
        subprocess.run(["dmsetup", "resume", name], capture_output=True, check=False)
        if subprocess.run(["dmsetup", "remove", "--retry", name],
                          capture_output=True, check=False).returncode:
            subprocess.run(["dmsetup", "remove", "--force", name], capture_output=True,
                           check=False)
    if left:
        subprocess.run(["udevadm", "settle"], check=False)
    return left


def running_children() -> set[int]:
    """This process's children that still run (a zombie, its exit not yet
    collected by its Popen, runs nothing), from /proc."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, ppid = line[line.rindex(")") + 2:].split()[:2]
        if int(ppid) == me and state != "Z":
            found.add(int(entry.name))
    return found


def kill_children(pids: set[int]) -> dict[int, str]:
    """Kill what a test left running (a fio still writing to the scratch
    disk would change the next test's data; a stopped reader would hold a
    stream open), continued first in case it was stopped.  What each was.
    A process in the kernel on a suspended device ends only once the
    device is resumed or removed: reap_children after remove_leftovers."""
    what = {}
    for pid in sorted(pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue  # ended meanwhile
        what[pid] = cmd.decode(errors="replace").strip()[:120]
    return what


def reap_children(killed: dict[int, str], timeout: float = 120) -> list[str]:
    """Collect the exits of kill_children's processes; 'pid command' each,
    and those that did not end within ``timeout`` seconds marked so."""
    deadline = time.monotonic() + timeout
    left = dict(killed)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # collected elsewhere
            if done:
                del left[pid]
        if left:
            time.sleep(0.1)
    return [f"{pid} {cmd}" + (" (still there)" if pid in left else "")
            for pid, cmd in killed.items()]


def loop_devices() -> list[str]:
    return sorted(sh("losetup", "--noheadings", "--output", "NAME").split())


def dm_names_now() -> list[str]:
    """Every device-mapper device's name, straight from the kernel's
    DM_LIST_DEVICES, for the check around each test (dm_devices runs
    dmsetup, an independent reader, for the tests' own assertions; a
    process start costs 0.2 s on 6.1 and 1-2 s on 5.10 under emulation, and
    the check ran six per test)."""
    with Control() as ctl:
        return sorted(name for name, _, _ in ctl.list_devices())


def attached_loops() -> list[str]:
    """The attached loop devices, from sysfs (a loop device has its loop/
    directory while it is attached), as losetup lists them, for the same
    check."""
    return sorted(f"/dev/{p.parent.name}" for p in Path("/sys/block").glob("loop*/loop"))


def mapper_nodes() -> list[str]:
    return sorted(p.name for p in Path("/dev/mapper").iterdir() if p.name != "control")


def sectors(dev: str) -> int:
    return int(sh("blockdev", "--getsz", dev))


def devno(dev: str) -> str:
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


@contextlib.contextmanager
def reading_in_background(reader: RecordReader) -> Iterator[list[Item]]:
    """A thread that keeps taking records from ``reader`` while the block runs
    (a write that waits for space needs one); everything it took, as it goes."""
    items: list[Item] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            items.extend(reader.read(timeout=0.2))

    t = threading.Thread(target=run)
    t.start()
    try:
        yield items
    finally:
        stop.set()
        t.join(timeout=60)


def idle_inflight(node: str | Path) -> str:
    """/sys/block/dm-N/inflight of a mapped device ("reads writes"), once the
    completions of the I/O that just ended are in (or what it reads after 10 s)."""
    path = Path("/sys/block") / os.path.basename(os.path.realpath(node)) / "inflight"
    deadline = time.monotonic() + 10 * SLOWDOWN
    while (now := " ".join(path.read_text().split())) != "0 0" and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def read_until_mark(reader: RecordReader, seq: int, timeout: float = 60) -> list[Item]:
    """Everything the reader brings up to and including the mark numbered ``seq``."""
    items: list[Item] = []
    deadline = time.monotonic() + timeout
    while True:
        batch = reader.read(timeout=1)
        items += batch
        if any(isinstance(i, MarkRecord) and i.seq == seq for i in batch):
            return items
        assert time.monotonic() < deadline, f"mark {seq} never arrived"


def open_flags(pid: int, path: Path) -> int | None:
    """The open-file flags with which process ``pid`` holds ``path``, or None."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                    return int(info.split("flags:")[1].split()[0], 8)
    return None


def holds_open(pid: int, paths: list[Path]) -> bool:
    """Whether process ``pid`` has one of ``paths`` open."""
    return any(open_flags(pid, p) is not None for p in paths)


def start_record(name: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    """``imgrement-dm record NAME -o OUT -q``, returned once it is really recording:
    its reader open (record opens the stream before it creates its temporary
    file beside OUT, output.parts_of), that file open (it is created, closed
    and opened again with O_DIRECT: on a device wrapped in wait mode the
    file's existence alone let a test look for the open file too early) and
    the device switched to wait mode (after that).  A fixed sleep was not
    enough: a loaded guest started the CLI after the workload had already run."""
    rec = subprocess.Popen([*CLI, "record", name, "-o", str(out), "-q", *extra],
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120 * SLOWDOWN
    while not (holds_open(rec.pid, parts_of(out)) and api.status(name).overflow == "wait"):
        if rec.poll() is not None:
            raise AssertionError(f"record ended early: {rec.stderr.read() if rec.stderr else ''}")
        assert time.monotonic() < deadline, "record did not start"
        time.sleep(0.2)
    return rec
