"""Table grammar, sandbox helpers and the JUnit checker."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgrement_dm.api import Status
from imgrement_dm.dm import Target
from imgrement_dm.errors import ImgrementError, SandboxError
from imgrement_dm.sandbox import debugkernel, kernels, roots
from imgrement_dm.sandbox.vm import parse_size
from imgrement_dm.table import ImgrementTable
from tests import check_junit


def test_table_line_round_trip() -> None:
    t = ImgrementTable(device="254:0", length=524288, offset=0)
    assert t.target() == Target(0, 524288, "imgrement", "254:0 0")
    assert ImgrementTable.parse(t.target()) == t


def test_table_options_round_trip() -> None:
    t = ImgrementTable(device="254:0", length=8, capture="all", buffer_kb=64, log=True,
                       overflow="wait", wait_ms=250)
    assert t.params() == ("254:0 0 5 capture:all buffer_kb:64 log:on overflow:wait "
                          "wait_ms:250")
    assert ImgrementTable.parse(t.target()) == t
    for bad in ({"overflow": "block"}, {"wait_ms": 9}, {"wait_ms": 60001}):
        with pytest.raises(ValueError):
            ImgrementTable(device="254:0", length=8, **bad)


def test_status_line_of_the_target() -> None:
    line = ("bios=10 bytes=40960 records=9 dropped=1 capture=writes buffer=65536 used=0 "
            "log=off overflow=wait waiting=2 waited=7 fallbacks=1 lost_from=5")
    st = Status.parse(line)
    assert (st.overflow, st.waiting, st.waited, st.fallbacks, st.lost_from) == (
        "wait", 2, 7, 1, 5)
    assert Status.parse(line.replace("lost_from=5", "lost_from=-")).lost_from is None
    with pytest.raises(ImgrementError, match="is the module older than this tool"):
        Status.parse(line.split(" overflow")[0])


def test_table_parse_refuses_other_targets() -> None:
    with pytest.raises(ValueError, match="not an imgrement target"):
        ImgrementTable.parse(Target(0, 8, "linear", "8:0 0"))


@pytest.mark.parametrize(
    "text,size", [("256M", 256 << 20), ("1G", 1 << 30), ("4096", 4096), ("64MiB", 64 << 20)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "M", "12X", "-1G", "1000"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(SandboxError, match="invalid disk size"):
        parse_size(text)


def test_kernel_names() -> None:
    assert kernels.resolve_series("6.1") == "6.1"
    assert kernels.resolve_series("trixie") == "6.12"
    with pytest.raises(SandboxError, match=r"unknown kernel '4\.19'"):
        kernels.resolve_series("4.19")
    assert kernels.resolve_series("debug") == "debug"
    assert kernels.resolve_series("canary") == "canary"


def test_debug_config_options_are_checked_in_the_result() -> None:
    fragment = "# comment\nCONFIG_KASAN=y\nCONFIG_LOCALVERSION=\"-x\"\n" \
        "# CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF is not set\nCONFIG_BLK_DEV_DM=m\n"
    config = "CONFIG_KASAN=y\nCONFIG_LOCALVERSION=\"-x\"\nCONFIG_BLK_DEV_DM=y\n" \
        "CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF=y\n"
    assert debugkernel.missing_options(fragment, config) == [
        "# CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF is not set", "CONFIG_BLK_DEV_DM=m"]
    assert debugkernel.missing_options(fragment, config.replace("DM=y", "DM=m").replace(
        "CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF=y\n", "")) == []
    # the shipped fragment is package data and names the checkers it promises
    text = debugkernel.config_text()
    for option in ("CONFIG_KASAN=y", "CONFIG_PROVE_LOCKING=y", "CONFIG_DEBUG_KMEMLEAK=y",
                   "CONFIG_UBSAN=y", "CONFIG_DEBUG_ATOMIC_SLEEP=y", "CONFIG_DEBUG_LIST=y",
                   "CONFIG_DEBUG_OBJECTS_TIMERS=y", "CONFIG_BLK_DEV_DM=m"):
        assert option in text.splitlines()


def test_mirror_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGREMENT_DEBIAN_MIRROR", "http://mirror.invalid/debian/")
    assert roots.debian_mirror() == "http://mirror.invalid/debian"


def _junit(tmp_path: Path, name: str, tests: int, failures: int, skipped: int) -> None:
    (tmp_path / name).write_text(
        f'<testsuites><testsuite name="x" tests="{tests}" failures="{failures}" '
        f'errors="0" skipped="{skipped}"/></testsuites>'
    )


def test_check_junit_requires_a_guest_run(tmp_path: Path) -> None:
    assert check_junit.main([str(tmp_path), "--expect-guest", "1"]) == 1
    _junit(tmp_path, "guest-6.1.0-1-amd64.xml", 5, 0, 0)
    assert check_junit.main([str(tmp_path), "--expect-guest", "1"]) == 0
    assert check_junit.main([str(tmp_path), "--expect-guest", "2"]) == 1


def test_check_junit_says_which_guest_the_hang_guard_ended(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "hang-guard-6.1.0-50-amd64.txt").write_text("hang watchdog: powering off\n")
    assert check_junit.main([str(tmp_path), "--expect-guest", "1"]) == 1
    err = capsys.readouterr().err
    assert "hang-guard-6.1.0-50-amd64.txt: hang watchdog: powering off" in err
    assert "a guest suite did not run" in err


@pytest.mark.parametrize("tests,failures,skipped", [(0, 0, 0), (5, 1, 0), (5, 0, 1)])
def test_check_junit_fails_on_empty_failed_or_skipped(
    tmp_path: Path, tests: int, failures: int, skipped: int
) -> None:
    _junit(tmp_path, "guest-x.xml", tests, failures, skipped)
    assert check_junit.main([str(tmp_path), "--expect-guest", "1"]) == 1


def test_shell_completion_script() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "imgrement-dm"
    env = {**os.environ, "_IMGREMENT_DM_COMPLETE": "bash_source"}
    r = subprocess.run([str(exe)], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0
    assert "complete -o nosort -F _imgrement_dm_completion imgrement-dm" in r.stdout


def test_the_kernel_modules_import_in_one_direction() -> None:
    """kernels.py picks debugkernel.py by series; debugkernel.py stands on
    roots.py alone, so the two never import each other (a circle made the
    import order matter and hid which module owned what)."""
    import ast

    def imports(mod: object) -> set[str]:
        tree = ast.parse(Path(str(getattr(mod, "__file__", ""))).read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert "imgrement_dm.sandbox.debugkernel" in imports(kernels)
    assert not any("kernels" in n and "debugkernel" not in n for n in imports(debugkernel))
    assert not any("kernels" in n or "debugkernel" in n for n in imports(roots))
