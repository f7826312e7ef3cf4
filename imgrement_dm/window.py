"""Records read in place: the stream's buffer mapped, lent a window at a time.

read() copies every byte of the stream out of the kernel, and a consumer
that stores the stream then copies it once more into its file.  With data
capture on, that first copy is most of what a consumer costs.  Mapping the
buffer (read-only) and asking for windows with IMGREMENT_IOC_NEXT
(dm_target/imgrement_record.h) skips it: a window is whole committed
records, the same bytes read() would return, and stays untouched by the
kernel until the next call gives it back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap

from imgrement_dm._kernel_ffi import ffi, lib

_WINDOW_SIZE: int = ffi.sizeof("struct imgrement_window")
#: The target does not know the ioctl (a module older than this package).
UNSUPPORTED = (errno.ENOTTY, errno.EINVAL)


class MappedStream:
    """The windows of one open records file (non-blocking, like its reads)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._arg = bytearray(_WINDOW_SIZE)
        self._ring_size = 0

    def holds_little(self) -> bool:
        """Is the window lent now at most a sixteenth of the buffer?

        Such a window may be held while waiting for a batch (the kernel
        announces one at a sixteenth unread); a larger one is better given
        back at once, so that the target can reuse its space.
        """
        held = self._view.nbytes if self._view is not None else 0
        return held <= self._ring_size // 16

    def next(self) -> memoryview:
        """Give back the current window and return the next one.

        Empty at the end of the stream; raises BlockingIOError when nothing
        is committed yet (poll the fd), OSError with one of
        :data:`UNSUPPORTED` when the target cannot lend windows.  The view
        is valid until the next call or :meth:`close`.
        """
        self._release()
        fcntl.ioctl(self._fd, lib.IMGREMENT_IOC_NEXT, self._arg, True)
        win = ffi.from_buffer("struct imgrement_window *", self._arg)
        if not win.length:
            return memoryview(b"")
        if self._map is None:
            # Mapped once: the buffer's size never changes for an open file.
            self._ring_size = win.ring_size
            self._map = mmap.mmap(self._fd, win.ring_size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._view = memoryview(self._map)[win.offset:win.offset + win.length]
        return self._view

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None

    def close(self) -> None:
        """Unmap (the caller closes the fd, which gives back the window)."""
        self._release()
        if self._map is not None:
            # A caller may still hold a slice: then it is unmapped when that goes.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
