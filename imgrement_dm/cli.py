"""The ``imgrement-dm`` command line: thin click commands over the API.

Errors are :class:`ImgrementError` subclasses; they are printed as one line
and turned into the error's exit code (tracebacks only with ``--debug``).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from imgrement_dm import resources
from imgrement_dm.defaults import DEFAULT_NAME
from imgrement_dm.errors import ImgrementError
from imgrement_dm.layout import OPS
from imgrement_dm.progress import Meter

# Each command imports what it uses when it runs: the udev-started autowrap
# and every short command would otherwise pay for importing the whole
# package (crashcheck, increments, formats), which on a slow or emulated
# machine costs seconds. tests/host/test_cli_imports.py keeps it so.
if TYPE_CHECKING:
    from imgrement_dm import autowrap as aw
    from imgrement_dm import crashcheck as crash
    from imgrement_dm import increment, recording
    from imgrement_dm.records import Item, RecordReader

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
        except OSError as e:
            # One we did not foresee (an input file that vanished, EIO): still
            # one line naming the file and the reason, never a traceback.
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"imgrement-dm: error: {where}{e.strerror or e}", err=True)
            sys.exit(1)


class _Seconds(click.FloatRange):
    """A duration in seconds: a positive, finite number (FloatRange lets nan
    through, since every comparison with nan is false)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        seconds = float(super().convert(value, param, ctx))
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


SECONDS = _Seconds(min=0, min_open=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(version=resources.version(), prog_name="imgrement-dm")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """See, and keep, every I/O that reaches a disk."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    # A file name need not be UTF-8 (Python carries its bytes as surrogates):
    # messages that name one show those bytes as escapes instead of failing.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


@main.command()
@click.argument("device")
@click.option("--name", "-n", default=DEFAULT_NAME, show_default=True,
              help="Name of the traced device under /dev/mapper.")
@click.option("--capture", type=click.Choice(["meta", "writes", "all"]), default=None,
              help="What to copy besides metadata [target default: writes].")
@click.option("--buffer-kb", type=click.IntRange(64, 1024 * 1024), default=None,
              help="Record buffer size in KiB [target default: 16384].")
@click.option("--log/--no-log", default=None,
              help="Also print each bio to the kernel log (rate-limited).")
@click.option("--overflow", type=click.Choice(["drop", "wait"]), default=None,
              help="When a record does not fit: drop it, or make the bio wait for the "
                   "reader (lossless) [target default: drop].")
@click.option("--wait-ms", type=click.IntRange(10, 60000), default=None,
              help="With --overflow wait: how long I/O may wait for a stopped reader "
                   "before records are dropped after all [target default: 5000].")
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
def wrap(device: str, name: str, capture: str | None, buffer_kb: int | None,
         log: bool | None, overflow: str | None, wait_ms: int | None, as_json: bool) -> None:
    """Stack the imgrement target on DEVICE as /dev/mapper/NAME.

    Returns once /dev/mapper/NAME exists and udev is done with it.
    """
    from imgrement_dm import api, render

    traced = api.wrap(device, name=name, capture=capture, buffer_kb=buffer_kb, log=log,
                      overflow=overflow, wait_ms=wait_ms)
    if as_json:
        click.echo(render.dumps({"name": traced.name, "node": str(traced.node),
                                 "uuid": traced.uuid, "dev": f"{traced.major}:{traced.minor}",
                                 "device": device}))
        return
    click.echo(str(traced.node))


@main.command()
@click.argument("name")
@click.option("--deferred", is_flag=True,
              help="If the device is open, remove it when its last user closes it.")
def unwrap(name: str, deferred: bool) -> None:
    """Remove the traced device NAME (the disk below is untouched)."""
    from imgrement_dm import api

    api.unwrap(name, deferred=deferred)


@main.command("list")
@click.option("--all", "all_devices", is_flag=True,
              help="Show every device-mapper device, not only imgrement's.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per device.")
def list_cmd(all_devices: bool, as_json: bool) -> None:
    """List traced devices."""
    import json

    from imgrement_dm import api, render

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
    for line in render.device_rows(found):
        click.echo(line)


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
def status(name: str, as_json: bool) -> None:
    """Counters and settings of the traced device NAME."""
    from imgrement_dm import api, render

    st = api.status(name)
    if as_json:
        click.echo(render.dumps({"name": name, **st.__dict__}))
        return
    for line in render.status_lines(name, st):
        click.echo(line)


@main.command()
@click.argument("name")
@click.argument("label")
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
def mark(name: str, label: str, as_json: bool) -> None:
    """Put a mark LABEL into the record stream of NAME; prints its sequence number."""
    from imgrement_dm import api, render

    seq = api.mark(name, label)
    click.echo(render.dumps({"name": name, "label": label, "seq": seq}) if as_json else seq)


@main.command()
@click.argument("name")
@click.argument("mode", type=click.Choice(["meta", "writes", "all"]))
def capture(name: str, mode: str) -> None:
    """Switch what NAME copies (meta, writes or all); takes effect at once."""
    from imgrement_dm import api

    api.set_capture(name, mode)


@main.command()
@click.argument("name")
@click.argument("policy", type=click.Choice(["drop", "wait"]))
def overflow(name: str, policy: str) -> None:
    """When a record of NAME does not fit: drop it, or make the bio wait (lossless)."""
    from imgrement_dm import api

    api.set_overflow(name, policy)


@contextlib.contextmanager
def _reader(name: str | None, from_file: Path | None) -> Iterator[Iterator[Item] | RecordReader]:
    """A live device's reader, or the items of a file of either kind."""
    from imgrement_dm import api
    from imgrement_dm.formats import files
    from imgrement_dm.records import RecordReader

    if (name is None) == (from_file is None):
        raise click.UsageError("give a device NAME or --file FILE (one of them)")
    if from_file is not None:
        with files.file_items(from_file) as items:
            yield items
        return
    assert name is not None  # for mypy: checked above
    api.status(name)  # refuses a device that is not ours, with a clear message
    with RecordReader.live(name) as reader:
        yield reader


class _Stop:
    """Which signal asked a long run to stop (0: none), and its flag."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    """Ctrl-C and SIGTERM set a flag instead of ending the process, so the run
    can end its children, remove its files and say what it did so far."""
    stop = _Stop()

    def on_signal(signum: int, frame: Any) -> None:
        stop.signum = stop.signum or signum
        stop.event.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _until_interrupted() -> Iterator[None]:
    """Ctrl-C or SIGTERM ends the block quietly, so the command can finish its files."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _sector_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit() or int(lo) > int(hi):
        raise click.BadParameter(f"{text!r} is not a range START-END of sectors, e.g. 0-2047")
    return int(lo), int(hi)


@main.command()
@click.argument("name", required=False)
@click.option("--file", "-f", "from_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Read a capture (from record) or a saved stream (from -o) instead "
                   "of a live device.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
@click.option("-x", "--hex", "hexdump", is_flag=True,
              help="Show the first bytes of each payload (with --json: all of it, in hex).")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Also save the raw stream to this file.")
@click.option("--op", "ops", multiple=True, type=click.Choice(sorted(OPS.values())),
              help="Show only these operations (repeatable).")
@click.option("--sector", "sectors", metavar="START-END",
              help="Show only bios that touch sectors START..END.")
@click.option("--count", "-c", type=click.IntRange(min=1), help="Stop after COUNT records.")
@click.option("--duration", "-d", type=SECONDS,
              help="Stop after this many seconds.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing (use with -o).")
def trace(name: str | None, from_file: Path | None, as_json: bool, hexdump: bool,
          output: Path | None, ops: tuple[str, ...], sectors: str | None,
          count: int | None, duration: float | None, quiet: bool) -> None:
    """Show the records of NAME live, one line each (or JSON lines).

    Runs until the device is unwrapped, --count or --duration is reached, or
    Ctrl-C. Drops are always shown. Columns: sequence number, time since the
    start, submitter, operation (R W F D E Z), flags (F fua, P preflush,
    S sync, M meta, A readahead, I idle, ...), sector + sectors, segments,
    latency, status.
    """
    from imgrement_dm import recording
    from imgrement_dm.output import atomic_output, check_writable, is_stdout, is_stream
    from imgrement_dm.records import RecordReader

    rng = _sector_range(sectors)
    if output is not None:
        if from_file is not None:
            raise click.UsageError(
                f"-o saves a live device's stream, and {from_file} is saved already "
                "(copy it with cp)")
        if is_stdout(output) and not quiet:
            raise click.UsageError("-o - writes the stream to standard output: add -q, so "
                                   "that trace lines do not mix with it")
        check_writable(output, stream_ok=True)
    with _reader(name, from_file) as source, contextlib.ExitStack() as stack:
        if (output is not None and isinstance(source, RecordReader) and quiet
                and not (ops or rng or count) and not is_stream(output)):
            # Only storing: whole records written through unchecked.
            with _until_interrupted():
                recording.store_stream(source, output, duration)
            return
        save = (stack.enter_context(atomic_output(output, stream_ok=True))
                if output is not None else None)
        with _until_interrupted():
            if save is not None and isinstance(source, RecordReader):
                source.save_to(save)
            _show(source, as_json=as_json, hexdump=hexdump, quiet=quiet, ops=ops, rng=rng,
                  count=count, duration=duration, live=from_file is None)


def _show(source: Iterator[Item] | RecordReader, *, as_json: bool, hexdump: bool,
          quiet: bool, ops: tuple[str, ...], rng: tuple[int, int] | None,
          count: int | None, duration: float | None, live: bool) -> None:
    """Print items as trace lines or JSON, filtered, up to ``count``."""
    from imgrement_dm import recording, render
    from imgrement_dm.records import BioRecord, Drop

    t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if live else None
    shown = 0
    if not as_json and not quiet:
        click.echo(render.TRACE_HEADER)
    for item in recording.items(source, duration=duration):
        if isinstance(item, BioRecord):
            if ops and item.op_name not in ops:
                continue
            if rng and not (item.sector <= rng[1]
                            and item.sector + max(item.sectors, 1) > rng[0]):
                continue
            if t0 is None:
                t0 = item.submit_ns
        if not isinstance(item, Drop):
            shown += 1
        if not quiet:
            if as_json:
                click.echo(render.dumps(render.item_json(item, with_payload=hexdump)))
            else:
                click.echo(render.trace_line(item, t0 or 0, hexdump=hexdump))
        if count is not None and shown >= count:
            break


@main.command()
@click.argument("name", required=False)
@click.option("--file", "-f", "from_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Summarise a capture (from record) or a saved stream (from trace -o) "
                   "instead of a live device.")
@click.option("--duration", "-d", type=SECONDS,
              help="Stop reading a live device after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
def stats(name: str | None, from_file: Path | None, duration: float | None,
          as_json: bool) -> None:
    """Per-operation counts and bytes, with log2 latency and size histograms.

    From a file, or live until the device goes, --duration, or Ctrl-C.
    """
    from imgrement_dm import recording, render

    st = render.Stats()
    with _reader(name, from_file) as source, _until_interrupted():
        for item in recording.items(source, duration=duration):
            st.add(item)
    if as_json:
        click.echo(render.dumps(st.as_json()))
        return
    for line in render.stats_lines(st):
        click.echo(line)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--kernel", "-k", default=None,
              help="Kernel series (5.10, 6.1, 6.12, 7.2), Debian suite, 'debug' "
                   "(6.1 built with KASAN, lockdep, UBSAN, kmemleak) or 'canary' "
                   "(experimental's newest, not claimed); default 6.1.")
@click.option("--disk", "-d", "disks", multiple=True, metavar="SIZE",
              help="Attach an empty virtio scratch disk of SIZE (e.g. 256M); repeatable.")
@click.option("--memory", "-m", default="2G", show_default=True, help="Guest memory.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("build/sandbox"),
              show_default=True, help="Folder shared read-write with the guest.")
@click.option("--kvm", is_flag=True, help="Use KVM (only where the host's KVM works).")
@click.option("--append", default="", metavar="ARGS",
              help="More kernel command line, e.g. 'tsc=reliable'.")
@click.option("--timeout", type=click.FloatRange(min=1), default=4 * 3600.0,
              show_default=True,
              help="Kill the guest after this many seconds (exit 124); the full suite "
                   "on the debug kernel takes about an hour under emulation.")
@click.option("--qemu-arg", "qemu_args", multiple=True, metavar="ARG",
              help="One more argument for QEMU, as it is (e.g. --qemu-arg=-plugin "
                   "--qemu-arg=insncount.so,out=counts.txt); repeatable.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def sandbox(kernel: str | None, disks: tuple[str, ...], memory: str, results: Path,
            kvm: bool, append: str, timeout: float, qemu_args: tuple[str, ...],
            command: tuple[str, ...]) -> None:
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
        append=append,
        timeout=timeout if command else None,
        qemu_args=list(qemu_args),
    )
    sys.exit(rc)


def _progress_option(f: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--progress", "progress_mode", type=click.Choice(["auto", "json", "none"]),
        default="auto", show_default=True,
        help="auto: a bar on stderr when it is a terminal, nothing otherwise; json: a "
             "line on stderr at most twice a second and at the end, "
             '{"progress": WHAT, "done": N, "total": N, "unit": "bytes"|"states"}; '
             "none: nothing.")(f)


@contextlib.contextmanager
def _meter(mode: str, label: str, unit: str = "bytes") -> Iterator[Meter]:
    """A progress meter (progress.py) closed, its bar's line ended, at the end."""
    m = Meter(mode, label, unit)
    try:
        yield m
    finally:
        m.close()


def _stop_at(until_mark: str | None, until_flush: int | None = None,
             until_fua: int | None = None) -> increment.StopAt:
    from imgrement_dm import increment
    if sum(x is not None for x in (until_mark, until_flush, until_fua)) > 1:
        raise click.UsageError("give at most one of --until-mark, --until-flush, --until-fua")
    return increment.StopAt(until_mark, until_flush, until_fua)


@main.command()
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="The capture file to write.")
@click.option("--duration", "-d", type=SECONDS,
              help="Stop after this many seconds.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@click.option("--allow-drops", is_flag=True,
              help="Leave the device's overflow policy as it is (drop: never slow the disk).")
@click.option("--marks", type=click.Path(path_type=Path, dir_okay=False),
              help="Make this FIFO for the recording: each line written to it becomes a "
                   "mark (echo ack:42 > FIFO), from any program.")
def record(name: str, output: Path, duration: float | None, quiet: bool,
           allow_drops: bool, marks: Path | None) -> None:
    """Record the stream of NAME into a durable capture file.

    Lossless: a device wrapped with --overflow drop is switched to wait for
    the recording's duration (and back after it), so a busy disk waits for
    the recorder instead of losing writes. Runs until the device is
    unwrapped, --duration passes, or Ctrl-C, then writes the trailer and
    renames FILE.part to FILE. A progress line on stderr shows records,
    bytes, drops and the rate.
    """
    from imgrement_dm import recording

    def show(r: recording.Recorded) -> None:
        rate = r.records / max(r.seconds, 1e-9)
        click.echo(f"\rrecords {r.records}, bytes {r.bytes}, drops {r.drops}, "
                   f"{rate:.0f} records/s   ", err=True, nl=False)

    done = None
    with _until_interrupted():  # SIGTERM as Ctrl-C: record() ends cleanly on either
        done = recording.record(name, output, duration=duration, allow_drops=allow_drops,
                                progress=None if quiet else show, marks=marks,
                                warn=lambda text: click.echo(f"\nimgrement-dm: warning: "
                                                             f"{text}", err=True))
    if done is None:  # interrupted before the recording began: nothing was written
        sys.exit(130)
    if not quiet:
        click.echo(f"\rrecords {done.records}, bytes {done.bytes}, drops {done.drops}: "
                   f"{output}", err=True)
    if done.drops:
        why = ("use a larger --buffer-kb, or record without --allow-drops" if allow_drops else
               "the recorder stalled longer than the device's wait_ms, or the device was "
               "switched to drop")
        click.echo(f"imgrement-dm: warning: {done.drops} record(s) were dropped ({why}); "
                   "apply and replay will refuse this capture", err=True)


@main.command("apply")
@click.argument("capture_file", metavar="FILE", type=click.Path(path_type=Path))
@click.argument("base", type=click.Path(path_type=Path, dir_okay=False, exists=True,
                                        readable=True))
@click.option("--until-mark", help="Stop at the mark with this label.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="The image to write [default: BASE.applied, or BASE.applied.qcow2].")
@click.option("--format", "fmt_name", type=click.Choice(["raw", "qcow2"]), default="raw",
              show_default=True,
              help="raw: a whole copy of BASE with the changes; qcow2: an overlay holding "
                   "only the changed clusters, with BASE as its backing file.")
@click.option("--backing", metavar="NAME",
              help="qcow2: the backing file name to record [default: BASE's absolute path].")
@click.option("--state", "state_id", metavar="ID",
              help="Build the crash state crashcheck reported as ID instead (raw only).")
@click.option("--force", is_flag=True, help="Apply even if records were dropped.")
@_progress_option
def apply_cmd(capture_file: Path, base: Path, until_mark: str | None, output: Path | None,
              fmt_name: str, backing: str | None, state_id: str | None, force: bool,
              progress_mode: str) -> None:
    """Apply the captured writes in FILE onto a copy of BASE.

    FILE comes first, as in crashcheck, replay, diff and export ('apply BASE
    FILE', the old order, still works this release, with a warning). BASE is
    an image of the disk (or the disk itself) as it was when recording began. Writes,
    discards and write-zeroes are applied in completion order, up to the
    mark if given; the result equals the disk at that point. With --format
    qcow2 the result is a qcow2 overlay on BASE that stores only the 64 KiB
    clusters the capture changed (QEMU, qemu-img and libvirt read it).
    """
    from imgrement_dm import crashcheck as crash
    from imgrement_dm import increment
    from imgrement_dm.formats import files

    if files.is_capture(base) and not files.is_capture(capture_file):
        click.echo("imgrement-dm: warning: 'apply BASE FILE' is the old order: write 'apply "
                   "FILE BASE' (FILE first, as in crashcheck, replay and export); the old "
                   "order goes in the next release", err=True)
        capture_file, base = base, capture_file
    if backing is not None and fmt_name != "qcow2":
        raise click.UsageError("--backing is for --format qcow2")
    if state_id is not None:
        if until_mark is not None or fmt_name != "raw":
            raise click.UsageError("--state builds one crash state: it takes neither "
                                   "--until-mark nor --format qcow2")
        out = output or base.with_name(base.name + ".state")
        state = crash.build_state(capture_file, base, state_id, out)
        click.echo(f"{out}: {state.describe()}, {len(state.writes())} writes")
        return
    stop = _stop_at(until_mark)
    if fmt_name == "qcow2":
        out = output or base.with_name(base.name + ".applied.qcow2")
        with _meter(progress_mode, "apply") as m:
            sel, stored, zeroed = increment.apply_qcow2(base, capture_file, out, stop,
                                                        backing_name=backing, force=force,
                                                        progress=m)
        click.echo(f"{out}: {sel.applied} changes, {stored} clusters of 64 KiB stored, "
                   f"{zeroed} marked zero, backing file {backing or base.resolve()}")
        return
    out = output or base.with_name(base.name + ".applied")
    with _meter(progress_mode, "apply") as m:
        sel = increment.apply(base, capture_file, out, stop, force=force, progress=m)
    click.echo(f"{out}: {sel.applied} changes applied"
               + (f", {sel.failed} failed writes skipped" if sel.failed else ""))


@main.command()
@click.argument("capture_file", metavar="CAPTURE", type=click.Path(path_type=Path))
@click.argument("base", type=click.Path(path_type=Path, dir_okay=False, exists=True,
                                        readable=True))
@click.argument("check", nargs=-1)
@click.option("--fsck", "use_fsck", is_flag=True,
              help="Check with the file system's own checker (ext4, XFS, btrfs, by "
                   "signature), after the recovery a mount would do.")
@click.option("--sqlite", "sqlite_check", nargs=2, metavar="DB QUERY",
              help="Check the SQLite database at DB (its path in the file system): whole, "
                   "and every acknowledged label among QUERY's first column.")
@click.option("--max-states", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Check at most this many distinct states (in the documented order).")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Check a random sample of this many distinct states (all are listed; "
                   "--max-states does not apply).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The sample's seed: the same seed checks the same states.")
@click.option("--exhaustive", type=click.IntRange(0, 12), default=6, show_default=True,
              help="Every subset of the unflushed writes when there are at most this many; "
                   "beyond, none, each alone and all but each.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=os.cpu_count() or 1,
              show_default="the CPUs", help="Checks run at once.")
@click.option("--bisect", is_flag=True,
              help="Only find the first boundary whose in-order state fails.")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
              help="Where state images are made [default: a new folder beside BASE].")
@click.option("--keep-failing", is_flag=True,
              help="Keep the images of failing states (and say where).")
@click.option("--timeout", type=SECONDS, default=None,
              help="Seconds one check may run; one that runs longer is killed and its "
                   "state fails as timed out.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per state checked.")
@_progress_option
def crashcheck(capture_file: Path, base: Path, check: tuple[str, ...], use_fsck: bool,
               sqlite_check: tuple[str, str] | None, max_states: int, sample: int | None,
               seed: int, exhaustive: int, jobs: int, bisect: bool, workdir: Path | None,
               keep_failing: bool, timeout: float | None, as_json: bool,
               progress_mode: str) -> None:
    """Run CHECK on every disk state a power cut could have left.

    BASE is the disk as it was when CAPTURE (a lossless capture) began. At
    each flush, FUA write and mark, the state holds every durable write
    plus, in turn, subsets of the writes not yet flushed (a volatile cache
    may have kept any of them); see docs/crashcheck.md. CHECK runs with {}
    replaced by a state image's path, e.g.:

    \b
    imgrement-dm crashcheck s.cap base.img -- e2fsck -fn {}
    imgrement-dm crashcheck s.cap base.img --fsck
    imgrement-dm crashcheck s.cap base.img --sqlite /app.db 'SELECT id FROM t'

    Marks labelled ack:LABEL say the application acknowledged LABEL: every
    state from there on must hold it. CHECK finds them in the file
    $IMGREMENT_ACKED (one a line) and writes the missing ones to the file
    $IMGREMENT_LOST; such a state fails as "lost acknowledged data".

    Exit 0 if every state passed, 1 if any failed; each failure is named by
    its state id, which 'apply --state ID' rebuilds alone. Ctrl-C or SIGTERM
    ends the running checks, removes their images, prints the summary so far
    and exits 130 or 143.
    """
    from imgrement_dm import checks as ready
    from imgrement_dm import crashcheck as crash
    from imgrement_dm import render

    made = ([ready.fsck] if use_fsck else []) + (
        [ready.sqlite(*sqlite_check)] if sqlite_check else [])
    if check and made:
        raise click.UsageError("give a CHECK command or --fsck/--sqlite, not both (a "
                               "command can run e2fsck and sqlite3 itself)")
    if not check and not made:
        raise click.UsageError("nothing to check with: give a CHECK command after --, "
                               "or --fsck, or --sqlite DB QUERY")
    if made and timeout is not None:
        raise click.UsageError("--timeout ends a CHECK command; --fsck and --sqlite run "
                               "in crashcheck's process and cannot be cut short")
    checker: crash.Check = check if check else ready.all_of(*made)

    with _meter(progress_mode, "listing") as m:
        bounds, size = crash.crash_boundaries(capture_file, base, progress=m)
    tty = sys.stderr.isatty() and progress_mode == "auto"
    seen = {"checked": 0, "failed": 0, "total": 0}
    states = Meter("json" if progress_mode == "json" else "none", "checking", "states")

    def listed(n: int) -> None:
        seen["total"] = n
        states(0, n)

    def show(r: crash.Result) -> None:
        seen["checked"] += 1
        seen["failed"] += not r.passed
        states(seen["checked"], seen["total"])
        if tty:  # a progress line on a terminal; the summary replaces it
            click.echo("\r\033[K", err=True, nl=False)
        acked = r.state.acked
        if as_json:
            click.echo(render.dumps({"state": r.state.id, "boundary": r.state.boundary.index,
                                     "kind": r.state.boundary.kind,
                                     "record": r.state.boundary.seq,
                                     "kept": r.state.kept, "exit": r.code,
                                     "timed_out": r.timed_out, "passed": r.passed,
                                     "verdict": r.verdict, "acked": len(acked),
                                     "last_ack": acked[-1] if acked else None,
                                     "lost": list(r.lost), "output": r.output[-2000:]}))
        elif r.lost:
            shown = ", ".join(r.lost[:10]) + (" ..." if len(r.lost) > 10 else "")
            click.echo(f"LOST {r.state.describe()}: {len(r.lost)} of {len(acked)} "
                       f"acknowledged missing: {shown}")
        elif not r.passed:
            last = r.output.splitlines()[-1] if r.output else ""
            how = f"timed out after {timeout:g} s" if r.timed_out else f"exit {r.code}"
            click.echo(f"FAIL {r.state.describe()}: {how}: {last}")
        if tty:
            click.echo(f"crashcheck: {seen['checked']} of {seen['total']} states checked, "
                       f"{seen['failed']} failed", err=True, nl=False)

    if bisect:
        first = crash.bisect(bounds, base, size, checker, workdir=workdir, report=show)
        if first is None:
            click.echo(f"{len(bounds)} boundaries: the last one passes, so bisect finds "
                       "nothing", err=True)
            return
        click.echo(f"first failing boundary: {first.state.boundary.index} "
                   f"{first.state.boundary.describe()} (state {first.state.id})", err=True)
        sys.exit(1)
    with _stop_on_signals() as stop:
        summary = crash.check_capture(bounds, base, size, checker, max_states=max_states,
                                      exhaustive=exhaustive, jobs=jobs, workdir=workdir,
                                      keep_failing=keep_failing, timeout=timeout,
                                      stop=stop.event, report=show, listed=listed,
                                      sample=sample, seed=seed)
    if tty:
        click.echo("\r\033[K", err=True, nl=False)
    click.echo(summary.describe(interrupted_by=stop.signum), err=True)
    if summary.kept:
        click.echo(f"failing states' images kept in {', '.join(summary.kept)}", err=True)
    if stop.signum:
        sys.exit(128 + stop.signum)
    if summary.failed:
        sys.exit(1)


@main.command()
@click.argument("capture_file", metavar="FILE", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path, exists=True))
@click.option("--until-mark", help="Stop at the mark with this label.")
@click.option("--until-flush", type=click.IntRange(min=1), help="Stop after the Nth flush.")
@click.option("--until-fua", type=click.IntRange(min=1), help="Stop after the Nth FUA write.")
@click.option("--force", is_flag=True, help="Replay even if records were dropped.")
@_progress_option
def replay(capture_file: Path, target: Path, until_mark: str | None,
           until_flush: int | None, until_fua: int | None, force: bool,
           progress_mode: str) -> None:
    """Write the capture onto TARGET (a device or image) up to a durability point.

    As dm-log-writes' replay-log is used for crash-consistency tests: replay
    to a mark, flush or FUA write, then check the filesystem on TARGET.
    """
    from imgrement_dm import increment

    with _meter(progress_mode, "replay") as m:
        sel = increment.replay(capture_file, target,
                               _stop_at(until_mark, until_flush, until_fua), force=force,
                               progress=m)
    click.echo(f"{target}: {sel.applied} changes replayed")


@main.command()
@click.argument("capture_file", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--until-mark", help="Only changes before the mark with this label.")
@click.option("--format", "fmt_name",
              type=click.Choice(["sectors", "json", "bytes", "qemu-map"]), default="sectors",
              show_default=True,
              help="sectors: START+SECTORS lines; json: [[start, sectors], ...]; bytes: "
                   "'OFFSET LENGTH' lines in bytes; qemu-map: the whole disk as "
                   "qemu-img map --output=json lists it (depth 0 changed, 1 unchanged).")
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
@click.option("--force", is_flag=True,
              help="List the extents of a capture that lost records (the map is incomplete).")
def diff(capture_file: Path, until_mark: str | None, fmt_name: str, as_json: bool,
         force: bool) -> None:
    """The changed extents in FILE (what an incremental backup copies).

    Merged and sorted, in 512-byte sectors unless --format bytes or
    qemu-map. A capture that lost records is refused: its map would miss
    blocks.
    """
    from imgrement_dm import increment, render

    found = increment.extents(capture_file, _stop_at(until_mark), force=force)
    fmt_name = "json" if as_json else fmt_name
    if fmt_name == "json":
        click.echo(render.dumps([[a, n] for a, n in found.spans]))
    elif fmt_name == "bytes":
        for a, n in found.spans:
            click.echo(f"{a * 512} {n * 512}")
    elif fmt_name == "qemu-map":
        click.echo(render.dumps(increment.qemu_map(found.spans, found.size)))
    else:
        for a, n in found.spans:
            click.echo(f"{a}+{n}")
    if found.drops:
        click.echo(f"imgrement-dm: warning: {capture_file} lost {found.drops} record(s): "
                   "this map is incomplete, blocks written by the lost ones are missing",
                   err=True)


@main.command()
@click.argument("capture_file", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--format", "fmt_name", type=click.Choice(["blktrace", "jsonl", "log-writes"]),
              required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="PREFIX for blktrace (writes PREFIX.blktrace.0), else the file.")
@click.option("--device", default="253:0", show_default=True,
              help="major:minor to put in blktrace events.")
@click.option("-x", "--payload", is_flag=True, help="jsonl: include payloads as hex.")
@_progress_option
def export(capture_file: Path, fmt_name: str, output: Path, device: str, payload: bool,
           progress_mode: str) -> None:
    """Write FILE in a format other tools read: blktrace, jsonl or log-writes."""
    from imgrement_dm.formats import export as export_fmt
    from imgrement_dm.output import is_stdout

    major, _, minor = device.partition(":")
    if not (major.isdigit() and minor.isdigit()):
        raise click.BadParameter(f"{device!r} is not major:minor", param_hint="--device")
    if int(major) >= 1 << 12 or int(minor) >= 1 << 20:
        raise click.BadParameter(f"{device!r}: a Linux device number has a major below 4096 "
                                 "and a minor below 1048576", param_hint="--device")
    to_stdout = is_stdout(output)
    dest = Path(f"{output}.blktrace.0") if fmt_name == "blktrace" and not to_stdout else output
    with _meter(progress_mode, "export") as m:
        n = export_fmt.export_capture(capture_file, fmt_name, dest,
                                      device=(int(major), int(minor)), with_payload=payload,
                                      progress=m)
    # with -o -, the data is standard output: the summary goes to stderr
    if fmt_name == "blktrace":
        click.echo(f"{dest}: {n} bios; read it with 'blkparse -i {output}'", err=to_stdout)
    else:
        click.echo(f"{output}: {n} entries", err=to_stdout)


@main.command("plot")
@click.argument("capture_file", metavar="FILE", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="The PNG to write.")
def plot_cmd(capture_file: Path, output: Path) -> None:
    """Draw FILE as sector over time (reads blue, writes red, marks as lines)."""
    from imgrement_dm.formats import files
    from imgrement_dm.formats.capture import CaptureReader
    from imgrement_dm.formats.plot import plot
    from imgrement_dm.output import atomic_output, check_writable, is_stdout

    check_writable(output, inputs=(capture_file,), stream_ok=True)
    files.require_capture(capture_file, "plot")
    # items() raises on any damage; the PNG is then never renamed into place
    with CaptureReader(capture_file) as reader, \
            atomic_output(output, inputs=(capture_file,), stream_ok=True) as f:
        counts = plot(reader.items(), f, title=f"{reader.device}: sector over time")
    click.echo(f"{output}: {counts['reads']} reads, {counts['writes']} writes, "
               f"{counts['marks']} marks", err=is_stdout(output))


@main.group()
def autowrap() -> None:
    """Wrap hotplugged disks by policy (opt-in; see docs/autowrap.md).

    The policy file (default /etc/imgrement-dm/autowrap.conf, or
    $IMGREMENT_AUTOWRAP_CONF) has a [match] section of udev properties and
    patterns, e.g. "ID_BUS = usb"; an [options] section may set capture and
    buffer_kb.
    """


def _policy() -> aw.Policy:
    from imgrement_dm import autowrap as aw
    return aw.Policy.load(Path(os.environ.get("IMGREMENT_AUTOWRAP_CONF", aw.DEFAULT_CONF)))


@autowrap.command("handle")
@click.argument("devnode")
def autowrap_handle(devnode: str) -> None:
    """Apply the policy to one disk (run by the systemd service)."""
    from imgrement_dm import autowrap as aw

    aw.handle(devnode, _policy())


@autowrap.command("release")
@click.argument("devnode")
def autowrap_release(devnode: str) -> None:
    """Tear down the mapping of a disk that went away (run by the service)."""
    from imgrement_dm import autowrap as aw

    aw.release(devnode)


@autowrap.command("watch")
def autowrap_watch() -> None:
    """Apply the policy to disks as they come and go (for machines without systemd)."""
    from imgrement_dm import autowrap as aw

    policy = _policy()
    with contextlib.suppress(KeyboardInterrupt):
        aw.watch(policy)


@autowrap.command("enable")
def autowrap_enable() -> None:
    """Install the udev rule and the systemd unit, and reload udev."""
    from imgrement_dm import autowrap_install as aw_install

    for line in aw_install.enable():
        click.echo(line)


@autowrap.command("disable")
def autowrap_disable() -> None:
    """Remove the udev rule and the systemd unit, and reload udev."""
    from imgrement_dm import autowrap_install as aw_install

    for line in aw_install.disable():
        click.echo(line)


@autowrap.command("example")
def autowrap_example() -> None:
    """Print the example policy (shipped with the package; for pip installs without /etc).

    Save it as /etc/imgrement-dm/autowrap.conf and edit the [match] section:
    imgrement-dm autowrap example | sudo tee /etc/imgrement-dm/autowrap.conf
    """
    click.echo(resources.data_file("autowrap.conf.example").read_text(), nl=False)


@autowrap.command("status")
def autowrap_status() -> None:
    """Whether autowrap is enabled, the policy, and the wrapped disks."""
    from imgrement_dm import autowrap_install as aw_install

    for line in aw_install.status():
        click.echo(line)


if __name__ == "__main__":
    main(prog_name="imgrement-dm")
