"""The sandbox's debug kernel: Debian's 6.1 source built with the kernel's
own checkers (KASAN, lockdep, UBSAN, kmemleak, debug objects, ...).

Debian's distro kernels have none of these, so a use-after-free or a lock
taken in the wrong order in the target would pass every test on them.  We
build one small kernel (``make allnoconfig`` plus ``debug.config``) from the
``linux-source-6.1`` package, inside a bookworm root of its own made by
mmdebstrap, so nothing comes from outside Debian's archive.  The root then
serves like the distro kernels' roots: the image sits in ``/boot``, the
modules in ``/lib/modules/<release>`` with ``build`` pointing at the built
tree, and the target is built against it there.

The root is cached; a change to ``debug.config`` builds it again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from importlib import resources
from pathlib import Path

from imgrement_dm.errors import SandboxError
from imgrement_dm.sandbox.roots import Kernel, cache_dir, debian_mirror, in_root
from imgrement_dm.sandbox.roots import locked as _locked
from imgrement_dm.sandbox.roots import run as _run
from imgrement_dm.sandbox.roots import say as _say

SERIES = "debug"
SUITE = "bookworm"
SOURCE_PACKAGE = "linux-source-6.1"
SRC = "/usr/src/linux-debug"  # inside the root
CONFIG_NAME = "debug.config"


def config_text() -> str:
    return resources.files("imgrement_dm.sandbox").joinpath(CONFIG_NAME).read_text()


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def missing_options(fragment: str, config: str) -> list[str]:
    """Lines of ``fragment`` that the resolved ``config`` does not honour.

    ``allnoconfig`` drops a forced option silently when a dependency is
    missing; we would rather fail than boot a kernel without, say, KASAN.
    """
    have = set(config.splitlines())
    set_names = {line.split("=", 1)[0] for line in have if line.startswith("CONFIG_")}
    missing = []
    for line in fragment.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_"):
            if line not in have:
                missing.append(line)
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            name = line[2:].split()[0]
            if name in set_names:
                missing.append(line)
    return missing


def prepare() -> Kernel:
    """Return the debug kernel, building it on first use (about 10-20 minutes)."""
    base = cache_dir() / "kernels" / SERIES
    root = base / "root"
    stamp = base / "release"
    text = config_text()
    want = _fingerprint(text)
    with _locked(base.parent / f"{SERIES}.lock"):
        if stamp.exists() and root.is_dir():
            release, _, have = stamp.read_text().strip().partition(" ")
            if have == want:
                return Kernel(SERIES, SUITE, release, root)
            _say(f"{CONFIG_NAME} changed: building the debug kernel again")
        if os.geteuid() != 0:
            raise SandboxError("building the debug kernel needs root (mmdebstrap, chroot)")
        _say(f"building the debug kernel from Debian's {SOURCE_PACKAGE} (cached in {base})")
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        log = base / "prepare.log"
        tmp = base / "root.tmp"
        _run(
            [
                "mmdebstrap",
                "--variant=apt",
                "--skip=cleanup/apt/lists",
                "--include=make,kmod,perl,sparse,gcc,libc6-dev,bc,bison,flex,"
                f"libelf-dev,libssl-dev,cpio,xz-utils,{SOURCE_PACKAGE}",
                SUITE,
                str(tmp),
                f"deb {debian_mirror()} {SUITE} main",
            ],
            f"mmdebstrap of {SUITE} for the debug kernel",
            log,
        )
        (tmp / "usr/src" / CONFIG_NAME).write_text(text)
        jobs = str(max(2, (os.cpu_count() or 1) + 1))
        script = f"""set -e
cd /usr/src
tar -xf {SOURCE_PACKAGE}.tar.xz
rm {SOURCE_PACKAGE}.tar.xz
mv {SOURCE_PACKAGE} {SRC}
cd {SRC}
make -s KCONFIG_ALLCONFIG=/usr/src/{CONFIG_NAME} allnoconfig
"""
        _chroot(tmp, script, "configuring the debug kernel", log)
        config = (tmp / SRC.lstrip("/") / ".config").read_text()
        missing = missing_options(text, config)
        if missing:
            raise SandboxError(
                f"the debug kernel's config lost options {CONFIG_NAME} asks for "
                "(a dependency is missing; add it to the fragment):\n  " + "\n  ".join(missing)
            )
        script = f"""set -e
cd {SRC}
make -s -j{jobs} bzImage modules
make -s modules_install INSTALL_MOD_PATH=/
release=$(make -s kernelrelease)
install -D -m 644 arch/x86/boot/bzImage /boot/vmlinuz-$release
depmod "$release"
echo "$release" > /usr/src/release
"""
        _chroot(tmp, script, "building the debug kernel", log)
        release = (tmp / "usr/src/release").read_text().strip()
        tmp.rename(root)
        stamp.write_text(f"{release} {want}\n")
        _say(f"debug kernel {release} ready")
        return Kernel(SERIES, SUITE, release, root)


#: The kernel build took 13 to 21 minutes here; four hours means it is stuck.
BUILD_TIMEOUT = 4 * 3600


def _chroot(root: Path, script: str, what: str, log: Path) -> None:
    _run(in_root(root, "sh", "-c", script), what, log, merge=True, timeout=BUILD_TIMEOUT)
