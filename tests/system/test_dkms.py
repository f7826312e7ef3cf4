"""The DKMS package builds the target for Debian's default kernel.

Runs in that kernel's Debian root (the sandbox's), where dkms is installed
on first use, exactly as 'make install' registers it on a real machine:
the sources under /usr/src/imgrement-<version>, then dkms add and build.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from imgrement_dm import resources
from imgrement_dm.sandbox import DEFAULT_KERNEL, kernels, target_source


def _in_root(root: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"', str(root), *cmd],
        capture_output=True, text=True, check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"},
    )


def test_dkms_builds_the_module_for_the_default_kernel() -> None:
    k = kernels.prepare(DEFAULT_KERNEL)
    if not (k.root / "usr/sbin/dkms").exists():
        r = _in_root(k.root, "apt-get", "install", "-y", "-q", "--no-install-recommends", "dkms")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    version = resources.version()
    src = k.root / "usr/src" / f"imgrement-{version}"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(target_source(), src,
                    ignore=shutil.ignore_patterns("*.o", "*.ko", "*.mod*", ".*", "Module.symvers",
                                                  "modules.order"))
    conf = (src / "dkms.conf").read_text()
    (src / "dkms.conf").write_text(conf.replace("#MODULE_VERSION#", version))
    _in_root(k.root, "dkms", "remove", "-m", "imgrement", "-v", version, "--all")
    try:
        r = _in_root(k.root, "dkms", "add", "-m", "imgrement", "-v", version)
        assert r.returncode == 0, r.stdout + r.stderr
        r = _in_root(k.root, "dkms", "build", "-m", "imgrement", "-v", version,
                     "-k", k.release)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        built = list((k.root / "var/lib/dkms/imgrement" / version / k.release)
                     .glob("*/module/imgrement.ko*"))
        assert len(built) == 1, built
        info = _in_root(k.root, "modinfo", "-F", "vermagic",
                        "/" + str(built[0].relative_to(k.root)))
        assert info.stdout.split()[0] == k.release
        alias = _in_root(k.root, "modinfo", "-F", "alias", "/" + str(built[0].relative_to(k.root)))
        assert alias.stdout.split() == ["dm-imgrement"]
    finally:
        _in_root(k.root, "dkms", "remove", "-m", "imgrement", "-v", version, "--all")
        shutil.rmtree(src, ignore_errors=True)
