"""The two kinds of record file, told apart by their first bytes.

``imgrement-dm record`` writes capture files (checksummed, with a trailer;
formats/capture.py); ``trace -o`` saves the raw stream behind a 16-byte
header (records.py).  Users should not have to know there are two: the
commands that only show records (``trace --file``, ``stats --file``) read
either, and the commands that need a capture's guarantees (``apply``,
``replay``, ``diff``, ``export``, ``plot``) say which kind they were given
and which they take.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from imgrement_dm.errors import CaptureError, StreamError, cannot_open
from imgrement_dm.formats.capture import MAGIC as CAPTURE_MAGIC
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.records import STREAM_MAGIC, Item, RecordReader

CAPTURE = "capture"
STREAM = "stream"

KINDS = ("a capture file (from 'imgrement-dm record') or a saved stream "
         "(from 'imgrement-dm trace -o')")


def kind_of(path: Path) -> str:
    """CAPTURE or STREAM; StreamError naming both kinds for anything else."""
    try:
        with path.open("rb") as f:
            head = f.read(max(len(CAPTURE_MAGIC), len(STREAM_MAGIC)))
    except IsADirectoryError:
        raise StreamError(f"{path} is a directory; give {KINDS}") from None
    except OSError as e:
        raise cannot_open(StreamError, path, e) from None
    if head.startswith(CAPTURE_MAGIC):
        return CAPTURE
    if head.startswith(STREAM_MAGIC[:15]):
        return STREAM
    what = "empty" if not head else "not an imgrement file"
    raise StreamError(f"{path} is {what}; give {KINDS}")


def is_capture(path: Path) -> bool:
    """Does ``path`` start as a capture file does (no error if it cannot be read)?"""
    try:
        with path.open("rb") as f:
            return f.read(len(CAPTURE_MAGIC)) == CAPTURE_MAGIC
    except OSError:
        return False


def require_capture(path: Path, command: str) -> None:
    """Refuse anything but a capture file, saying what was given instead."""
    if kind_of(path) == STREAM:
        raise CaptureError(
            f"{path} is a saved stream (from 'trace -o'), which has no checksums, device "
            f"size or end marker; '{command}' needs a capture file: record one with "
            "'imgrement-dm record NAME -o FILE'"
        )


def _read_head(fd: int, n: int) -> bytes:
    """The first ``n`` bytes (fewer at end of file): a pipe may give them in pieces."""
    head = b""
    while len(head) < n:
        got = os.read(fd, n - len(head))
        if not got:
            break
        head += got
    return head


@contextlib.contextmanager
def file_items(path: Path) -> Iterator[Iterator[Item]]:
    """The records and drops of a file of either kind, checked as they are read.

    The file is opened once: a pipe (``trace -f <(cat s.rec)``) can be read
    only once, so what was read to tell its kind is read from no other open.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except IsADirectoryError:
        raise StreamError(f"{path} is a directory; give {KINDS}") from None
    except OSError as e:
        raise cannot_open(StreamError, path, e) from None
    try:
        head = _read_head(fd, len(STREAM_MAGIC))  # the longer of the two magics
        seekable = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as e:
        os.close(fd)
        raise StreamError(f"cannot read {path}: {e.strerror}") from None
    if head.startswith(CAPTURE_MAGIC):
        os.close(fd)
        if not seekable:
            raise CaptureError(f"{path} is a capture arriving through a pipe: a capture is "
                               "checked against its size and end marker, so give the file "
                               "itself")
        with CaptureReader(path) as capture:
            yield capture.items()
        return
    if not head.startswith(STREAM_MAGIC[:15]):
        os.close(fd)
        what = "empty" if not head else "not an imgrement file"
        raise StreamError(f"{path} is {what}; give {KINDS}")
    with RecordReader.from_open(fd, path, head) as reader:
        yield iter(reader)

