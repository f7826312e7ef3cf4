"""The sandbox: a Debian distro kernel in QEMU with the target loaded.

It is how every kernel-side test runs here (the host kernel has no module
support), and the safe way for a new user to try the tool without a real
disk at risk.
"""

from __future__ import annotations

import os
from pathlib import Path

from imgrement_dm.errors import SandboxError
from imgrement_dm.sandbox.kernels import DEFAULT_KERNEL, SUITES, build_module, prepare
from imgrement_dm.sandbox.vm import GuestRun, parse_size, run

__all__ = ["DEFAULT_KERNEL", "SUITES", "SandboxError", "parse_size", "run_command", "target_source"]


def target_source() -> Path:
    """The dm_target/ sources to build: IMGREMENT_TARGET_SRC, the checkout's, or
    the copy 'make install' put in /usr/src for DKMS."""
    env = os.environ.get("IMGREMENT_TARGET_SRC")
    candidates = [Path(env)] if env else [
        Path(__file__).resolve().parents[2] / "dm_target",
        *sorted(Path("/usr/src").glob("imgrement-*"), reverse=True),
    ]
    src = next((c for c in candidates if (c / "Kbuild").exists()), candidates[0])
    if not (src / "Kbuild").exists():
        raise SandboxError(
            f"no target sources at {src}; set IMGREMENT_TARGET_SRC to the dm_target folder"
        )
    return src


def run_command(
    command: list[str],
    *,
    kernel: str = DEFAULT_KERNEL,
    disks: list[str] | None = None,
    results: Path,
    memory: str = "2G",
    kvm: bool = False,
    append: str = "",
    timeout: float | None = None,
    qemu_args: list[str] | None = None,
) -> int:
    """Prepare ``kernel``, build the target for it, boot, run ``command``; its status.

    ``qemu_args`` go to QEMU as they are (the cost bench's ``-plugin``)."""
    k = prepare(kernel)
    module = build_module(k, target_source())
    spec = GuestRun(
        kernel=k,
        module=module,
        command=command,
        results=results.resolve(),
        cwd=Path.cwd(),
        disks=[parse_size(d) for d in (disks or [])],
        memory=memory,
        kvm=kvm,
        append=append,
        timeout=timeout,
        qemu_args=list(qemu_args or []),
    )
    return run(spec)
