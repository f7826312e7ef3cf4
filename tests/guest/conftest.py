"""Guest-suite fixtures: scratch disks, loop devices, and the leftover check.

These tests need the real kernel with the imgrement target loaded, so they
run only inside the sandbox (``make test``), never on the host.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.guest import shards, timing
from tests.guest.helpers import (
    attached_loops,
    dm_names_now,
    kill_children,
    mapper_nodes,
    reap_children,
    remove_leftovers,
    running_children,
    sh,
)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("IMGREMENT_HOST_COLLECT") == "1" and config.option.collectonly:
        return  # make test-guest: writes pytest's rewritten modules, which the guest cannot
    if not os.environ.get("IMGREMENT_IN_SANDBOX"):
        raise pytest.UsageError(
            "the guest suite runs only inside the sandbox guest: use 'make test'"
        )
    timing.install()
    config.pluginmanager.register(timing, "guest-timing")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shard", metavar="K/S", default=None,
        help="besides the stress tests and the kernel-log check, run only the tests "
             "of shard K of S (tests/guest/shards.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The kernel-log check judges everything before it, so it runs last;
    ``--shard K/S`` keeps the stress tests, the check and shard K's tests."""
    spec = config.getoption("--shard")
    if spec:
        try:
            k, s = shards.parse(spec)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None
        keep = [i for i in items if i.get_closest_marker("stress")
                or i.get_closest_marker("last") or shards.shard_of(i.nodeid, s) == k]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
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


#: What the hang watchdog fires before pytest-timeout's own limit (seconds).
HANG_DUMP_MARGIN = 60


def _test_limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 0)


def _dump_hung_tasks(nodeid: str) -> None:
    """The kernel's list of blocked tasks (sysrq w) and the log's end, where
    the next person looks: stderr (the sandbox's console) and the results."""
    try:
        Path("/proc/sysrq-trigger").write_text("w\n")
    except OSError as e:
        print(f"hang watchdog: sysrq w failed: {e}", file=sys.__stderr__)
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    results = os.environ.get("IMGREMENT_RESULTS")
    where = ""
    if results:
        path = Path(results) / f"hang-{os.uname().release}.log"
        path.write_text(f"{nodeid} ran out of time; blocked tasks (sysrq w):\n{log}")
        where = f"; the whole kernel log is in {path}"
    tail = "\n".join(log.splitlines()[-150:])
    print(f"\nhang watchdog: {nodeid} is about to reach its time limit; blocked "
          f"tasks and the kernel log's end follow{where}\n{tail}",
          file=sys.__stderr__, flush=True)


#: How long after a test's limit the guard powers the guest off (seconds).
HANG_EXIT_GRACE = 60

#: The guard: reads deadlines (seconds since the epoch, 0 for none) a line at
#: a time from pytest, and ends when pytest's end closes the pipe.  A test
#: whose main thread is stuck in the kernel keeps pytest from exiting even
#: after pytest-timeout's os._exit (the process cannot end while one thread
#: sleeps uninterruptibly), so nothing in pytest can act any more, and the
#: guest would sit there until its own limit, hours later.  Past a deadline
#: the guard says so and powers the guest off: the run fails at once, the
#: suite's XML missing, the blocked tasks already in the log.
HANG_GUARD = r"""
deadline=0
while :; do
    read -r -t 5 line
    rc=$?
    if [ $rc -eq 0 ]; then
        deadline=$line
    elif [ $rc -le 128 ]; then
        exit 0
    fi
    printf -v now '%(%s)T' -1
    if [ "$deadline" -gt 0 ] && [ "$now" -ge "$deadline" ]; then
        msg="hang watchdog: the test passed its time limit and pytest cannot exit"
        msg="$msg (a task stuck in the kernel: blocked tasks above); powering the guest off"
        echo "$msg" >&2
        if [ -n "${IMGREMENT_RESULTS:-}" ]; then
            echo "$msg" > "$IMGREMENT_RESULTS/hang-guard-$(uname -r).txt"
        fi
        sleep 2  # the console takes the message out first
        echo o > /proc/sysrq-trigger
        exit 1
    fi
done
"""


@pytest.fixture(scope="session", autouse=True)
def hang_guard() -> Iterator[IO[str]]:
    """The guard process (HANG_GUARD), for the whole session; its input."""
    guard = subprocess.Popen(["bash", "-c", HANG_GUARD], stdin=subprocess.PIPE, text=True)
    assert guard.stdin is not None
    yield guard.stdin
    guard.stdin.close()
    guard.wait(timeout=30)


@pytest.fixture(autouse=True)
def hang_watchdog(request: pytest.FixtureRequest, hang_guard: IO[str]) -> Iterator[None]:
    """A test that hangs (a task stuck in the kernel, which no signal ends)
    is ended by pytest-timeout's thread method; just before that, this dumps
    the blocked tasks' kernel stacks, so the run says why, not only where;
    and if pytest cannot exit even then, the guard ends the guest."""
    limit = _test_limit(request.node)
    timer = None
    if limit > HANG_DUMP_MARGIN:
        timer = threading.Timer(limit - HANG_DUMP_MARGIN, _dump_hung_tasks,
                                args=(request.node.nodeid,))
        timer.daemon = True
        timer.start()
    if limit > 0:
        hang_guard.write(f"{int(time.time() + limit + HANG_EXIT_GRACE)}\n")
        hang_guard.flush()
    yield
    if timer is not None:
        timer.cancel()
    if limit > 0:
        hang_guard.write("0\n")
        hang_guard.flush()


@pytest.fixture(autouse=True)
def nothing_left_behind(hang_watchdog: None) -> Iterator[None]:
    """Every test must leave no dm device, /dev/mapper node or loop device.

    The test that leaves one fails (at teardown); what it left is removed
    there, and if even that did not work, here before the next test, which
    says so on stderr and goes on: one failure never fails every later test.
    """
    left = remove_leftovers()
    if left:
        # to the console itself, not to the captured output of a passing test
        print(f"\nnothing_left_behind: removed {left}, left by an earlier test "
              "(that test failed for it)", file=sys.__stderr__, flush=True)
    assert dm_names_now() == [], f"could not remove devices an earlier test left: {dm_names_now()}"
    before_loops = attached_loops()
    # An earlier test that failed may hold pipes in objects its traceback
    # kept; closed by the collector in the middle of this test, they would
    # look like this test's doing.  Collect now, and judge only new files.
    gc.collect()
    before_fds = set(os.listdir("/proc/self/fd"))
    before_children = running_children()
    yield
    killed = kill_children(running_children() - before_children)
    sh("udevadm", "settle")
    leftovers = dm_names_now()
    remove_leftovers()  # so one failure does not cascade
    left_running = reap_children(killed)
    assert leftovers == [], f"test left device-mapper devices: {leftovers}"
    assert mapper_nodes() == [], f"test left /dev/mapper nodes: {mapper_nodes()}"
    # Autouse fixtures are set up first and torn down last: loopdev has
    # already detached its device by now.
    assert attached_loops() == before_loops, "test left loop devices attached"
    assert left_running == [], f"test left processes running (killed): {left_running}"
    opened = sorted(set(os.listdir("/proc/self/fd")) - before_fds, key=int)
    assert opened == [], f"test left files open: fds {opened}"
