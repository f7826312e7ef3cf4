"""After the kernel upgrade: wrap the machine's scratch disk and trace a write.

Runs with the Debian package's python3 on the new kernel, whose module DKMS
built on upgrade: the write lands in the records with its sector, size and
bytes, and unwrap leaves no mapping.  Raises on the first failure.
"""

from __future__ import annotations

import mmap
import os
import time

from imgrement_dm import api
from imgrement_dm.records import BioRecord, MarkRecord

DISK = os.path.realpath("/dev/disk/by-id/virtio-scratch")


def main() -> None:
    dev = api.wrap(DISK, name="upgraded")
    try:
        data = bytes(reversed(range(256))) * 16
        with dev.records() as reader:
            reader.read(timeout=1)
            buf = mmap.mmap(-1, 4096)  # O_DIRECT wants a page-aligned buffer
            buf.write(data)
            fd = os.open(dev.node, os.O_WRONLY | os.O_DIRECT)
            try:
                os.pwrite(fd, buf, 3 * 4096)
            finally:
                os.close(fd)
                buf.close()
            seq = dev.mark("end")
            items: list[object] = []
            end = time.monotonic() + 30
            while not any(isinstance(i, MarkRecord) and i.seq == seq for i in items):
                assert time.monotonic() < end, "the mark never arrived"
                items += reader.read(timeout=1)
        mine = [i for i in items if isinstance(i, BioRecord) and i.pid == os.getpid()]
        assert len(mine) == 1, mine
        w = mine[0]
        assert (w.op_name, w.sector, w.size) == ("write", 24, 4096), (w.op_name, w.sector)
        assert bytes(w.payload) == data
        print(f"ok: {DISK} wrapped on {os.uname().release}: one write, sector 24, 4096 bytes, "
              "payload byte for byte")
    finally:
        api.unwrap("upgraded")
    assert "upgraded" not in os.listdir("/dev/mapper")


if __name__ == "__main__":
    main()
