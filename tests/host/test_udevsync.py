"""udev_running() against real listening sockets (no udevd on the host)."""

from __future__ import annotations

import socket
from pathlib import Path

from imgrement_dm.udevsync import udev_running


def test_a_full_queue_is_a_running_udevd(tmp_path: Path) -> None:
    """udevd listens with a backlog of 0 and accepts when its event loop
    gets to it: one connection not yet accepted fills the queue, and the
    next connect gets EAGAIN.  That is a busy udevd, not an absent one (CI's
    debug kernel took it for absent, and a wrap made its own node that the
    unwrap, under udev, left behind).  Before the fix: [True, False, False]."""
    path = str(tmp_path / "control")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(0)  # as udevd does, and never accepts
        assert [udev_running(path) for _ in range(3)] == [True, True, True]
    # closed: the file stays and nobody listens (ECONNREFUSED); no file at all
    assert Path(path).exists() and not udev_running(path)
    assert not udev_running(str(tmp_path / "none"))
