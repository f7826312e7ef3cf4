"""Installing and removing the autowrap udev rule and systemd unit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from imgrement_dm import autowrap as aw
from imgrement_dm import resources
from imgrement_dm.errors import (
    ImgrementError,
    MissingResourceError,
    NotRootError,
    PolicyError,
)

RULES = Path(os.environ.get("IMGREMENT_UDEV_RULES_DIR", "/etc/udev/rules.d"))
UNITS = Path(os.environ.get("IMGREMENT_SYSTEMD_DIR", "/etc/systemd/system"))
#: Where the Debian package puts them: present there, autowrap is on by policy
#: alone, and disable masks the rule (a same-named link to /dev/null in RULES).
PACKAGED_RULES = Path(os.environ.get("IMGREMENT_PACKAGED_RULES_DIR", "/usr/lib/udev/rules.d"))
RULE_NAME = "60-imgrement-autowrap.rules"
UNIT_NAME = "imgrement-autowrap@.service"


def _source(name: str) -> Path:
    """The shipped copy of the rule or unit (see imgrement_dm.resources)."""
    try:
        return resources.data_file(name)
    except MissingResourceError as e:
        raise PolicyError(str(e)) from None


def _bindir() -> str:
    exe = shutil.which("imgrement-dm") or str(Path(sys.executable).parent / "imgrement-dm")
    return str(Path(exe).parent)


def unit_text() -> str:
    return _source(UNIT_NAME).read_text().replace("@BINDIR@", _bindir())


#: udevadm and systemctl answer in well under a second; a hung daemon must not hang us.
RELOAD_TIMEOUT = 60


def _run(argv: list[str]) -> str:
    """Run a reload command; a one-line note of how it went."""
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True,
                              timeout=RELOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"warning: '{' '.join(argv)}' did not answer in {RELOAD_TIMEOUT} s"
    if proc.returncode:
        return f"warning: '{' '.join(argv)}' failed: {proc.stderr.strip()}"
    return ""


def _reload() -> Iterator[str]:
    if shutil.which("udevadm"):
        yield _run(["udevadm", "control", "--reload"]) or "udev rules reloaded"
    if Path("/run/systemd/system").exists() and shutil.which("systemctl"):
        yield _run(["systemctl", "daemon-reload"]) or "systemd reloaded"


def _needs_root(what: str, e: OSError) -> ImgrementError:
    if isinstance(e, PermissionError):
        return NotRootError(f"{what} needs root ({e.filename}: permission denied): run it "
                            "with sudo")
    return ImgrementError(f"{what} failed: {e.filename}: {e.strerror}")


def _packaged() -> Path | None:
    """The rule the imgrement-dm Debian package installed, if it did."""
    path = PACKAGED_RULES / RULE_NAME
    return path if path.is_file() else None


def _masked() -> bool:
    link = RULES / RULE_NAME
    return link.is_symlink() and os.readlink(link) == "/dev/null"


def enable() -> Iterator[str]:
    packaged = _packaged()
    if packaged is not None:
        if _masked():
            try:
                (RULES / RULE_NAME).unlink()
            except OSError as e:
                raise _needs_root("unmasking the packaged udev rule", e) from None
            yield f"unmasked {packaged} (removed {RULES / RULE_NAME} -> /dev/null)"
        else:
            yield f"the packaged rule {packaged} and its unit are in place"
    else:
        rule, unit = _source(RULE_NAME), unit_text()
        try:
            RULES.mkdir(parents=True, exist_ok=True)
            UNITS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(rule, RULES / RULE_NAME)
            (UNITS / UNIT_NAME).write_text(unit)
        except OSError as e:
            raise _needs_root("installing the udev rule and unit", e) from None
        yield f"installed {RULES / RULE_NAME} and {UNITS / UNIT_NAME}"
    yield from _reload()
    conf = Path(os.environ.get("IMGREMENT_AUTOWRAP_CONF", aw.DEFAULT_CONF))
    if not conf.exists():
        yield f"note: no policy at {conf} yet, so nothing will be wrapped until you write one"


def disable() -> Iterator[str]:
    for path in (RULES / RULE_NAME, UNITS / UNIT_NAME):
        if path.exists() or path.is_symlink():
            if path == RULES / RULE_NAME and _masked():
                continue
            try:
                path.unlink()
            except OSError as e:
                raise _needs_root("removing the udev rule and unit", e) from None
            yield f"removed {path}"
    packaged = _packaged()
    if packaged is not None and not _masked():
        try:
            RULES.mkdir(parents=True, exist_ok=True)
            (RULES / RULE_NAME).symlink_to("/dev/null")
        except OSError as e:
            raise _needs_root("masking the packaged udev rule", e) from None
        yield f"masked {packaged} with {RULES / RULE_NAME} -> /dev/null"
    yield from _reload()


def status() -> Iterator[str]:
    packaged = _packaged()
    if _masked():
        yield f"autowrap: disabled ({RULES / RULE_NAME} masks {packaged or 'the rule'})"
    elif (RULES / RULE_NAME).exists():
        yield f"autowrap: enabled ({RULES / RULE_NAME})"
    elif packaged is not None:
        yield f"autowrap: enabled ({packaged}, from the package)"
    else:
        yield f"autowrap: disabled ({RULES / RULE_NAME} is not installed)"
    conf = Path(os.environ.get("IMGREMENT_AUTOWRAP_CONF", aw.DEFAULT_CONF))
    try:
        policy = aw.Policy.load(conf)
        rules = ", ".join(f"{k} = {v}" for k, v in policy.match.items())
        yield f"policy: {conf}: {rules}"
    except PolicyError as e:
        yield f"policy: {e}"
    for w in aw.wrapped():
        gone = "" if w.present else " (the mapping is gone: removed by hand?)"
        yield f"wrapped: {w.devnode} as /dev/mapper/{w.name}{gone}"
