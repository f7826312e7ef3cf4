"""'sudo make install' and 'make uninstall' on a booted Debian machine.

A whole bookworm machine (tests/system/machine.py: its own kernel, initramfs
and systemd as PID 1) runs payload/run at boot: make install from this
checkout, the installed module loaded from DKMS, the udev rule and systemd
unit wrapping a hot-added scsi_debug disk by policy (payload/hotplug.py),
make uninstall, and a before/after comparison of the root file system.
The machine's report is kept in build/test-results/machine-install.log.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests import checkout
from tests.system import machine

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = Path(__file__).resolve().parent / "payload"
#: What 'pip install .' needs in the machine, which has no network.
WHEELS = ["setuptools>=77", "wheel", "cffi>=1.15", "click>=8.0", "pyudev>=0.24"]


def test_make_install_and_uninstall_on_a_booted_debian_machine(tmp_path: Path) -> None:
    img = machine.image()
    payload = tmp_path / "payload"
    payload.mkdir()
    shutil.copy2(PAYLOAD / "run", payload / "run")
    shutil.copy2(PAYLOAD / "hotplug.py", payload / "hotplug.py")
    checkout.copy_to(payload / "src")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest",
                    str(payload / "wheels"), "--only-binary=:all:", "--platform",
                    "manylinux2014_x86_64", "--python-version", "3.11", "--implementation",
                    "cp", *WHEELS], check=True)
    run = machine.boot(img, payload, tmp_path / "machine")
    results = ROOT / "build" / "test-results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "machine-install.log").write_text(run.output)
    (results / "machine-console.log").write_text(run.console)
    print(run.output)
    assert run.exit_code is not None, "the machine never reported: " + run.console[-4000:]
    assert run.exit_code == 0, run.output
    assert "FAIL:" not in run.output
    for step in ("systemd is PID 1", "make install", "dkms status says installed", "hotplug",
                 "kernel log clean", "make uninstall", "the root file system is as before"):
        assert f"ok: {step}" in run.output, step
