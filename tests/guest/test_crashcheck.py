"""crashcheck on captures made through the target, with ext4 as the subject.

- ext4 (default options) with fsyncs: every crash state is consistent
  (after journal recovery, e2fsck finds nothing).
- An application that replaces a file by writing a new one and renaming it
  over the old one, without fsync: some crash state leaves the file neither
  old nor new (empty).  ext4's auto_da_alloc would force the data out at
  such a rename and hide exactly this, so the file system is mounted with
  noauto_da_alloc (docs/crashcheck.md says more).  With an fsync before the
  rename, every state holds the old or the new file.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imgrement_dm import crashcheck as crash
from tests.guest.helpers import CLI, DEBUG_KERNEL, cli, sh, start_record

SIZE = 32 << 20
OLD = b"old content\n" * 300
NEW = b"new content\n" * 400

#: The application's invariant: data.txt is the old file or the new one.
RENAME_CHECK = f"""
import os, subprocess, sys, tempfile
img = sys.argv[1]
mnt = tempfile.mkdtemp(prefix="cc-mnt-")
subprocess.run(["mount", "-o", "loop", img, mnt], check=True, capture_output=True)
try:
    data = open(os.path.join(mnt, "data.txt"), "rb").read()
finally:
    subprocess.run(["umount", mnt], check=True)
    os.rmdir(mnt)
if data not in ({OLD!r}, {NEW!r}):
    print(f"data.txt is neither old nor new: {{len(data)}} bytes, "
          f"{{'all zero' if not data.strip(bytes(1)) else 'other'}}")
    sys.exit(1)
"""

def _data_is_old_or_new(img: Path, state: crash.State) -> bool:
    """RENAME_CHECK as a function crashcheck calls in its own process."""
    mnt = Path(tempfile.mkdtemp(prefix="cc-mnt-"))
    sh("mount", "-o", "loop", str(img), str(mnt))
    try:
        data = (mnt / "data.txt").read_bytes()
    finally:
        sh("umount", str(mnt))
        mnt.rmdir()
    if data not in (OLD, NEW):
        raise AssertionError(f"data.txt is neither old nor new: {len(data)} bytes, "
                             f"{'all zero' if not data.strip(bytes(1)) else 'other'}")
    return True


#: How each file system is made; XFS's smallest is 300 MiB, btrfs's about 114.
MKFS = {"ext4": (SIZE, ["mkfs.ext4", "-q", "-F", "-E",
                        "lazy_itable_init=0,lazy_journal_init=0"]),
        "xfs": (300 << 20, ["mkfs.xfs", "-q", "-f"]),
        "btrfs": (128 << 20, ["mkfs.btrfs", "-q", "-f"])}


def _recorded(d: Path, prepare: Callable[[Path], None], workload: Callable[[Path], None],
              mount_opts: str, *, fs: str = "ext4",
              record_args: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A base image (mkfs, then ``prepare`` on it) and a capture of ``workload``
    (recorded with ``record_args`` too)."""
    img = d / "disk.img"
    size, mkfs = MKFS[fs]
    with img.open("wb") as f:
        f.truncate(size)
    sh(*mkfs, str(img))
    mnt = d / "mnt"
    mnt.mkdir(exist_ok=True)
    opts = ",".join(x for x in ("loop", "nouuid" if fs == "xfs" else "", mount_opts) if x)
    sh("mount", "-o", opts, str(img), str(mnt))
    try:
        prepare(mnt)
    finally:
        sh("umount", str(mnt))
    base = d / "base.img"
    sh("cp", "--sparse=always", str(img), str(base))  # sparse: the states are too
    cap = d / "s.cap"
    loop = sh("losetup", "--find", "--show", str(img)).strip()
    try:
        assert cli("wrap", loop).returncode == 0
        rec = start_record("traced", cap, *record_args)
        sh("mount", *(["-o", mount_opts] if mount_opts else []), "/dev/mapper/traced",
           str(mnt))
        try:
            workload(mnt)
        finally:
            sh("umount", str(mnt))
        assert cli("unwrap", "traced").returncode == 0
        _, err = rec.communicate(timeout=120)
        assert rec.returncode == 0, err
    finally:
        subprocess.run(["dmsetup", "remove", "traced"], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
    return base, cap


def _write(path: Path, data: bytes, *, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _crashcheck(base: Path, cap: Path, *check: str, states: int = 40) -> \
        subprocess.CompletedProcess[str]:
    """The CLI's crashcheck; CHECK is a command, or options (--fsck, --sqlite)."""
    how = list(check) if check[0].startswith("--") else ["--", *check]
    return subprocess.run([*CLI, "crashcheck", str(cap), str(base), "--json", "--max-states",
                           str(states), *how], capture_output=True, text=True,
                          check=False, timeout=1500)


#: The file systems crashcheck --fsck is shown on.  Every Debian kernel has
#: XFS and btrfs; the debug kernel (allnoconfig plus sandbox/debug.config,
#: built to check our module) has ext4 alone, so there ext4 is the subject.
FILESYSTEMS = ["ext4"] if DEBUG_KERNEL else ["ext4", "xfs", "btrfs"]


@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_with_fsyncs_every_state_is_consistent(tmp_path: Path, fs: str) -> None:
    """Files written and fsynced, folders made, a file moved: every crash
    state mounts (the kernel recovers the journal or log) and the file
    system's own checker then finds nothing (crashcheck --fsck)."""
    def work(mnt: Path) -> None:
        for i in range(4):
            _write(mnt / f"f{i}", os.urandom(20000 + i * 5000), fsync=True)
            (mnt / f"d{i}").mkdir()
        (mnt / "f0").rename(mnt / "d1" / "moved")

    base, cap = _recorded(tmp_path, lambda m: None, work,
                          "" if fs == "xfs" else "commit=1", fs=fs)
    r = _crashcheck(base, cap, "--fsck", states=24)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checked = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(checked) >= 10, r.stderr  # boundaries and subsets, not a trivial run
    assert {c["verdict"] for c in checked} == {"passed"}
    assert f"{len(checked)} checked, 0 failed" in r.stderr


@pytest.mark.parametrize("fsync", [False, True], ids=["rename-without-fsync", "with-fsync"])
def test_the_rename_pattern(tmp_path: Path, fsync: bool) -> None:
    def prepare(mnt: Path) -> None:
        _write(mnt / "data.txt", OLD, fsync=True)

    def work(mnt: Path) -> None:
        _write(mnt / "data.tmp", NEW, fsync=fsync)
        (mnt / "data.tmp").rename(mnt / "data.txt")
        time.sleep(3)  # commit=1: the rename reaches the journal, the data may not
        sh("sync")

    base, cap = _recorded(tmp_path, prepare, work, "noauto_da_alloc,commit=1")
    check = tmp_path / "check.py"
    check.write_text(RENAME_CHECK)
    # the check in-process (a Python start a state cost 1-2 s here); the
    # same one as a command rebuilds the first failing state below, and the
    # CLI's crashcheck is the ext4 and state-count tests' subject
    bounds, size = crash.crash_boundaries(cap, base)
    summary = crash.check_capture(bounds, base, size, _data_is_old_or_new, max_states=40,
                                  jobs=os.cpu_count() or 1, workdir=tmp_path / "states")
    assert summary.results and len(summary.results) == summary.to_check, summary.describe()
    failed = summary.failed
    if fsync:
        assert not failed, [(r.state.id, r.output) for r in failed]
        return
    assert failed, summary.describe()
    assert all("neither old nor new: 0 bytes" in r.output for r in failed), \
        [(r.state.id, r.output) for r in failed]

    # the first failing state, rebuilt alone, shows the same
    first = failed[0].state.id
    img = tmp_path / "state.img"
    rebuilt = cli("apply", str(cap), str(base), "--state", first, "-o", str(img))
    assert rebuilt.returncode == 0, rebuilt.stderr
    again = subprocess.run([sys.executable, str(check), str(img)], capture_output=True,
                           text=True, check=False)
    assert again.returncode == 1 and "neither old nor new: 0 bytes" in again.stdout


def _record_direct(dev: str, cap: Path, work: Callable[[int, mmap.mmap], None], *,
                   timeout: float = 120) -> None:
    """Wrap ``dev`` as traced, record it losslessly into ``cap`` while
    ``work`` does direct I/O on /dev/mapper/traced (an open O_DIRECT
    descriptor and an aligned 4 KiB buffer), then unwrap: the capture whole."""
    assert cli("wrap", dev).returncode == 0
    try:
        rec = start_record("traced", cap)
        buf = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
        fd = os.open("/dev/mapper/traced", os.O_RDWR | os.O_DIRECT)
        try:
            work(fd, buf)
        finally:
            os.close(fd)
        assert cli("unwrap", "traced").returncode == 0
        _, err = rec.communicate(timeout=timeout)
        assert rec.returncode == 0, err
    finally:
        subprocess.run(["dmsetup", "remove", "traced"], capture_output=True, check=False)


def test_the_state_count_of_a_known_capture_made_through_the_target(
        tmp_path: Path, loopdev: str) -> None:
    """The host test's eight records, made for real: two direct writes, a flush
    (fsync of the device), two writes, a mark, a FUA write (O_DIRECT with
    RWF_DSYNC), a flush.  The enumeration rules give 4 boundaries, 10 states,
    8 distinct, with the ids the host test names (tests/host/test_crashcheck.py),
    plus one duplicate state per flush the kernel adds of its own."""
    base = tmp_path / "base.img"
    sh("cp", "--sparse=always", str(Path(sh("losetup", "-nO", "BACK-FILE", loopdev).strip())),
       str(base))
    cap = tmp_path / "s.cap"

    def work(fd: int, buf: mmap.mmap) -> None:
        def write(sector: int, fill: int, flags: int = 0) -> None:
            buf[:] = bytes([fill]) * 4096
            assert os.pwritev(fd, [buf], sector * 512, flags) == 4096

        write(0, 1)
        write(8, 2)
        os.fsync(fd)
        write(16, 3)
        write(24, 4)
        assert cli("mark", "traced", "m").returncode == 0
        write(32, 5, os.RWF_DSYNC)
        os.fsync(fd)

    _record_direct(loopdev, cap, work)
    # The kernel may add flushes of its own after ours (seen: one more at the end, from
    # the last close or the unwrap): each is a boundary with every write durable,
    # one state, the same bytes as the one before it.
    bounds, _ = crash.load(cap)
    assert [b.kind for b in bounds[:4]] == ["flush", "mark", "fua", "flush"]
    sectors = [[w.sector for w in b.completed] for b in bounds]
    assert sectors[:4] == [[0, 8], [0, 8, 16, 24], [0, 8, 16, 24, 32], [0, 8, 16, 24, 32]]
    assert [[w.sector for w in b.unflushed] for b in bounds[:4]] == [[], [16, 24], [16, 24],
                                                                      []]
    for i, extra in enumerate(bounds[4:], start=4):
        assert extra.kind == "flush" and not extra.unflushed and sectors[i] == sectors[3]
    r = _crashcheck(base, cap, "true")
    assert r.returncode == 0, r.stderr
    n = len(bounds)
    assert (f"{n} boundaries, {n + 6} states enumerated, 8 distinct to check: 8 checked, "
            "0 failed") in r.stderr
    states = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    s3, s4 = (w.seq for w in bounds[1].unflushed)
    assert [s["state"] for s in states] == ["0:all", "1:all", f"1:{s3}", f"1:{s4}", "2:all",
                                           "2:none", f"2:{s3}", f"2:{s4}"]


FSYNCS = 10_000
BLOCKS = 1000  # 4 KiB blocks the run cycles through: each written ten times


def test_ten_thousand_fsyncs_checked_to_the_end(tmp_path: Path, loopdev: str) -> None:
    """A real run of 10,000 fsyncs (write block i % 1000 with i's bytes, then
    fsync the device) through the target, recorded losslessly, and every one
    of its crash states checked, the last included, with a Python check that
    reads the state's image: the state at the flush after write k holds k in
    block k % 1000 and, in the next block, what write k + 1 overwrites (the
    write of ten blocks before, or zeros), never k + 1 itself."""
    base = tmp_path / "base.img"
    with base.open("wb") as f:
        f.truncate(64 << 20)  # the loop device's file: zeros, as base
    cap = tmp_path / "s.cap"

    def work(fd: int, buf: mmap.mmap) -> None:
        for i in range(FSYNCS):
            buf[:] = i.to_bytes(8, "little") * 512
            assert os.pwrite(fd, buf, (i % BLOCKS) * 4096) == 4096
            os.fsync(fd)

    _record_direct(loopdev, cap, work, timeout=300)
    bounds, size = crash.crash_boundaries(cap, base)
    # each fsync one flush boundary with its write durable; the kernel may add
    # flushes of its own at the end (each a boundary, the same bytes)
    assert len(bounds) >= FSYNCS and all(b.kind == "flush" for b in bounds)
    assert [b.upto for b in bounds[:FSYNCS]] == list(range(1, FSYNCS + 1))
    assert not any(b.unflushed for b in bounds)

    def holds(img: Path, k: int) -> bool:
        """The image is the disk just after write k was made durable."""
        with img.open("rb") as f:
            f.seek((k % BLOCKS) * 4096)
            got = f.read(4096)
            f.seek(((k + 1) % BLOCKS) * 4096)
            nxt = f.read(4096)
        before = k + 1 - BLOCKS  # what block (k + 1) % 1000 held: write k + 1 - 1000
        want_next = before.to_bytes(8, "little") * 512 if before >= 0 else bytes(4096)
        return got == k.to_bytes(8, "little") * 512 and nxt == want_next

    def check(img: Path, st: crash.State) -> bool:
        return holds(img, st.boundary.upto - 1)

    checked: list[crash.Result] = []
    # one job: the check is a few reads, and a second thread only contends
    # for the interpreter (the host measured 0.26 ms a state at -j 1 and 60%
    # more CPU at -j 2)
    summary = crash.check_capture(bounds, base, size, check, max_states=10 * FSYNCS,
                                  jobs=1, workdir=tmp_path / "w", report=checked.append)
    # distinct states: one a write (a kernel flush after the last repeats it)
    assert (summary.to_check, summary.stopped) == (FSYNCS, False), summary.describe()
    assert len(summary.results) == FSYNCS and not summary.failed, summary.describe()
    assert [r.state.boundary.upto for r in checked] == list(range(1, FSYNCS + 1))
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
    # the check can fail: a state one write short is not the disk after it
    img = tmp_path / "short.img"
    crash.build_state(cap, base, f"{FSYNCS // 2}:all", img)
    assert holds(img, FSYNCS // 2) and not holds(img, FSYNCS // 2 + 1)
