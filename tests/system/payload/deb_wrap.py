"""After the kernel upgrade: wrap the machine's scratch disk and trace a write.

Runs with the Debian package's python3 on the new kernel, whose module DKMS
built on upgrade: the write lands in the records with its sector, size and
bytes, and unwrap leaves no mapping.  Raises on the first failure.
"""

from __future__ import annotations

import os

from hotplug import traced_write  # type: ignore[import-not-found]  # payload/, beside us

from imgrement_dm import api

DISK = os.path.realpath("/dev/disk/by-id/virtio-scratch")


def main() -> None:
    dev = api.wrap(DISK, name="upgraded")
    try:
        data = bytes(reversed(range(256))) * 16
        w = traced_write(dev, 3 * 4096, data)
        assert (w.op_name, w.sector, w.size) == ("write", 24, 4096), (w.op_name, w.sector)
        assert bytes(w.payload) == data
        print(f"ok: {DISK} wrapped on {os.uname().release}: one write, sector 24, 4096 bytes, "
              "payload byte for byte")
    finally:
        api.unwrap("upgraded")
    assert "upgraded" not in os.listdir("/dev/mapper")


if __name__ == "__main__":
    main()
