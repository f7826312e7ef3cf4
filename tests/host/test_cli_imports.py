"""What starting the CLI imports, and the package's API names, imported late.

Every ``imgrement-dm`` command, and every autowrap udev starts for a disk,
imports the package first. Under emulation, or on a slow machine, importing
all of it (crash checks, increments, export formats) took longer than the
command's own work: 5.5 s of a 6 s ``--version`` in a TCG guest. So the
package's ``__init__`` names the API lazily and each command imports what it
runs. These tests keep it so, in a fresh interpreter each (the test
process itself has imported everything long ago).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Modules no command needs before it runs (and most commands never).
HEAVY = {
    "imgrement_dm.api", "imgrement_dm.dm", "imgrement_dm.records", "imgrement_dm.recording",
    "imgrement_dm.increment", "imgrement_dm.crashcheck", "imgrement_dm.autowrap",
    "imgrement_dm.autowrap_install", "imgrement_dm.render", "imgrement_dm.formats.export",
    "imgrement_dm.formats.capture", "imgrement_dm.formats.qcow2", "imgrement_dm.sandbox",
}


def _modules_after(code: str) -> set[str]:
    """The imgrement_dm modules a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return {m for m in json.loads(out.splitlines()[-1]) if m.startswith("imgrement_dm")}


def test_importing_the_cli_imports_no_command_s_modules() -> None:
    loaded = _modules_after("import imgrement_dm.cli")
    assert "imgrement_dm.cli" in loaded
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def _modules_after_commands(*argvs: list[str]) -> set[str]:
    """The modules loaded after running each CLI command line (exits ignored)."""
    return _modules_after(
        "import contextlib\n"
        "from imgrement_dm import cli\n"
        f"for args in {list(argvs)!r}:\n"
        "    with contextlib.suppress(SystemExit):\n"
        "        cli.main(args, prog_name='imgrement-dm')\n")


def test_version_and_help_run_without_the_api() -> None:
    loaded = _modules_after_commands(["--version"], ["--help"], ["wrap", "--help"],
                                     ["trace", "--help"], ["crashcheck", "--help"],
                                     ["autowrap", "handle", "--help"])
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_a_command_imports_what_it_runs() -> None:
    # status of a name that cannot exist: it fails, after importing the API
    loaded = _modules_after_commands(["status", "no/such"])
    assert {"imgrement_dm.api", "imgrement_dm.render"} <= loaded
    assert not loaded & {"imgrement_dm.crashcheck", "imgrement_dm.increment",
                         "imgrement_dm.autowrap"}


def test_the_package_imports_only_its_version_until_an_api_name_is_used() -> None:
    loaded = _modules_after("import imgrement_dm\nassert imgrement_dm.__version__")
    assert loaded == {"imgrement_dm", "imgrement_dm.errors", "imgrement_dm.resources"}


def test_every_api_name_resolves_to_its_defining_module() -> None:
    import importlib

    import imgrement_dm

    for name in imgrement_dm.__all__:
        value = getattr(imgrement_dm, name)
        assert value is getattr(importlib.import_module(value.__module__), name), name
    # every lazily named one is exported, and the other way round
    assert set(imgrement_dm.__all__) == set(imgrement_dm._WHERE)
    assert set(imgrement_dm.__all__) <= set(dir(imgrement_dm))
    from imgrement_dm import TracedDevice, api, wrap  # the names scripts import
    assert wrap is api.wrap and TracedDevice is api.TracedDevice


def test_an_unknown_name_is_an_attribute_error() -> None:
    import imgrement_dm

    with pytest.raises(AttributeError, match="no attribute 'wrapp'"):
        imgrement_dm.wrapp  # noqa: B018
    assert not hasattr(imgrement_dm, "wrapp")
