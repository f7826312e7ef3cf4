"""Hotplug auto-wrapping with the real systemd-udevd: scsi_debug disks come
and go; matching ones are wrapped within seconds and records flow,
excluded and unmatched ones are left alone, removal under I/O tears the
mapping down. And the udev rule's own decision, as `udevadm test` shows it."""

from __future__ import annotations

import glob
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm.autowrap_install import RULE_NAME, _source
from imgrement_dm.records import BioRecord
from tests.guest.helpers import (
    CLI,
    SLOWDOWN,
    direct_write,
    dm_devices,
    pattern,
    read_until_mark,
    sh,
)

SCSI_DEBUG = Path("/sys/bus/pseudo/drivers/scsi_debug")


def _scsi_disks() -> set[str]:
    return {os.path.basename(p) for p in glob.glob(
        str(SCSI_DEBUG / "adapter*/host*/target*/*/block/*"))}


def _wait(cond: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout * SLOWDOWN
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    conf = tmp_path / "autowrap.conf"
    conf.write_text("[match]\nID_MODEL = scsi_debug\n[options]\ncapture = writes\n")
    log = tmp_path / "watch.log"
    env = {**os.environ, "IMGREMENT_AUTOWRAP_CONF": str(conf),
           "IMGREMENT_AUTOWRAP_STATE": str(tmp_path / "state")}
    subprocess.run(["modprobe", "scsi_debug", "add_host=0", "dev_size_mb=32"], check=True)
    with log.open("w") as out:
        proc = subprocess.Popen([*CLI, "autowrap", "watch"], stderr=out, stdout=out,
                                text=True, env=env)
    _wait(lambda: "watching for disks" in log.read_text(), "the watcher to start")
    yield proc, log
    proc.terminate()
    proc.wait(timeout=30)
    for name in dm_devices():
        if name.startswith("traced-"):
            imgrement_dm.unwrap(name, deferred=True)
    sh("udevadm", "settle")
    subprocess.run(["rmmod", "scsi_debug"], check=False)


def test_hotplugged_disks_are_wrapped_by_policy(
    watcher: tuple[subprocess.Popen[str], Path], disk2: str, loopdev: str
) -> None:
    _, log = watcher
    before = _scsi_disks()
    (SCSI_DEBUG / "add_host").write_text("1\n")
    _wait(lambda: _scsi_disks() - before, "the new scsi_debug disk")
    (new,) = _scsi_disks() - before
    _wait(lambda: f"wrapped /dev/{new} as" in log.read_text(), "the wrap", 30)
    (name,) = [n for n in dm_devices() if n.startswith("traced-")]
    serial = sh("udevadm", "info", "--query=property", f"--name=/dev/{new}")
    short = [ln.split("=", 1)[1] for ln in serial.splitlines()
             if ln.startswith("ID_SERIAL_SHORT=")]
    assert name == f"traced-{short[0]}" if short else name == f"traced-{new}"
    assert f"wrapped /dev/{new} as /dev/mapper/{name}" in log.read_text()

    # records flow
    dev = imgrement_dm.api.TracedDevice.find(name)
    with dev.records() as reader:
        reader.read(timeout=1)
        direct_write(dev.node, 0, pattern(1, 4096))
        items = read_until_mark(reader, dev.mark("end"))
    writes = [i for i in items if isinstance(i, BioRecord) and i.pid == os.getpid()]
    assert [bytes(w.payload) for w in writes] == [pattern(1, 4096)]

    # not matching, or never: untouched, with the reason logged
    sh("udevadm", "trigger", "--action=add", "--settle", f"/sys/class/block/{Path(disk2).name}")
    sh("udevadm", "trigger", "--action=add", "--settle",
       f"/sys/class/block/{Path(loopdev).name}")
    _wait(lambda: f"{Path(loopdev).name} is a loop device" in log.read_text(), "the log")
    text = log.read_text()
    assert f"not wrapping {disk2}: {Path(disk2).name}: no [match] rule matches" in text
    assert [n for n in dm_devices() if n.startswith("traced-")] == [name]

    # remove the wrapped disk under I/O: the mapping goes, errors reach fio
    fio = subprocess.Popen(
        ["fio", "--name=gone", f"--filename={dev.node}", "--rw=randwrite", "--bs=4k",
         "--direct=1", "--ioengine=libaio", "--iodepth=4", "--time_based", "--runtime=60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    scsi = Path(glob.glob(str(SCSI_DEBUG / f"adapter*/host*/target*/*/block/{new}"))[0])
    (scsi.parents[1] / "delete").write_text("1\n")
    fio.communicate(timeout=120 * SLOWDOWN)
    assert fio.returncode != 0
    _wait(lambda: name not in dm_devices(), "the mapping to go", 30)
    # the watcher logs the release after the removal returns: wait for the line
    _wait(lambda: f"released /dev/mapper/{name}" in log.read_text(), "the release's log line",
          30)


def _status(log: Path) -> list[str]:
    """autowrap status's wrapped: lines, with the watcher's state folder."""
    env = {**os.environ, "IMGREMENT_AUTOWRAP_STATE": str(log.parent / "state"),
           "IMGREMENT_AUTOWRAP_CONF": str(log.parent / "autowrap.conf")}
    r = subprocess.run([*CLI, "autowrap", "status"], capture_output=True, text=True,
                       env=env, check=False)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line.startswith("wrapped:")]


def test_the_watcher_survives_disks_that_vanish_at_once(
    watcher: tuple[subprocess.Popen[str], Path], disk2: str
) -> None:
    """Disks added and deleted in a tight loop: the watcher meets disks gone
    between the event and its lookup (and mappings over vanished disks), logs
    each and goes on. Afterwards it is alive, no mapping is left, and it still
    wraps the next disk; status lists what it wrapped, not a traced- name
    made by hand."""
    proc, log = watcher
    add_host = SCSI_DEBUG / "add_host"
    for _ in range(12):
        add_host.write_text("1\n")
        add_host.write_text("-1\n")
    sh("udevadm", "settle")
    _wait(lambda: not [n for n in dm_devices() if n.startswith("traced-")],
          "the mappings of vanished disks to go", 60)
    assert proc.poll() is None, log.read_text()
    assert "Traceback" not in log.read_text()
    assert _status(log) == []

    before = _scsi_disks()
    add_host.write_text("1\n")
    _wait(lambda: _scsi_disks() - before, "the new scsi_debug disk")
    (new,) = _scsi_disks() - before
    _wait(lambda: f"wrapped /dev/{new} as" in log.read_text(), "the wrap", 30)
    (name,) = [n for n in dm_devices() if n.startswith("traced-")]
    by_hand = imgrement_dm.wrap(disk2, name="traced-byhand")
    try:
        assert _status(log) == [f"wrapped: /dev/{new} as /dev/mapper/{name}"]
    finally:
        by_hand.unwrap()
    add_host.write_text("-1\n")
    _wait(lambda: name not in dm_devices(), "the mapping to go", 30)
    assert _status(log) == []
    assert proc.poll() is None


def test_udevadm_test_shows_the_rules_decision(tmp_path: Path, loopdev: str) -> None:
    """The rule asks systemd for the service for a real disk, never for a loop
    device, and for nothing at all until a policy exists (the Debian package
    installs it unconditionally: it must be inert until the admin opts in)."""
    rules = Path("/etc/udev/rules.d") / RULE_NAME
    policy = Path("/etc/imgrement-dm/autowrap.conf")  # the guest's /etc is an overlay
    assert not policy.exists()
    rules.write_text(_source(RULE_NAME).read_text())
    subprocess.run(["modprobe", "scsi_debug", "dev_size_mb=16"], check=True)

    def wants(dev: str) -> str:
        out = subprocess.run(["udevadm", "test", "--action=add", f"/sys/class/block/{dev}"],
                             capture_output=True, text=True, check=False)
        return out.stdout + out.stderr

    try:
        sh("udevadm", "settle")
        (sd,) = _scsi_disks()
        assert "imgrement-autowrap@" not in wants(sd)
        policy.parent.mkdir(exist_ok=True)
        policy.write_text("[match]\nID_MODEL = scsi_debug\n")
        assert f"SYSTEMD_WANTS=imgrement-autowrap@{sd}.service" in wants(sd)
        assert "imgrement-autowrap@" not in wants(Path(loopdev).name)
    finally:
        policy.unlink(missing_ok=True)
        rules.unlink()
        sh("udevadm", "settle")
        subprocess.run(["rmmod", "scsi_debug"], check=False)
