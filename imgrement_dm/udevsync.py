"""Knowing when /dev/mapper/NAME exists, with or without udev.

With udev running, the dm rules create the node when they handle the
"change" event that resuming a device emits.  We tag our ioctls with a
flags-only cookie (primary source, no semaphore, so ``dmsetup udevcomplete``
has nothing to do) and watch the udev monitor, started *before* the ioctl so
the event cannot be missed, for our device number.  Without udev we tell
the rules to stay out of it and make or remove the node ourselves, as libdm
does.

The kernel says in each reply whether the ioctl sent a uevent at all
(DM_UEVENT_GENERATED_FLAG): resuming a device that was not suspended, or a
deferred remove of a device still open, sends none, and then there is
nothing to wait for.  :class:`imgrement_dm.dm.Control` does all of this
itself, so no caller can forget it.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from imgrement_dm.errors import UdevTimeoutError

# libdm's udev flags, carried in the high 16 bits of event_nr (the cookie).
DM_UDEV_DISABLE_DM_RULES_FLAG = 0x0001
DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG = 0x0002
DM_UDEV_DISABLE_DISK_RULES_FLAG = 0x0004
DM_UDEV_DISABLE_OTHER_RULES_FLAG = 0x0008
DM_UDEV_PRIMARY_SOURCE_FLAG = 0x0040

MAPPER_DIR = Path("/dev/mapper")
DEFAULT_TIMEOUT = 60.0


UDEV_CONTROL = "/run/udev/control"


def udev_running(control: str = UDEV_CONTROL) -> bool:
    """Is systemd-udevd listening on its control socket?

    The socket file outlives a udevd that exited, so we connect rather than
    look for the file.  udevd listens with a backlog of 0: one connection
    not yet accepted (ours of a moment ago, or udevadm's) fills it, and the
    next connect fails with EAGAIN, which only a live listener answers; a
    busy udevd is running.  (Taken for "not running", it made a wrap right
    after a udevd restart make its own node, which the unwrap, under udev,
    then left behind.)
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(2)
        sock.connect(control)
        return True
    except BlockingIOError:
        return True  # EAGAIN: listening, its queue full
    except OSError:
        return False
    finally:
        sock.close()


def cookie(use_udev: bool) -> int:
    """The event_nr to pass: who makes the node, in libdm's flag bits."""
    if use_udev:
        return DM_UDEV_PRIMARY_SOURCE_FLAG << 16
    return (
        DM_UDEV_DISABLE_DM_RULES_FLAG
        | DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG
        | DM_UDEV_DISABLE_DISK_RULES_FLAG
        | DM_UDEV_DISABLE_OTHER_RULES_FLAG
    ) << 16


class NodeSync:
    """Create before a uevent-generating ioctl; then wait for its effect.

    ``cookie`` is the event_nr to pass with the ioctl.
    """

    def __init__(self, *, use_udev: bool | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.use_udev = udev_running() if use_udev is None else use_udev
        self.timeout = timeout
        self._monitor: Any = None
        self.cookie = cookie(self.use_udev)
        if self.use_udev:
            import pyudev

            self._monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            self._monitor.filter_by("block")
            self._monitor.start()

    def __enter__(self) -> NodeSync:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor = None

    def _wait_event(self, major: int, minor: int, actions: tuple[str, ...]) -> None:
        devnum = os.makedev(major, minor)
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UdevTimeoutError(
                    f"udev did not finish with device {major}:{minor} in {self.timeout:.0f} s; "
                    "check that systemd-udevd is healthy ('udevadm monitor')"
                )
            device = self._monitor.poll(timeout=left)
            if device is None:
                continue
            if device.action in actions and device.device_number == devnum:
                return

    def node_created(self, name: str, major: int, minor: int, *, uevent: bool = True) -> Path:
        """Wait until /dev/mapper/NAME is the node of (major, minor).

        ``uevent`` False: the ioctl sent none (the device was live already),
        so the node is checked at once instead of waiting for udev.
        """
        node = MAPPER_DIR / name
        if self.use_udev:
            if uevent:
                self._wait_event(major, minor, ("change",))
        else:
            MAPPER_DIR.mkdir(mode=0o755, exist_ok=True)
            if not node.exists():
                os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        try:
            st = os.stat(node)
        except FileNotFoundError:
            raise UdevTimeoutError(
                f"{node} does not exist after udev finished with {major}:{minor}; "
                "check the device-mapper udev rules (dmsetup udevflags, 'udevadm monitor')"
            ) from None
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(major, minor):
            raise UdevTimeoutError(f"{node} exists but is not device {major}:{minor}")
        return node

    def node_removed(self, name: str, major: int, minor: int, *, uevent: bool = True) -> None:
        """Wait until /dev/mapper/NAME is gone after a remove.

        ``uevent`` False: nothing was removed yet (a deferred remove of an
        open device), so the node stays and there is nothing to wait for.
        """
        if not uevent:
            return
        if self.use_udev:
            self._wait_event(major, minor, ("remove",))
        remove_stale_node(MAPPER_DIR / name, major, minor)


def remove_stale_node(node: Path, major: int, minor: int) -> None:
    """Remove ``node`` if it is what the removed device (major, minor) left.

    Who made a node and who removes it can differ: a device wrapped while
    udev was down has a node we made, which udev's remove rules do not know
    and leave (CI saw this when udevd came back between a wrap and its
    unwrap); one wrapped under udev has udev's symlink, which dangles once
    the kernel's /dev/dm-N is gone if udev is down at the unwrap.  Like
    libdm's check after udev, we remove either: a block node of this device
    number, or a symlink that leads nowhere.  A symlink to a live device is
    udev's business (the number may already be reused).
    """
    devnum = os.makedev(major, minor)
    try:
        st = os.lstat(node)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        try:
            os.stat(node)
        except FileNotFoundError:
            node.unlink(missing_ok=True)  # dangling: its /dev/dm-N is gone
        return
    if stat.S_ISBLK(st.st_mode) and st.st_rdev == devnum:
        node.unlink(missing_ok=True)
