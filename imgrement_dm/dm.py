"""Device-mapper control: one narrow ioctl core and a thin method per command.

Every command goes through :meth:`Control._ioctl`, which fills the
``struct dm_ioctl`` header (its layout comes from ``<linux/dm-ioctl.h>`` via
cffi), grows the buffer when the kernel sets ``DM_BUFFER_FULL_FLAG``, and
turns errno into a typed exception.  The methods above it only build payloads
and parse replies; they know nothing of our target.  The commands that make
or remove a node (resume, remove) wait for it themselves (udev or, without
udev, our own mknod), so /dev/mapper/NAME is there, or gone, when they
return: no caller needs ``udevadm settle``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from imgrement_dm import kmsg, udevsync
from imgrement_dm._kernel_ffi import ffi, lib
from imgrement_dm.errors import (
    DeviceMapperError,
    ImgrementError,
    InvalidNameError,
    NameTakenError,
    NoSuchMappingError,
    NotRootError,
)

CONTROL_PATH = "/dev/mapper/control"

#: The interface version we ask for.  The kernel refuses a request whose
#: major differs or whose minor is newer than its own, so asking for 4.0.0
#: works on every kernel we support and the reply tells us the real version.
REQUEST_VERSION = (lib.DM_VERSION_MAJOR, 0, 0)

HEADER_SIZE: int = ffi.sizeof("struct dm_ioctl")
SPEC_SIZE: int = ffi.sizeof("struct dm_target_spec")
#: libdm starts its list, status and message buffers at 16 KiB.
INITIAL_BUFFER = 16 * 1024
MAX_BUFFER = 64 * 1024 * 1024

_NAME_RE = re.compile(r"^[A-Za-z0-9#+\-.:=@_]+$")


@dataclass(frozen=True)
class DeviceInfo:
    """What the kernel says of one mapped device (the reply header)."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    target_count: int
    event_nr: int
    flags: int

    @property
    def suspended(self) -> bool:
        return bool(self.flags & lib.DM_SUSPEND_FLAG)

    @property
    def active_table(self) -> bool:
        return bool(self.flags & lib.DM_ACTIVE_PRESENT_FLAG)

    @property
    def inactive_table(self) -> bool:
        return bool(self.flags & lib.DM_INACTIVE_PRESENT_FLAG)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & lib.DM_READONLY_FLAG)

    @property
    def uevent_generated(self) -> bool:
        """Did the ioctl that returned this send a uevent (so udev will act)?"""
        return bool(self.flags & lib.DM_UEVENT_GENERATED_FLAG)


@dataclass(frozen=True)
class Target:
    """One line of a table: ``<start> <length> <type> <params>``."""

    start: int
    length: int
    target_type: str
    params: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.target_type} {self.params}"


@dataclass(frozen=True)
class _Reply:
    version: tuple[int, int, int]
    flags: int
    event_nr: int
    target_count: int
    open_count: int
    dev: int
    name: str
    uuid: str
    data: bytes


def decode_dev(dev: int) -> tuple[int, int]:
    """Split the kernel's huge_encode_dev() form into (major, minor)."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return major, minor


def encode_dev(major: int, minor: int) -> int:
    """The inverse of :func:`decode_dev`, as the kernel's huge_decode_dev expects."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def check_name(name: str) -> str:
    """Refuse names that device-mapper or udev would reject or mangle."""
    if not name or len(name.encode()) >= lib.DM_NAME_LEN:
        raise InvalidNameError(
            f"invalid device name {name!r}: use 1 to {lib.DM_NAME_LEN - 1} characters"
        )
    if name in (".", "..") or not _NAME_RE.match(name):
        raise InvalidNameError(
            f"invalid device name {name!r}: use only letters, digits and #+-.:=@_"
        )
    return name


def _cstr(raw: Any) -> str:
    return str(ffi.string(raw).decode("utf-8", "replace"))


def _c_string_at(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    if end < 0:
        end = len(data)
    return data[offset:end].decode("utf-8", "replace")


def _align8(n: int) -> int:
    return (n + 7) & ~7


class Control:
    """An open ``/dev/mapper/control``; use as a context manager.

    Opening checks that the node really is the device-mapper control device
    and that the kernel speaks interface major 4.
    """

    def __init__(self, path: str = CONTROL_PATH) -> None:
        self._use_udev: bool | None = None
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImgrementError(
                f"{path} does not exist: device-mapper is not available in this kernel; "
                "load it with 'modprobe dm-mod'"
            ) from None
        except PermissionError:
            raise NotRootError(
                f"cannot open {path}: device-mapper control needs root (CAP_SYS_ADMIN); "
                "run the command with sudo"
            ) from None
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISCHR(st.st_mode):
                raise ImgrementError(f"{path} is not a character device; is /dev mounted?")
            self.kernel_version = self.version()
            if self.kernel_version[0] != lib.DM_VERSION_MAJOR:
                raise ImgrementError(
                    f"kernel device-mapper interface {self.kernel_version} is not "
                    f"major version {lib.DM_VERSION_MAJOR}; this tool cannot drive it"
                )
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def use_udev(self) -> bool:
        """Does udev make our nodes (asked once per Control)?"""
        if self._use_udev is None:
            self._use_udev = udevsync.udev_running()
        return self._use_udev

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the core ---------------------------------------------------------

    def _ioctl(
        self,
        command: str,
        *,
        name: str = "",
        uuid: str = "",
        dev: int = 0,
        flags: int = 0,
        event_nr: int = 0,
        target_count: int = 0,
        payload: bytes = b"",
        buffer_size: int = 0,
    ) -> _Reply:
        request = getattr(lib, command)
        size = max(HEADER_SIZE + len(payload), buffer_size)
        name_b = name.encode()
        uuid_b = uuid.encode()
        if len(name_b) >= lib.DM_NAME_LEN or len(uuid_b) >= lib.DM_UUID_LEN:
            raise InvalidNameError(f"name or uuid too long for device-mapper: {name!r}")
        while True:
            buf = bytearray(size)
            io = ffi.from_buffer("struct dm_ioctl *", buf)
            io.version = list(REQUEST_VERSION)
            io.data_size = size
            io.data_start = HEADER_SIZE
            io.target_count = target_count
            io.flags = flags
            io.event_nr = event_nr
            io.dev = dev
            ffi.memmove(io.name, name_b, len(name_b))
            ffi.memmove(io.uuid, uuid_b, len(uuid_b))
            buf[HEADER_SIZE : HEADER_SIZE + len(payload)] = payload
            try:
                fcntl.ioctl(self._fd, request, buf, True)
            except OSError as e:
                raise self._error(command, name, e.errno or errno.EIO) from None
            if io.flags & lib.DM_BUFFER_FULL_FLAG:
                if size >= MAX_BUFFER:
                    raise DeviceMapperError(command, errno.ENOBUFS, "reply larger than 64 MiB")
                size *= 2
                continue
            start, used = io.data_start, io.data_size
            return _Reply(
                version=(int(io.version[0]), int(io.version[1]), int(io.version[2])),
                flags=io.flags,
                event_nr=io.event_nr,
                target_count=io.target_count,
                open_count=io.open_count,
                dev=io.dev,
                name=_cstr(io.name),
                uuid=_cstr(io.uuid),
                data=bytes(buf[start:used]) if used > start else b"",
            )

    @staticmethod
    def _error(command: str, name: str, err: int) -> ImgrementError:
        if err in (errno.EPERM, errno.EACCES):
            return NotRootError(f"device-mapper {command} needs root (CAP_SYS_ADMIN)")
        if err == errno.ENXIO and name and command != "DM_TABLE_LOAD":
            # (a table load also says ENXIO when a device in the table is missing)
            return NoSuchMappingError(f"no device-mapper device named {name!r}")
        if err == errno.EBUSY and command == "DM_DEV_CREATE":
            return NameTakenError(
                f"a device-mapper device named {name!r} (or with that uuid) exists already; "
                "choose another name with --name"
            )
        return DeviceMapperError(command, err, f"device {name!r}" if name else "")

    @staticmethod
    def _info(reply: _Reply) -> DeviceInfo:
        major, minor = decode_dev(reply.dev)
        return DeviceInfo(
            name=reply.name,
            uuid=reply.uuid,
            major=major,
            minor=minor,
            open_count=reply.open_count,
            target_count=reply.target_count,
            event_nr=reply.event_nr,
            flags=reply.flags,
        )

    # -- commands ---------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """DM_VERSION: the kernel's interface version."""
        return self._ioctl("DM_VERSION").version

    def list_devices(self) -> list[tuple[str, int, int]]:
        """DM_LIST_DEVICES: (name, major, minor) of every mapped device."""
        reply = self._ioctl("DM_LIST_DEVICES", buffer_size=INITIAL_BUFFER)
        return list(_parse_name_list(reply.data))

    def create(self, name: str, uuid: str = "") -> DeviceInfo:
        """DM_DEV_CREATE: a new device with no table (no node until resume)."""
        check_name(name)
        return self._info(self._ioctl("DM_DEV_CREATE", name=name, uuid=uuid,
                                      event_nr=udevsync.cookie(self.use_udev)))

    def load_table(self, name: str, targets: list[Target], *, read_only: bool = False) -> None:
        """DM_TABLE_LOAD: put ``targets`` into the inactive slot of ``name``."""
        payload = bytearray()
        for t in targets:
            params = t.params.encode() + b"\0"
            entry_len = _align8(SPEC_SIZE + len(params))
            spec_buf = bytearray(entry_len)
            spec = ffi.from_buffer("struct dm_target_spec *", spec_buf)
            spec.sector_start = t.start
            spec.length = t.length
            spec.status = 0
            spec.next = entry_len
            ttype = t.target_type.encode()
            if len(ttype) >= lib.DM_MAX_TYPE_NAME:
                raise DeviceMapperError("DM_TABLE_LOAD", errno.EINVAL, "target type too long")
            ffi.memmove(spec.target_type, ttype, len(ttype))
            spec_buf[SPEC_SIZE : SPEC_SIZE + len(params)] = params
            payload += spec_buf
        flags = lib.DM_READONLY_FLAG if read_only else 0
        with kmsg.Cursor() as log:
            try:
                self._ioctl(
                    "DM_TABLE_LOAD",
                    name=name,
                    flags=flags,
                    target_count=len(targets),
                    payload=bytes(payload),
                )
            except DeviceMapperError as e:
                # The target's own reason (ti->error) only reaches the kernel log,
                # in a line that names the device by number.
                lines = log.read_new()
                try:
                    dev = self.info(name)
                except ImgrementError:
                    raise e from None
                reason = table_reason(lines, dev.major, dev.minor)
                if reason:
                    raise DeviceMapperError(e.command, e.errno or errno.EIO, reason) from None
                raise

    def clear_table(self, name: str) -> None:
        """DM_TABLE_CLEAR: drop the inactive table of ``name``."""
        self._ioctl("DM_TABLE_CLEAR", name=name)

    def suspend(self, name: str, *, noflush: bool = False) -> DeviceInfo:
        """DM_DEV_SUSPEND with DM_SUSPEND_FLAG: quiesce I/O on ``name``."""
        flags = lib.DM_SUSPEND_FLAG | (lib.DM_NOFLUSH_FLAG if noflush else 0)
        return self._info(self._ioctl("DM_DEV_SUSPEND", name=name, flags=flags))

    def resume(self, name: str, *, timeout: float = udevsync.DEFAULT_TIMEOUT) -> DeviceInfo:
        """DM_DEV_SUSPEND without the flag: swap in the inactive table and resume.

        Returns once /dev/mapper/NAME is the device's node.  Resuming a device
        that was not suspended sends no uevent, and then returns at once.
        """
        with udevsync.NodeSync(use_udev=self.use_udev, timeout=timeout) as sync:
            info = self._info(self._ioctl("DM_DEV_SUSPEND", name=name, event_nr=sync.cookie))
            sync.node_created(name, info.major, info.minor, uevent=info.uevent_generated)
        return info

    def remove(self, name: str, *, deferred: bool = False,
               timeout: float = udevsync.DEFAULT_TIMEOUT) -> DeviceInfo:
        """DM_DEV_REMOVE; with ``deferred`` the kernel removes it at last close.

        Returns once /dev/mapper/NAME is gone, or at once when the removal was
        deferred (the reply then says no uevent was sent).
        """
        flags = lib.DM_DEFERRED_REMOVE if deferred else 0
        # the reply of a remove does not carry the device number: take it first
        before = self.info(name)
        with udevsync.NodeSync(use_udev=self.use_udev, timeout=timeout) as sync:
            reply = self._ioctl("DM_DEV_REMOVE", name=name, flags=flags, event_nr=sync.cookie)
            info = replace(before, flags=reply.flags, event_nr=reply.event_nr)
            sync.node_removed(name, info.major, info.minor, uevent=info.uevent_generated)
        return info

    def info(self, name: str) -> DeviceInfo:
        """DM_DEV_STATUS: the header facts of ``name``."""
        return self._info(self._ioctl("DM_DEV_STATUS", name=name))

    def table_status(
        self, name: str, *, table: bool = False, inactive: bool = False
    ) -> list[Target]:
        """DM_TABLE_STATUS: each target's status line, or its table line."""
        flags = (lib.DM_STATUS_TABLE_FLAG if table else 0) | (
            lib.DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0
        )
        reply = self._ioctl(
            "DM_TABLE_STATUS", name=name, flags=flags, buffer_size=INITIAL_BUFFER
        )
        return list(_parse_specs(reply.data, reply.target_count))

    def deps(self, name: str) -> list[tuple[int, int]]:
        """DM_TABLE_DEPS: (major, minor) of each device the table uses."""
        reply = self._ioctl("DM_TABLE_DEPS", name=name, buffer_size=INITIAL_BUFFER)
        deps = ffi.from_buffer("struct dm_target_deps *", reply.data)
        first = ffi.offsetof("struct dm_target_deps", "dev")
        out = []
        for i in range(deps.count):
            raw = int.from_bytes(reply.data[first + 8 * i : first + 8 * i + 8], "little")
            out.append(decode_dev(raw))
        return out

    def message(self, name: str, text: str, sector: int = 0) -> str | None:
        """DM_TARGET_MSG: send ``text`` to the target at ``sector``; its reply, if any."""
        msg = text.encode() + b"\0"
        head = ffi.offsetof("struct dm_target_msg", "message")
        payload = bytearray(head + len(msg))
        ffi.from_buffer("struct dm_target_msg *", payload).sector = sector
        payload[head:] = msg
        reply = self._ioctl(
            "DM_TARGET_MSG", name=name, payload=bytes(payload), buffer_size=INITIAL_BUFFER
        )
        if reply.flags & lib.DM_DATA_OUT_FLAG:
            return _c_string_at(reply.data, 0)
        return None

    def list_versions(self) -> dict[str, tuple[int, int, int]]:
        """DM_LIST_VERSIONS: every target type the kernel has loaded."""
        reply = self._ioctl("DM_LIST_VERSIONS", buffer_size=INITIAL_BUFFER)
        return dict(_parse_versions(reply.data))


def table_reason(lines: list[str], major: int, minor: int) -> str | None:
    """The kernel's reason for refusing a table of device major:minor.

    dm-table logs ``device-mapper: table: MAJ:MIN: <type>: <reason>``; a line
    for another device (a table refused at the same moment elsewhere) is
    not this device's reason.
    """
    prefix = f"device-mapper: table: {major}:{minor}: "
    mine = [line for line in lines if line.startswith(prefix)]
    return mine[-1] if mine else None


def _parse_name_list(data: bytes) -> Iterator[tuple[str, int, int]]:
    name_at = ffi.offsetof("struct dm_name_list", "name")
    offset = 0
    while offset + name_at <= len(data):
        entry = ffi.from_buffer("struct dm_name_list *", data[offset:])
        if entry.dev == 0:
            return
        major, minor = decode_dev(entry.dev)
        yield _c_string_at(data, offset + name_at), major, minor
        if entry.next == 0:
            return
        offset += entry.next


def _parse_specs(data: bytes, count: int) -> Iterator[Target]:
    offset = 0
    for _ in range(count):
        spec = ffi.from_buffer("struct dm_target_spec *", data[offset:])
        yield Target(
            start=int(spec.sector_start),
            length=int(spec.length),
            target_type=_cstr(spec.target_type),
            params=_c_string_at(data, offset + SPEC_SIZE),
        )
        # In replies, next is an offset from the start of the data area.
        offset = int(spec.next)


def _parse_versions(data: bytes) -> Iterator[tuple[str, tuple[int, int, int]]]:
    name_at = ffi.offsetof("struct dm_target_versions", "name")
    offset = 0
    while offset + name_at <= len(data):
        entry = ffi.from_buffer("struct dm_target_versions *", data[offset:])
        version = (int(entry.version[0]), int(entry.version[1]), int(entry.version[2]))
        yield _c_string_at(data, offset + name_at), version
        if entry.next == 0:
            return
        offset += entry.next


__all__ = [
    "CONTROL_PATH",
    "Control",
    "DeviceInfo",
    "Target",
    "check_name",
    "decode_dev",
    "encode_dev",
]
