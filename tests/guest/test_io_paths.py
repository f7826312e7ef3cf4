"""Every way I/O can reach the disk through the mapped device is traced or
refused: SCSI passthrough (SG_IO) is refused, since it would change the disk
with no bio; RWF_NOWAIT and io_uring's inline issue go through and are
recorded (every kernel we build for lets a target take REQ_NOWAIT bios)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm.records import BioRecord, Item
from tests.guest.helpers import aligned, direct_read, pattern, read_until_mark, sh

SG_IO = 0x2285
SG_DXFER_TO_DEV = -2
F_NOWAIT = 1 << 7  # IMGREMENT_F_NOWAIT


class SgIoHdr(ctypes.Structure):
    """struct sg_io_hdr (scsi/sg.h), as the kernel lays it out on x86-64."""

    _fields_ = [
        ("interface_id", ctypes.c_int),
        ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte),
        ("mx_sb_len", ctypes.c_ubyte),
        ("iovec_count", ctypes.c_ushort),
        ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p),
        ("cmdp", ctypes.c_void_p),
        ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p),
        ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte),
        ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte),
        ("host_status", ctypes.c_ushort),
        ("driver_status", ctypes.c_ushort),
        ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint),
        ("info", ctypes.c_uint),
    ]


def sg_write10(path: str, lba: int, data: bytes) -> None:
    """A SCSI WRITE(10) of ``data`` (whole 512 B blocks) at ``lba``, by SG_IO."""
    blocks = len(data) // 512
    cdb = (ctypes.c_ubyte * 10)(0x2A, 0, *lba.to_bytes(4, "big"), 0,
                                *blocks.to_bytes(2, "big"), 0)
    buf = ctypes.create_string_buffer(data, len(data))
    sense = ctypes.create_string_buffer(32)
    hdr = SgIoHdr(interface_id=ord("S"), dxfer_direction=SG_DXFER_TO_DEV, cmd_len=10,
                  mx_sb_len=32, dxfer_len=len(data),
                  dxferp=ctypes.cast(buf, ctypes.c_void_p),
                  cmdp=ctypes.cast(cdb, ctypes.c_void_p),
                  sbp=ctypes.cast(sense, ctypes.c_void_p), timeout=10_000)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.ioctl(fd, SG_IO, hdr)
    finally:
        os.close(fd)
    assert (hdr.status, hdr.host_status, hdr.driver_status) == (0, 0, 0), "WRITE(10) failed"


@pytest.fixture
def scsi_disk() -> Iterator[str]:
    subprocess.run(["modprobe", "scsi_debug", "dev_size_mb=16"], check=True)
    try:
        sh("udevadm", "settle")
        disks = glob.glob("/sys/bus/pseudo/drivers/scsi_debug/adapter*/host*/target*/*/block/*")
        assert len(disks) == 1
        yield f"/dev/{os.path.basename(disks[0])}"
    finally:
        sh("udevadm", "settle")
        subprocess.run(["modprobe", "-r", "scsi_debug"], check=False)


def mine(items: list[Item]) -> list[BioRecord]:
    return [r for r in items if isinstance(r, BioRecord) and r.pid == os.getpid()]


@pytest.mark.smoke
def test_scsi_passthrough_is_refused_and_the_disk_unchanged(scsi_disk: str) -> None:
    data = pattern(11, 4096)
    # the command itself is good: sent to the disk, it writes
    sg_write10(scsi_disk, 64, data)
    assert direct_read(scsi_disk, 64 * 512, 4096) == data
    with imgrement_dm.wrap(scsi_disk) as dev:
        sh("udevadm", "settle")
        with dev.records() as reader:
            reader.read(timeout=1)
            with pytest.raises(OSError) as e:
                sg_write10(str(dev.node), 8, data)
            assert e.value.errno == errno.ENOTTY
            end = dev.mark("end")
            items = read_until_mark(reader, end)
        assert mine(items) == []
    # nothing reached the disk behind the trace's back
    assert direct_read(scsi_disk, 8 * 512, 4096) == bytes(4096)


#: _IOW('p', 200, struct pr_registration): 24 bytes {old_key, new_key, flags, pad}
IOC_PR_REGISTER = (1 << 30) | (24 << 16) | (ord("p") << 8) | 200


def _pr_register(path: str) -> int:
    """IOC_PR_REGISTER of a new key on ``path``: 0, or the errno it failed with."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.ioctl(fd, IOC_PR_REGISTER, struct.pack("<QQII", 0, 0x1234ABCD, 0, 0))
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


def test_persistent_reservations_reach_the_disk_unrecorded(scsi_disk: str) -> None:
    """What the target's top comment says: device-mapper hands IOC_PR_REGISTER to
    the disk through .iterate_devices, not through the target, so it is not
    refused as SG_IO is (ENOTTY) but answered by the disk, and nothing of it
    is in the stream.  (It changes who may write, never the data.)"""
    with imgrement_dm.wrap(scsi_disk) as dev:
        sh("udevadm", "settle")
        with dev.records() as reader:
            reader.read(timeout=1)
            through = _pr_register(str(dev.node))
            end = dev.mark("end")
            items = read_until_mark(reader, end)
        assert mine(items) == []
    assert through != errno.ENOTTY, "refused by device-mapper: the docs are wrong"
    # the disk's own answer: the same once more, now on the disk itself (it
    # may refuse a second registration of the key the first one made)
    direct = _pr_register(scsi_disk)
    assert direct != errno.ENOTTY and (through == 0 or through == direct), (through, direct)


@pytest.mark.smoke
def test_rwf_nowait_write_goes_through_and_is_recorded(disk: str) -> None:
    data = pattern(12, 4096)
    with imgrement_dm.wrap(disk) as dev:
        sh("udevadm", "settle")
        with dev.records() as reader:
            reader.read(timeout=1)
            fd = os.open(dev.node, os.O_WRONLY | os.O_DIRECT)
            try:
                buf = aligned(data)
                # (without DM_TARGET_NOWAIT this failed with EOPNOTSUPP)
                for _ in range(100):  # EAGAIN is its right answer when it would block
                    try:
                        assert os.pwritev(fd, [buf], 4096, os.RWF_NOWAIT) == 4096
                        break
                    except BlockingIOError:
                        continue
                else:
                    raise AssertionError("RWF_NOWAIT write never went through")
            finally:
                os.close(fd)
            end = dev.mark("end")
            items = read_until_mark(reader, end)
        (w,) = [r for r in mine(items) if r.op_name == "write"]
        assert (w.sector, w.size, bytes(w.payload)) == (8, 4096, data)
        assert w.flags & F_NOWAIT
    assert direct_read(disk, 4096, 4096) == data


@pytest.mark.smoke
def test_io_uring_issues_inline_and_every_write_is_recorded(disk: str, tmp_path: Path) -> None:
    """Without nowait support io_uring hands every I/O to a worker thread
    (iou-wrk-*); with it, fio's own thread submits most of them: the records
    say which."""
    with imgrement_dm.wrap(disk) as dev:
        sh("udevadm", "settle")
        with dev.records() as reader:
            reader.read(timeout=1)
            r = subprocess.run(
                ["fio", "--name=uring", f"--filename={dev.node}", "--ioengine=io_uring",
                 "--direct=1", "--rw=write", "--bs=4k", "--size=4M", "--iodepth=8",
                 "--verify=crc32c", "--do_verify=1"],
                capture_output=True, text=True, timeout=300, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            end = dev.mark("end")
            items = read_until_mark(reader, end)
        writes = [i for i in items if isinstance(i, BioRecord) and i.op_name == "write"]
        assert sorted(w.sector for w in writes) == list(range(0, 8192, 8))
        assert all(w.size == 4096 and w.status == 0 for w in writes)
        # A write whose inline issue would block (EAGAIN) is retried from a
        # worker, so a few may carry iou-wrk-*; without nowait support every
        # one does.
        inline = sum(w.comm == "fio" for w in writes)
        assert inline >= len(writes) // 2, (
            f"only {inline} of {len(writes)} writes were issued inline; the rest were "
            f"punted to io_uring workers: {sorted({w.comm for w in writes})}")
        assert dev.status().dropped == 0


@pytest.mark.smoke
def test_discard_over_a_loop_file_on_overlayfs_warns_nothing(tmp_path: Path) -> None:
    """5.10's loop driver claims discard with a granularity of 0 for a file
    on overlayfs (the guest's /tmp); device-mapper stacked on it then took
    BLKDISCARD and hit a kernel WARNING ("discard_granularity is 0").  Over
    such a device the target takes no discards (EOPNOTSUPP); where the loop
    device is sane, the discard goes through and is recorded."""
    image = tmp_path / "d.img"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    try:
        q = Path("/sys/block") / Path(loop).name / "queue"
        claims = int((q / "discard_max_bytes").read_text()) > 0
        usable = claims and int((q / "discard_granularity").read_text()) > 0
        said = sh("dmesg").count("discard_granularity is 0")
        dev = imgrement_dm.wrap(loop)
        try:
            sh("udevadm", "settle")
            with dev.records() as reader:
                reader.read(timeout=0)
                r = subprocess.run(["blkdiscard", str(dev.node)], capture_output=True,
                                   text=True, timeout=120, check=False)
                items = read_until_mark(reader, dev.mark("end"))
        finally:
            dev.unwrap()
        assert sh("dmesg").count("discard_granularity is 0") == said
        discards = [i for i in items if isinstance(i, BioRecord) and i.op_name == "discard"]
        if usable:
            assert r.returncode == 0, r.stderr
            assert sum(d.size for d in discards) == 16 << 20
        else:  # (5.10 over overlayfs: claims, granularity 0; the warning came from here)
            assert r.returncode != 0 and "Operation not supported" in r.stderr, r.stderr
            assert discards == []
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
