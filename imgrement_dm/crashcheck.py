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
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from imgrement_dm import increment
from imgrement_dm.changes import CHANGING_OPS, FUA_FLAG, PREFLUSH_FLAG, Change, change_of
from imgrement_dm.errors import CrashCheckError
from imgrement_dm.formats import files
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.output import atomic_path, check_writable
from imgrement_dm.progress import Progress, metered
from imgrement_dm.records import Drop, MarkRecord
from imgrement_dm.stateimages import StateImages


@dataclass(frozen=True)
class Boundary:
    """Where a crash is considered: just after this record completed.

    What it leaves is held without copies: the writes completed by then are
    the first ``upto`` of the capture's (:class:`Listing`), the last
    ``len(tail)`` of them completed after the latest flush's reach (the FUA
    ones durable all the same, the others ``unflushed``).
    """

    index: int
    kind: str  # "flush", "fua" or "mark"
    seq: int
    label: str
    upto: int
    unflushed: tuple[Change, ...]  # completed writes not yet durable
    tail: tuple[Change, ...] = field(repr=False)  # writes after the flush horizon
    durable_key: int = field(repr=False)  # the content key of writes[:upto - len(tail)]
    atoms: tuple[tuple[int, int, int], ...] = field(repr=False)  # see _atoms
    listing: Listing = field(repr=False, compare=False)
    acks: int = 0  # acknowledgements made by then: the first ``acks`` of listing.acks

    @property
    def acked(self) -> list[str]:
        """The labels of every ack mark made by this boundary (it included),
        in order: what a state here must still hold (docs/crashcheck.md)."""
        return self.listing.acks[:self.acks]

    @property
    def completed(self) -> list[Change]:
        """Every write completed by then, in completion order."""
        return self.listing.writes[:self.upto]

    def describe(self) -> str:
        what = {"flush": "flush", "fua": "FUA write", "mark": "mark"}[self.kind]
        extra = f" {self.label!r}" if self.kind == "mark" else ""
        return f"after {what}{extra} (record {self.seq})"

    def key(self, kept: tuple[int, ...] | None) -> int:
        """The content key of the state that keeps ``kept`` (None: all) of the
        unflushed writes: equal keys, equal images (see :class:`Hasher`)."""
        if not self.tail:
            return self.durable_key
        h = self.listing.hasher
        drop = set() if kept is None else {w.seq for w in self.unflushed} - set(kept)
        starts = [a for a, _, _ in self.atoms]
        owner: list[Change | None] = [None] * len(self.atoms)
        for w in self.tail:  # in completion order: the last one wins
            if w.seq in drop or w.size < 512:
                continue
            i = bisect_right(starts, w.sector) - 1
            j = bisect_left(starts, w.end)
            owner[i:j] = [w] * (j - i)
        key = self.durable_key
        for (a, b, durable), last in zip(self.atoms, owner):
            if last is not None:
                key += h.contribution(last, a, b) - durable
        return key % MOD


@dataclass
class Listing:
    """What a capture's boundaries share: every completed write, in completion
    order, the capture they are read from, and their sector hashes."""

    capture: Path
    writes: list[Change]
    hasher: Hasher
    acks: list[str] = field(default_factory=list)  # the ack marks' labels, in order


@dataclass(frozen=True)
class State:
    boundary: Boundary
    kept: tuple[int, ...] | None  # seqs of unflushed writes kept; None: all of them

    @property
    def id(self) -> str:
        if self.kept is None:
            return f"{self.boundary.index}:all"
        return f"{self.boundary.index}:" + (",".join(map(str, self.kept)) or "none")

    def writes(self) -> list[Change]:
        """The writes this state holds, in completion order."""
        b = self.boundary
        if self.kept is None:
            return b.completed
        return b.listing.writes[:b.upto - len(b.tail)] + self.tail_writes()

    def tail_writes(self) -> list[Change]:
        """The writes it holds of its boundary's tail (after the durable ones)."""
        b = self.boundary
        if self.kept is None:
            return list(b.tail)
        dropped = {w.seq for w in b.unflushed} - set(self.kept)
        return [w for w in b.tail if w.seq not in dropped]

    def key(self) -> int:
        return self.boundary.key(self.kept)

    @property
    def acked(self) -> list[str]:
        """What the application had acknowledged by this state's boundary."""
        return self.boundary.acked

    def describe(self) -> str:
        n = len(self.boundary.unflushed)
        if n == 0:
            return f"state {self.id}: {self.boundary.describe()}, every write durable"
        kept = n if self.kept is None else len(self.kept)
        return (f"state {self.id}: {self.boundary.describe()}, {kept} of {n} unflushed "
                f"write(s) kept")


#: A mark labelled ``ack:LABEL`` says the application acknowledged LABEL
#: (told its user it was saved) by then: every state from that boundary on
#: must still hold it (docs/crashcheck.md, "The acknowledgement oracle").
ACK_PREFIX = "ack:"

#: Content keys are sums modulo this prime (a Mersenne prime: 2**127 - 1).
MOD = (1 << 127) - 1


class Hasher:
    """Content keys of disk images, built by difference.

    An image's key is the sum, over every sector some write touched, of
    R**sector times a 16-byte BLAKE2b of that sector's bytes, modulo
    :data:`MOD`: a polynomial in R, so two images with different bytes in
    some sector get the same key only if R is a root of their difference, a
    chance below 2**-90 for R drawn at random per run (Schwartz-Zippel, degree
    under 2**37). Being a sum, the key of a range a write replaced is taken
    out and the write's put in, in the time of that range, never the disk's:
    each data write keeps the prefix sums of its own sectors (16 bytes a
    sector), and a zeroed range's sum is a geometric series.
    """

    def __init__(self, r: int | None = None) -> None:
        self.r = r if r is not None else random.SystemRandom().randrange(2, MOD - 1)
        self._inv = pow(self.r - 1, -1, MOD)
        self._zero = _digest(bytes(512))
        self._sums: dict[int, bytes] = {}

    def add_write(self, seq: int, payload: memoryview) -> None:
        """Keep the prefix sums of a data write's sectors (in its own powers of R)."""
        r, total, power = self.r, 0, 1
        out = bytearray(16 * (len(payload) // 512 + 1))
        for i in range(len(payload) // 512):
            total = (total + power * _digest(payload[i * 512:(i + 1) * 512])) % MOD
            power = power * r % MOD
            out[16 * (i + 1):16 * (i + 2)] = total.to_bytes(16, "little")
        self._sums[seq] = bytes(out)

    def contribution(self, w: Change, a: int, b: int) -> int:
        """The key's share of sectors [a, b) as ``w`` left them."""
        if w.op_name != "write":
            n = b - a
            return (self._zero * pow(self.r, a, MOD) * (pow(self.r, n, MOD) - 1) * self._inv
                    % MOD)
        sums = self._sums[w.seq]
        i, j = a - w.sector, b - w.sector
        lo = int.from_bytes(sums[16 * i:16 * i + 16], "little")
        hi = int.from_bytes(sums[16 * j:16 * j + 16], "little")
        return pow(self.r, w.sector, MOD) * (hi - lo) % MOD


def _digest(sector: bytes | memoryview) -> int:
    return int.from_bytes(hashlib.blake2b(sector, digest_size=16).digest(), "little")


class _Durable:
    """The durable image as extents (sorted, disjoint sector ranges, each with
    the write that left it) and its content key, kept as writes become durable."""

    def __init__(self, hasher: Hasher) -> None:
        self.h = hasher
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.owners: list[Change] = []
        self.key = 0

    def add(self, w: Change) -> None:
        a, b = w.sector, w.end
        if a >= b:
            return
        starts, ends, owners, h = self.starts, self.ends, self.owners, self.h
        i = bisect_right(ends, a)  # the first extent that ends after a
        j = bisect_left(starts, b)  # the first that starts at or after b
        new_s, new_e, new_o = [], [], []
        for k in range(i, j):
            s, e, o = starts[k], ends[k], owners[k]
            self.key -= h.contribution(o, max(s, a), min(e, b))
            if s < a:
                new_s.append(s)
                new_e.append(a)
                new_o.append(o)
        new_s.append(a)
        new_e.append(b)
        new_o.append(w)
        if j > i and ends[j - 1] > b:
            new_s.append(b)
            new_e.append(ends[j - 1])
            new_o.append(owners[j - 1])
        starts[i:j], ends[i:j], owners[i:j] = new_s, new_e, new_o
        self.key = (self.key + h.contribution(w, a, b)) % MOD

    def covered(self, a: int, b: int) -> int:
        """The key's share of sectors [a, b) (0 where no durable write is)."""
        i = bisect_right(self.ends, a)
        total = 0
        while i < len(self.starts) and self.starts[i] < b:
            lo, hi = max(self.starts[i], a), min(self.ends[i], b)
            total += self.h.contribution(self.owners[i], lo, hi)
            i += 1
        return total % MOD


def _atoms(tail: Sequence[Change], durable: _Durable) -> tuple[tuple[int, int, int], ...]:
    """The pieces the tail's writes cut the disk into, where any of them wrote,
    each with the durable image's share of the key there: what a state's key
    changes from the durable one's."""
    cuts = sorted({x for w in tail if w.size >= 512 for x in (w.sector, w.end)})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        if any(w.sector < b and w.end > a for w in tail if w.size >= 512):
            out.append((a, b, durable.covered(a, b)))
    return tuple(out)


class _Event(NamedTuple):
    time: int
    seq: int
    kind: str  # "mark", "flush", "write" (any change), "flush-write" (a change with preflush)
    change: Change | None
    submit_ns: int
    label: str


def _events(reader: CaptureReader, hasher: Hasher,
            progress: Progress | None = None) -> list[_Event]:
    """What decides the boundaries, read once (and checked whole on the way),
    in completion order; data writes' sectors hashed as they go by."""
    events: list[_Event] = []
    for item in metered(reader.items(), reader, progress):
        if isinstance(item, Drop):
            raise CrashCheckError(
                f"the capture lost {item.count} record(s): its crash states would be "
                "wrong. Record it losslessly ('record' waits for the reader by default)")
        if isinstance(item, MarkRecord):
            events.append(_Event(item.time_ns, item.seq, "mark", None, 0, item.label))
            continue
        if item.status != 0:
            continue  # refused by the device: changed nothing, persisted nothing
        op = item.op_name
        is_flush = op == "flush" or bool(item.flags & PREFLUSH_FLAG)
        change = None
        if op in CHANGING_OPS:
            if op == "write" and not item.has_payload:
                raise CrashCheckError(
                    f"write {item.seq} was recorded without its data (capture mode meta): "
                    "record with capture writes or all")
            change = change_of(item, reader.chunk_at)
            if op == "write":
                hasher.add_write(item.seq, item.payload)
        elif not is_flush:
            continue
        kind = ("flush-write" if is_flush else "write") if change else "flush"
        events.append(_Event(item.complete_ns, item.seq, kind, change, item.submit_ns, ""))
    events.sort(key=lambda e: (e.time, e.seq))
    return events


def boundaries(capture: Path, reader: CaptureReader, hasher: Hasher | None = None,
               progress: Progress | None = None) -> list[Boundary]:
    """The crash points of a capture and what each leaves, by the model above.

    One walk in completion order: the writes a flush made durable move from
    the tail into the durable image's extents as the flush completes, so a
    boundary costs its tail, not the capture before it.
    """
    hasher = hasher or Hasher()
    listing = Listing(capture, [], hasher)
    writes = listing.writes
    durable = _Durable(hasher)
    tail: deque[Change] = deque()
    horizon = -1  # the latest submit time of a completed flush
    found: list[Boundary] = []

    def boundary(kind: str, seq: int, label: str) -> None:
        while tail and tail[0].complete_ns <= horizon:
            durable.add(tail.popleft())
        t = tuple(tail)
        unflushed = tuple(w for w in t if not (w.op_name == "write" and w.flags & FUA_FLAG))
        found.append(Boundary(len(found), kind, seq, label, len(writes), unflushed, t,
                              durable.key, _atoms(t, durable) if t else (), listing,
                              len(listing.acks)))

    for ev in _events(reader, hasher, progress):
        if ev.kind == "mark":
            if ev.label.startswith(ACK_PREFIX) and len(ev.label) > len(ACK_PREFIX):
                listing.acks.append(ev.label[len(ACK_PREFIX):])
            boundary("mark", ev.seq, ev.label)
            continue
        if ev.kind != "write":
            horizon = max(horizon, ev.submit_ns)
        if ev.change is not None:
            writes.append(ev.change)
            tail.append(ev.change)
            if ev.change.op_name == "write" and ev.change.flags & FUA_FLAG:
                boundary("fua", ev.seq, "")
                continue
        if ev.kind != "write":
            boundary("flush", ev.seq, "")
    return found


def _subsets(unflushed: Sequence[Change], exhaustive: int) -> Iterator[tuple[int, ...]]:
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


class Unique(NamedTuple):
    states: list[State]  # deduplicated by content, at most the limit
    enumerated: int  # states looked at to find them
    stopped: bool  # the limit left out at least one more distinct state


def unique_states(bounds: Sequence[Boundary], *, exhaustive: int = 6,
                  limit: int | None = None) -> Unique:
    """States deduplicated by content (and by the acknowledgements they must
    hold: a later boundary with the same bytes but more acks is checked too),
    at most ``limit``; how many were enumerated; and whether the limit left
    out another distinct one (looked for, so that a capture with exactly
    ``limit`` states is not said to stop)."""
    seen: set[tuple[int, int]] = set()
    out: list[State] = []
    enumerated = 0
    for st in states(bounds, exhaustive):
        # the same bytes under more acknowledgements is another question
        key = (st.key(), st.boundary.acks)
        if key in seen:
            enumerated += 1
            continue
        if limit is not None and len(out) >= limit:
            return Unique(out, enumerated, True)
        enumerated += 1
        seen.add(key)
        out.append(st)
    return Unique(out, enumerated, False)


def load(capture: Path, progress: Progress | None = None) -> tuple[list[Boundary], int]:
    """The capture's boundaries, and the traced device's size in bytes, from
    one pass that also checks the capture whole (``progress``: bytes read)."""
    files.require_capture(capture, "crashcheck")
    with CaptureReader(capture) as reader:
        return boundaries(capture, reader, progress=progress), reader.sectors * 512


def crash_boundaries(capture: Path, base: Path,
                     progress: Progress | None = None) -> tuple[list[Boundary], int]:
    """The capture's boundaries and the device's size, once the capture is
    whole, BASE (an image or a device) is large enough, and there is at least
    one boundary to check."""
    bounds, size = load(capture, progress)
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
    capture = state.boundary.listing.capture
    try:
        source = os.open(capture, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CrashCheckError(f"cannot read {capture}: {e.strerror}") from None
    try:
        fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
        try:
            increment.apply_to_fd(fd, state.writes(), source, size)
        finally:
            os.close(fd)
    finally:
        os.close(source)


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
    lost: tuple[str, ...] = ()  # acknowledged labels the check found missing

    @property
    def passed(self) -> bool:
        return self.code == 0 and not self.timed_out and not self.lost

    @property
    def verdict(self) -> str:
        """``passed``, ``lost acknowledged data`` (the check named acked
        labels the state lacks), ``timed out`` or ``inconsistent`` (the
        check failed otherwise)."""
        if self.lost:
            return LOST
        if self.timed_out:
            return "timed out"
        return "passed" if self.code == 0 else "inconsistent"


#: The verdict of a state missing data the application had acknowledged.
LOST = "lost acknowledged data"


class LostAcknowledged(Exception):  # noqa: N818 (a verdict, raised by a check)
    """Raised by a Python check: the state lacks these acknowledged labels.

    (A command check writes them to the file $IMGREMENT_LOST instead.)"""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        shown = ", ".join(self.labels[:10]) + (" ..." if len(self.labels) > 10 else "")
        super().__init__(f"{len(self.labels)} acknowledged label(s) missing: {shown}")


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


def image_path(workdir: Path, state: State) -> Path:
    """Where the state's image is made (and kept, if it fails and is to be)."""
    return workdir / f"state-{state.id.replace(':', '-').replace(',', '_')}.img"


#: What checks a state: a command (argv, ``{}`` standing for the image's
#: path), or a Python function of the image's path and the state that returns
#: whether the state passes (one that raises fails it, with the exception's
#: text as its output).  A function runs in crashcheck's own process, in a
#: thread of the pool: no process start a state, no ``timeout`` (a thread
#: cannot be killed), and it may only read the image or change it in place.
#: Either may find data the application acknowledged missing (``state.acked``
#: or $IMGREMENT_ACKED): a function raises :class:`LostAcknowledged`, a
#: command writes the labels to $IMGREMENT_LOST; the state's verdict is then
#: :data:`LOST`, not merely failed.
Check = Sequence[str] | Callable[[Path, State], bool]


def _call(check: Callable[[Path, State], bool], img: Path,
          state: State) -> tuple[int, str, tuple[str, ...]]:
    try:
        return (0, "", ()) if check(img, state) else (1, "the check returned False", ())
    except LostAcknowledged as e:
        return 1, str(e), e.labels
    except Exception as e:  # a failing check is a failing state
        return 1, f"{type(e).__name__}: {e}", ()


def _ack_files(img: Path, state: State) -> tuple[Path, Path]:
    """The files a command check is given beside its image: the labels it
    must find ($IMGREMENT_ACKED, one a line) and where it names the ones it
    did not ($IMGREMENT_LOST, empty)."""
    acked = img.with_name(img.name + ".acked")
    lost = img.with_name(img.name + ".lost")
    acked.write_text("".join(f"{a}\n" for a in state.acked))
    lost.write_bytes(b"")
    return acked, lost


def _read_lost(lost: Path) -> tuple[str, ...]:
    try:
        text = lost.read_text(errors="replace")
    except FileNotFoundError:
        return ()
    return tuple(line for line in text.splitlines() if line.strip())


def run_check(state: State, base: Path, size: int, check: Check, workdir: Path,
              keep: bool, *, timeout: float | None = None,
              stop: threading.Event | None = None, lent: bool = False) -> Result | None:
    """Build the state (unless ``lent``: its image is made, and the caller
    takes it back), run CHECK on it ({} is its path, also in
    $IMGREMENT_STATE, and its id in $IMGREMENT_STATE_ID; the labels it must
    hold in the file $IMGREMENT_ACKED, the last in $IMGREMENT_LAST_ACK), and
    remove it unless it failed and is to be kept.

    A check that runs past ``timeout`` seconds is killed (its process group)
    and fails as timed out.  Once ``stop`` is set, the check is ended and
    None returned: the state was not decided.  The check runs in a session of
    its own, so a Ctrl-C at the terminal reaches crashcheck, which ends it."""
    img = image_path(workdir, state)

    def drop() -> None:
        if not lent:
            img.unlink(missing_ok=True)

    if stop is not None and stop.is_set():
        drop()
        return None
    if not lent:
        build(state, base, img, size)
    if callable(check):
        code, output, lost = _call(check, img, state)
        result = Result(state, code, output, lost=lost)
        if result.passed or not keep:
            drop()
        else:
            result.image = img
        return result
    argv = [a.replace("{}", str(img)) for a in check]
    acked, lost_file = _ack_files(img, state)

    def drop_all() -> None:
        drop()
        acked.unlink(missing_ok=True)
        lost_file.unlink(missing_ok=True)

    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "IMGREMENT_STATE": str(img),
                                     "IMGREMENT_STATE_ID": state.id,
                                     "IMGREMENT_ACKED": str(acked),
                                     "IMGREMENT_LAST_ACK": (state.acked or [""])[-1],
                                     "IMGREMENT_LOST": str(lost_file)})
    except OSError as e:
        drop_all()
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
            drop_all()
            return None
        if deadline is not None and time.monotonic() > deadline:
            out, err = _end(proc, signal.SIGKILL)
            timed_out = True
            break
    result = Result(state, proc.returncode, (out + err).strip(), timed_out=timed_out,
                    lost=_read_lost(lost_file))
    acked.unlink(missing_ok=True)
    lost_file.unlink(missing_ok=True)
    if result.passed or not keep:
        drop()
    else:
        result.image = img
    return result


def _check_lent(images: StateImages, state: State, base: Path, size: int,
                check: Check, workdir: Path, keep: bool, *, timeout: float | None,
                stop: threading.Event | None) -> Result | None:
    """run_check on an image ``images`` made, given back to it afterwards
    (unless it is kept: a failing state's, for the user)."""
    r = None
    try:
        r = run_check(state, base, size, check, workdir, keep, timeout=timeout, stop=stop,
                      lent=True)
    finally:
        images.give_back(image_path(workdir, state), keep=r is not None and r.image is not None)
    return r


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


def check_all(todo: Sequence[State], base: Path, size: int, check: Check, *,
              jobs: int, workdir: Path | None = None, keep_failing: bool = False,
              report: Callable[[Result], None] | None = None, timeout: float | None = None,
              stop: threading.Event | None = None) -> list[Result]:
    """Run CHECK on every state, ``jobs`` at a time; results in state order.

    The states are built here, one after another, by difference
    (:class:`~imgrement_dm.stateimages.StateImages`: ``jobs`` images reused,
    never a copy of BASE each), at most ``jobs`` ahead of the checks that
    finished, and checked in the pool. Once ``stop`` is set, running checks
    are ended and no more start: the results are those decided so far."""
    results: list[Result] = []
    pending: deque[Future[Result | None]] = deque()

    def collect(block: bool) -> None:
        while pending and (block or pending[0].done()):
            r = pending.popleft().result()
            if r is None:
                continue
            if report:
                report(r)
            results.append(r)

    with _workdir(workdir, base) as wd, ThreadPoolExecutor(max_workers=jobs) as pool:
        capture = todo[0].boundary.listing.capture if todo else None
        images = StateImages(base, size, wd, capture) if capture is not None else None
        try:
            for st in todo:
                while not (stop is not None and stop.is_set()):
                    running = [f for f in pending if not f.done()]
                    if len(running) < jobs:
                        break
                    # wait for a running one: a finished one behind a slow
                    # head would make wait() return at once, and this spin
                    wait(running, timeout=_POLL, return_when=FIRST_COMPLETED)
                collect(block=False)
                if stop is not None and stop.is_set():
                    break
                assert images is not None
                b = st.boundary
                if b.listing.capture != capture:
                    raise CrashCheckError("check_all takes the states of one capture")
                images.make(b.listing.writes, b.upto - len(b.tail), st.tail_writes(),
                            image_path(wd, st))
                pending.append(pool.submit(_check_lent, images, st, base, size, check, wd,
                                           keep_failing, timeout=timeout, stop=stop))
                collect(block=False)
        finally:
            try:
                collect(block=True)  # every lent image given back
            finally:
                if images is not None:
                    images.close()
        return results


def bisect(bounds: Sequence[Boundary], base: Path, size: int, check: Check, *,
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
    seconds: float = 0.0  # the checking's wall time
    sampled_from: int = 0  # with a sample: the distinct states it was drawn from
    seed: int | None = None  # with a sample: its seed (the same seed, the same states)
    acks: int = 0  # ack marks in the capture

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.passed]

    @property
    def lost(self) -> list[Result]:
        """The states that lack data the application had acknowledged."""
        return [r for r in self.results if r.lost]

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
        why = [f"{len(self.lost)} {LOST}"] if self.lost else []
        why += [f"{timed_out} timed out"] if timed_out else []
        slow = f" ({', '.join(why)})" if why else ""
        picked = (f"a sample of {self.to_check} of {self.sampled_from} distinct (seed "
                  f"{self.seed})" if self.seed is not None else
                  f"{self.to_check} distinct to check{more}")
        acks = f", {self.acks} acknowledgements" if self.acks else ""
        rate = (f", {len(self.results) * 60 / self.seconds:.0f} states/min"
                if self.seconds > 0 and self.results else "")
        return (f"{self.boundaries} boundaries{acks}, {self.enumerated} states enumerated, "
                f"{picked}{cut}: {len(self.results)} checked, {len(self.failed)} "
                f"failed{slow}{rate}")


def check_capture(bounds: Sequence[Boundary], base: Path, size: int, check: Check, *,
                  max_states: int = 1000, exhaustive: int = 6, jobs: int = 1,
                  workdir: Path | None = None, keep_failing: bool = False,
                  timeout: float | None = None, stop: threading.Event | None = None,
                  report: Callable[[Result], None] | None = None,
                  listed: Callable[[int], None] | None = None,
                  sample: int | None = None, seed: int = 0) -> Summary:
    """Run CHECK on every distinct crash state of ``bounds`` (see
    :func:`crash_boundaries`), at most ``max_states``, ``jobs`` at a time;
    ``listed`` hears how many there are to check, before the first starts.

    With ``sample``: every distinct state is listed (``max_states`` does not
    apply) and ``sample`` of them, drawn with ``seed``, are checked in their
    order, so that the same seed checks the same states again."""
    if sample is not None:
        every, enumerated, _ = unique_states(bounds, exhaustive=exhaustive, limit=None)
        picked = sorted(random.Random(seed).sample(range(len(every)),
                                                   min(sample, len(every))))
        todo, stopped = [every[i] for i in picked], False
    else:
        todo, enumerated, stopped = unique_states(bounds, exhaustive=exhaustive,
                                                  limit=max_states)
    if listed is not None:
        listed(len(todo))
    began = time.monotonic()
    results = check_all(todo, base, size, check, jobs=jobs, workdir=workdir,
                        keep_failing=keep_failing, report=report, timeout=timeout, stop=stop)
    return Summary(len(bounds), enumerated, len(todo), stopped, max_states, results,
                   time.monotonic() - began,
                   len(every) if sample is not None else 0,
                   seed if sample is not None else None,
                   len(bounds[-1].listing.acks) if bounds else 0)
