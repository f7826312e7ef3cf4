"""Read what the kernel logged since a point in time, from /dev/kmsg.

device-mapper reports why a table was refused (the target's ``ti->error``)
only in the kernel log; the ioctl itself returns a bare EINVAL.  A cursor
opened before the ioctl lets us show the user the kernel's own reason.
"""

from __future__ import annotations

import os


class Cursor:
    """Positioned at the end of the kernel log when created.

    Reading the log needs privileges; without them the cursor is empty and
    :meth:`read_new` returns nothing, which only costs the user detail.
    """

    def __init__(self) -> None:
        self._fd = -1
        try:
            self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            self.close()

    def read_new(self) -> list[str]:
        """The messages logged since the cursor was made (or last read)."""
        out: list[str] = []
        while self._fd >= 0:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                # The ring overwrote records we had not read yet; go on.
                continue
            except OSError:
                break
            if not record:
                break
            _, _, text = record.decode("utf-8", "replace").partition(";")
            out.append(text.split("\n", 1)[0])
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
