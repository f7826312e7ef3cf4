"""Typed errors.

Every failure a user can cause or meet is one of these, with a message that
names the problem and what to do about it; the CLI prints the message and
exits with ``exit_code`` instead of showing a traceback.
"""

from __future__ import annotations

import errno as errno_mod


class ImgrementError(Exception):
    """Base class of all errors imgrement-dm reports to its user."""

    exit_code = 1


class NotRootError(ImgrementError):
    """The operation needs CAP_SYS_ADMIN (in practice, root)."""

    exit_code = 3


class DeviceError(ImgrementError):
    """The block device named by the user cannot be used as asked."""

    exit_code = 4


class DeviceNotFoundError(DeviceError):
    """The path does not exist."""


class NotABlockDeviceError(DeviceError):
    """The path exists but is not a block device."""


class DeviceBusyError(DeviceError):
    """The device is mounted, held by another device or already wrapped."""


class InvalidNameError(ImgrementError):
    """A device-mapper name is not one we can create."""

    exit_code = 5


class NameTakenError(ImgrementError):
    """A device-mapper device of that name exists already."""

    exit_code = 5


class NoSuchMappingError(ImgrementError):
    """No device-mapper device of that name exists."""

    exit_code = 6


class TargetNotLoadedError(ImgrementError):
    """The kernel does not know the ``imgrement`` target type."""

    exit_code = 7


class UdevTimeoutError(ImgrementError):
    """udev did not finish with a device node in time."""

    exit_code = 8


class DeviceMapperError(ImgrementError):
    """A device-mapper ioctl failed; carries the command and errno."""

    def __init__(self, command: str, err: int, detail: str = "") -> None:
        self.command = command
        self.errno = err
        name = errno_mod.errorcode.get(err, str(err))
        text = f"device-mapper {command} failed: {name} ({_strerror(err)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)


def _strerror(err: int) -> str:
    import os

    return os.strerror(err)
