"""Output files replaced whole or not at all, and never the wrong thing.

Every file the tool writes (a saved stream, a capture, an applied image, an
export, a plot) goes through :func:`atomic_output` or its siblings: the data
goes to a temporary file of its own in the same folder (``.FILE.XXXXXXXX.part``,
created with O_EXCL, so never a name a user or another run owns), is
fsynced, and is renamed over ``FILE`` only when the command finished; a
failure (an error, ENOSPC, a vanished device) removes the temporary file and
leaves ``FILE`` as it was.  So a mistake never empties a file the user had,
and a crash leaves at most a ``.part`` that says what it is.

What ``-o`` names decides how it is written:

- a regular file, or nothing yet: replaced atomically as above; a new file
  is created 0600 (a capture holds every byte written to a disk), an
  existing one keeps its mode;
- a symbolic link: followed only to a regular file (or to nothing yet),
  whose place it takes;
- ``-``, a FIFO or a character device: a stream, written directly (``-`` is
  standard output), where the command writes a stream; a command that must
  seek (a capture, an image) refuses it;
- a block device: refused (``replay`` writes a capture onto a device);
- a file that is one of the command's inputs (the same inode, through any
  name or link): refused, since writing it would destroy the input.

The destination is checked before the command starts its work, so a missing
directory or a read-only file system is reported at once, not after an hour
of recording.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
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


#: Created outputs are the owner's alone.
MODE = 0o600
#: ``-o -``: standard output.
STDOUT = Path("-")


def is_stdout(path: Path) -> bool:
    return str(path) == "-"


def _target(path: Path) -> Path:
    """Where the bytes go: a symbolic link's target (followed only to a
    regular file or to nothing yet), else ``path``."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    try:
        st = target.stat()
    except FileNotFoundError:
        return target
    except OSError as e:
        raise output_error(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path} is a symbolic link to {target}, which is not a regular "
                          f"file: name the file to write; {path} was left as it was")
    return target


def is_stream(path: Path) -> bool:
    """``-``, a FIFO or a character device: written directly, not replaced."""
    if is_stdout(path):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _same_file(path: Path, inputs: Iterable[Path]) -> Path | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    for given in inputs:
        try:
            other = os.stat(given)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino):
            return given
    return None


def check_writable(path: Path, *, inputs: Iterable[Path] = (), stream_ok: bool = False) -> None:
    """Refuse early a destination that cannot or must not be written (before
    any work is done): see the module's doc for what each kind of path means.
    ``inputs``: the files the command reads; ``stream_ok``: the command writes
    a stream, which ``-``, a FIFO or a character device may take."""
    if is_stdout(path):
        if not stream_ok:
            raise OutputError("-o - (standard output) is a stream, and this command must "
                              "write a file it can seek in: give a file name")
        return
    same = _same_file(path, inputs)
    if same is not None:
        raise OutputError(f"{path} is {same}, an input of this command: writing it would "
                          f"destroy the input; choose another output file")
    if path.name in ("", ".", ".."):
        raise OutputError(f"{path} is not a file name: give the file to write")
    if path.is_dir():
        raise output_error(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR)))
    target = _target(path)
    try:
        mode = os.stat(target).st_mode
    except OSError:
        mode = 0
    if stat.S_ISBLK(mode):
        raise OutputError(f"{path} is a block device: this command writes files, not "
                          f"devices ('imgrement-dm replay' writes a capture onto a device); "
                          f"{path} was left as it was")
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        if not stream_ok:
            raise OutputError(f"{path} is a {'FIFO' if stat.S_ISFIFO(mode) else 'character device'}"
                              f", and this command must write a file it can seek in: give a "
                              f"file name; {path} was left as it was")
        return
    if mode and not stat.S_ISREG(mode):
        raise OutputError(f"{path} is neither a regular file nor a stream: give a file name; "
                          f"{path} was left as it was")
    parent = target.parent
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


def parts_of(path: Path) -> list[Path]:
    """The temporary files being written for ``path`` now (or left by a crash)."""
    return sorted(path.parent.glob(f".{path.name}.*.part"))


def _new_part(target: Path) -> Path:
    """A temporary file of our own beside ``target``, created 0600 (O_EXCL)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: Path, *, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """A temporary path to write (by a library that wants a name), renamed
    over ``path`` on success (a symbolic link's target: the link stays).

    The caller writes the file itself; it is fsynced here before the rename.
    """
    check_writable(path, inputs=inputs)
    target = _target(path)
    try:
        part = _new_part(target)
    except OSError as e:
        raise output_error(path, e) from None
    try:
        yield part
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(part, stat.S_IMODE(os.stat(target).st_mode))  # a replaced file's mode
        if _same_file(target, inputs) is not None:  # a name changed meanwhile
            raise OutputError(f"{path} became an input of this command while it ran; "
                              f"{path} was left as it was")
        os.rename(part, target)
        _fsync_dir(target.parent)
    except OSError as e:
        _remove(part)
        if e.filename not in (None, str(part), str(path), str(target)):
            raise  # about another file (an input): not ours to explain
        raise output_error(path, e) from None
    except BaseException:
        _remove(part)
        raise


@contextlib.contextmanager
def _stream(path: Path) -> Iterator[BinaryIO]:
    if is_stdout(path):
        out = sys.stdout.buffer
        yield out
        out.flush()
        return
    try:
        f = path.open("wb")
    except OSError as e:
        raise output_error(path, e) from None
    with f:
        yield f


@contextlib.contextmanager
def atomic_output(path: Path, *, inputs: Iterable[Path] = (),
                  stream_ok: bool = False) -> Iterator[BinaryIO]:
    """A file open for writing, renamed to ``path`` if the block ends well;
    with ``stream_ok``, ``-``, a FIFO or a character device written directly."""
    check_writable(path, inputs=inputs, stream_ok=stream_ok)
    if stream_ok and is_stream(path):
        with _stream(path) as f:
            yield f
        return
    with atomic_path(path, inputs=inputs) as part, part.open("wb") as f:
        yield f


@contextlib.contextmanager
def atomic_appender(path: Path, *, inputs: Iterable[Path] = ()) -> Iterator[DirectAppender]:
    """Like :func:`atomic_output`, appended to with O_DIRECT where the file
    system allows it (directio.py): for files that store a record stream."""
    with atomic_path(path, inputs=inputs) as part:
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
