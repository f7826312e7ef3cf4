"""Typed errors: every one the package raises to its user, in one place.

Every failure a user can cause or meet is one of these, with a message that
names the problem and what to do about it; the CLI prints the message and
exits with ``exit_code`` instead of showing a traceback.  Each also derives
from the built-in exception a script would expect (a missing mapping is a
LookupError, a refused privilege a PermissionError, a failed ioctl an
OSError with its errno), so ``except OSError`` works as it does for the
standard library.  The modules that raise them import them from here.
"""

from __future__ import annotations

import errno as errno_mod


class ImgrementError(Exception):
    """Base class of all errors imgrement-dm reports to its user."""

    exit_code = 1


class NotRootError(ImgrementError, PermissionError):
    """The operation needs CAP_SYS_ADMIN (in practice, root)."""

    exit_code = 3


class DeviceError(ImgrementError, ValueError):
    """The block device named by the user cannot be used as asked."""

    exit_code = 4


class DeviceNotFoundError(DeviceError, FileNotFoundError):
    """The path does not exist."""


class NotABlockDeviceError(DeviceError):
    """The path exists but is not a block device."""


class DeviceBusyError(DeviceError):
    """The device is mounted, held by another device or already wrapped."""


class InvalidNameError(ImgrementError, ValueError):
    """A device-mapper name is not one we can create."""

    exit_code = 5


class NameTakenError(ImgrementError, FileExistsError):
    """A device-mapper device of that name exists already."""

    exit_code = 5


class NoSuchMappingError(ImgrementError, LookupError):
    """No device-mapper device of that name exists."""

    exit_code = 6


class TargetNotLoadedError(ImgrementError, LookupError):
    """The kernel does not know the ``imgrement`` target type."""

    exit_code = 7


class UdevTimeoutError(ImgrementError, TimeoutError):
    """udev did not finish with a device node in time."""

    exit_code = 8


class DeviceMapperError(ImgrementError, OSError):
    """A device-mapper ioctl failed; carries the command and errno."""

    def __init__(self, command: str, err: int, detail: str = "") -> None:
        name = errno_mod.errorcode.get(err, str(err))
        text = f"device-mapper {command} failed: {name} ({_strerror(err)})"
        if detail:
            text += f": {detail}"
        # one argument, so str() is the message; errno set by hand for except OSError
        super().__init__(text)
        self.command = command
        self.errno = err
        self.strerror = _strerror(err)

    def __str__(self) -> str:
        return str(self.args[0])


class StreamError(ImgrementError, ValueError):
    """The record stream cannot be opened or is not a valid stream."""

    exit_code = 9


class CaptureError(ImgrementError, ValueError):
    """A capture file is missing, truncated, corrupted or not a capture."""

    exit_code = 9


class StreamNotFoundError(StreamError, FileNotFoundError):
    """A saved stream (or a live device's stream) that does not exist."""


class CaptureNotFoundError(CaptureError, FileNotFoundError):
    """A capture file that does not exist."""


def cannot_open(kind: type[StreamError] | type[CaptureError], path: object,
                err: OSError) -> ImgrementError:
    """``kind``'s error for an input that cannot be opened; for a missing one,
    its FileNotFoundError variant, so that scripts can catch what they expect."""
    message = f"cannot open {path}: {err.strerror}"
    if isinstance(err, FileNotFoundError):
        return (CaptureNotFoundError if issubclass(kind, CaptureError)
                else StreamNotFoundError)(message)
    return kind(message)


class SandboxError(ImgrementError, RuntimeError):
    """The sandbox could not be prepared or run."""

    exit_code = 10


class IncrementError(ImgrementError, ValueError):
    """The capture cannot be used as asked."""

    exit_code = 11


class CrashCheckError(IncrementError):
    """The capture cannot be explored as asked."""


class PolicyError(ImgrementError, ValueError):
    """The autowrap policy file is missing or invalid."""

    exit_code = 12


class OutputError(ImgrementError, ValueError):
    """An output file cannot be written where the user asked."""

    exit_code = 13


class MissingResourceError(ImgrementError, FileNotFoundError):
    """A file the package should carry is nowhere to be found."""


def _strerror(err: int) -> str:
    import os

    return os.strerror(err)
