"""After everything else: the kernel log holds no sign of trouble."""

from __future__ import annotations

import re

import pytest

from tests.guest.helpers import sh

# Case matters: "scsi_debug:" must not read as "BUG:".
BAD = re.compile(
    r"WARNING:|\bBUG:|Oops|general protection fault|Call Trace:|"
    r"possible (recursive|circular) locking|lockdep|INFO: task .* blocked for more than|"
    r"hung_task|KASAN|UBSAN|kernel BUG|[Ss]lab.*corrupt|refcount_t:"
)


@pytest.mark.smoke
@pytest.mark.last
def test_kernel_log_is_clean() -> None:
    log = sh("dmesg", "--notime")
    bad = [line for line in log.splitlines() if BAD.search(line)]
    assert bad == [], "kernel log has trouble:\n" + "\n".join(bad)
    # The target really was loaded into this kernel (so the log speaks of it).
    assert "imgrement" in sh("cat", "/proc/modules")
