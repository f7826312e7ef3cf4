"""Output files replaced whole or not at all.

Every file the tool writes (a saved stream, a capture, an applied image, an
export, a plot) goes through :func:`atomic_output`: the data goes to
``FILE.part``, is fsynced, and is renamed over ``FILE`` only when the command
finished; a failure (an error, ENOSPC, a vanished device) removes the
``.part`` and leaves ``FILE`` as it was.  So a mistake never empties a file
the user had, and a crash leaves at most a ``.part`` that says what it is.

The destination is checked before the command starts its work, so a missing
directory or a read-only file system is reported at once, not after an hour
of recording.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from imgrement_dm.directio import DirectAppender, open_direct
from imgrement_dm.errors import OutputError

_HINTS = {
    errno.ENOENT: "the directory does not exist: create it or choose another path",
    errno.ENOTDIR: "a component of the path is not a directory: choose another path",
    errno.EACCES: "permission denied: choose a path you may write to",
    errno.EPERM: "permission denied: choose a path you may write to",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere",
    errno.EISDIR: "it is a directory: give a file name",
    errno.EFBIG: "the file is too large for this file system: write elsewhere",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter one",
}


def output_error(path: Path, err: OSError) -> OutputError:
    """A one-line reason, with what to do, for an ``OSError`` met writing ``path``."""
    hint = _HINTS.get(err.errno or 0, err.strerror or str(err))
    return OutputError(f"cannot write {path}: {hint}; {path} was left as it was")


def part_of(path: Path) -> Path:
    """Where ``path`` is written until it is complete."""
    return path.with_name(path.name + ".part")


def check_writable(path: Path) -> None:
    """Refuse early a destination that cannot be written (before any work is done)."""
    if path.name in ("", ".", ".."):
        raise OutputError(f"{path} is not a file name: give the file to write")
    if path.is_dir():
        raise output_error(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR)))
    parent = path.parent
    if not parent.is_dir():
        err = errno.ENOENT if not parent.exists() else errno.ENOTDIR
        raise output_error(path, OSError(err, os.strerror(err)))
    if not os.access(parent, os.W_OK | os.X_OK):
        # os.access answers EROFS too; tell the two apart for the message
        err = errno.EROFS if _read_only(parent) else errno.EACCES
        raise output_error(path, OSError(err, os.strerror(err)))


def _read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """The ``.part`` path to write (by a library that wants a name); renamed on success.

    The caller writes the file itself; it is fsynced here before the rename.
    """
    check_writable(path)
    part = part_of(path)
    try:
        yield part
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(part, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _remove(part)
        if e.filename not in (None, str(part), str(path)):
            raise  # about another file (an input): not ours to explain
        raise output_error(path, e) from None
    except BaseException:
        _remove(part)
        raise


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """``FILE.part`` open for writing; fsynced and renamed to ``FILE`` if the block ends well."""
    with atomic_path(path) as part, part.open("wb") as f:
        yield f


@contextlib.contextmanager
def atomic_appender(path: Path) -> Iterator[DirectAppender]:
    """Like :func:`atomic_output`, appended to with O_DIRECT where the file
    system allows it (directio.py): for files that store a record stream."""
    with atomic_path(path) as part:
        fd, direct = open_direct(part)
        try:
            out = DirectAppender(fd, direct=direct)
            yield out
            out.close()
        finally:
            os.close(fd)


def _remove(part: Path) -> None:
    with contextlib.suppress(OSError):
        part.unlink()
