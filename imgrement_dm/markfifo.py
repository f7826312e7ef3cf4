"""Marks from any program: a FIFO whose lines become marks in the stream.

A shell script or a C program acknowledging a commit should not need Python
or root to say so: while ``imgrement-dm record NAME --marks FIFO`` runs,
each line written to FIFO (``echo ack:42 > FIFO``) becomes a mark labelled
with that line.  The mark is made when the recorder reads the line, a moment
after the program wrote it: later than the acknowledgement, never earlier,
so crashcheck's oracle may ask less of the states in between, never more
(docs/crashcheck.md).  A program that needs its mark at an exact point calls
``imgrement-dm mark`` (or the API's ``mark()``), which returns once made.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from imgrement_dm import api
from imgrement_dm.errors import ImgrementError, OutputError

#: Marks that did not fit a full buffer are tried again for this long.
RETRY_SECONDS = 2.0


class MarkFifo:
    """The FIFO at ``path``, made here and removed at the end, read by a
    thread that turns each line into a mark of device ``name``."""

    def __init__(self, name: str, path: Path,
                 warn: Callable[[str], None] | None = None) -> None:
        self.name, self.path = name, path
        self.made = 0
        self.failed = 0
        self._warn = warn or (lambda text: None)
        self._stop = threading.Event()
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            raise OutputError(f"{path} exists: --marks makes the FIFO itself and removes it "
                              "at the end; name a path that does not exist") from None
        except OSError as e:
            raise OutputError(f"cannot make the FIFO {path}: {e.strerror}") from None
        # our own writer end too: the reads never see an end of file when
        # the last program writing to it closes it
        fds: list[int] = []
        try:
            fds.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            os.unlink(path)
            raise OutputError(f"cannot open the FIFO {path}: {e.strerror}") from None
        self._rfd, self._wfd = fds
        self._thread = threading.Thread(target=self._run, name="imgrement-marks", daemon=True)
        self._thread.start()

    def _mark(self, label: str) -> None:
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            try:
                api.mark(self.name, label)
                self.made += 1
                return
            except ImgrementError as e:
                if "buffer" in str(e) and time.monotonic() < deadline:
                    time.sleep(0.01)  # the recorder drains it: try again
                    continue
                self.failed += 1
                self._warn(f"mark {label!r} not made: {e}")
                return

    def _lines(self) -> Iterator[str]:
        pending = b""
        while True:
            ready, _, _ = select.select([self._rfd], [], [], 0.1)
            chunk = os.read(self._rfd, 65536) if ready else b""
            if not chunk and self._stop.is_set():
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                text = raw.decode(errors="replace").strip()
                if text:
                    yield text
        if pending.strip():
            yield pending.decode(errors="replace").strip()

    def _run(self) -> None:
        for label in self._lines():
            self._mark(label)

    def close(self) -> None:
        """Mark what was written so far, then stop and remove the FIFO."""
        self._stop.set()
        self._thread.join()
        os.close(self._wfd)
        os.close(self._rfd)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISFIFO(os.lstat(self.path).st_mode):
                os.unlink(self.path)


@contextlib.contextmanager
def mark_fifo(name: str, path: Path | None,
              warn: Callable[[str], None] | None = None) -> Iterator[MarkFifo | None]:
    """A :class:`MarkFifo` for the block's duration (None: no FIFO)."""
    if path is None:
        yield None
        return
    fifo = MarkFifo(name, path, warn)
    try:
        yield fifo
    finally:
        fifo.close()
