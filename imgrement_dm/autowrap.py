"""Wrapping hotplugged disks by policy (opt-in).

Nothing is wrapped unless the administrator wrote a policy: a file (by
default /etc/imgrement-dm/autowrap.conf) whose ``[match]`` section names
udev properties and shell patterns, for example ``ID_BUS = usb`` or
``ID_SERIAL = WDC_*``; a disk matching any of them is wrapped as
``traced-<serial or kernel name>``. Whatever the policy, some disks are
never wrapped (see :func:`decide`), and every decision is logged with its
reason.

On systemd machines a udev rule starts ``imgrement-autowrap@<kname>.service``
for each new disk, which runs ``imgrement-dm autowrap handle``; udev itself
must not run long or forking work. ``imgrement-dm autowrap watch`` applies
the same policy from a pyudev monitor, for machines without systemd.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgrement_dm import api, devices
from imgrement_dm.errors import ImgrementError, PolicyError

DEFAULT_CONF = Path("/etc/imgrement-dm/autowrap.conf")
#: kernel name -> the traced device made for it, so the mapping can be found
#: again when the disk (and its udev data) is gone.
STATE_DIR = Path(os.environ.get("IMGREMENT_AUTOWRAP_STATE", "/run/imgrement-dm/autowrap"))
NEVER_KERNEL = ("dm-*", "loop*", "ram*", "zram*", "md*", "sr*", "nbd*", "zd*")
NEVER_FS = {
    "LVM2_member": "an LVM physical volume",
    "crypto_LUKS": "a LUKS container",
    "linux_raid_member": "a RAID member",
    "zfs_member": "a ZFS pool member",
    "ddf_raid_member": "a RAID member",
    "isw_raid_member": "a RAID member",
}


@dataclass(frozen=True)
class Policy:
    match: dict[str, str] = field(default_factory=dict)
    capture: str | None = None
    buffer_kb: int | None = None

    @classmethod
    def load(cls, path: Path) -> Policy:
        if not path.exists():
            raise PolicyError(
                f"no autowrap policy at {path}: write one (see 'imgrement-dm autowrap --help') "
                "to say which disks to wrap"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise PolicyError(f"{path} is a directory: the policy is a file (see "
                              "'imgrement-dm autowrap example')") from None
        except UnicodeDecodeError as e:
            raise PolicyError(f"{path} is not UTF-8 text (byte {e.start}): write the "
                              "policy as UTF-8") from None
        except OSError as e:
            raise PolicyError(f"cannot read {path}: {e.strerror}") from None
        cp = configparser.ConfigParser(interpolation=None)
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            cp.read_string(text, source=str(path))
        except configparser.Error as e:
            raise PolicyError(f"{path}: {e}") from None
        if not cp.has_section("match") or not cp["match"]:
            raise PolicyError(f"{path} has no [match] rules: nothing would ever be wrapped")
        options = cp["options"] if cp.has_section("options") else {}
        capture = options.get("capture")
        if capture is not None and capture not in ("meta", "writes", "all"):
            raise PolicyError(f"{path}: capture must be meta, writes or all, not {capture!r}")
        buffer_kb = options.get("buffer_kb")
        try:
            kb = int(buffer_kb) if buffer_kb is not None else None
        except ValueError:
            raise PolicyError(f"{path}: buffer_kb must be a number of KiB") from None
        return cls(dict(cp["match"]), capture, kb)


@dataclass(frozen=True)
class Decision:
    wrap: bool
    reason: str
    name: str = ""


def traced_name(props: Mapping[str, str]) -> str:
    """traced-<ID_SERIAL_SHORT, ID_SERIAL or kernel name>, in dm's name alphabet."""
    ident = props.get("ID_SERIAL_SHORT") or props.get("ID_SERIAL") or props.get("DEVNAME", "")
    ident = os.path.basename(ident) if ident.startswith("/dev/") else ident
    return ("traced-" + re.sub(r"[^A-Za-z0-9#+\-.:=@_]", "_", ident))[:127]


def decide(props: Mapping[str, str], policy: Policy, *, sysfs: Path | None = None) -> Decision:
    """Whether to wrap the disk whose udev properties are ``props``, and why."""
    kname = os.path.basename(props.get("DEVNAME", ""))
    if props.get("SUBSYSTEM", "block") != "block":
        return Decision(False, "not a block device")
    if props.get("DEVTYPE") != "disk":
        return Decision(False, f"{kname} is a partition, not a whole disk")
    for pattern in NEVER_KERNEL:
        if fnmatch.fnmatchcase(kname, pattern):
            return Decision(False, f"{kname} is a {pattern.rstrip('*')} device, never wrapped")
    if props.get("DM_UUID", "").startswith(devices.UUID_PREFIX):
        return Decision(False, f"{kname} is one of ours")
    fs = props.get("ID_FS_TYPE", "")
    if fs in NEVER_FS:
        return Decision(False, f"{kname} is {NEVER_FS[fs]}")
    if sysfs is not None:
        holders = list((sysfs / "holders").glob("*")) if (sysfs / "holders").exists() else []
        if holders:
            return Decision(False, f"{kname} has holders ({', '.join(h.name for h in holders)})")
    for key, pattern in policy.match.items():
        value = kname if key == "KERNEL" else props.get(key)
        if value is not None and fnmatch.fnmatchcase(value, pattern):
            return Decision(True, f"{key}={value} matches {pattern!r}", traced_name(props))
    return Decision(False, f"{kname}: no [match] rule matches")


def _log(message: str) -> None:
    print(f"imgrement-dm autowrap: {message}", file=sys.stderr, flush=True)


def _props_of(devnode: str) -> tuple[dict[str, str], Path]:
    import pyudev

    ctx = pyudev.Context()
    try:
        dev = pyudev.Devices.from_device_file(ctx, devnode)
    except Exception as e:
        raise ImgrementError(f"{devnode}: {e}") from None
    return dict(dev.properties), Path(dev.sys_path)


def handle(devnode: str, policy: Policy) -> Decision:
    """Apply the policy to ``devnode`` (called by the service and the watcher)."""
    try:
        props, sysfs = _props_of(devnode)
    except ImgrementError as e:  # gone again before we looked (hot-add, hot-remove)
        _log(f"not wrapping {devnode}: {e}")
        return Decision(False, str(e))
    decision = decide(props, policy, sysfs=sysfs)
    if not decision.wrap:
        _log(f"not wrapping {devnode}: {decision.reason}")
        return decision
    try:
        api.wrap(devnode, name=decision.name, capture=policy.capture,
                 buffer_kb=policy.buffer_kb)
    except ImgrementError as e:
        _log(f"not wrapping {devnode}: {e}")
        return Decision(False, str(e))
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / os.path.basename(devnode)).write_text(decision.name + "\n")
    _log(f"wrapped {devnode} as /dev/mapper/{decision.name} ({decision.reason})")
    return decision


@dataclass(frozen=True)
class Wrapped:
    """One disk the watcher or the service wrapped, from the state folder."""

    devnode: str
    name: str
    present: bool  # the mapping still exists


def wrapped() -> list[Wrapped]:
    """The disks autowrap wrapped and has not released (its own record of them,
    not every device whose name starts with traced-)."""
    try:
        states = sorted(STATE_DIR.iterdir())
    except FileNotFoundError:
        return []
    if not states:
        return []
    live = {d.name for d in api.list_devices()}
    out = []
    for state in states:
        try:
            name = state.read_text().strip()
        except OSError:
            continue  # released while we looked
        out.append(Wrapped(f"/dev/{state.name}", name, name in live))
    return out


def release(devnode: str) -> str | None:
    """Tear down the mapping made for a disk that went away (deferred if still open)."""
    state = STATE_DIR / os.path.basename(devnode)
    try:
        name = state.read_text().strip()
    except FileNotFoundError:
        return None  # not one we wrapped
    try:
        api.unwrap(name, deferred=True)
        _log(f"released /dev/mapper/{name} ({devnode} went away)")
    except ImgrementError as e:
        _log(f"{name}: {e}")
    state.unlink(missing_ok=True)
    return name


def watch(policy: Policy, *, ready: Any = None) -> None:
    """Apply the policy to block devices as they come and go, until interrupted."""
    import pyudev

    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by("block")
    monitor.start()
    _log("watching for disks")
    if ready is not None:
        ready()
    for device in iter(monitor.poll, None):
        try:
            if device.action == "add" and device.device_node:
                handle(device.device_node, policy)
            elif device.action == "remove" and device.device_node:
                release(device.device_node)
        except Exception as e:  # one disk's trouble must not stop the watcher
            _log(f"{device.action} of {device.device_node}: {type(e).__name__}: {e}; "
                 "going on")
