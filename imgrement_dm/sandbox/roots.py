"""What every prepared kernel shares: where the cache is, the Debian mirror,
the record of a prepared kernel, and the running of a preparation step
(logged, bounded, serialised by a lock file).

kernels.py (distro kernels) and debugkernel.py (the debug kernel built from
Debian's source) both stand on this; neither imports the other's
internals, and only kernels.py, which picks one by series, imports
debugkernel.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgrement_dm.errors import SandboxError


@dataclass(frozen=True)
class Kernel:
    """A prepared kernel: where its root, image and build tree are."""

    series: str
    suite: str
    release: str  # e.g. 6.1.0-56-amd64
    root: Path

    @property
    def image(self) -> Path:
        for candidate in (
            self.root / "boot" / f"vmlinuz-{self.release}",
            self.root / "usr" / "lib" / "modules" / self.release / "vmlinuz",
        ):
            if candidate.exists():
                return candidate
        raise SandboxError(f"kernel image for {self.release} missing under {self.root}")


def cache_dir() -> Path:
    """Where downloads and per-suite roots live: outside the checkout."""
    env = os.environ.get("IMGREMENT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "imgrement-dm"


def debian_mirror() -> str:
    """The Debian mirror this host's apt already uses (or IMGREMENT_DEBIAN_MIRROR)."""
    env = os.environ.get("IMGREMENT_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(path.read_text())
        except OSError:
            continue
    for text in texts:
        for uri in re.findall(r"(?:^deb\s+(?:\[[^]]*\]\s+)?|^URIs:\s*)(\S+)", text, re.M):
            if re.search(r"/debian/?$", uri):
                return str(uri).rstrip("/")
    raise SandboxError(
        "no Debian mirror found in /etc/apt sources; set IMGREMENT_DEBIAN_MIRROR "
        "to the URL of a Debian archive mirror"
    )


#: No preparation step (mmdebstrap, apt, a module build) takes an hour even on
#: a loaded machine; the debug kernel's build passes its own, longer bound.
STEP_TIMEOUT = 3600


def run(cmd: list[str], what: str, log: Path | None = None, *, merge: bool = False,
         timeout: float = STEP_TIMEOUT) -> str:
    """Run a preparation step; its output (stdout, or both streams with ``merge``)."""
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=True,
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError:
        raise SandboxError(
            f"{cmd[0]} is not installed; run 'make' (or scripts/install-host-deps) first"
        ) from None
    except subprocess.TimeoutExpired:
        raise SandboxError(
            f"{what} did not finish in {timeout:.0f} s and was stopped; see "
            f"{log or 'its output'} (a stalled mirror or a full disk?)"
        ) from None
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr or ''}\n")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        raise SandboxError(f"{what} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    return proc.stdout


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def say(msg: str) -> None:
    print(f"sandbox: {msg}", flush=True)


def in_root(root: Path, *cmd: str) -> list[str]:
    """``cmd`` run chrooted in ``root``, with /proc mounted there.

    kbuild tools (objtool on 7.x, nproc) read /proc: it is mounted in a
    private mount namespace, so it disappears with the command.
    """
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"', str(root), *cmd]
