"""Text and JSON rendering for the CLI, kept apart from the commands."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from imgrement_dm.records import BioRecord, Drop, Item, MarkRecord

if TYPE_CHECKING:
    from imgrement_dm.api import MappedDevice, Status

OP_LETTERS = {
    "read": "R", "write": "W", "flush": "F", "discard": "D", "secure-erase": "E",
    "write-zeroes": "Z", "zone-append": "A", "zone-mgmt": "M", "other": "?",
}
FLAG_LETTERS = {
    "fua": "F", "preflush": "P", "sync": "S", "meta": "M", "prio": "p", "rahead": "A",
    "background": "B", "nowait": "N", "nounmap": "U", "idle": "I", "nomerge": "m",
}


def device_rows(found: Iterable[MappedDevice]) -> Iterator[str]:
    """One aligned row per device, with a header; nothing when there are none."""
    rows = [("NAME", "DEV", "OPEN", "TABLE", "STATUS")]
    for d in found:
        rows.append((
            d.name,
            f"{d.major}:{d.minor}",
            str(d.open_count),
            "; ".join(t.line() for t in d.table) or "-",
            "; ".join(t.params for t in d.status) or ("suspended" if d.suspended else "-"),
        ))
    if len(rows) == 1:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        yield "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4]


def status_lines(name: str, st: Status) -> Iterator[str]:
    yield f"{name}: capture {st.capture}, log {'on' if st.log else 'off'}"
    yield f"  bios     {st.bios}"
    yield f"  bytes    {st.bytes}"
    yield f"  records  {st.records}"
    yield f"  dropped  {st.dropped}"
    yield f"  buffer   {st.used} of {st.buffer} bytes in use"
    yield f"  overflow {st.overflow}" + (
        f" ({st.waiting} bios waiting now, {st.waited} ever, {st.fallbacks} fallback(s))"
        if st.overflow == "wait" or st.waited else "")
    if st.lost_from is not None:
        yield f"  LOST     records from seq {st.lost_from} on: the capture is incomplete"


TRACE_HEADER = (
    f"{'SEQ':>8} {'TIME(s)':>12} {'COMM':<15} {'PID':>7} OP {'FLAGS':<5} "
    f"{'SECTOR + SECTORS':<24} {'SEGS':>4} {'LAT(us)':>9} STATUS"
)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (an ESC that starts a
    terminal sequence, a BEL, a newline) and other unprintable ones shown as
    escapes, as repr() would; printable text, non-ASCII letters too, as is.
    Any process on a traced machine chooses its own command name."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def flag_letters(names: list[str]) -> str:
    return "".join(FLAG_LETTERS.get(n, "?") for n in names) or "-"


def trace_line(item: Item, t0: int, *, hexdump: bool = False) -> str:
    """One human line per record (and per drop)."""
    if isinstance(item, Drop):
        return f"{'':>8} *** {item.count} record(s) dropped (seq {item.first_seq}.." \
               f"{item.first_seq + item.count - 1}): the reader fell behind ***"
    if isinstance(item, MarkRecord):
        return f"{item.seq:>8} {(item.time_ns - t0) / 1e9:>12.6f} --- mark {item.label!r} ---"
    r = item
    status = "ok" if r.status == 0 else f"err {r.status}"
    line = (
        f"{r.seq:>8} {(r.submit_ns - t0) / 1e9:>12.6f} {printable(r.comm[:15]):<15} {r.pid:>7} "
        f"{OP_LETTERS.get(r.op_name, '?'):<2} {flag_letters(r.flag_names):<5} "
        f"{f'{r.sector} + {r.sectors}':<24} {r.nr_segments:>4} "
        f"{r.latency_ns / 1000:>9.1f} {status}"
    )
    if hexdump and r.has_payload:
        head = bytes(r.payload[:32])
        line += "\n" + " " * 9 + head.hex(" ") + (" ..." if r.payload_len > 32 else "")
    return line


def item_json(item: Item, *, with_payload: bool = False) -> dict[str, Any]:
    """A JSON-ready dict per record; the payload as hex only when asked."""
    if isinstance(item, Drop):
        return {"type": "drop", "first_seq": item.first_seq, "count": item.count}
    if isinstance(item, MarkRecord):
        return {"type": "mark", "seq": item.seq, "time_ns": item.time_ns, "label": item.label}
    r = item
    out: dict[str, Any] = {
        "type": "bio", "seq": r.seq, "op": r.op_name, "flags": r.flag_names,
        "sector": r.sector, "bytes": r.size, "submit_ns": r.submit_ns,
        "complete_ns": r.complete_ns, "status": r.status, "pid": r.pid, "tid": r.tid,
        "comm": r.comm, "segments": [asdict(s) for s in r.segments],
        "payload_len": r.payload_len,
    }
    if r.payload_lost:
        out["payload_lost"] = True  # too large for the buffer: recorded without its data
    if with_payload and r.has_payload:
        out["payload"] = bytes(r.payload).hex()
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def log2_bucket(value: int) -> int:
    """The bucket index b such that 2**b <= value < 2**(b+1) (0 for 0 and 1)."""
    return max(value.bit_length() - 1, 0)


@dataclass
class OpStats:
    count: int = 0
    bytes: int = 0
    errors: int = 0
    latency_us: dict[int, int] = field(default_factory=dict)  # log2 bucket -> count
    size: dict[int, int] = field(default_factory=dict)  # log2 bucket of bytes -> count


@dataclass
class Stats:
    """Per-operation counts, bytes, and log2 histograms of latency and size."""

    ops: dict[str, OpStats] = field(default_factory=dict)
    marks: int = 0
    dropped: int = 0

    def add(self, item: Item) -> None:
        if isinstance(item, Drop):
            self.dropped += item.count
            return
        if isinstance(item, MarkRecord):
            self.marks += 1
            return
        s = self.ops.setdefault(item.op_name, OpStats())
        s.count += 1
        s.bytes += item.size
        s.errors += item.status != 0
        lat = log2_bucket(max(item.latency_ns // 1000, 0))
        s.latency_us[lat] = s.latency_us.get(lat, 0) + 1
        if isinstance(item, BioRecord) and item.size:
            b = log2_bucket(item.size)
            s.size[b] = s.size.get(b, 0) + 1

    def as_json(self) -> dict[str, Any]:
        return {
            "ops": {
                op: {
                    "count": s.count, "bytes": s.bytes, "errors": s.errors,
                    "latency_us_log2": {str(2**k): v for k, v in sorted(s.latency_us.items())},
                    "size_bytes_log2": {str(2**k): v for k, v in sorted(s.size.items())},
                }
                for op, s in sorted(self.ops.items())
            },
            "marks": self.marks,
            "dropped": self.dropped,
        }


def histogram(title: str, unit: str, buckets: dict[int, int], width: int = 40) -> Iterator[str]:
    """A log2 histogram in the shape biolatency prints."""
    if not buckets:
        return
    yield f"     {unit:>19}     : count    distribution   ({title})"
    top = max(buckets.values())
    for k in range(min(buckets), max(buckets) + 1):
        n = buckets.get(k, 0)
        lo, hi = (0 if k == 0 else 2**k), 2 ** (k + 1) - 1
        bar = "*" * (n * width // top if top else 0)
        yield f"{lo:>10} -> {hi:<10} : {n:<8} |{bar:<{width}}|"


def stats_lines(st: Stats) -> Iterator[str]:
    yield f"{'OP':<14} {'COUNT':>10} {'BYTES':>14} {'ERRORS':>7}"
    for op, s in sorted(st.ops.items()):
        yield f"{op:<14} {s.count:>10} {s.bytes:>14} {s.errors:>7}"
    yield f"marks {st.marks}, dropped {st.dropped}"
    for op, s in sorted(st.ops.items()):
        yield ""
        yield from histogram(f"{op} latency", "usecs", s.latency_us)
        if s.size:
            yield ""
            yield from histogram(f"{op} size", "bytes", s.size)
