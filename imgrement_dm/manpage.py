"""imgrement-dm(1), generated from the click commands themselves.

A man page written by hand drifts from ``--help``; this one is rendered from
the same objects ``--help`` prints (every command's help, usage and options)
and from the typed errors' exit codes, so the two cannot disagree.  The
Debian package builds it with ``python3 -m imgrement_dm.manpage``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator

import click

from imgrement_dm import cli, resources
from imgrement_dm.errors import ImgrementError

PROG = "imgrement-dm"


def roff(text: str) -> str:
    """Escape text for a roff line: backslashes, hyphens, a leading dot or quote."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    if out.startswith((".", "'")):
        out = "\\&" + out
    return out


def _paragraphs(text: str) -> Iterator[str]:
    """click's help text, one roff paragraph per blank-line-separated block;
    click's \\b marker (keep lines as they are) becomes a no-fill block."""
    for block in inspect.cleandoc(text).split("\n\n"):
        lines = block.split("\n")
        if lines[0].strip() == "\b":
            yield ".PP\n.nf\n" + "\n".join(roff(x) for x in lines[1:]) + "\n.fi"
        else:
            yield ".PP\n" + roff(" ".join(x.strip() for x in lines))


def _commands(ctx: click.Context) -> Iterator[click.Context]:
    """A context for every command under ``ctx``'s group, depth first; each has
    its parents, so inherited settings (``-h`` for help) show as in --help."""
    group = ctx.command
    assert isinstance(group, click.Group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx, **cmd.context_settings)
        yield sub
        if isinstance(cmd, click.Group):
            yield from _commands(sub)


def _options(cmd: click.Command, ctx: click.Context) -> Iterator[str]:
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option):
            continue  # arguments are in the usage line and the help text
        record = param.get_help_record(ctx)
        if record is None:
            continue
        decl, helptext = record
        yield f".TP\n.B {roff(decl)}\n{roff(helptext) if helptext else ''}".rstrip()


def _exit_codes() -> Iterator[str]:
    found: dict[int, list[str]] = {}
    todo: list[type[ImgrementError]] = [ImgrementError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is ImgrementError:
            doc = "Any other failure; the message says what and what to do"
        else:
            doc = (inspect.getdoc(cls) or cls.__name__).split("\n")[0]
        found.setdefault(cls.exit_code, []).append(doc.replace("``", "").rstrip("."))
    yield ".TP\n.B 0\nSuccess."
    for code in sorted(found):
        yield f".TP\n.B {code}\n" + roff("; ".join(sorted(set(found[code]))) + ".")
    yield ".TP\n.B 2\nUsage error: a bad option or argument (click)."


def render(group: click.Group = cli.main) -> str:
    """The whole page, in man(7) roff."""
    root = click.Context(group, info_name=PROG, **group.context_settings)
    out = [
        f'.TH IMGREMENT\\-DM 1 "" "imgrement-dm {resources.version()}" "User Commands"',
        ".SH NAME",
        f"{roff(PROG)} \\- {roff((group.help or '').strip().splitlines()[0])}",
        ".SH SYNOPSIS",
        f".B {roff(PROG)}\n[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        *_paragraphs(group.help or ""),
        ".SH OPTIONS",
        *_options(group, root),
        ".SH COMMANDS",
    ]
    for ctx in _commands(root):
        cmd = ctx.command
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        out.append(f".SS {roff(ctx.command_path.split(' ', 1)[1])}")
        out.append(f".B {roff(ctx.command_path)}\n{roff(usage)}")
        out.extend(_paragraphs(cmd.help or ""))
        out.extend(_options(cmd, ctx))
    out += [".SH EXIT STATUS", *_exit_codes(),
            ".SH FILES",
            ".TP\n.B /sys/kernel/debug/imgrement/\\fINAME\\fR\nThe record stream of a traced "
            "device (debugfs, root only).",
            ".TP\n.B /etc/imgrement\\-dm/autowrap.conf\nThe autowrap policy; without it the "
            "udev rule does nothing (\\fBimgrement\\-dm autowrap example\\fR prints one).",
            ".SH SEE ALSO",
            ".BR dmsetup (8),\n.BR blktrace (8),\n.BR udev (7),\n.BR dkms (8)",
            ".PP\n/usr/share/doc/imgrement\\-dm/README.md and docs/ in the source tree."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
