"""The ``imgrement-dm`` command line: thin click commands over the API.

Errors are :class:`ImgrementError` subclasses; they are printed as one line
and turned into the error's exit code (tracebacks only with ``--debug``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from imgrement_dm import api
from imgrement_dm.errors import ImgrementError
from imgrement_dm.format import device_rows

F = TypeVar("F", bound=Callable[..., Any])


class _Group(click.Group):
    """Turns our typed errors into a message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ImgrementError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"imgrement-dm: error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="imgrement-dm")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """See, and keep, every I/O that reaches a disk."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.argument("device")
@click.option("--name", "-n", default=api.DEFAULT_NAME, show_default=True,
              help="Name of the traced device under /dev/mapper.")
def wrap(device: str, name: str) -> None:
    """Stack the imgrement target on DEVICE as /dev/mapper/NAME."""
    traced = api.wrap(device, name=name)
    click.echo(str(traced.node))


@main.command()
@click.argument("name")
@click.option("--deferred", is_flag=True,
              help="If the device is open, remove it when its last user closes it.")
def unwrap(name: str, deferred: bool) -> None:
    """Remove the traced device NAME (the disk below is untouched)."""
    api.unwrap(name, deferred=deferred)


@main.command("list")
@click.option("--all", "all_devices", is_flag=True,
              help="Show every device-mapper device, not only imgrement's.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per device.")
def list_cmd(all_devices: bool, as_json: bool) -> None:
    """List traced devices."""
    found = api.list_devices(all_devices=all_devices)
    if as_json:
        for d in found:
            click.echo(json.dumps({
                "name": d.name,
                "uuid": d.uuid,
                "dev": f"{d.major}:{d.minor}",
                "open_count": d.open_count,
                "suspended": d.suspended,
                "table": [t.line() for t in d.table],
                "status": [t.line() for t in d.status],
            }))
        return
    for line in device_rows(found):
        click.echo(line)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--kernel", "-k", default=None,
              help="Kernel series (5.10, 6.1, 6.12, 7.2) or Debian suite; default 6.1.")
@click.option("--disk", "-d", "disks", multiple=True, metavar="SIZE",
              help="Attach an empty virtio scratch disk of SIZE (e.g. 256M); repeatable.")
@click.option("--memory", "-m", default="2G", show_default=True, help="Guest memory.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("build/sandbox"),
              show_default=True, help="Folder shared read-write with the guest.")
@click.option("--kvm", is_flag=True, help="Use KVM (only where the host's KVM works).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def sandbox(kernel: str | None, disks: tuple[str, ...], memory: str, results: Path,
            kvm: bool, command: tuple[str, ...]) -> None:
    """Boot a Debian kernel in QEMU with the target loaded and run COMMAND as root.

    Write COMMAND after '--'. Without it, an interactive shell starts. The
    exit status is COMMAND's.
    """
    from imgrement_dm import sandbox as sb

    rc = sb.run_command(
        list(command) or [],
        kernel=kernel or sb.DEFAULT_KERNEL,
        disks=list(disks),
        results=results,
        memory=memory,
        kvm=kvm,
    )
    sys.exit(rc)


if __name__ == "__main__":
    main(prog_name="imgrement-dm")
