"""The installed autowrap path, inside the booted Debian machine.

Runs with the installed Python (make install's venv, or the Debian package's
python3) and with a policy
that wraps scsi_debug disks: udev rule -> systemd template unit ->
'imgrement-dm autowrap handle' -> a traced device whose records carry the
exact bytes written; a disk the policy does not name is left alone with the
reason in the unit's journal; deleting the wrapped disk under I/O stops the
unit and its ExecStop releases the mapping.  With --inert (no policy at
all): a hot-added disk starts no unit.  Raises on the first failure.
"""

from __future__ import annotations

import glob
import mmap
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from imgrement_dm import api
from imgrement_dm.records import BioRecord, MarkRecord

SCSI_DEBUG = Path("/sys/bus/pseudo/drivers/scsi_debug")


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def wait(cond: Callable[[], object], what: str, limit: float = 60) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}")


def journal(unit: str) -> str:
    return sh("journalctl", "--no-pager", "-o", "cat", "-u", unit)


def traced() -> list[str]:
    return sorted(d.name for d in api.list_devices() if d.name.startswith("traced-"))


def disks() -> set[str]:
    return {Path(p).name for p in glob.glob("/sys/block/sd*")}


def unit_state(unit: str) -> str:
    r = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True)
    return r.stdout.strip()


def hot_add() -> str:
    """Load scsi_debug with no host, add one: the new disk's kernel name."""
    sh("modprobe", "scsi_debug", "add_host=0", "dev_size_mb=32")
    before = disks()
    (SCSI_DEBUG / "add_host").write_text("1\n")
    wait(lambda: disks() - before, "the hot-added scsi_debug disk")
    (new,) = disks() - before
    return new


def traced_write(dev: api.TracedDevice, offset: int, data: bytes) -> BioRecord:
    """One O_DIRECT write of ``data`` (4096 bytes) through ``dev``, and its record,
    read up to a mark set after it; the only record of this process's I/O."""
    with dev.records() as reader:
        reader.read(timeout=1)
        aligned = mmap.mmap(-1, 4096)  # O_DIRECT wants a page-aligned buffer
        aligned.write(data)
        fd = os.open(dev.node, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwrite(fd, aligned, offset)
        finally:
            os.close(fd)
            aligned.close()
        seq = dev.mark("end")
        items: list[object] = []
        end = time.monotonic() + 30
        while not any(isinstance(i, MarkRecord) and i.seq == seq for i in items):
            assert time.monotonic() < end, "the mark never arrived"
            items += reader.read(timeout=1)
    mine = [i for i in items if isinstance(i, BioRecord) and i.pid == os.getpid()]
    assert len(mine) == 1, mine
    return mine[0]


def inert() -> None:
    """No policy: a hot-added disk starts no unit and is not wrapped."""
    new = hot_add()
    sh("udevadm", "settle")
    time.sleep(3)
    units = sh("systemctl", "list-units", "--all", "--no-legend", "imgrement-autowrap@*")
    assert units.strip() == "", units
    assert traced() == [], traced()
    print(f"ok: /dev/{new} hot-added with no policy: no unit started, nothing wrapped")
    (SCSI_DEBUG / "add_host").write_text("-1\n")
    wait(lambda: new not in disks(), f"/dev/{new} to go")
    sh("rmmod", "scsi_debug")


def main() -> None:
    new = hot_add()
    unit = f"imgrement-autowrap@{new}.service"
    wait(lambda: traced(), f"{unit} to wrap /dev/{new}")
    (name,) = traced()
    wait(lambda: unit_state(unit) == "active", f"{unit} to be active")
    text = journal(unit)
    assert f"wrapped /dev/{new} as /dev/mapper/{name}" in text, text
    print(f"ok: /dev/{new} hot-added, {unit} active, wrapped as /dev/mapper/{name}")

    dev = api.TracedDevice.find(name)
    data = bytes(range(256)) * 16
    w = traced_write(dev, 8 * 4096, data)
    assert (w.op_name, w.sector, w.size) == ("write", 64, 4096), (w.op_name, w.sector, w.size)
    assert bytes(w.payload) == data
    print("ok: records flow: one write, sector 64, 4096 bytes, payload byte for byte")

    # a disk the policy does not name: the service runs, refuses, says why
    other = Path(os.path.realpath("/dev/disk/by-id/virtio-payload")).name
    sh("udevadm", "trigger", "--action=add", "--settle", f"/sys/class/block/{other}")
    ounit = f"imgrement-autowrap@{other}.service"
    want = f"not wrapping /dev/{other}: {other}: no [match] rule matches"
    wait(lambda: want in journal(ounit), f"the refusal in {ounit}'s journal")
    assert traced() == [name], traced()
    print(f"ok: /dev/{other} left alone; journal: {want}")

    # delete the wrapped disk under I/O: the unit stops, ExecStop releases the mapping
    dd = subprocess.Popen(["dd", "if=/dev/zero", f"of={dev.node}", "bs=64k", "oflag=direct",
                           "count=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2)
    (scsi,) = glob.glob(str(SCSI_DEBUG / f"adapter*/host*/target*/*/block/{new}"))
    (Path(scsi).parents[1] / "delete").write_text("1\n")
    dd.communicate(timeout=120)
    assert dd.returncode != 0, "dd did not see the disk go"
    wait(lambda: not traced(), "the mapping to go")
    wait(lambda: unit_state(unit) in ("inactive", "failed"), f"{unit} to stop")
    assert unit_state(unit) == "inactive", unit_state(unit)
    text = journal(unit)
    assert f"released /dev/mapper/{name}" in text, text
    assert not any(n.startswith("traced-") for n in os.listdir("/dev/mapper")), \
        os.listdir("/dev/mapper")
    print(f"ok: disk deleted under dd: {unit} inactive, /dev/mapper/{name} released")
    sh("rmmod", "scsi_debug")


if __name__ == "__main__":
    import sys

    inert() if sys.argv[1:] == ["--inert"] else main()
