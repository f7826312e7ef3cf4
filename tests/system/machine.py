"""A whole Debian machine under QEMU, for the install test.

The sandbox guests (imgrement_dm.sandbox) share the host's files and run
our own init; they cannot show what 'sudo make install' does to a machine.
This boots a plain Debian bookworm disk image instead: its own kernel and
initramfs, systemd as PID 1, systemd-udevd, dkms, and the packages
scripts/install-host-deps --install would fetch, preinstalled (the guest
has no network).

The base image is made once with mmdebstrap and cached; every boot writes
to a throw-away qcow2 overlay, so each run starts from the same machine.
A run is a *payload*: a tar written to a virtio disk with serial
``payload``.  At boot, the unit ``payload-runner.service`` unpacks it,
runs its ``run`` script as root, copies the output to the disk with serial
``results`` and powers the machine off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from imgrement_dm.sandbox import roots

SUITE = "bookworm"
PACKAGES = [
    "systemd-sysv", "udev", "linux-image-amd64", "linux-headers-amd64", "initramfs-tools",
    "dkms", "python3", "python3-venv", "python3-dev", "gcc", "make", "libc6-dev",
    "linux-libc-dev", "kmod", "dmsetup", "e2fsprogs", "util-linux", "procps",
    # what the imgrement-dm .deb depends on, preinstalled: the machine has no
    # network, and purge must leave the machine as it was before install
    "python3-cffi-backend", "python3-click", "python3-pyudev", "man-db",
]
#: The second kernel the .deb test installs: bookworm's cloud flavour (its own
#: release, 6.1.0-N-cloud-amd64, so DKMS must build for it; a third of the
#: generic one's size, with virtio, dm-mod, ext4 and debugfs: all a wrap
#: needs; unpacking is most of the install's time under emulation).
#: bookworm-backports' newer 6.12 line was the first choice, but its kernel
#: (6.12.95+deb12, the cloud build tried) oopses within seconds of boot
#: under QEMU's TCG here: booted bare (nothing of ours) with -cpu max, on one
#: TCG thread or several, and in this test with -cpu qemu64.  Fetched (not
#: installed) while the image is made, with every package it needs, into
#: UPGRADE_DEBS.
UPGRADE = ["linux-image-cloud-amd64", "linux-headers-cloud-amd64"]
UPGRADE_SUITE = SUITE
UPGRADE_DEBS = "/var/local/kernel-upgrade"

RUNNER = """#!/bin/sh
# Run the payload disk's 'run' as root at every boot; put its output and
# whatever it left in /root/out on the results disk, as a tar.
P=/dev/disk/by-id/virtio-payload
R=/dev/disk/by-id/virtio-results
[ -b "$P" ] || exit 0
mkdir -p /root/payload && tar -xf "$P" -C /root/payload
rm -rf /root/out && mkdir -p /root/out
cd /root/payload && sh ./run >/root/out/payload.log 2>&1
echo "PAYLOAD-EXIT $?" >>/root/out/payload.log
tar -C /root/out -cf - . | dd of="$R" conv=fsync,notrunc status=none
systemctl --no-block poweroff
"""

UNIT = """[Unit]
Description=Run the test payload (tests/system/machine.py)
After=basic.target systemd-udev-settle.service systemd-udevd.service

[Service]
# simple, not oneshot: boot completes while the payload runs, so it sees a
# machine that is up ('systemctl is-system-running --wait' returns).
Type=simple
ExecStart=/usr/local/sbin/run-payload
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


#: mmdebstrap's customize hook ($1: the new root).
HOOK = (
    'set -e; echo "LABEL=root / ext4 defaults 0 1" > "$1/etc/fstab"; '
    'echo machine > "$1/etc/hostname"; '
    f'printf %s {_q(RUNNER)} > "$1/usr/local/sbin/run-payload"; '
    'chmod 755 "$1/usr/local/sbin/run-payload"; '
    f'printf %s {_q(UNIT)} > "$1/etc/systemd/system/payload-runner.service"; '
    'chroot "$1" systemctl enable payload-runner.service; '
    'chroot "$1" passwd -d root; '
    # under emulation: initramfs for the machine's own devices only, and no
    # man-db index rebuild after every package (man still finds pages)
    'echo MODULES=dep > "$1/etc/initramfs-tools/conf.d/imgrement-machine"; '
    'rm -f "$1/var/lib/man-db/auto-update"; '
    # PKG/suite pins the suite of these alone (when it is backports, -t would
    # prefer backports for every dependency too: 140 packages)
    'rm -f "$1"/var/cache/apt/archives/*.deb; '  # the base system's own, still there
    'chroot "$1" apt-get install -y -q --download-only '
    + " ".join(f"{p}/{UPGRADE_SUITE}" for p in UPGRADE) + '; '
    f'mkdir -p "$1{UPGRADE_DEBS}"; '
    f'mv "$1"/var/cache/apt/archives/*.deb "$1{UPGRADE_DEBS}/"'
)

#: The suites in the machine's apt sources (the upgrade's once, if it is the base's).
SOURCES = list(dict.fromkeys([SUITE, UPGRADE_SUITE]))
#: Everything that decides the image's contents; a change makes a new image.
RECIPE = "\n".join([*SOURCES, *PACKAGES, HOOK])


@dataclass(frozen=True)
class Image:
    disk: Path  # raw ext4 root
    kernel: Path
    initrd: Path


def image() -> Image:
    """The cached base machine, made on first use (root, mmdebstrap)."""
    key = hashlib.sha256(RECIPE.encode()).hexdigest()[:12]
    base = roots.cache_dir() / "machine" / f"{SUITE}-{key}"
    done = Image(base / "root.img", base / "vmlinuz", base / "initrd.img")
    if done.disk.exists() and (base / "ready").exists():
        return done
    for old in base.parent.glob(f"{SUITE}-*"):  # earlier recipes, and a failed try
        shutil.rmtree(old, ignore_errors=True)
    base.mkdir(parents=True)
    tree = base / "tree"
    hook = HOOK
    mirror = roots.debian_mirror()
    cmd = ["mmdebstrap", "--variant=apt", "--include=" + ",".join(PACKAGES),
           f"--customize-hook={hook}", SUITE, str(tree),
           *(f"deb {mirror} {suite} main" for suite in SOURCES)]
    _check(cmd, base / "mmdebstrap.log")
    boot = tree / "boot"
    vmlinuz = sorted(boot.glob("vmlinuz-*"))
    initrd = sorted(boot.glob("initrd.img-*"))
    assert len(vmlinuz) == 1 and len(initrd) == 1, (vmlinuz, initrd)
    shutil.copyfile(vmlinuz[0], done.kernel)
    shutil.copyfile(initrd[0], done.initrd)
    _check(["mkfs.ext4", "-q", "-L", "root", "-d", str(tree), str(done.disk), "4G"],
           base / "mkfs.log")
    shutil.rmtree(tree)
    (base / "ready").write_text(key + "\n")
    return done


def _check(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if r.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}):\n{tail}")


@dataclass
class Run:
    output: str  # what the payload's run script printed
    exit_code: int | None  # None: the machine never reported one
    console: str
    out: Path  # what the payload left in /root/out (payload.log included)


#: The payload's exit code for "boot me again, on the kernel I left in /root/out".
REBOOT = 100


def boot(img: Image, payload: Path, work: Path, *, timeout: float = 1800,
         kernel: Path | None = None, initrd: Path | None = None,
         keep_disk: bool = False) -> Run:
    """Boot the machine once with ``payload`` (a directory holding ``run``).

    ``kernel``/``initrd`` boot another kernel than the image's (one the
    payload installed and handed out); ``keep_disk`` keeps the machine's
    disk (a qcow2 overlay over the image) for the next boot in ``work``,
    which then goes on from it; otherwise the disk is thrown away after
    this boot, and a boot with no disk kept starts from the image as made.
    """
    work.mkdir(parents=True, exist_ok=True)
    overlay = work / "overlay.qcow2"
    if not overlay.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                        "-b", str(img.disk), str(overlay)], check=True)
    tar = work / "payload.tar"
    with tarfile.open(tar, "w") as t:
        t.add(payload, arcname=".")
    results = work / "results.img"
    results.unlink(missing_ok=True)
    with results.open("wb") as f:
        f.truncate(512 << 20)  # sparse: room for a kernel and its initrd
    scratch = work / "scratch.img"
    with scratch.open("wb") as f:
        f.truncate(64 << 20)
    console = work / "console.log"
    # KVM does not work on the machines this was written on; IMGREMENT_KVM=1 where it does
    accel = "kvm" if os.environ.get("IMGREMENT_KVM") == "1" else "tcg"
    # another CPU model, for experiments (e.g. qemu64)
    cpu = os.environ.get("IMGREMENT_MACHINE_CPU", "max")
    cmd = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-cpu", cpu,
        "-smp", "2", "-m", "2G", "-display", "none", "-no-reboot", "-nic", "none",
        "-serial", f"file:{console}", "-monitor", "none",
        "-kernel", str(kernel or img.kernel), "-initrd", str(initrd or img.initrd),
        "-append", "root=LABEL=root rw console=ttyS0 panic=-1 systemd.show_status=1",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={tar},if=none,id=payload,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=payload,serial=payload",
        "-drive", f"file={results},if=none,id=results,format=raw",
        "-device", "virtio-blk-pci,drive=results,serial=results",
        "-drive", f"file={scratch},if=none,id=scratch,format=raw",
        "-device", "virtio-blk-pci,drive=scratch,serial=scratch",
    ]
    began = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):  # then no PAYLOAD-EXIT line
        subprocess.run(cmd, check=False, timeout=timeout, stdin=subprocess.DEVNULL)
    took = time.monotonic() - began
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with contextlib.suppress(tarfile.TarError), tarfile.open(results) as t:
        t.extractall(out, filter="data")
    log = out / "payload.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    code = None
    tail = text.rstrip().rsplit("\n", 1)[-1]
    if tail.startswith("PAYLOAD-EXIT "):
        code = int(tail.split()[1])
    con = console.read_text(errors="replace") if console.exists() else ""
    results.unlink(missing_ok=True)
    scratch.unlink(missing_ok=True)
    if not keep_disk:
        overlay.unlink(missing_ok=True)
    return Run(text + f"\n(machine ran {took:.0f} s)\n", code, con, out)
