"""Wrapping and unwrapping for real: data passes through byte for byte,
dmsetup sees our table, and every refusal leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import imgrement_dm
from imgrement_dm import api
from imgrement_dm.dm import Control
from tests.guest.helpers import (
    aligned,
    attached_loops,
    cli,
    devno,
    direct_read,
    direct_write,
    dm_devices,
    dm_names_now,
    loop_devices,
    mapper_nodes,
    pattern,
    sectors,
    sh,
)

# (offset, size): aligned and odd sector offsets, sizes from one sector to 1 MiB.
WRITES = [
    (0, 512),
    (7 * 512, 4096),
    (1 << 20, 64 << 10),
    (3 << 20, 1 << 20),
    (5 * 512 + (8 << 20), 3 * 512),
]


def _node_is(name: str, device: str) -> bool:
    st = os.stat(f"/dev/mapper/{name}")
    return stat.S_ISBLK(st.st_mode) and f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == device


@pytest.mark.smoke
@pytest.mark.parametrize("kind", ["virtio", "loop"])
def test_wrap_passes_data_through(kind: str, request: pytest.FixtureRequest) -> None:
    dev = request.getfixturevalue("disk" if kind == "virtio" else "loopdev")
    r = cli("wrap", dev)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "/dev/mapper/traced\n"
    # wrap returns only once the node exists and is our device.
    info = api.list_devices()
    assert [d.name for d in info] == ["traced"]
    assert _node_is("traced", f"{info[0].major}:{info[0].minor}")

    last = (sectors(dev) * 512) - 4096
    writes = [*WRITES, (last, 4096)]
    for i, (offset, size) in enumerate(writes):
        direct_write("/dev/mapper/traced", offset, pattern(i, size))
    for i, (offset, size) in enumerate(writes):
        assert direct_read(dev, offset, size) == pattern(i, size), f"write {i} at {offset}"
    # and the other way: what is on the disk reads back through the target
    direct_write(dev, 2 << 20, pattern(99, 8192))
    assert direct_read("/dev/mapper/traced", 2 << 20, 8192) == pattern(99, 8192)

    r = cli("unwrap", "traced")
    assert r.returncode == 0, r.stderr
    assert dm_devices() == []
    assert not Path("/dev/mapper/traced").exists()


@pytest.mark.smoke
def test_dmsetup_sees_our_table_and_removes_it(disk: str) -> None:
    traced = imgrement_dm.wrap(disk)
    assert traced.name == "traced"
    table = sh("dmsetup", "table", "traced")
    assert table == f"0 {sectors(disk)} imgrement {devno(disk)} 0\n"
    uuid = sh("dmsetup", "info", "-c", "--noheadings", "-o", "uuid", "traced").strip()
    assert uuid.startswith("IMGREMENT-") and uuid == traced.uuid
    assert sh("dmsetup", "targets").count("imgrement") == 1
    subprocess.run(["dmsetup", "remove", "traced"], check=True)
    sh("udevadm", "settle")
    assert dm_devices() == []
    assert mapper_nodes() == []


def test_the_leftover_check_sees_what_dmsetup_and_losetup_see(loopdev: str) -> None:
    """The check around every test reads the kernel's device list and sysfs
    instead of starting dmsetup and losetup; both views agree, with a
    device that has no table yet (no disk in sysfs on newer kernels) among
    them."""
    assert attached_loops() == loop_devices() and loopdev in attached_loops()
    subprocess.run(["dmsetup", "create", "notable", "--notable"], check=True)
    try:
        sh("dmsetup", "create", "plain", "--table", f"0 {sectors(loopdev)} linear {loopdev} 0")
        try:
            assert dm_names_now() == dm_devices() == ["notable", "plain"]
        finally:
            sh("dmsetup", "remove", "plain")
    finally:
        sh("dmsetup", "remove", "notable")
    sh("udevadm", "settle")
    assert dm_names_now() == dm_devices() == []


def test_status_counts_each_bio(disk: str) -> None:
    with imgrement_dm.wrap(disk, name="counted") as traced:
        # One open for all I/O: closing a written device makes udev re-read it.
        fd = os.open(traced.node, os.O_RDWR | os.O_DIRECT)
        try:
            before = traced.status().bios
            for i in range(5):
                buf = aligned(pattern(i, 4096))
                assert os.pwrite(fd, buf, i * 4096) == 4096
            assert os.preadv(fd, [buf], 0) == 4096
            assert bytes(buf) == pattern(0, 4096)
            assert traced.status().bios == before + 6
        finally:
            os.close(fd)
        assert traced.table().device == devno(disk)
        assert traced.table().length == sectors(disk)
    assert dm_devices() == []


def test_queue_limits_are_inherited_from_the_device(disk: str) -> None:
    """dm stacks the device's limits through .iterate_devices; check they arrived."""
    keys = ["logical_block_size", "physical_block_size", "max_sectors_kb",
            "discard_max_bytes", "write_zeroes_max_bytes", "rotational"]
    below = Path("/sys/class/block") / Path(disk).name / "queue"
    with imgrement_dm.wrap(disk) as traced:
        above = Path("/sys/class/block") / f"dm-{traced.minor}" / "queue"
        got = {k: (above / k).read_text().strip() for k in keys}
        want = {k: (below / k).read_text().strip() for k in keys}
        assert got == want
        assert int(got["discard_max_bytes"]) > 0  # so discards pass through


def test_list_shows_only_ours_unless_all(disk: str, disk2: str) -> None:
    length = sectors(disk2)
    subprocess.run(
        ["dmsetup", "create", "plainlinear", "--table", f"0 {length} linear {disk2} 0"],
        check=True,
    )
    try:
        with imgrement_dm.wrap(disk):
            r = cli("list", "--json")
            assert r.returncode == 0, r.stderr
            assert [line for line in r.stdout.splitlines() if '"traced"' in line]
            assert "plainlinear" not in r.stdout
            r = cli("list", "--all")
            assert "plainlinear" in r.stdout and "traced" in r.stdout
            # and we refuse to remove what is not ours
            r = cli("unwrap", "plainlinear")
            assert r.returncode == 4
            assert "not an imgrement device" in r.stderr
    finally:
        subprocess.run(["dmsetup", "remove", "plainlinear"], check=True)


@pytest.fixture
def mounted_partition(disk2: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    subprocess.run(["sfdisk", "--quiet", disk2], input="label: dos\n,32M\n,\n",
                   text=True, check=True)
    sh("udevadm", "settle")
    part = f"{disk2}1"
    sh("mkfs.ext4", "-q", "-F", part)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", part, str(mnt))
    yield part, mnt
    sh("umount", str(mnt))
    subprocess.run(["wipefs", "--all", "--quiet", disk2], check=True)
    sh("udevadm", "settle")


def _refused(args: list[str], code: int, message: str) -> None:
    r = cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert dm_devices() == []
    assert mapper_nodes() == []


def test_refuses_missing_path() -> None:
    _refused(["wrap", "/dev/does-not-exist"], 4, "/dev/does-not-exist does not exist")


def test_refuses_regular_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    _refused(["wrap", str(image)], 4, "is a regular file, not a block device")
    assert image.read_bytes() == b"\0" * 4096


def test_refuses_mounted_partition(mounted_partition: tuple[str, Path], disk2: str) -> None:
    part, mnt = mounted_partition
    _refused(["wrap", part], 4, f"{part} is mounted at {mnt}")
    _refused(["wrap", disk2], 4, f"{part} (partition of {disk2}) is mounted at {mnt}")


def test_refuses_already_wrapped_disk(disk: str, disk2: str) -> None:
    with imgrement_dm.wrap(disk):
        r = cli("wrap", disk, "--name", "second")
        assert r.returncode == 4, r.stderr
        assert f"{disk} is already wrapped by imgrement device 'traced'" in r.stderr
        assert dm_devices() == ["traced"]
        # the name is taken too, whatever the disk
        r = cli("wrap", disk2)
        assert r.returncode == 5, r.stderr
        assert "named 'traced' exists already" in r.stderr
        assert dm_devices() == ["traced"]
    assert dm_devices() == []


@pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 128, "sp ace"])
def test_refuses_bad_names(disk: str, name: str) -> None:
    _refused(["wrap", disk, "--name", name], 5, "invalid device name")


def test_unwrap_missing_and_busy(disk: str, tmp_path: Path) -> None:
    _refused(["unwrap", "nosuch"], 6, "no device-mapper device named 'nosuch'")
    with imgrement_dm.wrap(disk) as traced:
        fd = os.open(traced.node, os.O_RDONLY)
        try:
            r = cli("unwrap", "traced")
            assert r.returncode == 4
            assert "is open (1 user(s))" in r.stderr
            assert dm_devices() == ["traced"]
        finally:
            os.close(fd)
    assert dm_devices() == []


def test_ioctls_that_send_no_uevent_do_not_wait_for_udev(disk: str) -> None:
    """Resuming a live device, or a deferred remove of an open one, sends no
    uevent; the reply says so (DM_UEVENT_GENERATED clear), and the node sync
    must return on it instead of waiting its whole timeout for an event that
    never comes (UdevTimeoutError)."""
    traced = imgrement_dm.wrap(disk)
    try:
        with Control() as ctl:
            assert ctl.use_udev
            info = ctl.resume("traced", timeout=20)  # live already: no uevent
            assert not info.uevent_generated
            assert _node_is("traced", f"{traced.major}:{traced.minor}")
            fd = os.open(traced.node, os.O_RDONLY)
            try:
                info = ctl.remove("traced", deferred=True, timeout=20)
                assert not info.uevent_generated
                assert dm_devices() == ["traced"]  # open: removal waits for the last close
                assert _node_is("traced", f"{traced.major}:{traced.minor}")
            finally:
                os.close(fd)
    except BaseException:  # leave nothing behind for the next test
        with contextlib.suppress(imgrement_dm.ImgrementError):
            imgrement_dm.unwrap("traced", deferred=True)
        raise
    sh("udevadm", "settle")  # the last close removed it, which our code did not wait for
    assert dm_devices() == []
    assert mapper_nodes() == []


def test_without_cap_sys_admin_says_it_needs_root(disk: str) -> None:
    r = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all",
         "imgrement-dm", "wrap", disk],
        capture_output=True, text=True, check=False,
    )
    assert r.returncode == 3, r.stderr
    assert "needs root" in r.stderr
    assert "Traceback" not in r.stderr
    assert dm_devices() == []
