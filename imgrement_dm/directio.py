"""Appending to a file with O_DIRECT, straight from the caller's memory.

Why: a recorder stores every byte the traced disk is written.  A buffered
``write()`` copies each byte into the page cache and the kernel writes it
back later; measured in the 6.1 guest (ext4 on a virtio disk, 4 MiB
writes from mapped memory), that cost 14 to 15 s of CPU per GB, against
0.4 s/GB with O_DIRECT, where the disk reads the caller's pages itself.
The record stream's windows are already in mapped memory, so a recorder
can hand them to the disk without any copy.

O_DIRECT wants the file offset, the length and the memory address aligned
to the disk's block.  :class:`DirectAppender` keeps the file's unaligned
end in a small aligned staging buffer and writes whole blocks only;
:meth:`DirectAppender.write_in_place` writes the aligned middle of the
caller's memory directly, when the caller has placed it so that its
address and its file offset agree modulo :data:`BLOCK` (the capture
writer pads its file to make them agree).  The file is cut to its real
length at :meth:`DirectAppender.close`.

Where O_DIRECT is refused (tmpfs before Linux 6.6, some FUSE file
systems), the same code writes buffered: the file is identical.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from imgrement_dm._kernel_ffi import ffi

#: Alignment of offsets, lengths and addresses: the largest logical block
#: size of Linux block devices in use, so it suits every disk.
BLOCK = 4096
_STAGE = 1 << 20  # staging buffer: whole blocks are written from it when full
#: How a file system says it has no O_DIRECT (at open, or at the first write).
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)


def address_of(data: bytes | bytearray | memoryview) -> int:
    """The memory address of the first byte of ``data`` (kept only as a number)."""
    with ffi.from_buffer(data) as ptr:
        return int(ffi.cast("uintptr_t", ptr))


def open_direct(path: str | os.PathLike[str]) -> tuple[int, bool]:
    """Create/truncate ``path`` for writing: (fd, whether O_DIRECT is on)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_DIRECT, 0o666), True
    except OSError as e:
        if e.errno not in _REFUSED:
            raise
    return os.open(path, flags, 0o666), False


class DirectAppender:
    """Appends to an open file, whole aligned blocks at a time (see the module doc)."""

    def __init__(self, fd: int, *, direct: bool) -> None:
        self._fd = fd
        self.direct = direct
        self._stage = mmap.mmap(-1, _STAGE)  # page-aligned, as O_DIRECT wants
        self._view = memoryview(self._stage)
        self._used = 0  # bytes staged, not yet written
        self._done = 0  # bytes written to the file (a multiple of BLOCK)
        #: bytes written straight from the caller's memory (for the curious and tests)
        self.in_place = 0

    def tell(self) -> int:
        """The file's logical length: where the next byte goes."""
        return self._done + self._used

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` through the staging buffer (a copy)."""
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), _STAGE - self._used)
            self._view[self._used:self._used + n] = view[:n]
            self._used += n
            view = view[n:]
            if self._used == _STAGE:
                self._flush_blocks()

    def write_in_place(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``, its aligned middle written from where it lies.

        Only the parts before its first and after its last block boundary
        are copied.  Requires ``address_of(data) % BLOCK == self.tell() %
        BLOCK`` (ValueError otherwise): the caller pads the file to make it so.
        """
        view = memoryview(data).cast("B")
        if not self.direct:
            # buffered: no alignment to keep, just no copy through the stage
            self._flush_blocks(everything=True)
            self._write_all(view)
            return
        if address_of(view) % BLOCK != self.tell() % BLOCK:
            raise ValueError("write_in_place: the data's address and the file offset "
                             "are not aligned alike")
        head = -self.tell() % BLOCK
        middle = (len(view) - head) // BLOCK * BLOCK if len(view) > head else 0
        if middle <= 0:
            self.write(view)
            return
        self.write(view[:head])
        self._flush_blocks()  # whole blocks now: nothing stays staged
        assert self._used == 0
        self._write_all(view[head:head + middle])
        self.in_place += middle
        self.write(view[head + middle:])

    def _flush_blocks(self, *, everything: bool = False) -> None:
        """Write the staged whole blocks; keep the unaligned rest staged.

        ``everything``: the rest too (only without O_DIRECT, which needs no
        alignment).
        """
        whole = self._used if everything else self._used // BLOCK * BLOCK
        if not whole:
            return
        self._write_all(self._view[:whole])
        rest = self._used - whole
        self._view[:rest] = self._view[whole:self._used]
        self._used = rest

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                n = os.pwrite(self._fd, view, self._done)
            except OSError as e:
                if e.errno not in _REFUSED or not self.direct:
                    raise
                self._buffered()  # the file system refused O_DIRECT after all
                continue
            if not n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.direct and n % BLOCK and len(view) != n:
                raise OSError(errno.EIO, "short unaligned write")
            self._done += n
            view = view[n:]

    def _buffered(self) -> None:
        """Go on without O_DIRECT (same file, same bytes)."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self.direct = False

    def close(self) -> None:
        """Write what is staged (padded to a block), then cut the file to its length."""
        length = self.tell()
        if self._used:
            pad = -self._used % BLOCK
            self._view[self._used:self._used + pad] = bytes(pad)
            self._used += pad
            self._flush_blocks()
        os.ftruncate(self._fd, length)
        self._view.release()
        self._stage.close()
