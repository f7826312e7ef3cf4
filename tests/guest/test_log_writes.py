"""Our log-writes export is dm-log-writes' format: the kernel's own target
logs a workload with marks, a strict reader of the format's rules
(tests/logwrites.py) reads that log, and our export of a capture of the
same workload passes the same reader with the same entries: kinds,
sectors, lengths, flags, data byte for byte, labels."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from imgrement_dm import api
from tests import logwrites
from tests.guest.helpers import SLOWDOWN, cli, direct_write, pattern, sh, start_record

LOG_BYTES = 4 << 20  # more than the workload's log


def _workload(node: Path, mark: Callable[[str], None]) -> None:
    """Writes with O_DIRECT (one of them with O_DSYNC), marks, and an fsync."""
    direct_write(node, 64 << 10, pattern(1, 8192))
    mark("one")
    direct_write(node, 128 << 10, pattern(2, 4096), flags=os.O_DSYNC)
    fd = os.open(node, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    mark("two")
    direct_write(node, 192 << 10, pattern(3, 4096))


def _entries(log: bytes) -> list[tuple[str, int, int, int, bytes]]:
    return [(e.kind, e.sector, e.nr_sectors, e.flags, e.data) for e in logwrites.read(log)]


def _kernel_log(disk: str, log_disk: str) -> bytes:
    sectors = int(sh("blockdev", "--getsz", disk))
    subprocess.run(["dmsetup", "create", "lw", "--table",
                    f"0 {sectors} log-writes {disk} {log_disk}"], check=True)
    def mark(label: str) -> None:
        sh("dmsetup", "message", "lw", "0", "mark", label)

    try:
        sh("udevadm", "settle")
        _workload(Path("/dev/mapper/lw"), mark)
    finally:
        subprocess.run(["dmsetup", "remove", "--retry", "lw"], check=True)
    with open(log_disk, "rb") as f:
        return f.read(LOG_BYTES)


def _our_export(disk: str, tmp_path: Path) -> bytes:
    cap, out = tmp_path / "w.cap", tmp_path / "w.lw"
    dev = api.wrap(disk)

    def mark(label: str) -> None:
        dev.mark(label)

    try:
        sh("udevadm", "settle")
        rec = start_record(dev.name, cap)
        _workload(dev.node, mark)
        time.sleep(0.5)
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=120 * SLOWDOWN)
        assert rec.returncode == 0, err
    finally:
        dev.unwrap()
    r = cli("export", str(cap), "--format", "log-writes", "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def test_our_export_reads_as_the_kernels_log(disk: str, disk2: str, tmp_path: Path) -> None:
    # a volatile write cache: flushes and FUA reach both targets, not dropped above them
    name = os.path.basename(os.path.realpath(disk))
    assert Path(f"/sys/block/{name}/queue/write_cache").read_text().strip() == "write back"
    subprocess.run(["modprobe", "dm-log-writes"], check=True)
    # the log device starts zeroed: nothing from an earlier test reads as entries
    subprocess.run(["blkdiscard", "-z", "-l", str(LOG_BYTES), disk2], check=True)
    kernel = _entries(_kernel_log(disk, disk2))
    ours = _entries(_our_export(disk, tmp_path))
    shown = [[(e[0], e[1], e[2], e[3]) for e in log] for log in (kernel, ours)]
    print(f"kernel: {shown[0]}\nours:   {shown[1]}")
    # the target's own order: marks at once, the O_DSYNC (FUA) write when it
    # completed, the first write with the fsync's flush, the last one (never
    # flushed) when the target went
    assert [e[4] for e in kernel if e[0] == "mark"] == [b"one", b"two", b"dm-log-writes-end"]
    writes = {e[1]: e for e in kernel if e[0] == "write"}
    assert sorted(writes) == [128, 256, 384], shown
    assert writes[128][2:] == (16, 0, pattern(1, 8192))
    assert writes[256][4] == pattern(2, 4096) and writes[384][4] == pattern(3, 4096)
    assert kernel[-2][0] == "write" and kernel[-2][1] == 384, shown
    assert ours == kernel, shown
