"""Guest-suite fixtures: scratch disks, loop devices, and the leftover check.

These tests need the real kernel with the imgrement target loaded, so they
run only inside the sandbox (``make test``), never on the host.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.helpers import dm_devices, loop_devices, mapper_nodes, sh


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("IMGREMENT_HOST_COLLECT") == "1" and config.option.collectonly:
        return  # make test-guest: writes pytest's rewritten modules, which the guest cannot
    if not os.environ.get("IMGREMENT_IN_SANDBOX"):
        raise pytest.UsageError(
            "the guest suite runs only inside the sandbox guest: use 'make test'"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The kernel-log check judges everything before it, so it runs last."""
    last = [i for i in items if i.get_closest_marker("last")]
    items[:] = [i for i in items if i not in last] + last


@pytest.fixture(scope="session")
def scratch_disks() -> list[str]:
    disks = os.environ.get("IMGREMENT_SCRATCH_DISKS", "").split()
    assert len(disks) >= 2, "the guest suite needs two scratch disks (--disk twice)"
    return disks


@pytest.fixture
def disk(scratch_disks: list[str]) -> str:
    """The first scratch disk, a virtio disk with nothing on it that matters."""
    return scratch_disks[0]


@pytest.fixture
def disk2(scratch_disks: list[str]) -> str:
    return scratch_disks[1]


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "loop.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    dev = sh("losetup", "--find", "--show", str(image)).strip()
    sh("udevadm", "settle")
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every test must leave no dm device, /dev/mapper node or loop device."""
    before_loops = loop_devices()
    before_fds = sorted(os.listdir("/proc/self/fd"))
    assert dm_devices() == [], "a previous test left a device-mapper device"
    yield
    sh("udevadm", "settle")
    leftovers = dm_devices()
    for name in leftovers:  # clean up so one failure does not cascade
        subprocess.run(["dmsetup", "remove", "--force", name], check=False)
    assert leftovers == [], f"test left device-mapper devices: {leftovers}"
    assert mapper_nodes() == [], f"test left /dev/mapper nodes: {mapper_nodes()}"
    # Autouse fixtures are set up first and torn down last: loopdev has
    # already detached its device by now.
    assert loop_devices() == before_loops, "test left loop devices attached"
    assert sorted(os.listdir("/proc/self/fd")) == before_fds, "test left files open"
