"""After everything else: the kernel log holds no sign of trouble, and on a
kernel with kmemleak, nothing leaked."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.guest.helpers import sh

# Case matters: "scsi_debug:" must not read as "BUG:".  The debug kernel's
# checkers each have their own words: KASAN and UBSAN reports, lockdep's
# "possible ... locking" and "suspicious RCU usage", DEBUG_ATOMIC_SLEEP's
# "BUG: sleeping function called from invalid context", debug objects'
# "ODEBUG:", DEBUG_LIST's "list_add corruption", kmemleak's own line, and
# the watchdogs' soft lockups and RCU stalls.
BAD = re.compile(
    r"WARNING:|\bBUG:|Oops|general protection fault|Call Trace:|"
    r"possible (recursive|circular) locking|lockdep is turned off|"
    r"INFO: task .* blocked for more than|"
    r"hung_task|KASAN|UBSAN|kernel BUG|[Ss]lab.*corrupt|refcount_t:|"
    r"ODEBUG:|suspicious RCU usage|list_(add|del) corruption|"
    r"kmemleak: .*(suspected memory leak|error)|soft lockup|rcu: INFO|self-detected stall|"
    r"inconsistent lock state|possible irq lock inversion"
)

KMEMLEAK = Path("/sys/kernel/debug/kmemleak")


def kernel_log_trouble(log: str) -> list[str]:
    """The lines of ``log`` that report trouble."""
    return [line for line in log.splitlines() if BAD.search(line)]


def test_the_pattern_knows_each_checker() -> None:
    """Each checker's own report line is caught (so a new checker's words
    are added here, not silently missed); ordinary lines are not."""
    reports = [
        "BUG: KASAN: use-after-free in imgrement_ring_take+0x1d/0x2c0",
        "UBSAN: shift-out-of-bounds in drivers/md/dm-imgrement.c:42:9",
        "WARNING: possible circular locking dependency detected",
        "BUG: sleeping function called from invalid context at kernel/locking/mutex.c:580",
        "ODEBUG: free active (active state 0) object type: timer_list hint: ring_wake_timer",
        "kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)",
        "watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [python:1234]",
        "list_add corruption. prev->next should be next (ffff8880), but was 0000",
        "WARNING: suspicious RCU usage",
        "INFO: task python:77 blocked for more than 120 seconds.",
        "INFO: lockdep is turned off.",
    ]
    assert [r for r in reports if not BAD.search(r)] == []
    ordinary = ["scsi_debug:sdebug_driver_probe: scsi_debug: trim poll_queues to 0",
                "imgrement: W, bytes to transfer: 4096, delta count: 1",
                "kmemleak: Kernel memory leak detector initialized (mem pool available: 15676)",
                "rcu: \tRCU lockdep checking is enabled."]
    assert [r for r in ordinary if BAD.search(r)] == []


@pytest.mark.smoke
@pytest.mark.last
def test_kernel_log_is_clean() -> None:
    leaks = ""
    if KMEMLEAK.exists():
        # Two scans, apart: kmemleak reports an object only once it has
        # stayed unreferenced across scans.
        for _ in range(2):
            KMEMLEAK.write_text("scan")
            time.sleep(6)
        leaks = KMEMLEAK.read_text()
    bad = kernel_log_trouble(sh("dmesg", "--notime"))
    assert bad == [], "kernel log has trouble:\n" + "\n".join(bad)
    assert leaks == "", "kmemleak found unreferenced objects:\n" + leaks
    # The target really was loaded into this kernel (so the log speaks of it).
    assert "imgrement" in sh("cat", "/proc/modules")
