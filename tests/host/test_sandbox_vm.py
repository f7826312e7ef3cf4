"""The sandbox's guest process: it must not outlive the command that boots it.

QEMU runs in a session of its own (so that a terminal's Ctrl-C reaches only
``imgrement-dm sandbox``, which then takes it down). A stand-in for vng,
which starts a long child the way vng starts QEMU, shows what is left after
the sandbox is stopped by each signal a supervisor sends.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: Runs vm._boot with the stand-in vng given as argv[1].
DRIVER = """
import signal
import sys
from pathlib import Path
# Ctrl-C as in a terminal, even under a parent that ignores SIGINT (a
# background job of a non-interactive shell does, and children inherit it)
signal.signal(signal.SIGINT, signal.default_int_handler)
from types import SimpleNamespace
from imgrement_dm.sandbox import vm

vm._vng = lambda: sys.argv[1]
kernel = SimpleNamespace(image=Path("/nonexistent/vmlinuz"), series="test")
spec = vm.GuestRun(kernel=kernel, module=Path("/nonexistent.ko"), command=["true"],
                   results=Path(sys.argv[2]), cwd=Path.cwd())
sys.exit(vm._boot(spec, [], Path(sys.argv[2]) / "marker"))
"""

#: Starts a "QEMU" (a sleep) in its own process group and says its pid.
FAKE_VNG = """#!/bin/sh
sleep 600 &
echo $! > "{pidfile}"
echo booted
wait
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # dead, waiting for init to reap it


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_stopping_the_sandbox_stops_its_guest(tmp_path: Path, sig: signal.Signals) -> None:
    pidfile = tmp_path / "qemu.pid"
    fake = tmp_path / "vng"
    fake.write_text(FAKE_VNG.format(pidfile=pidfile))
    fake.chmod(0o755)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(fake), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "the stand-in vng never started"
            time.sleep(0.05)
        qemu = int(pidfile.read_text())
        assert driver.stdout is not None
        assert driver.stdout.readline() == b"booted\n"  # the console relay is running
        driver.send_signal(sig)
        rc = driver.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not _gone(qemu) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(qemu), f"the guest outlived the sandbox stopped by {sig.name}"
        # Ctrl-C: Python ends by the signal itself after the KeyboardInterrupt
        assert rc == (-sig if sig == signal.SIGINT else 128 + sig), driver.communicate()
    finally:
        driver.kill()
        driver.wait()
        if pidfile.exists() and pidfile.read_text().strip():
            qemu = int(pidfile.read_text())
            if not _gone(qemu):
                os.kill(qemu, signal.SIGKILL)


#: Keeps what vng was asked to run in the guest, and the script it names.
RECORDING_VNG = """#!/bin/sh
while [ $# -gt 0 ]; do
    if [ "$1" = --exec ]; then
        printf '%s' "$2" > "{out}/exec"
        cp "$(printf '%s' "$2" | cut -d' ' -f2)" "{out}/script"
    fi
    shift
done
"""


def test_a_long_command_reaches_the_guest_whole(tmp_path: Path) -> None:
    # x86 kernels keep 2048 bytes of command line; vng put the command there
    # and a longer one left a guest that never started (idle until killed).
    fake = tmp_path / "vng"
    fake.write_text(RECORDING_VNG.format(out=tmp_path))
    fake.chmod(0o755)
    words = [f"--deselect=tests/guest/test_x.py::test_{i}[it's \"quoted\" $HOME]"
             for i in range(200)]
    command = ["tests/guest/run-suite", "full", *words]
    driver = DRIVER.replace('command=["true"]', f"command={command!r}")
    subprocess.run([sys.executable, "-c", driver, str(fake), str(tmp_path)], check=True,
                   cwd=Path(__file__).resolve().parents[2], timeout=60)
    exec_arg = (tmp_path / "exec").read_text()
    assert len(exec_arg) < 200 and exec_arg.startswith("bash "), exec_arg[:300]
    script = (tmp_path / "script").read_text()
    assert len(script) > 2048
    # the script says exactly the command, every word as it was
    last = script.splitlines()[-1]
    argv = shlex.split(last.removeprefix("exec "))
    assert argv[-len(command):] == command
    assert script.splitlines()[0] == f"touch {shlex.quote(str(tmp_path / 'marker'))}"
    assert not list(tmp_path.glob("marker*")), "the script stays behind"


def test_the_cached_share_covers_the_interpreter_and_the_venv(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What guest_init.sh lays the cached share over: where this Python's
    standard library and installed packages are, and never a system prefix
    the guest writes below."""
    import click

    from imgrement_dm.sandbox import vm

    paths = vm.python_paths()
    assert paths and all(os.path.isdir(p) and os.path.isabs(p) for p in paths)

    def covered(f: str) -> bool:
        real = os.path.realpath(f)
        return any(real.startswith(p + "/") for p in paths)

    assert covered(os.__file__) and covered(click.__file__)
    assert not set(paths) & {"/", "/usr", "/usr/local"}
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sys, "prefix", "/usr")
    import sysconfig
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": "/usr/lib/python3.11"})
    assert vm.python_paths() == (["/usr/lib/python3.11"] if os.path.isdir("/usr/lib/python3.11")
                                 else [])


def test_the_cached_share_also_covers_executables_and_their_libraries() -> None:
    """dmsetup and libc are read through the cached share; never a prefix the
    guest writes below."""
    import shutil

    from imgrement_dm.sandbox import vm

    paths = vm.system_paths()
    assert "/usr/bin" in paths and not set(paths) & {"/", "/usr", "/usr/local", "/usr/lib"}
    libc = os.path.realpath("/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert any(libc.startswith(p + "/") for p in paths)
    dmsetup = shutil.which("dmsetup", path="/usr/sbin:/sbin")
    assert dmsetup and any(os.path.realpath(dmsetup).startswith(p + "/") for p in paths)


def test_the_guest_gets_bytecode_for_the_package_and_the_tests(tmp_path: Path) -> None:
    """The guest cannot write .pyc files; without them every Python start
    there compiled our modules again, so the sandbox writes them first."""
    import importlib.util

    from imgrement_dm import resources
    from imgrement_dm.sandbox import vm

    tests = tmp_path / "tests"
    (tests / "guest").mkdir(parents=True)
    (tests / "guest" / "test_x.py").write_text("X = 1\n")
    package = resources.PACKAGE
    for tree in (package, tests):
        for cache in tree.rglob("__pycache__"):
            for pyc in cache.glob("*.pyc"):
                pyc.unlink()
    assert vm.write_bytecode(tmp_path) == [package, tests]
    for source in (tests / "guest" / "test_x.py", package / "cli.py", package / "api.py",
                   package / "formats" / "capture.py"):
        assert Path(importlib.util.cache_from_source(str(source))).is_file(), source
    # a folder without tests/ gets the package's alone
    assert vm.write_bytecode(tmp_path / "nothing-here") == [package]
