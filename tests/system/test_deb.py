"""The Debian packages, installed, carried through a kernel upgrade, purged.

On a booted Debian bookworm machine (tests/system/machine.py): ``apt install``
the imgrement-dkms and imgrement-dm packages that ``make deb`` built, check
what the make install test checks (DKMS's module, CLI, udev rule and unit,
hotplug autowrap end to end) plus the man page, completion and the rule being
inert without a policy; install a second kernel (bookworm's cloud flavour), check DKMS
built the module for it, boot the same disk again on that kernel, wrap and
trace a disk there; then ``apt purge`` both and compare the root file system
with the one before install (payload/deb-run does the machine's side).
Reports land in build/test-results/machine-deb-*.log.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system import machine

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = Path(__file__).resolve().parent / "payload"


def _debs(dest: Path) -> None:
    """make deb, as a user would run it; the two packages into ``dest``."""
    r = subprocess.run(["make", "-C", str(ROOT), "deb"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    dest.mkdir()
    for name in ("imgrement-dkms_*_all.deb", "imgrement-dm_*_amd64.deb"):
        (deb,) = (ROOT / "build" / "deb").glob(name)
        shutil.copy2(deb, dest / deb.name)


@pytest.mark.timeout(3600)  # two boots of a whole machine, a kernel installed in between
def test_debs_install_survive_a_kernel_upgrade_and_purge_clean(tmp_path: Path) -> None:
    img = machine.image()
    payload = tmp_path / "payload"
    payload.mkdir()
    shutil.copy2(PAYLOAD / "deb-run", payload / "run")
    for name in ("hotplug.py", "deb_wrap.py", "fs_diff.py"):
        shutil.copy2(PAYLOAD / name, payload / name)
    shutil.copy2(ROOT / "VERSION", payload / "VERSION")
    _debs(payload / "debs")
    results = ROOT / "build" / "test-results"
    results.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "machine"

    first = machine.boot(img, payload, work, keep_disk=True, timeout=2400)
    (results / "machine-deb-1.log").write_text(first.output)
    (results / "machine-deb-1-console.log").write_text(first.console)
    print(first.output)
    assert first.exit_code is not None, "the machine never reported: " + first.console[-4000:]
    assert first.exit_code == machine.REBOOT, first.output
    for step in ("apt install ./imgrement-dkms", "dkms built and installed it for",
                 "man imgrement-dm documents wrap", "bash completion", "inert without a policy",
                 "hotplug", "apt install the second kernel", "the module file is there for"):
        assert f"ok: {step}" in first.output, step
    release = (first.out / "release").read_text().strip()

    second = machine.boot(img, payload, work, kernel=first.out / "vmlinuz",
                          initrd=first.out / "initrd.img")
    (results / "machine-deb-2.log").write_text(second.output)
    (results / "machine-deb-2-console.log").write_text(second.console)
    print(second.output)
    assert second.exit_code is not None, "the machine never reported: " + second.console[-4000:]
    assert second.exit_code == 0, second.output
    assert "FAIL:" not in second.output
    assert f"kernel {release}," in second.output
    for step in ("booted the upgraded kernel", "the module is not loaded at boot",
                 f"wrap and trace a disk on {release}", "apt purge", "dkms knows no imgrement",
                 "the root file system is as before install"):
        assert f"ok: {step}" in second.output, step
