"""The autowrap policy: what is wrapped, what never is, and why."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from imgrement_dm import autowrap as aw
from imgrement_dm import autowrap_install as aw_install
from imgrement_dm.autowrap_install import unit_text
from imgrement_dm.errors import PolicyError

POLICY = aw.Policy(match={"ID_BUS": "usb", "ID_SERIAL": "WDC_*", "KERNEL": "sdz"})


def disk(**props: str) -> dict[str, str]:
    base = {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": "/dev/sdb"}
    return {**base, **props}


@pytest.mark.parametrize("props,reason", [
    (disk(ID_BUS="usb", ID_SERIAL_SHORT="A1B2"), "ID_BUS=usb matches 'usb'"),
    (disk(ID_BUS="ata", ID_SERIAL="WDC_WD10EZEX-00BN5A0_WD-WCC3F"),
     "ID_SERIAL=WDC_WD10EZEX-00BN5A0_WD-WCC3F matches 'WDC_*'"),
    (disk(DEVNAME="/dev/sdz"), "KERNEL=sdz matches 'sdz'"),
])
def test_matching_disks_are_wrapped(props: dict[str, str], reason: str) -> None:
    d = aw.decide(props, POLICY)
    assert d.wrap and d.reason == reason


@pytest.mark.parametrize("props,reason", [
    (disk(DEVTYPE="partition", DEVNAME="/dev/sdb1", ID_BUS="usb"), "is a partition"),
    (disk(DEVNAME="/dev/dm-3", ID_BUS="usb"), "dm-3 is a dm- device, never wrapped"),
    (disk(DEVNAME="/dev/loop0", ID_BUS="usb"), "loop0 is a loop device"),
    (disk(DEVNAME="/dev/zram0", ID_BUS="usb"), "is a zram device"),
    (disk(DEVNAME="/dev/md127", ID_BUS="usb"), "is a md device"),
    (disk(DEVNAME="/dev/sr0", ID_BUS="usb"), "is a sr device"),
    (disk(ID_BUS="usb", ID_FS_TYPE="LVM2_member"), "is an LVM physical volume"),
    (disk(ID_BUS="usb", ID_FS_TYPE="crypto_LUKS"), "is a LUKS container"),
    (disk(ID_BUS="usb", ID_FS_TYPE="linux_raid_member"), "is a RAID member"),
    (disk(ID_BUS="usb", DM_UUID="IMGREMENT-abc"), "one of ours"),
    (disk(ID_BUS="ata"), "no [match] rule matches"),
])
def test_never_and_unmatched(props: dict[str, str], reason: str) -> None:
    d = aw.decide(props, POLICY)
    assert not d.wrap and reason in d.reason


def test_disks_with_holders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "holders" / "dm-0").mkdir(parents=True)
    d = aw.decide(disk(ID_BUS="usb"), POLICY, sysfs=tmp_path)
    assert not d.wrap and "has holders (dm-0)" in d.reason


def test_names_are_deterministic_and_valid() -> None:
    assert aw.traced_name(disk(ID_SERIAL_SHORT="S3Z9NB0K", ID_SERIAL="x")) == "traced-S3Z9NB0K"
    assert aw.traced_name(disk(ID_SERIAL="Generic Flash/Disk")) == "traced-Generic_Flash_Disk"
    assert aw.traced_name(disk()) == "traced-sdb"


def test_policy_file(tmp_path: Path) -> None:
    conf = tmp_path / "autowrap.conf"
    with pytest.raises(PolicyError, match="no autowrap policy"):
        aw.Policy.load(conf)
    conf.write_text("[options]\ncapture = all\n")
    with pytest.raises(PolicyError, match="has no \\[match\\] rules"):
        aw.Policy.load(conf)
    conf.write_text("[match]\nID_MODEL = scsi_debug\n[options]\ncapture = bogus\n")
    with pytest.raises(PolicyError, match="capture must be"):
        aw.Policy.load(conf)
    conf.write_text("[match]\nID_MODEL = scsi_debug\n[options]\ncapture = all\nbuffer_kb = 4096\n")
    assert aw.Policy.load(conf) == aw.Policy({"ID_MODEL": "scsi_debug"}, "all", 4096)


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "imgrement-autowrap@.service"
    unit.write_text(unit_text())
    assert "@BINDIR@" not in unit.read_text()
    r = subprocess.run(["systemd-analyze", "verify", "imgrement-autowrap@sdb.service"],
                       capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Rule, unit and packaged-rule folders in tmp_path; no daemon is reloaded."""
    found = {k: tmp_path / k for k in ("etc-rules", "etc-units", "lib-rules")}
    monkeypatch.setattr(aw_install, "RULES", found["etc-rules"])
    monkeypatch.setattr(aw_install, "UNITS", found["etc-units"])
    monkeypatch.setattr(aw_install, "PACKAGED_RULES", found["lib-rules"])
    monkeypatch.setattr(aw_install, "_reload", lambda: iter(()))
    monkeypatch.setattr("imgrement_dm.api.list_devices", list)
    monkeypatch.setattr(aw, "STATE_DIR", tmp_path / "state")
    monkeypatch.setenv("IMGREMENT_AUTOWRAP_CONF", str(tmp_path / "none.conf"))
    return found


def _state() -> str:
    return next(aw_install.status())


def test_enable_and_disable_copy_the_rule_without_a_package(dirs: dict[str, Path]) -> None:
    assert _state().startswith("autowrap: disabled")
    out = list(aw_install.enable())
    assert (dirs["etc-rules"] / aw_install.RULE_NAME).read_text() == \
        aw_install._source(aw_install.RULE_NAME).read_text()
    assert "@BINDIR@" not in (dirs["etc-units"] / aw_install.UNIT_NAME).read_text()
    assert any("no policy" in line for line in out)
    assert _state().startswith("autowrap: enabled")
    list(aw_install.disable())
    assert not any(dirs["etc-rules"].iterdir()) and not any(dirs["etc-units"].iterdir())
    assert _state().startswith("autowrap: disabled")


def test_a_packaged_rule_is_masked_and_unmasked(dirs: dict[str, Path]) -> None:
    """With the Debian package, the rule lives in /usr/lib/udev/rules.d, owned by
    dpkg: disable must not delete it but mask it, as udev documents."""
    dirs["lib-rules"].mkdir()
    packaged = dirs["lib-rules"] / aw_install.RULE_NAME
    packaged.write_text("# packaged\n")
    assert _state() == f"autowrap: enabled ({packaged}, from the package)"
    list(aw_install.disable())
    mask = dirs["etc-rules"] / aw_install.RULE_NAME
    assert mask.is_symlink() and str(mask.readlink()) == "/dev/null"
    assert packaged.read_text() == "# packaged\n"
    assert _state().startswith("autowrap: disabled")
    assert list(aw_install.disable()) == []  # twice: nothing to do, no error
    assert mask.is_symlink()
    list(aw_install.enable())
    assert not mask.exists() and not mask.is_symlink()
    assert not dirs["etc-units"].exists()  # the packaged unit serves
    assert _state() == f"autowrap: enabled ({packaged}, from the package)"


def test_status_lists_what_autowrap_wrapped_not_every_traced_name(
    dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not [line for line in aw_install.status() if line.startswith("wrapped:")]
    state = tmp_path / "state"
    state.mkdir()
    (state / "sdc").write_text("traced-SER1\n")
    (state / "sdd").write_text("traced-SER2\n")
    live = [SimpleNamespace(name="traced-SER1"), SimpleNamespace(name="traced-byhand")]
    monkeypatch.setattr("imgrement_dm.api.list_devices", lambda: live)
    assert [line for line in aw_install.status() if line.startswith("wrapped:")] == [
        "wrapped: /dev/sdc as /dev/mapper/traced-SER1",
        "wrapped: /dev/sdd as /dev/mapper/traced-SER2 (the mapping is gone: removed by hand?)",
    ]
