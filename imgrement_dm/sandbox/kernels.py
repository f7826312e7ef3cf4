"""Debian distro kernels for the sandbox: fetch, cache, build the target.

For each Debian suite we keep one small root (made by mmdebstrap) that holds
the suite's own compiler and kernel headers, with the kernel image and its
modules unpacked beside them.  The module is built inside that root, so each
kernel gets the compiler and glibc its kbuild tools expect (trixie's and
sid's headers cannot be used with bookworm's gcc and glibc), and the guest
boots the image from the same root.  Nothing is installed into the host's
/boot or /lib/modules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from imgrement_dm.errors import SandboxError
from imgrement_dm.sandbox import debugkernel
from imgrement_dm.sandbox.roots import (
    STEP_TIMEOUT,
    Kernel,
    cache_dir,
    debian_mirror,
    in_root,
)
from imgrement_dm.sandbox.roots import locked as _locked
from imgrement_dm.sandbox.roots import run as _run
from imgrement_dm.sandbox.roots import say as _say

#: Kernel series we support, by the Debian suite that ships it.
SUITES: dict[str, str] = {
    "5.10": "bullseye",
    "6.1": "bookworm",
    "6.12": "trixie",
    "7.2": "sid",
}
DEFAULT_KERNEL = "6.1"
#: Not claimed, not in make test: the newest kernel Debian ships (experimental's
#: release candidates), in a sid root, for make test-canary to see what the
#: next line breaks before it reaches sid.
CANARY_KERNEL = "canary"
CANARY_SUITE = "experimental"
#: The kernel built with KASAN, lockdep and friends (debugkernel.py).
DEBUG_KERNEL = "debug"
ARCH = "amd64"


def resolve_series(name: str) -> str:
    """Accept a series (``6.1``), a suite name (``bookworm``) or ``debug``."""
    if name in SUITES or name in (DEBUG_KERNEL, CANARY_KERNEL):
        return name
    for series, suite in SUITES.items():
        if name == suite:
            return series
    known = ", ".join([*(f"{s} ({suite})" for s, suite in SUITES.items()), DEBUG_KERNEL,
                       f"{CANARY_KERNEL} ({CANARY_SUITE})"])
    raise SandboxError(f"unknown kernel {name!r}: choose one of {known}")


def prepare(series: str) -> Kernel:
    """Return the kernel for ``series``, fetching and unpacking it on first use."""
    series = resolve_series(series)
    if series == DEBUG_KERNEL:
        return debugkernel.prepare()
    canary = series == CANARY_KERNEL
    suite = CANARY_SUITE if canary else SUITES[series]
    base = cache_dir() / "kernels" / suite
    root = base / "root"
    stamp = base / "release"
    with _locked(base.parent / f"{suite}.lock"):
        if stamp.exists() and root.is_dir():
            return Kernel(series, suite, stamp.read_text().strip(), root)
        if os.geteuid() != 0:
            raise SandboxError(
                f"preparing the {series} kernel the first time needs root (mmdebstrap, chroot)"
            )
        _say(f"preparing Debian {suite} kernel {series} (first use; cached in {base})")
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        log = base / "prepare.log"
        tmp_root = base / "root.tmp"
        mirror = debian_mirror()
        headers = f"linux-headers-{ARCH}" + (f"/{CANARY_SUITE}" if canary else "")
        cmd = [
            "mmdebstrap",
            "--variant=apt",
            "--skip=cleanup/apt/lists",
            f"--include=make,kmod,perl,sparse,{headers}",
        ]
        if suite in ("sid", CANARY_SUITE):
            # sid's Release file is routinely past its Valid-Until on mirrors.
            cmd.append('--aptopt=Acquire::Check-Valid-Until "false"')
        if canary:
            # experimental is not a whole suite: sid, with the kernel from experimental
            cmd += ["sid", str(tmp_root), f"deb {mirror} sid main",
                    f"deb {mirror} {CANARY_SUITE} main"]
        else:
            cmd += [suite, str(tmp_root), f"deb {mirror} {suite} main"]
        _run(cmd, f"mmdebstrap of {suite}", log)
        release = _headers_release(tmp_root)
        _fetch_image(tmp_root, release, log)
        _run(["depmod", "-b", str(tmp_root), release], "depmod", log)
        tmp_root.rename(root)
        stamp.write_text(release + "\n")
        _say(f"kernel {release} ready")
        return Kernel(series, suite, release, root)


def _headers_release(root: Path) -> str:
    out = _run(
        ["chroot", str(root), "dpkg-query", "-W", "-f=${Depends}", f"linux-headers-{ARCH}"],
        "reading the headers package",
    )
    m = re.search(rf"linux-headers-(\S+-{ARCH})", out)
    if not m:
        raise SandboxError(f"cannot tell the kernel release from {out!r}")
    return m.group(1)


def _fetch_image(root: Path, release: str, log: Path) -> None:
    """Download the image (and, on newer suites, its split-out parts) and unpack them."""
    depends = _run(
        ["chroot", str(root), "apt-cache", "depends", f"linux-image-{release}"],
        "resolving the kernel image",
        log,
    )
    packages = [f"linux-image-{release}"]
    for name in re.findall(r"Depends:\s*(linux-\S+)", depends):
        # 7.x splits the image into linux-binary-*, linux-modules-* and friends.
        if name.endswith(release) and name not in packages:
            packages.append(name)
    debs = root / "var" / "cache" / "imgrement-debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run(
        ["chroot", str(root), "sh", "-c", 'cd "$0" && apt-get download "$@"',
         "/var/cache/imgrement-debs", *packages],
        "downloading the kernel image",
        log,
    )
    for deb in sorted(debs.glob("*.deb")):
        # dpkg -x would replace the merged-/usr links with directories.
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                              stdout=subprocess.PIPE) as unpack:
            try:
                tar = subprocess.run(
                    ["tar", "-x", "--keep-directory-symlink", "-C", str(root)],
                    stdin=unpack.stdout, capture_output=True, check=False,
                    timeout=STEP_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                unpack.kill()
                raise SandboxError(f"unpacking {deb.name} did not finish in "
                                   f"{STEP_TIMEOUT} s") from None
        if unpack.returncode or tar.returncode:
            raise SandboxError(f"unpacking {deb.name} failed: {tar.stderr.decode()[-500:]}")
        deb.unlink()


def build_module(kernel: Kernel, source: Path, *, sparse: bool = True) -> Path:
    """Build dm_target/ against ``kernel`` inside its root; return the .ko path.

    The build runs with W=1 and, by default, sparse (C=1); any warning fails
    it, so every module a guest loads has passed both.
    """
    build = kernel.root / "build" / "imgrement"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    for item in source.iterdir():
        if (item.is_file() and item.suffix in (".c", ".h")) or item.name in ("Kbuild", "Makefile"):
            shutil.copy2(item, build / item.name)
    make = ["make", "-C", f"/lib/modules/{kernel.release}/build", "M=/build/imgrement",
            "W=1", "modules"]
    if sparse:
        make.append("C=1")
    out = _run(in_root(kernel.root, *make), f"building the target for {kernel.release}",
               merge=True)
    warnings = [line for line in out.splitlines() if "warning:" in line]
    if warnings:
        raise SandboxError("the target built with warnings:\n  " + "\n  ".join(warnings))
    ko = build / "imgrement.ko"
    if not ko.exists():
        raise SandboxError(f"the build made no {ko}")
    return ko
