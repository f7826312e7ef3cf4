"""The scripting API: wrap a disk, look at it, unwrap it.

``wrap()`` is the whole life of a traced device in one call: it checks the
disk, creates the mapping with our uuid prefix, waits for udev, and undoes
everything it did if any step fails, so a refused wrap leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from imgrement_dm import defaults, devices, layout
from imgrement_dm.dm import Control, DeviceInfo, Target, check_name
from imgrement_dm.errors import (
    DeviceBusyError,
    DeviceError,
    DeviceMapperError,
    ImgrementError,
    NameTakenError,
    NoSuchMappingError,
    NotRootError,
    TargetNotLoadedError,
)
from imgrement_dm.records import RecordReader
from imgrement_dm.table import CAPTURE_MODES, OVERFLOW_POLICIES, TARGET_TYPE, ImgrementTable

UUID_PREFIX = devices.UUID_PREFIX
MARK_MAX = layout.MARK_MAX
DEFAULT_NAME = defaults.DEFAULT_NAME
#: How long unwrap waits for a short-lived opener (udev's probe) to go away.
TRANSIENT_OPEN_WAIT = 5.0
#: modprobe of a module already on disk takes well under a second.
MODPROBE_TIMEOUT = 60


@dataclass(frozen=True)
class Status:
    """The target's INFO line: counters since load (or reset-stats) and settings."""

    bios: int
    bytes: int
    records: int
    dropped: int
    capture: str
    buffer: int
    used: int
    log: bool
    overflow: str  # drop or wait (see the target's top comment)
    waiting: int  # bios waiting for space now
    waited: int  # bios that ever waited
    fallbacks: int  # stalls that fell back to dropping
    lost_from: int | None  # first sequence number lost in wait mode

    @classmethod
    def parse(cls, line: str) -> Status:
        kv = dict(item.split("=", 1) for item in line.split() if "=" in item)
        try:
            return cls(
                bios=int(kv["bios"]),
                bytes=int(kv["bytes"]),
                records=int(kv["records"]),
                dropped=int(kv["dropped"]),
                capture=kv["capture"],
                buffer=int(kv["buffer"]),
                used=int(kv["used"]),
                log=kv["log"] == "on",
                overflow=kv["overflow"],
                waiting=int(kv["waiting"]),
                waited=int(kv["waited"]),
                fallbacks=int(kv["fallbacks"]),
                lost_from=None if kv["lost_from"] == "-" else int(kv["lost_from"]),
            )
        except (KeyError, ValueError):
            raise ImgrementError(
                f"unexpected imgrement status {line!r}: is the module older than this tool?"
            ) from None


def _escape_arg(text: str) -> str:
    """One device-mapper message argument: whitespace and backslashes escaped."""
    return "".join("\\" + c if c.isspace() or c == "\\" else c for c in text)


@dataclass(frozen=True)
class MappedDevice:
    """A device-mapper device as ``list`` shows it."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    suspended: bool
    table: list[Target]
    status: list[Target]

    @property
    def ours(self) -> bool:
        return self.uuid.startswith(UUID_PREFIX)

    @property
    def node(self) -> Path:
        return Path("/dev/mapper") / self.name


def _require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("this needs root (device-mapper control): run it with sudo")


def _ensure_target(ctl: Control) -> None:
    if TARGET_TYPE in ctl.list_versions():
        return
    # An installed module loads on demand; a built-but-not-installed one does not.
    # (a failure or a hang is not reported here: the check below says what is missing)
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["modprobe", "-q", f"dm-{TARGET_TYPE}"], check=False,
                       capture_output=True, timeout=MODPROBE_TIMEOUT)
    if TARGET_TYPE not in ctl.list_versions():
        raise TargetNotLoadedError(
            f"the kernel has no '{TARGET_TYPE}' target: load it with "
            f"'sudo modprobe dm-{TARGET_TYPE}' (after 'sudo make install'), or "
            "'sudo insmod dm_target/imgrement.ko' from a built checkout"
        )


class TracedDevice:
    """A live imgrement mapping; a context manager that unwraps on exit."""

    def __init__(self, name: str, uuid_: str, major: int, minor: int, source: str) -> None:
        self.name = name
        self.uuid = uuid_
        self.major = major
        self.minor = minor
        self.source = source
        self._unwrapped = False

    @property
    def node(self) -> Path:
        return Path("/dev/mapper") / self.name

    @classmethod
    def find(cls, name: str) -> TracedDevice:
        """The existing traced device ``name`` (refusing one we did not make)."""
        _require_root()
        check_name(name)
        with Control() as ctl:
            info = _ours(ctl, name)
            table = ImgrementTable.parse(_target(ctl, name, table=True))
        return cls(name, info.uuid, info.major, info.minor, table.device)

    def status(self) -> Status:
        """The target's counters and settings."""
        return status(self.name)

    def table(self) -> ImgrementTable:
        with Control() as ctl:
            return ImgrementTable.parse(_target(ctl, self.name, table=True))

    def records(self, *, first_seq: int | None = None,
                save: BinaryIO | None = None) -> RecordReader:
        """A reader of this device's record stream (see :class:`RecordReader`)."""
        return RecordReader.live(self.name, first_seq=first_seq, save=save)

    def mark(self, label: str) -> int:
        """Put a mark in the stream; its sequence number."""
        return mark(self.name, label)

    def set_capture(self, mode: str) -> None:
        """What to copy from now on: ``meta``, ``writes`` or ``all``."""
        set_capture(self.name, mode)

    def set_overflow(self, policy: str) -> None:
        """When a record does not fit: ``drop`` it, or ``wait`` (lossless)."""
        set_overflow(self.name, policy)

    def set_log(self, on: bool) -> None:
        """Also print each bio to the kernel log (rate-limited)."""
        _message(self.name, f"log {'on' if on else 'off'}")

    def reset_stats(self) -> None:
        _message(self.name, "reset-stats")

    def unwrap(self, *, deferred: bool = False) -> None:
        if not self._unwrapped:
            unwrap(self.name, deferred=deferred)
            self._unwrapped = True

    def __enter__(self) -> TracedDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        return f"TracedDevice({self.name!r} over {self.source!r}, {self.major}:{self.minor})"


def wrap(device: str, name: str = DEFAULT_NAME, *, capture: str | None = None,
         buffer_kb: int | None = None, log: bool | None = None,
         overflow: str | None = None, wait_ms: int | None = None) -> TracedDevice:
    """Stack an imgrement mapping on ``device``; /dev/mapper/NAME exists on return.

    ``capture`` (meta, writes, all), ``buffer_kb``, ``log``, ``overflow``
    (drop, wait) and ``wait_ms`` go into the table; left as None, the
    target's defaults apply (writes, 16 MiB, off, drop, 5000).
    """
    _require_root()
    check_name(name)
    try:
        options = ImgrementTable(device="0:0", length=0, capture=capture,
                                 buffer_kb=buffer_kb, log=log, overflow=overflow,
                                 wait_ms=wait_ms)
    except ValueError as e:
        raise ImgrementError(f"{e}; see 'imgrement-dm wrap --help'") from None
    dev = devices.resolve(device)
    if dev.sectors == 0:
        raise DeviceError(f"{device} has no sectors (an empty loop device or no medium?)")
    devices.check_unused(dev)
    with Control() as ctl:
        if any(n == name for n, _, _ in ctl.list_devices()):
            raise NameTakenError(
                f"a device-mapper device named {name!r} exists already; choose another "
                "name with --name, or unwrap it first"
            )
        _ensure_target(ctl)
        table = replace(options, device=dev.devno, length=dev.sectors)
        dm_uuid = UUID_PREFIX + uuid.uuid4().hex
        info = ctl.create(name, dm_uuid)
        try:
            ctl.load_table(name, [table.target()])
            ctl.resume(name)  # returns when udev is done with the node
        except BaseException:
            _remove_quietly(ctl, name)
            raise
    return TracedDevice(name, dm_uuid, info.major, info.minor, device)


def _remove_quietly(ctl: Control, name: str) -> None:
    """Undo a half-made wrap; the original error is the one worth reporting."""
    with contextlib.suppress(ImgrementError):
        ctl.remove(name, timeout=10)


def unwrap(name: str, *, deferred: bool = False) -> None:
    """Remove our mapping ``name``; refuses devices that are not ours or are open."""
    _require_root()
    check_name(name)
    with Control() as ctl:
        info = _ours(ctl, name)
        if info.open_count and not deferred:
            info = _wait_transient_open(ctl, name, info)
        if info.open_count and not deferred:
            raise DeviceBusyError(
                f"/dev/mapper/{name} is open ({info.open_count} user(s)); unmount or close "
                "it first, or pass --deferred to remove it when the last user closes it"
            )
        _remove_retrying(ctl, name, deferred=deferred)


def _remove_retrying(ctl: Control, name: str, *, deferred: bool) -> None:
    """DM_DEV_REMOVE, retried while a short-lived opener (udev) holds the device."""
    deadline = time.monotonic() + TRANSIENT_OPEN_WAIT
    while True:
        try:
            ctl.remove(name, deferred=deferred)
            return
        except DeviceMapperError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                if e.errno == errno.EBUSY:
                    raise DeviceBusyError(
                        f"/dev/mapper/{name} stayed busy; close whatever holds it "
                        "(lsof, fuser -vm), or use --deferred"
                    ) from None
                raise
            time.sleep(0.1)


def _ours(ctl: Control, name: str) -> DeviceInfo:
    """The device ``name``, refusing one this tool did not make."""
    info = ctl.info(name)
    if not info.uuid.startswith(UUID_PREFIX):
        raise DeviceBusyError(
            f"{name!r} is not an imgrement device (uuid {info.uuid or 'none'!r}); "
            "imgrement-dm only drives and removes devices it made: use dmsetup for others"
        )
    return info


def _target(ctl: Control, name: str, *, table: bool = False) -> Target:
    """The one ``imgrement`` line of ``name``'s live table (or its status).

    A device we made can still have had its table replaced by hand (dmsetup
    reload): then it traces nothing, and we say so instead of misreading
    another target's status.
    """
    lines = ctl.table_status(name, table=table)
    if len(lines) != 1 or lines[0].target_type != TARGET_TYPE:
        now = "; ".join(f"{t.target_type} {t.start}+{t.length}" for t in lines) or "no table"
        raise DeviceBusyError(
            f"{name!r} was made by imgrement-dm but its table was changed (now: {now}): it "
            f"traces nothing. Remove it with 'imgrement-dm unwrap {name}' and wrap the disk "
            "again"
        )
    return lines[0]


def _message(name: str, text: str) -> str | None:
    _require_root()
    check_name(name)
    with Control() as ctl:
        _ours(ctl, name)
        _target(ctl, name)
        return ctl.message(name, text)


def status(name: str) -> Status:
    """The counters and settings of traced device ``name``."""
    _require_root()
    check_name(name)
    with Control() as ctl:
        _ours(ctl, name)
        return Status.parse(_target(ctl, name).params)


def mark(name: str, label: str) -> int:
    """Put a mark labelled ``label`` into the stream of ``name``; its sequence number."""
    raw = label.encode()
    if not raw or len(raw) > MARK_MAX or "\0" in label:
        raise ImgrementError(
            f"a mark label needs 1 to {MARK_MAX} bytes and no NUL; got {len(raw)} bytes"
        )
    reply = _message(name, "mark " + _escape_arg(label)) or ""
    if reply in ("dropped", "full"):
        what = "dropped" if reply == "dropped" else "not made (lossless mode drops nothing)"
        raise ImgrementError(
            f"the mark was {what}: the record buffer of {name!r} is full; read the "
            "stream (imgrement-dm trace) so the buffer drains, then mark again"
        )
    if not reply.startswith("seq "):
        raise ImgrementError(f"unexpected reply to mark: {reply!r}")
    return int(reply.split()[1])


def set_capture(name: str, mode: str) -> None:
    """Switch what ``name`` copies: meta, writes or all; takes effect at once."""
    if mode not in CAPTURE_MODES:
        raise ImgrementError(
            f"capture mode {mode!r} is not one of {', '.join(CAPTURE_MODES)}"
        )
    _message(name, f"capture {mode}")


def set_overflow(name: str, policy: str) -> None:
    """Switch what ``name`` does when a record does not fit: drop it, or make the
    bio wait for space (lossless); takes effect at once."""
    if policy not in OVERFLOW_POLICIES:
        raise ImgrementError(
            f"overflow policy {policy!r} is not one of {', '.join(OVERFLOW_POLICIES)}"
        )
    _message(name, f"overflow {policy}")


def _wait_transient_open(ctl: Control, name: str, info: DeviceInfo) -> DeviceInfo:
    """Give udev's probe a moment to close the device.

    Closing a device after writing makes udev re-read it (its inotify
    "watch"), so an unwrap right after a write can find it briefly open.
    libdm retries removal for the same reason.
    """
    deadline = time.monotonic() + TRANSIENT_OPEN_WAIT
    while info.open_count and time.monotonic() < deadline:
        time.sleep(0.1)
        info = ctl.info(name)
    return info


def list_devices(*, all_devices: bool = False) -> list[MappedDevice]:
    """Our mapped devices (every device-mapper device with ``all_devices``)."""
    out = []
    with Control() as ctl:
        for name, _, _ in ctl.list_devices():
            try:
                info = ctl.info(name)
                if not all_devices and not info.uuid.startswith(UUID_PREFIX):
                    continue
                table = ctl.table_status(name, table=True) if info.active_table else []
                status = ctl.table_status(name) if info.active_table else []
            except NoSuchMappingError:
                continue  # removed while we looked
            out.append(
                MappedDevice(
                    name=name,
                    uuid=info.uuid,
                    major=info.major,
                    minor=info.minor,
                    open_count=info.open_count,
                    suspended=info.suspended,
                    table=table,
                    status=status,
                )
            )
    return out
