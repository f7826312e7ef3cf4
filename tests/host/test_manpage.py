"""imgrement-dm(1) says what --help says, for every command and option."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from imgrement_dm import cli, manpage


def _all_commands(group: click.Group, path: list[str]) -> list[list[str]]:
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        found.append([*path, name])
        if isinstance(cmd, click.Group):
            found += _all_commands(cmd, [*path, name])
    return found


COMMANDS = _all_commands(cli.main, [])
PAGE = manpage.render()


@pytest.mark.parametrize("path", [[], *COMMANDS], ids=lambda p: " ".join(p) or "main")
def test_every_command_usage_and_option_is_in_the_page(path: list[str]) -> None:
    result = CliRunner().invoke(cli.main, [*path, "--help"], prog_name="imgrement-dm")
    assert result.exit_code == 0, result.output
    usage = re.match(r"Usage: (.*)\n", result.output)
    assert usage
    if path:
        assert manpage.roff(usage.group(1)) in PAGE.replace(".B ", "").replace("\n", " ")
    options = result.output.split("Options:\n", 1)[1]
    decls = re.findall(r"^  (-[^ ].*?)(?:  |\n|$)", options, flags=re.M)
    assert decls, options
    for decl in decls:
        assert f".B {manpage.roff(decl.strip())}" in PAGE, (path, decl)
    summary = (cli.main if not path else _command(path)).help or ""
    first = " ".join(summary.strip().split("\n\n")[0].split())
    assert manpage.roff(first) in PAGE, (path, first)


def _command(path: list[str]) -> click.Command:
    cmd: click.Command = cli.main
    for name in path:
        assert isinstance(cmd, click.Group)
        found = cmd.get_command(click.Context(cmd), name)
        assert found is not None
        cmd = found
    return cmd


def test_the_page_names_every_exit_code_the_errors_use() -> None:
    section = PAGE.split(".SH EXIT STATUS", 1)[1].split(".SH", 1)[0]
    codes = {int(c) for c in re.findall(r"^\.B (\d+)$", section, flags=re.M)}
    assert {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13} <= codes


def test_man_renders_it_without_warnings(tmp_path: Path) -> None:
    assert shutil.which("man"), "man-db is a host dependency (scripts/install-host-deps)"
    page = tmp_path / "imgrement-dm.1"
    page.write_text(PAGE)
    r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                       env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "imgrement-dm wrap [OPTIONS] DEVICE" in r.stdout.replace("\u2010", "-")
