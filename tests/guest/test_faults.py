"""Faults and bad input: the disk's data stays safe whatever happens around
the target, and the kernel stays healthy (test_kernel_log runs after all)."""

from __future__ import annotations

import errno
import glob
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm._kernel_ffi import ffi
from imgrement_dm.dm import Control, Target
from imgrement_dm.errors import DeviceMapperError
from imgrement_dm.records import (
    BioRecord,
    Drop,
    Item,
    MarkRecord,
    RecordReader,
    decode,
    stream_path,
)
from tests.guest.helpers import (
    aligned,
    direct_read,
    direct_write,
    dm_devices,
    pattern,
    read_until_mark,
    sh,
)

REPO = Path(__file__).resolve().parents[2]


def _fio(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["fio", "--output-format=terse", "--terse-version=3", *args],
                       capture_output=True, text=True, check=False)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def _drain_checking_order(reader: RecordReader, stop: threading.Event,
                          out: list[Item]) -> None:
    while not stop.is_set() or not reader.eof:
        batch = reader.read(timeout=0.5)
        out.extend(batch)
        if stop.is_set() and not batch:
            return


@pytest.mark.parametrize("mode", ["meta", "writes", "all"])
def test_fio_verify_under_suspend_reload_and_capture_switches(disk: str, mode: str) -> None:
    dev = imgrement_dm.wrap(disk, capture=mode)
    reader = dev.records(first_seq=0)
    got: list[Item] = []
    stop = threading.Event()
    drainer = threading.Thread(target=_drain_checking_order, args=(reader, stop, got))
    drainer.start()
    churn_errors: list[str] = []
    churn_stop = threading.Event()
    table = dev.table()

    def churn() -> None:
        modes = ["meta", "writes", "all"]
        i = 0
        while not churn_stop.is_set():
            try:
                i += 1
                if i % 3 == 0:
                    new = (f"0 {table.length} imgrement {table.device} 0 1 "
                           f"capture:{modes[i % 3]}")
                    subprocess.run(["dmsetup", "reload", dev.name, "--table", new], check=True)
                    subprocess.run(["dmsetup", "suspend", dev.name], check=True)
                    subprocess.run(["dmsetup", "resume", dev.name], check=True)
                elif i % 3 == 1:
                    subprocess.run(["dmsetup", "suspend", dev.name], check=True)
                    subprocess.run(["dmsetup", "resume", dev.name], check=True)
                else:
                    dev.set_capture(modes[i % 3])
            except Exception as e:  # collected and reported below
                churn_errors.append(repr(e))
            time.sleep(0.3)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        _fio("--name=verify", f"--filename={dev.node}", "--rw=randwrite", "--bs=4k",
             "--size=48M", "--direct=1", "--ioengine=libaio", "--iodepth=8",
             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
    finally:
        churn_stop.set()
        churner.join()
    end = dev.mark("fio done")
    deadline = time.monotonic() + 60
    while not any(isinstance(i, MarkRecord) and i.seq == end for i in got):
        assert time.monotonic() < deadline, "the end mark never arrived"
        time.sleep(0.2)
    stop.set()
    drainer.join()
    reader.close()
    dev.unwrap()
    assert churn_errors == []
    # Ordering: sequence numbers strictly increase, gaps are reported drops.
    seqs = [i.seq for i in got if not isinstance(i, Drop)]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    dropped = sum(i.count for i in got if isinstance(i, Drop))
    assert len(seqs) + dropped == seqs[-1] - seqs[0] + 1
    # (bios that waited out a suspend reach the target from dm's worker, so
    # count writes by op, not by submitter: nothing else writes this disk)
    fio_writes = [i for i in got if isinstance(i, BioRecord) and i.op_name == "write"]
    assert len(fio_writes) + dropped >= (48 << 20) // 4096
    assert all(r.status == 0 for r in fio_writes)


@pytest.fixture
def error_device(disk2: str) -> Iterator[str]:
    size = sh("blockdev", "--getsz", disk2).strip()
    subprocess.run(["dmsetup", "create", "below", "--table", f"0 {size} error"], check=True)
    sh("udevadm", "settle")
    yield "/dev/mapper/below"
    subprocess.run(["dmsetup", "remove", "below"], check=False)


def _io_errno(path: str | Path, write: bool) -> int:
    fd = os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        buf = aligned(pattern(1, 4096))
        if write:
            os.pwrite(fd, buf, 0)
        else:
            os.preadv(fd, [buf], 0)
    except OSError as e:
        return e.errno or 0
    finally:
        os.close(fd)
    return 0


def test_errors_below_reach_the_submitter_and_the_records(error_device: str) -> None:
    with imgrement_dm.wrap(error_device, capture="all") as dev:
        with dev.records() as reader:
            reader.read(timeout=1)
            assert _io_errno(dev.node, write=True) == errno.EIO
            assert _io_errno(dev.node, write=False) == errno.EIO
            end = dev.mark("end")
            items = read_until_mark(reader, end)
        mine = [i for i in items if isinstance(i, BioRecord) and i.pid == os.getpid()]
        assert [(r.op_name, r.status) for r in mine] == [("write", -5), ("read", -5)]
        assert mine[1].payload_len == 0  # a failed read filled nothing


def test_a_failed_read_leaves_zeros_where_its_data_would_be(error_device: str) -> None:
    """A failed read keeps its reserved payload space; on a buffer that has
    wrapped, that space held earlier records' data, and the format promises
    zeros there, not old bytes."""
    with imgrement_dm.wrap(error_device, capture="all", buffer_kb=64) as dev:
        fd = os.open(stream_path(dev.name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        out = os.open(dev.node, os.O_RDWR | os.O_DIRECT)
        raw = b""
        try:
            data = aligned(pattern(9, 4096))
            # 40 failing writes keep their data (copied at submission): the
            # 64 KiB buffer wraps more than twice, full of pattern bytes
            for i in range(40):
                with pytest.raises(OSError):
                    os.pwrite(out, data, i * 4096)
                while True:  # consume as we go, so nothing is dropped
                    try:
                        os.read(fd, 1 << 20)
                    except BlockingIOError:
                        break
            for i in range(10):
                with pytest.raises(OSError):
                    os.preadv(out, [data], i * 4096)
            end = dev.mark("end")
            while not raw or decode(raw)[0][-1].seq != end:
                assert select.select([fd], [], [], 30)[0] == [fd], "the mark never came"
                raw += os.read(fd, 1 << 20)
        finally:
            os.close(out)
            os.close(fd)
        assert dev.status().dropped == 0
    head = ffi.sizeof("struct imgrement_bio_record")
    seg = ffi.sizeof("struct imgrement_segment")
    reads = 0
    off = 0
    while off < len(raw):
        size = int.from_bytes(raw[off:off + 4], "little")
        (rec,), _ = decode(raw[off:off + size])
        if isinstance(rec, BioRecord) and rec.pid == os.getpid() and rec.op_name == "read":
            assert (rec.status, rec.payload_len, rec.has_payload) == (-5, 0, False)
            rest = raw[off + head + seg * rec.nr_entries:off + size]
            assert len(rest) >= 4096, "the read's payload space was reserved"
            assert rest == bytes(len(rest)), f"read record {rec.seq} shows stale bytes"
            reads += 1
        off += size
    assert reads == 10


@pytest.mark.parametrize("feature,write_errno,status", [
    ("error_writes", errno.EIO, -5),
    ("drop_writes", 0, 0),
])
def test_flakey_below(disk2: str, feature: str, write_errno: int, status: int) -> None:
    size = sh("blockdev", "--getsz", disk2).strip()
    direct_write(disk2, 0, pattern(7, 4096))
    # up for 0 s, down for 3600 s: always in the failing state
    subprocess.run(["dmsetup", "create", "flaky", "--table",
                    f"0 {size} flakey {disk2} 0 0 3600 1 {feature}"], check=True)
    sh("udevadm", "settle")
    try:
        with imgrement_dm.wrap("/dev/mapper/flaky") as dev:
            with dev.records() as reader:
                reader.read(timeout=1)
                assert _io_errno(dev.node, write=True) == write_errno
                end = dev.mark("end")
                items = read_until_mark(reader, end)
            (w,) = [i for i in items if isinstance(i, BioRecord) and i.pid == os.getpid()]
            assert (w.op_name, w.status) == ("write", status)
            assert bytes(w.payload) == pattern(1, 4096)  # what was submitted
        # reads still pass through a flakey device in write-failure modes
        assert direct_read(disk2, 0, 4096) == pattern(7, 4096)
    finally:
        subprocess.run(["dmsetup", "remove", "flaky"], check=False)


def test_surprise_removal_under_fio() -> None:
    subprocess.run(["modprobe", "scsi_debug", "dev_size_mb=64"], check=True)
    try:
        sh("udevadm", "settle")
        disks = [p for p in glob.glob("/sys/bus/pseudo/drivers/scsi_debug/adapter*/host*/"
                                      "target*/*/block/*")]
        assert len(disks) == 1
        name = os.path.basename(disks[0])
        scsi_dev = Path(disks[0]).parents[1]
        dev = imgrement_dm.wrap(f"/dev/{name}")
        fio = subprocess.Popen(
            ["fio", "--name=gone", f"--filename={dev.node}", "--rw=randwrite", "--bs=4k",
             "--direct=1", "--ioengine=libaio", "--iodepth=4", "--time_based",
             "--runtime=60", "--size=32M"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        (scsi_dev / "delete").write_text("1\n")
        out, err = fio.communicate(timeout=120)
        assert fio.returncode != 0, "the submitter must see the disk go"
        assert "error" in (out + err).lower()
        # unwrap; the device may still be held briefly, so allow deferral
        imgrement_dm.unwrap(dev.name, deferred=True)
        deadline = time.monotonic() + 30
        while dm_devices() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dm_devices() == []
    finally:
        sh("udevadm", "settle")
        subprocess.run(["rmmod", "scsi_debug"], check=False)


def test_memory_pressure_loses_no_io(loopdev: str) -> None:
    cg = Path("/sys/fs/cgroup")
    if not (cg / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(cg)], check=True)
    (cg / "cgroup.subtree_control").write_text("+memory\n")
    group = cg / "imgrement-squeeze"
    group.mkdir(exist_ok=True)
    try:
        (group / "memory.max").write_text(str(48 << 20) + "\n")
        with imgrement_dm.wrap(loopdev, buffer_kb=64) as dev:
            script = (
                f"echo $$ > {group}/cgroup.procs && "
                f"fio --name=squeeze --filename={dev.node} --rw=write --bs=64k --size=48M "
                "--ioengine=psync --verify=crc32c --do_verify=1 --verify_fatal=1 "
                "--end_fsync=1 --buffered=1"
            )
            r = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                               check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            events = dict(line.split() for line in
                          (group / "memory.events").read_text().splitlines())
            assert int(events["max"]) > 0, "the squeeze never bit"
            assert dev.status().dropped > 0  # a 64 KiB buffer overflowed, the I/O did not
    finally:
        group.rmdir()


def test_four_devices_four_readers_never_mix(tmp_path: Path) -> None:
    loops = []
    for i in range(4):
        img = tmp_path / f"d{i}.img"
        with img.open("wb") as f:
            f.truncate(32 << 20)
        loops.append(sh("losetup", "--find", "--show", str(img)).strip())
    devs = []
    try:
        sh("udevadm", "settle")
        devs = [imgrement_dm.wrap(loop, name=f"traced{i}") for i, loop in enumerate(loops)]
        readers = [d.records() for d in devs]
        for r in readers:
            r.read(timeout=0.5)

        def work(i: int) -> None:
            fd = os.open(devs[i].node, os.O_WRONLY | os.O_DIRECT)
            try:
                for k in range(50):
                    os.pwrite(fd, aligned(pattern(1000 * i + k, 4096)), (i * 64 + k) * 4096)
            finally:
                os.close(fd)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for i, (d, r) in enumerate(zip(devs, readers)):
            end = d.mark(f"end{i}")
            items = read_until_mark(r, end)
            writes = [x for x in items if isinstance(x, BioRecord) and x.pid == os.getpid()]
            assert [x.sector for x in writes] == [(i * 64 + k) * 8 for k in range(50)]
            assert all(bytes(x.payload) == pattern(1000 * i + (x.sector // 8 - i * 64), 4096)
                       for x in writes)
            labels = [x.label for x in items if isinstance(x, MarkRecord)]
            assert labels == [f"end{i}"]
            r.close()
    finally:
        for d in devs:
            d.unwrap()
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)


def _bad_tables(dev: str, length: int) -> list[str]:
    """Several hundred malformed argument strings for the imgrement target."""
    rng = random.Random(20261125)
    good = [dev, "0", "3", "capture:all", "buffer_kb:1024", "log:off"]
    bad: list[str] = [
        "", "   ", "/dev/does-not-exist", "/etc/hostname", "999:999", f"{dev} -1",
        f"{dev} abc", f"{dev} 0x10", f"{dev} 1.5", f"{dev} 18446744073709551616",
        f"{dev} 99999999999999999999999", f"{dev} {length}", f"{dev} 1",
        f"{dev} 0 1", f"{dev} 0 2 capture:all", f"{dev} 0 1 capture:all log:on",
        f"{dev} 0 -1", f"{dev} 0 4294967296 capture:all", f"{dev} 0 x",
        f"{dev} 0 1 capture:", f"{dev} 0 1 capture:ALL", f"{dev} 0 1 capture:none",
        f"{dev} 0 1 buffer_kb:", f"{dev} 0 1 buffer_kb:0", f"{dev} 0 1 buffer_kb:63",
        f"{dev} 0 1 buffer_kb:1048577", f"{dev} 0 1 buffer_kb:-64",
        f"{dev} 0 1 buffer_kb:4294967296", f"{dev} 0 1 buffer_kb:64k",
        f"{dev} 0 1 log:", f"{dev} 0 1 log:yes", f"{dev} 0 2 log:on log:off",
        f"{dev} 0 2 capture:all capture:meta", f"{dev} 0 1 junk",
        f"{dev} 0 1 " + "capture:" + "a" * 4000, f"{dev} 0 1 " + "x" * 4000,
        "x" * 4000, f"{dev} 0 0 trailing",
    ]
    words = ["", "-", "0", "-1", "1e9", "capture:", "capture:all", "buffer_kb:64",
             "log:on", "\\", "%s", "%n", "18446744073709551615", "nan", dev, "ÿ", "a:b:c"]
    while len(bad) < 300:
        n = rng.randint(2, 7)
        args = [rng.choice(good[:2])] + [rng.choice(words) for _ in range(n)]
        if rng.random() < 0.5 and len(args) > 2:
            args[2] = str(rng.choice([len(args) - 2, len(args) - 4, len(args) + 1, 99]))
        cand = " ".join(args)
        if cand.split()[0] == dev and len(cand.split()) >= 3:
            tail = cand.split()[3:]
            try:
                if int(cand.split()[2]) == len(tail) and all(
                    w in ("capture:all", "buffer_kb:64", "log:on") for w in tail
                ) and len(set(tail)) == len(tail) and cand.split()[1] == "0":
                    continue  # accidentally valid
            except ValueError:
                pass
        bad.append(cand)
    return bad


def test_several_hundred_bad_tables_are_refused_cleanly(disk: str) -> None:
    length = int(sh("blockdev", "--getsz", disk))
    devno = sh("lsblk", "-dno", "MAJ:MIN", disk).strip()
    tables = _bad_tables(devno, length)
    assert len(tables) >= 300
    accepted: list[str] = []
    odd_errno: list[tuple[str, int]] = []
    with Control() as ctl:
        for params in tables:
            ctl.create("bad")
            try:
                ctl.load_table("bad", [Target(0, length, "imgrement", params)])
                accepted.append(params)
            except DeviceMapperError as e:
                # Which refusal errno a kernel picks for a bad path or number
                # varies (6.12 says ENAMETOOLONG for a 4000-byte path); what
                # matters is that it is a refusal, not a failure inside.
                if e.errno in (errno.ENOMEM, errno.EFAULT, errno.EIO, errno.EBUSY):
                    odd_errno.append((params, e.errno))
            finally:
                ctl.remove("bad")
    assert accepted == [] and odd_errno == []
    # the kernel's own reason reaches our error message
    with Control() as ctl:
        ctl.create("bad")
        try:
            with pytest.raises(DeviceMapperError, match="Invalid capture mode"):
                ctl.load_table("bad", [Target(0, length, "imgrement", f"{devno} 0 1 capture:x")])
        finally:
            ctl.remove("bad")
    # and the standard tool refuses them too, leaving nothing behind
    for params in tables[:120]:
        r = subprocess.run(["dmsetup", "create", "bad", "--table",
                            f"0 {length} imgrement {params}"],
                           capture_output=True, text=True, check=False)
        assert r.returncode != 0, params
    sh("udevadm", "settle")
    assert dm_devices() == []


def test_unprivileged_cli_says_it_needs_root(disk: str) -> None:
    site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    env = {"PYTHONPATH": f"{REPO}:{site}", "PATH": "/usr/bin:/bin", "HOME": "/"}
    for args in (["wrap", disk], ["list"], ["status", "traced"], ["unwrap", "traced"]):
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "/usr/bin/python3", "-m", "imgrement_dm.cli", *args],
            capture_output=True, text=True, check=False, env=env)
        assert r.returncode == 3, (args, r.stderr)
        assert "needs root" in r.stderr and "Traceback" not in r.stderr
