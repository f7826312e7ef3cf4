"""Block devices as the user names them: resolve, check, refuse with reasons.

Before a disk is wrapped we make sure it is the block device the user meant
and that nothing else is using it, and we say exactly why when it is not.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from imgrement_dm.errors import (
    DeviceBusyError,
    DeviceNotFoundError,
    NotABlockDeviceError,
)

#: The uuid prefix of every device-mapper device this tool creates.
UUID_PREFIX = "IMGREMENT-"

SYS_BLOCK = Path("/sys/dev/block")


@dataclass(frozen=True)
class BlockDevice:
    """A block device resolved from a user's path."""

    path: str
    major: int
    minor: int
    kname: str
    sectors: int
    is_partition: bool

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def sysfs(self) -> Path:
        return SYS_BLOCK / self.devno


def resolve(path: str) -> BlockDevice:
    """The block device at ``path``; typed errors for anything else."""
    if not os.path.lexists(path):
        raise DeviceNotFoundError(
            f"{path} does not exist: give the path of a block device, such as /dev/sdb "
            "(lsblk lists them)"
        )
    try:
        st = os.stat(path)
    except OSError as e:
        raise DeviceNotFoundError(f"cannot use {path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else (
            "a directory" if stat.S_ISDIR(st.st_mode) else "not a block device"
        )
        hint = (
            f"; to trace a disk image, attach it first with 'losetup --find --show {path}' "
            "and wrap the loop device"
            if stat.S_ISREG(st.st_mode)
            else ""
        )
        raise NotABlockDeviceError(f"{path} is {kind}, not a block device{hint}")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sysfs = SYS_BLOCK / f"{major}:{minor}"
    try:
        sectors = int((sysfs / "size").read_text())
    except OSError:
        raise DeviceNotFoundError(
            f"{path} is block device {major}:{minor}, which the kernel does not know "
            "(a stale node?)"
        ) from None
    return BlockDevice(
        path=path,
        major=major,
        minor=minor,
        kname=sysfs.resolve().name,
        sectors=sectors,
        is_partition=(sysfs / "partition").exists(),
    )


def _partitions(dev: BlockDevice) -> list[Path]:
    if dev.is_partition:
        return []
    return sorted(p for p in dev.sysfs.resolve().iterdir() if (p / "partition").exists())


def _mounts() -> dict[str, str]:
    """major:minor -> first mount point, from /proc/self/mountinfo."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.setdefault(fields[2], fields[4])
    return out


def _swaps() -> set[str]:
    devs: set[str] = set()
    try:
        with open("/proc/swaps") as f:
            next(f, None)
            for line in f:
                name = line.split()[0]
                try:
                    st = os.stat(name)
                except OSError:
                    continue
                if stat.S_ISBLK(st.st_mode):
                    devs.add(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    except OSError:
        pass
    return devs


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def describe_holder(holder: Path) -> tuple[str, bool]:
    """A readable name for a holder in sysfs, and whether it is one of ours."""
    dm_name = _read(holder / "dm" / "name")
    if dm_name:
        ours = _read(holder / "dm" / "uuid").startswith(UUID_PREFIX)
        return f"device-mapper device {dm_name!r} ({holder.name})", ours
    if holder.name.startswith("md"):
        return f"md RAID array {holder.name}", False
    return holder.name, False


def check_unused(dev: BlockDevice, *, doing: str = "wrap") -> None:
    """Refuse a device that is mounted, swapped on, held, or already wrapped.

    ``doing`` is "wrap" or "replay" (writing a capture onto the device): the
    checks are the same, the advice differs.
    """
    wrap = doing == "wrap"
    mounts = _mounts()
    swaps = _swaps()
    members = [(dev.path, dev.sysfs.resolve())] + [
        (f"/dev/{p.name}", p) for p in _partitions(dev)
    ]
    for shown, sysdir in members:
        devno = _read(sysdir / "dev")
        whose = "" if shown == dev.path else f" (partition of {dev.path})"
        for holder in sorted((sysdir / "holders").glob("*")):
            what, ours = describe_holder(holder)
            if ours:
                name = _read(holder / "dm" / "name")
                advice = (f"trace that device, or unwrap it first with 'imgrement-dm unwrap "
                          f"{name}'" if wrap else
                          f"writing below it would bypass the trace: replay onto "
                          f"/dev/mapper/{name}, or unwrap it first")
                raise DeviceBusyError(
                    f"{shown}{whose} is already wrapped by imgrement device {name!r} "
                    f"(/dev/mapper/{name}); {advice}"
                )
            why = ("wrapping it would trace only part of its I/O" if wrap else
                   "writing below it would corrupt what it holds")
            raise DeviceBusyError(f"{shown}{whose} is in use by {what}; {why}: stop that "
                                  "user first")
        if devno in mounts:
            then = ", then wrap it and mount /dev/mapper/NAME instead" if wrap else ""
            raise DeviceBusyError(
                f"{shown}{whose} is mounted at {mounts[devno]}; unmount it first "
                f"('umount {mounts[devno]}'){then}"
            )
        if devno in swaps:
            raise DeviceBusyError(f"{shown}{whose} is in use as swap; run 'swapoff {shown}' first")
    _check_exclusive(dev)


def _check_exclusive(dev: BlockDevice) -> None:
    """Last word: the kernel refuses O_EXCL while anyone holds the device exclusively."""
    os.close(open_exclusive(dev, os.O_RDONLY))


def open_exclusive(dev: BlockDevice, mode: int) -> int:
    """``dev`` opened with O_EXCL (no mount or holder can take it meanwhile), checked
    to be the device that was resolved."""
    try:
        fd = os.open(dev.path, mode | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusyError(
                f"{dev.path} is in use (the kernel refuses an exclusive open); find the "
                "user with 'lsblk' or 'fuser -vm' and stop it first"
            ) from None
        raise DeviceNotFoundError(f"cannot open {dev.path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if (os.major(st.st_rdev), os.minor(st.st_rdev)) != (dev.major, dev.minor):
            raise DeviceBusyError(f"{dev.path} changed while it was being checked; try again")
    except BaseException:
        os.close(fd)
        raise
    return fd
