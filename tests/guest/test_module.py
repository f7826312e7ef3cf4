"""Module life: unloading is refused while in use, and fifty load, use,
unload cycles give the kernel's memory back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import imgrement_dm
from imgrement_dm.records import BioRecord, Item, MarkRecord, RecordReader
from tests.guest.helpers import SLOWDOWN, cli, direct_write, dm_devices, pattern, sh

KO = os.environ.get("IMGREMENT_KO", "")
#: A record buffer that outlives its device is caught exactly, in every
#: cycle. Over fifty cycles the totals of /proc/meminfo show anything else
#: lost at 10 KiB or more per cycle (a hundred cycles, 5 KiB, took 165 s of
#: CI's 90 minutes under emulation); smaller unreferenced leaks are
#: kmemleak's, on the debug kernel, where a cycle takes several times as
#: long and half as many run.
CYCLES = 50 if SLOWDOWN == 1 else 25


def _rmmod() -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rmmod", "imgrement"], capture_output=True, text=True, check=False)


def _loaded() -> bool:
    lines = Path("/proc/modules").read_text().splitlines()
    return any(line.split()[0] == "imgrement" for line in lines)


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _ring_allocations() -> int:
    """vmalloc areas whose caller is in our module (the record buffers)."""
    lines = Path("/proc/vmallocinfo").read_text().splitlines()
    return sum("imgrement_ring_init" in line for line in lines)


def _settle_memory() -> tuple[int, int]:
    sh("sync")
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return _meminfo("SUnreclaim"), _meminfo("VmallocUsed")


def test_unload_refused_while_a_device_or_reader_exists(disk: str) -> None:
    assert _loaded()
    dev = imgrement_dm.wrap(disk)
    r = _rmmod()
    assert r.returncode != 0 and "in use" in r.stderr
    reader = dev.records()
    dev.unwrap()
    # an open stream keeps the module (and the records) until it is closed
    r = _rmmod()
    assert r.returncode != 0 and "in use" in r.stderr
    reader.close()
    assert _rmmod().returncode == 0
    assert not _loaded()
    subprocess.run(["insmod", KO], check=True)
    assert _loaded()


def test_wrap_without_the_module_says_how_to_load_it(disk: str) -> None:
    assert _rmmod().returncode == 0
    try:
        r = cli("wrap", disk, "--json")
        assert r.returncode == 7, r.stderr
        assert "the kernel has no 'imgrement' target" in r.stderr
        assert "modprobe dm-imgrement" in r.stderr and "Traceback" not in r.stderr
        assert dm_devices() == []
    finally:
        subprocess.run(["insmod", KO], check=True)
    r = cli("wrap", disk, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["name"] == "traced" and info["node"] == "/dev/mapper/traced"
    assert info["uuid"].startswith("IMGREMENT-") and info["device"] == disk
    assert cli("unwrap", "traced").returncode == 0


def _cycle(disk: str, i: int) -> None:
    assert _rmmod().returncode == 0
    subprocess.run(["insmod", KO], check=True)
    with imgrement_dm.wrap(disk) as dev:
        assert _ring_allocations() >= 1  # the check below can see a buffer
        sh("udevadm", "settle")
        with RecordReader.live(dev.name, first_seq=0) as reader:
            direct_write(dev.node, i * 4096, pattern(i, 4096))
            seq = dev.mark("cycle")
            got: list[Item] = []
            while not any(isinstance(r, MarkRecord) and r.seq == seq for r in got):
                got += reader.read(timeout=5)
                assert got, "no records"
            writes = [r for r in got if isinstance(r, BioRecord) and r.op_name == "write"]
            assert [bytes(w.payload) for w in writes] == [pattern(i, 4096)]


def test_load_use_unload_cycles_return_memory(disk: str) -> None:
    assert KO, "IMGREMENT_KO names the module built for this kernel"
    _cycle(disk, 0)  # warm caches once
    slab0, vmalloc0 = _settle_memory()
    for i in range(1, CYCLES + 1):
        _cycle(disk, i)
        assert _ring_allocations() == 0, f"a record buffer outlived its device (cycle {i})"
    slab1, vmalloc1 = _settle_memory()
    # Exact leaks of our buffers are caught above; here, nothing else grows:
    # a leaked 100-byte object per cycle would be lost in noise, 10 KiB per
    # cycle would not.
    assert slab1 - slab0 < 512, f"unreclaimable slab grew {slab1 - slab0} kB"
    assert vmalloc1 - vmalloc0 < 512, f"vmalloc grew {vmalloc1 - vmalloc0} kB"
    assert _loaded()
