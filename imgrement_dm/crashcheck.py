"""Every disk state a power cut could have left, built from a capture and checked.

The model (docs/crashcheck.md has it whole, with its limits): the traced disk
has a volatile write cache.  A write is *durable* once it is FUA, or once a
flush that was submitted after the write completed has itself completed.  A
crash at a *boundary* (the completion of a flush, of a FUA write, or a mark)
leaves every durable write, and any subset of the writes that completed but
were not yet durable (the *unflushed* ones): the cache may have written back
some, all or none of them, in any order.  Writes still in flight at the
boundary are taken as not persisted.

States, in this order, for each boundary: ``all`` (every completed write: what
in-order replay gives), then subsets of the unflushed writes: all of them
when there are at most ``exhaustive`` (2**n states), else ``none``, each one
alone, and all but each one (2n + 2).  A state's id, ``BOUNDARY:KEPT`` with
KEPT ``all``, ``none`` or the kept writes' sequence numbers, rebuilds it
(``imgrement-dm apply --state ID``).  States whose bytes are the same as an
earlier one's are checked once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from imgrement_dm import increment
from imgrement_dm.errors import CrashCheckError
from imgrement_dm.formats import files
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.output import atomic_path, check_writable
from imgrement_dm.records import BioRecord, Drop, Item, MarkRecord


@dataclass(frozen=True)
class Boundary:
    """Where a crash is considered: just after this record completed."""

    index: int
    kind: str  # "flush", "fua" or "mark"
    seq: int
    label: str
    completed: tuple[BioRecord, ...]  # every write completed by then, in completion order
    unflushed: tuple[BioRecord, ...]  # those of them not yet durable

    def describe(self) -> str:
        what = {"flush": "flush", "fua": "FUA write", "mark": "mark"}[self.kind]
        extra = f" {self.label!r}" if self.kind == "mark" else ""
        return f"after {what}{extra} (record {self.seq})"


@dataclass(frozen=True)
class State:
    boundary: Boundary
    kept: tuple[int, ...] | None  # seqs of unflushed writes kept; None: all of them

    @property
    def id(self) -> str:
        if self.kept is None:
            return f"{self.boundary.index}:all"
        return f"{self.boundary.index}:" + (",".join(map(str, self.kept)) or "none")

    def writes(self) -> list[BioRecord]:
        """The writes this state holds, in completion order."""
        if self.kept is None:
            return list(self.boundary.completed)
        dropped = {w.seq for w in self.boundary.unflushed} - set(self.kept)
        return [w for w in self.boundary.completed if w.seq not in dropped]

    def describe(self) -> str:
        n = len(self.boundary.unflushed)
        if n == 0:
            return f"state {self.id}: {self.boundary.describe()}, every write durable"
        kept = n if self.kept is None else len(self.kept)
        return (f"state {self.id}: {self.boundary.describe()}, {kept} of {n} unflushed "
                f"write(s) kept")


def boundaries(items: Iterable[Item]) -> list[Boundary]:
    """The crash points of a capture and what each leaves, by the model above."""
    events: list[tuple[int, int, BioRecord | MarkRecord]] = []
    for item in items:
        if isinstance(item, Drop):
            raise CrashCheckError(
                f"the capture lost {item.count} record(s): its crash states would be "
                "wrong. Record it losslessly ('record' waits for the reader by default)")
        if isinstance(item, MarkRecord):
            events.append((item.time_ns, item.seq, item))
        else:
            events.append((item.complete_ns, item.seq, item))
    events.sort(key=lambda e: (e[0], e[1]))
    completed: list[BioRecord] = []
    durable: set[int] = set()
    flush_submits: list[int] = []  # submit times of completed flushes
    found: list[Boundary] = []

    def boundary(kind: str, seq: int, label: str) -> None:
        horizon = max(flush_submits, default=-1)
        for w in completed:
            if w.complete_ns <= horizon:
                durable.add(w.seq)
        unflushed = tuple(w for w in completed if w.seq not in durable)
        found.append(Boundary(len(found), kind, seq, label, tuple(completed), unflushed))

    for _, _, ev in events:
        if isinstance(ev, MarkRecord):
            boundary("mark", ev.seq, ev.label)
            continue
        if ev.status != 0:
            continue  # refused by the device: changed nothing, persisted nothing
        is_flush = ev.op_name == "flush" or bool(ev.flags & increment.PREFLUSH_FLAG)
        if is_flush:
            flush_submits.append(ev.submit_ns)
        if ev.op_name in increment.CHANGING_OPS:
            if ev.op_name == "write" and not ev.has_payload:
                raise CrashCheckError(
                    f"write {ev.seq} was recorded without its data (capture mode meta): "
                    "record with capture writes or all")
            completed.append(ev)
            if ev.op_name == "write" and ev.flags & increment.FUA_FLAG:
                durable.add(ev.seq)
                boundary("fua", ev.seq, "")
                continue
        if is_flush:
            boundary("flush", ev.seq, "")
    return found


def _subsets(unflushed: Sequence[BioRecord], exhaustive: int) -> Iterator[tuple[int, ...]]:
    seqs = [w.seq for w in unflushed]
    n = len(seqs)
    if n <= exhaustive:
        for k in range(n + 1):
            yield from itertools.combinations(seqs, k)
        return
    yield ()
    for s in seqs:
        yield (s,)
    for s in seqs:
        yield tuple(x for x in seqs if x != s)


def states(bounds: Sequence[Boundary], exhaustive: int = 6) -> Iterator[State]:
    """Every state of every boundary, in the documented order (duplicates included)."""
    for b in bounds:
        yield State(b, None)
        every = tuple(w.seq for w in b.unflushed)
        for kept in _subsets(b.unflushed, exhaustive):
            if kept != every:
                yield State(b, kept)


def content_key(writes: Sequence[BioRecord]) -> str:
    """A digest of what ``writes`` leave on the disk: equal keys, equal images."""
    blocks: dict[int, bytes] = {}
    for w in writes:
        data = bytes(w.payload) if w.op_name == "write" else bytes(w.size)
        for i in range(w.size // 512):
            blocks[w.sector + i] = data[i * 512:(i + 1) * 512]
    h = hashlib.sha256()
    for sector in sorted(blocks):
        h.update(sector.to_bytes(8, "little"))
        h.update(blocks[sector])
    return h.hexdigest()


class Unique(NamedTuple):
    states: list[State]  # deduplicated by content, at most the limit
    enumerated: int  # states looked at to find them
    stopped: bool  # the limit left out at least one more distinct state


def unique_states(bounds: Sequence[Boundary], *, exhaustive: int = 6,
                  limit: int | None = None) -> Unique:
    """States deduplicated by content, at most ``limit``; how many were
    enumerated; and whether the limit left out another distinct one (looked
    for, so that a capture with exactly ``limit`` states is not said to stop)."""
    seen: set[str] = set()
    out: list[State] = []
    enumerated = 0
    for st in states(bounds, exhaustive):
        key = content_key(st.writes())
        if key in seen:
            enumerated += 1
            continue
        if limit is not None and len(out) >= limit:
            return Unique(out, enumerated, True)
        enumerated += 1
        seen.add(key)
        out.append(st)
    return Unique(out, enumerated, False)


def load(capture: Path) -> tuple[list[Boundary], int]:
    """The capture's boundaries, and the traced device's size in bytes."""
    files.require_capture(capture, "crashcheck")
    with CaptureReader(capture) as check:
        check.validate()
    reader = CaptureReader(capture)
    try:
        return boundaries(reader.items()), reader.sectors * 512
    finally:
        reader.close()


def crash_boundaries(capture: Path, base: Path) -> tuple[list[Boundary], int]:
    """The capture's boundaries and the device's size, once the capture is
    whole, BASE (an image or a device) is large enough, and there is at least
    one boundary to check."""
    bounds, size = load(capture)
    increment.check_base(base, size)
    if not bounds:
        raise CrashCheckError(f"{capture} has no flush, FUA write or mark: there is no "
                              "point a power cut could have left, so nothing to check "
                              "(sync or mark inside the workload)")
    return bounds, size


def find(bounds: Sequence[Boundary], state_id: str) -> State:
    """The state named ``BOUNDARY:KEPT``, as crashcheck reported it."""
    b_text, _, kept_text = state_id.partition(":")
    if not b_text.isdigit() or not kept_text:
        raise CrashCheckError(f"{state_id!r} is not a state id: crashcheck names them "
                              "BOUNDARY:all, BOUNDARY:none or BOUNDARY:SEQ,SEQ,...")
    index = int(b_text)
    if index >= len(bounds):
        raise CrashCheckError(f"the capture has {len(bounds)} boundaries; there is no "
                              f"boundary {index}")
    b = bounds[index]
    if kept_text == "all":
        return State(b, None)
    parts = [] if kept_text == "none" else kept_text.split(",")
    if not all(p.isdigit() for p in parts):
        raise CrashCheckError(f"{state_id!r} is not a state id: after the colon comes all, "
                              "none or sequence numbers separated by commas (BOUNDARY:SEQ,SEQ)")
    kept = tuple(int(x) for x in parts)
    unknown = set(kept) - {w.seq for w in b.unflushed}
    if unknown:
        raise CrashCheckError(f"write(s) {sorted(unknown)} are not among boundary {index}'s "
                              f"unflushed writes {[w.seq for w in b.unflushed]}")
    return State(b, tuple(sorted(kept)))


#: A sparse, reflinked copy of an image (increment.clone, kept here by name).
clone = increment.clone


def build(state: State, base: Path, dest: Path, size: int) -> None:
    """The state's image at ``dest``: a cheap copy of ``base`` with its writes."""
    increment.check_base(base, size)
    clone(base, dest)
    fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
    try:
        increment.apply_to_fd(fd, state.writes(), size, None)
    finally:
        os.close(fd)


def build_state(capture: Path, base: Path, state_id: str, out: Path) -> State:
    """Rebuild the crash state ``state_id`` (as crashcheck named it) of
    ``capture`` over ``base`` at ``out``, written whole or not at all."""
    inputs = (base, capture)
    check_writable(out, inputs=inputs)
    bounds, size = load(capture)
    state = find(bounds, state_id)
    with atomic_path(out, inputs=inputs) as part:
        build(state, base, part, size)
    return state


@dataclass
class Result:
    state: State
    code: int
    output: str = field(repr=False)
    timed_out: bool = False  # the check ran past --timeout and was killed
    image: Path | None = None  # where the state's image was kept (a failing one)

    @property
    def passed(self) -> bool:
        return self.code == 0 and not self.timed_out


#: How often a running check looks at the stop flag and its time limit.
_POLL = 0.2


def _end(proc: subprocess.Popen[str], sig: int) -> tuple[str, str]:
    """Signal the check's whole process group (it runs in a session of its
    own) and collect what it printed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


def run_check(state: State, base: Path, size: int, check: Sequence[str], workdir: Path,
              keep: bool, *, timeout: float | None = None,
              stop: threading.Event | None = None) -> Result | None:
    """Build the state, run CHECK on it ({} is its path, also in $IMGREMENT_STATE, and
    its id in $IMGREMENT_STATE_ID), and remove it unless it failed and is to be kept.

    A check that runs past ``timeout`` seconds is killed (its process group)
    and fails as timed out.  Once ``stop`` is set, the check is ended and
    None returned: the state was not decided.  The check runs in a session of
    its own, so a Ctrl-C at the terminal reaches crashcheck, which ends it."""
    if stop is not None and stop.is_set():
        return None
    img = workdir / f"state-{state.id.replace(':', '-').replace(',', '_')}.img"
    build(state, base, img, size)
    argv = [a.replace("{}", str(img)) for a in check]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "IMGREMENT_STATE": str(img),
                                     "IMGREMENT_STATE_ID": state.id})
    except OSError as e:
        img.unlink(missing_ok=True)
        raise CrashCheckError(f"cannot run the check {argv[0]!r}: {e.strerror}") from None
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    while True:
        try:
            out, err = proc.communicate(timeout=_POLL)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop is not None and stop.is_set():
            _end(proc, signal.SIGTERM)
            img.unlink(missing_ok=True)
            return None
        if deadline is not None and time.monotonic() > deadline:
            out, err = _end(proc, signal.SIGKILL)
            timed_out = True
            break
    result = Result(state, proc.returncode, (out + err).strip(), timed_out=timed_out)
    if result.passed or not keep:
        img.unlink(missing_ok=True)
    else:
        result.image = img
    return result


@contextlib.contextmanager
def _workdir(where: Path | None, base: Path) -> Iterator[Path]:
    """``where``, or a new folder beside BASE (the same file system: reflinks can
    share its extents), or in /var/tmp when BASE's folder is not writable.  A
    new folder goes at the end unless a kept image is in it."""
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        yield where
        return
    try:
        d = Path(tempfile.mkdtemp(prefix=".imgrement-crashcheck-", dir=base.parent))
    except OSError:
        d = Path(tempfile.mkdtemp(prefix="imgrement-crashcheck-", dir="/var/tmp"))
    try:
        yield d
    finally:
        if not any(d.glob("state-*.img")):
            shutil.rmtree(d, ignore_errors=True)


def check_all(todo: Sequence[State], base: Path, size: int, check: Sequence[str], *,
              jobs: int, workdir: Path | None = None, keep_failing: bool = False,
              report: Callable[[Result], None] | None = None, timeout: float | None = None,
              stop: threading.Event | None = None) -> list[Result]:
    """Run CHECK on every state, ``jobs`` at a time; results in state order.
    Once ``stop`` is set, running checks are ended and no more start: the
    results are those decided so far."""
    with _workdir(workdir, base) as wd, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_check, st, base, size, check, wd, keep_failing,
                               timeout=timeout, stop=stop)
                   for st in todo]
        results = []
        for f in futures:
            r = f.result()
            if r is None:
                continue
            if report:
                report(r)
            results.append(r)
        return results


def bisect(bounds: Sequence[Boundary], base: Path, size: int, check: Sequence[str], *,
           workdir: Path | None = None,
           report: Callable[[Result], None] | None = None) -> Result | None:
    """The first boundary whose in-order state fails, in about log2(n) checks;
    None if the last one passes.  Assumes that once failing, later ones fail too
    (true of damage that persists; a check that flips back may mislead it)."""
    with _workdir(workdir, base) as wd:
        def test(i: int) -> Result:
            r = run_check(State(bounds[i], None), base, size, check, wd, keep=False)
            assert r is not None  # without a stop flag, every state is decided
            if report:
                report(r)
            return r

        if not bounds:
            return None
        last = test(len(bounds) - 1)
        if last.passed:
            return None
        lo, hi, first = 0, len(bounds) - 1, last
        while lo < hi:
            mid = (lo + hi) // 2
            r = test(mid)
            if r.passed:
                lo = mid + 1
            else:
                hi, first = mid, r
        return first


@dataclass
class Summary:
    """What a crashcheck run found (check_capture)."""

    boundaries: int
    enumerated: int  # states looked at
    to_check: int  # distinct states chosen, at most max_states
    stopped: bool  # max_states left out at least one more distinct state
    max_states: int
    results: list[Result]  # those decided (fewer if stopped by a signal)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.passed]

    @property
    def kept(self) -> list[str]:
        """The folders holding kept images of failing states."""
        return sorted({str(r.image.parent) for r in self.failed if r.image is not None})

    def describe(self, *, interrupted_by: int = 0) -> str:
        """The summary line; ``interrupted_by``: the signal that ended the run."""
        timed_out = sum(r.timed_out for r in self.failed)
        more = (f" (stopped at --max-states {self.max_states}: there are more)"
                if self.stopped else "")
        cut = (f", interrupted by {signal.Signals(interrupted_by).name} after "
               f"{len(self.results)} of {self.to_check}" if interrupted_by else "")
        slow = f" ({timed_out} timed out)" if timed_out else ""
        return (f"{self.boundaries} boundaries, {self.enumerated} states enumerated, "
                f"{self.to_check} distinct to check{more}{cut}: {len(self.results)} "
                f"checked, {len(self.failed)} failed{slow}")


def check_capture(bounds: Sequence[Boundary], base: Path, size: int, check: Sequence[str], *,
                  max_states: int = 1000, exhaustive: int = 6, jobs: int = 1,
                  workdir: Path | None = None, keep_failing: bool = False,
                  timeout: float | None = None, stop: threading.Event | None = None,
                  report: Callable[[Result], None] | None = None) -> Summary:
    """Run CHECK on every distinct crash state of ``bounds`` (see
    :func:`crash_boundaries`), at most ``max_states``, ``jobs`` at a time."""
    todo, enumerated, stopped = unique_states(bounds, exhaustive=exhaustive, limit=max_states)
    results = check_all(todo, base, size, check, jobs=jobs, workdir=workdir,
                        keep_failing=keep_failing, report=report, timeout=timeout, stop=stop)
    return Summary(len(bounds), enumerated, len(todo), stopped, max_states, results)
