"""Where a guest test's time goes: a breakdown by what the test waited on.

Under emulation a Python start costs about a second and a CLI call several,
so a test can spend most of its time on things that are not what it tests.
This plugin measures, per test (setup, call and teardown together), the
wall time the test's main thread spent blocked in

- ``python``: a Python process (the CLI, or a helper script) it ran;
- ``fio``, ``udev`` (udevadm, and the API's own wait for a udev event),
  ``mkfs/mount``, ``dm/loop`` (dmsetup, losetup, blockdev) and ``other``
  commands;
- ``sleep``: time.sleep, which is how the tests poll;

and calls the rest ``own``: the test's own work in-process (its I/O, the
API's ioctls, reading records).  Only the outermost wait counts (a sleep
inside a wrapped call is not counted twice), and only the main thread's: a
background thread's time overlaps the test's own.

run-suite prints the totals at the end and writes one line per test to
``timing-<release>.tsv`` in the results folder (docs/testing.md has the
figures).
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

CATEGORIES = ("python", "fio", "udev", "mkfs/mount", "dm/loop", "other", "sleep")

_MAIN = threading.main_thread()
_state = threading.local()
_current: defaultdict[str, float] = defaultdict(float)
_totals: defaultdict[str, float] = defaultdict(float)
_rows: list[tuple[str, float, dict[str, float]]] = []


def category(argv: Any) -> str:
    """What kind of process ``argv`` starts (past setpriv, env and timeout)."""
    raw = [argv] if isinstance(argv, (str, bytes)) else list(argv)
    words: list[str] = [os.fsdecode(w) for w in raw]
    while words and (os.path.basename(words[0]) in ("setpriv", "env", "timeout")):
        words = words[1:]
        while words and (words[0].startswith("-") or "=" in words[0] or words[0][:1].isdigit()):
            words = words[1:]
    if not words:
        return "other"
    name = os.path.basename(words[0].split()[0])
    if name.startswith("python") or name.startswith("imgrement-dm"):
        return "python"
    if name == "fio":
        return "fio"
    if name == "udevadm":
        return "udev"
    if name.startswith("mkfs") or name in ("mount", "umount", "fsck", "e2fsck"):
        return "mkfs/mount"
    if name in ("dmsetup", "losetup", "blockdev"):
        return "dm/loop"
    return "other"


def _timed(kind: Callable[..., str], func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not _MAIN or getattr(_state, "inside", False):
            return func(*args, **kwargs)
        _state.inside = True
        start = time.monotonic()
        try:
            return func(*args, **kwargs)
        finally:
            _current[kind(*args, **kwargs)] += time.monotonic() - start
            _state.inside = False

    return wrapper


def _argv_of_call(*args: Any, **kwargs: Any) -> str:
    return category(args[0] if args else kwargs.get("args", ()))


def _argv_of_popen(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> str:
    return category(getattr(self, "args", ()))


def install() -> None:
    """Wrap the calls a test blocks in (once per process)."""
    if getattr(install, "done", False):
        return
    install.done = True  # type: ignore[attr-defined]
    subprocess.run = _timed(_argv_of_call, subprocess.run)
    subprocess.check_output = _timed(_argv_of_call, subprocess.check_output)
    subprocess.check_call = _timed(_argv_of_call, subprocess.check_call)
    subprocess.call = _timed(_argv_of_call, subprocess.call)
    popen = subprocess.Popen
    popen.communicate = _timed(_argv_of_popen, popen.communicate)  # type: ignore[method-assign]
    popen.wait = _timed(_argv_of_popen, popen.wait)  # type: ignore[method-assign]
    original_init = popen.__init__

    def init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        kind = category(args[0] if args else kwargs.get("args", ()))
        _timed(lambda *a, **k: kind, original_init)(self, *args, **kwargs)

    popen.__init__ = init  # type: ignore[method-assign]
    time.sleep = _timed(lambda *a, **k: "sleep", time.sleep)
    from imgrement_dm import udevsync

    udevsync.NodeSync._wait_event = _timed(  # type: ignore[method-assign]
        lambda *a, **k: "udev", udevsync.NodeSync._wait_event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    _current.clear()
    start = time.monotonic()
    yield
    wall = time.monotonic() - start
    spent = dict(_current)
    spent["own"] = max(0.0, wall - sum(spent.values()))
    for k, v in spent.items():
        _totals[k] += v
    _totals["wall"] += wall
    _rows.append((item.nodeid, wall, spent))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _rows:
        return
    wall = _totals["wall"]
    parts = ", ".join(f"{k} {_totals[k]:.0f} s ({100 * _totals[k] / wall:.0f}%)"
                      for k in (*CATEGORIES, "own") if _totals.get(k))
    terminalreporter.write_line(f"time by what the tests waited on: {len(_rows)} tests, "
                                f"{wall:.0f} s: {parts}")
    results = os.environ.get("IMGREMENT_RESULTS")
    if results:
        path = Path(results) / f"timing-{os.uname().release}.tsv"
        with path.open("w") as f:
            f.write("\t".join(("test", "wall", *CATEGORIES, "own")) + "\n")
            for nodeid, w, spent in _rows:
                f.write("\t".join((nodeid, f"{w:.2f}",
                                   *(f"{spent.get(k, 0.0):.2f}" for k in (*CATEGORIES, "own"))))
                        + "\n")
