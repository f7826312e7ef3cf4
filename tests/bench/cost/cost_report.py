"""The cost benchmark's counts into results-cost.json and a section of the page.

    python -m tests.bench.cost.cost_report build/bench docs/benchmarks.md [DIR...]

Line k of cost-counts.txt (the insncount plugin's) is the instructions of
run k of cost-runs.json (cost_guest.py's).  For each disk, workload and
configuration: instructions per I/O, the median of the runs, and their
spread ((max - min) / median); ``cost_ratio[config][disk-workload]`` is the
median over dm-linear's.  The section sits between the page's title and the
throughput tables (report.py keeps it when it rewrites the page).
"""

from __future__ import annotations

import bisect
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- cost:begin -->", "<!-- cost:end -->"
ORDER = ["linear", "blktrace", "bpftrace", "meta", "writes-drop", "writes-wait",
         "log-writes"]
#: The spread the issue asks of one configuration's runs.
MAX_SPREAD = 0.02


def summarise(counts: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    if len(counts) != len(runs):
        raise SystemExit(f"cost_report: {len(counts)} counts for {len(runs)} runs: the "
                         "plugin's file and the guest's list do not match (a stale "
                         "cost-counts.txt? make bench-cost removes it first)")
    per: dict[tuple[str, str, str], list[float]] = {}
    dropped: dict[tuple[str, str, str], Any] = {}
    shorts: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    longs: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    unfinished: set[str] = set()
    for n, r in zip(counts, runs, strict=True):
        if r["rep"] == "profile":  # a run the plugin profiled: not among the reps
            continue
        key = (r["disk"], r["workload"], r["config"])
        if "dropped" not in r:  # the boot ended inside this cell: not all its reps ran
            unfinished.add("-".join(key))
            continue
        dropped[key] = r.get("dropped")
        if r.get("part") == "short":
            shorts.setdefault(key, []).append((n, r["ios"]))
        elif r.get("part") == "long":
            longs.setdefault(key, []).append((n, r["ios"]))
        else:
            per.setdefault(key, []).append(n / r["ios"])
    # a long run's I/Os alone: its count less what a run costs once, taken
    # from the median of the cell's short runs (their spread is mostly that
    # fixed part: fio's exit, the markers, the settle)
    for key, got in longs.items():
        fixed = statistics.median(n for n, _ in shorts[key])
        ios0 = shorts[key][0][1]
        per[key] = [(n - fixed) / (ios - ios0) for n, ios in got]
    cells: dict[str, dict[str, Any]] = {}
    for (disk, workload, config), xs in per.items():
        med = statistics.median(xs)
        cells.setdefault(config, {})[f"{disk}-{workload}"] = {
            "insns_per_io": round(med), "runs": [round(x) for x in xs],
            "spread": round((max(xs) - min(xs)) / med, 4), "dropped": dropped[(disk, workload,
                                                                              config)]}
    ratio: dict[str, dict[str, float]] = {}
    for config, by in cells.items():
        for cell, c in by.items():
            base = cells.get("linear", {}).get(cell)
            if base:
                ratio.setdefault(config, {})[cell] = round(c["insns_per_io"]
                                                           / base["insns_per_io"], 4)
    return {"cells": cells, "cost_ratio": ratio, "goals": goals(cells, ratio),
            "unfinished": sorted(unfinished)}


def goals(cells: dict[str, dict[str, Any]],
          ratio: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The issue's goals on cost ratios: meta's extra at most blktrace's;
    writes-wait (0 dropped) at most 1/1.3 of dm-log-writes' cost."""
    out = []
    for key in sorted(ratio.get("meta", {})):
        bt = ratio.get("blktrace", {}).get(key)
        if bt is not None:
            extra, bt_extra = ratio["meta"][key] - 1, bt - 1
            out.append({"goal": "meta's extra <= blktrace's", "cell": key,
                        "got": round(extra, 4), "wanted": round(bt_extra, 4),
                        "met": extra <= bt_extra})
    for key in sorted(ratio.get("writes-wait", {})):
        lw = cells.get("log-writes", {}).get(key)
        ww = cells["writes-wait"][key]
        if lw is not None:
            wanted = lw["insns_per_io"] / 1.3
            out.append({"goal": "writes-wait <= log-writes / 1.3, 0 dropped", "cell": key,
                        "got": ww["insns_per_io"], "wanted": round(wanted),
                        "met": ww["insns_per_io"] <= wanted and not ww["dropped"]})
    # the storing disk is the traced one's kind everywhere here (a second RAM
    # disk, a second virtio disk), so drop mode must keep up on every cell
    for key, wd in sorted(cells.get("writes-drop", {}).items()):
        out.append({"goal": "writes-drop drops nothing", "cell": key,
                    "got": wd["dropped"], "wanted": 0, "met": wd["dropped"] == 0})
    return out


#: Where the extra instructions of a traced configuration go, by symbol.
GROUPS: list[tuple[str, Callable[[str], bool]]] = [
    ("imgrement (the target)", lambda s: s.endswith("[imgrement]")),
    ("clock reads", lambda s: any(k in s for k in ("ktime", "clock", "tsc", "hpet"))),
    ("memory copies", lambda s: any(k in s for k in ("memcpy", "copy_", "memmove",
                                                     "rep_movs"))),
    ("user space (fio, the consumer)", lambda s: s == "[user]")]
USER_TOP = 0xffff800000000000


class Symbols:
    """Guest addresses to names, from a copy of the guest's /proc/kallsyms."""

    def __init__(self, text: str) -> None:
        pairs = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                name = parts[2] + (" " + parts[3] if len(parts) > 3 else "")
                pairs.append((int(parts[0], 16), name))
        pairs.sort()
        self.addrs = [a for a, _ in pairs]
        self.names = [n for _, n in pairs]

    def name(self, addr: int) -> str:
        if addr < USER_TOP:
            return "[user]"
        i = bisect.bisect_right(self.addrs, addr) - 1
        return self.names[i] if i >= 0 and self.addrs[i] else "[unknown kernel]"


def profiles(text: str, symbols: Symbols) -> dict[int, dict[str, int]]:
    """The profile file's windows: window (the count file's line, from 1) to
    instructions by symbol."""
    out: dict[int, dict[str, int]] = {}
    cur: dict[str, int] | None = None
    for line in text.splitlines():
        if line.startswith("# window "):
            cur = out.setdefault(int(line.split()[2]), {})
            continue
        if cur is None or not line.strip():
            continue
        addr, ran = line.split()
        name = symbols.name(int(addr, 16))
        cur[name] = cur.get(name, 0) + int(ran)
    return out


def profile_summary(runs: list[dict[str, Any]], windows: dict[int, dict[str, int]],
                    top: int = 6) -> dict[str, Any]:
    """For each profiled cell and traced configuration: its extra
    instructions an I/O over dm-linear's, by group and by symbol."""
    per: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    shorts: dict[tuple[str, str, str], tuple[dict[str, int], int]] = {}
    for k, r in enumerate(runs, start=1):
        if r["rep"] != "profile" or k not in windows:
            continue
        key = (r["disk"], r["workload"], r["config"])
        if r.get("part") == "short":
            shorts[key] = (windows[k], r["ios"])
            continue
        w0, ios0 = shorts.pop(key, ({}, 0))
        got = windows[k]
        by = {s: (got.get(s, 0) - w0.get(s, 0)) / (r["ios"] - ios0)
              for s in set(got) | set(w0)}
        per.setdefault((r["disk"], r["workload"]), {})[r["config"]] = by
    out: dict[str, Any] = {}
    for (disk, workload), configs in sorted(per.items()):
        base = configs.get("linear")
        if base is None:
            continue
        floors = floor_of(configs)
        if floors:
            out.setdefault(f"{disk}-{workload}", {})["floor"] = floors
        for config, by in configs.items():
            if config == "linear":
                continue
            extra = {s: by.get(s, 0) - base.get(s, 0) for s in set(by) | set(base)}
            total = sum(extra.values())
            groups: dict[str, float] = {}
            for s, x in extra.items():
                g = next((name for name, test in GROUPS if test(s)), "other kernel code")
                groups[g] = groups.get(g, 0) + x
            out.setdefault(f"{disk}-{workload}", {})[config] = {
                "extra_per_io": round(total), "groups": {g: round(x) for g, x in
                                                         sorted(groups.items())},
                # (a tie by name: the page comes out the same from the same runs)
                "top": [(s, round(x)) for s, x in sorted(extra.items(),
                                                         key=lambda kv: (-kv[1], kv[0]))[:top]]}
    return out


#: The least work each capture mode must do for a bio, as the target's own
#: functions that do it: build the record and append it to the ring (meta),
#: and copy each written byte into it (the data modes).  What these cost in
#: a mode's profiled run is its floor; everything else a traced I/O costs
#: over dm-linear (the clock reads, the per-bio bookkeeping, the wake-ups,
#: the consumer reading and storing the stream) is what could be saved.
FLOOR_APPEND = ("record_bio", "walk_runs", "put_segment", "record_op", "record_flags",
                "imgrement_ring_reserve", "imgrement_ring_commit")
FLOOR_COPY = ("copy_payload",)
#: Which profiled configuration each floor is read from.
FLOOR_FROM = {"meta": ("meta", FLOOR_APPEND),
              "writes": ("writes-drop", FLOOR_APPEND + FLOOR_COPY)}


def floor_of(configs: dict[str, dict[str, float]]) -> dict[str, int]:
    """Each mode's floor, instructions an I/O, from its profiled run's
    symbols (:data:`FLOOR_FROM`); a mode not profiled has none."""
    out = {}
    for mode, (config, names) in FLOOR_FROM.items():
        by = configs.get(config)
        if by is not None:
            out[mode] = round(sum(by.get(f"{n} [imgrement]", 0) for n in names))
    return out


def floor_goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal on the floor (meta's extra at most 1.5 times its floor), and
    each traced mode's extra as a multiple of its floor: how far from the
    least it could cost."""
    out = []
    for cell, prof in sorted((res.get("profile") or {}).items()):
        floors = prof.get("floor", {})
        base = res["cells"].get("linear", {}).get(cell)
        if not base:
            continue
        for config, mode in (("meta", "meta"), ("writes-drop", "writes"),
                             ("writes-wait", "writes")):
            got = res["cells"].get(config, {}).get(cell)
            floor = floors.get(mode)
            if got is None or not floor:
                continue
            extra = got["insns_per_io"] - base["insns_per_io"]
            row = {"cell": cell, "config": config, "extra_per_io": extra,
                   "floor_per_io": floor, "times_floor": round(extra / floor, 2)}
            if config == "meta":
                row.update(goal="meta's extra <= 1.5x its floor", got=extra,
                           wanted=round(1.5 * floor), met=extra <= 1.5 * floor)
            out.append(row)
    return out


def lines(res: dict[str, Any]) -> list[str]:
    cells, ratio = res["cells"], res["cost_ratio"]
    configs = [c for c in ORDER if c in cells]
    keys = sorted({k for by in cells.values() for k in by})
    worst = max((c["spread"] for by in cells.values() for c in by.values()), default=0.0)
    within = sum(c["spread"] <= MAX_SPREAD for by in cells.values() for c in by.values())
    total = sum(len(by) for by in cells.values())
    lengths = "; ".join(f"{w}: {a:,} and {b:,}" for w, (a, b) in
                        sorted(res.get("lengths", {}).items()))
    floors = {cell: p.get("floor", {}) for cell, p in (res.get("profile") or {}).items()}
    out = [BEGIN, "## Cost in guest instructions (make bench-cost)", "",
           "Under software emulation a guest's work is instructions, and QEMU counts them "
           "exactly: the guest runs with a TCG plugin (tests/bench/cost/insncount.c) that "
           "adds up the instructions every vCPU executes, kernel and user, fio and the "
           "consumer alike, between two marker instructions the guest executes around each "
           "run: the first inside fio, in its job process just before the first I/O "
           "(`--exec_prerun`), the second once the run is over. fio's start stays outside: "
           "it calibrates its clock by spinning on it for about 65 ms, and under emulation "
           "the instructions a spin of fixed guest time executes follow the host's speed "
           "(inside the window, it alone spread a cell's short runs by 15-19M "
           "instructions). fio runs on vCPU 1 alone (bpftrace's tracepoint events cost "
           "about 2,000 instructions an I/O more on CPU 0, where its perf events are "
           "open, so its runs sat at two levels as the scheduler placed fio), and its "
           "buffers are in 2 MiB huge pages, so a 1 MiB write is one segment in every "
           "configuration (in malloc'd memory its pages joined into segments as the "
           "allocator happened to hand them out: from about 3 to 256 a bio, run by run, and the "
           "block layer's and imgrement's work a segment with them). "
           "Each rep is two runs of a fixed number of I/Os, a short and a "
           f"long one ({lengths}): a long run's "
           "count less the median of the cell's short runs, over the I/Os between "
           "them, is what an I/O costs, so what every run costs once (fio's last I/Os and "
           "its exit, the markers, a 1 s settle and then a wait until the consumer has used "
           "no CPU for 0.3 s, and a `sync` that "
           "writes back what it stored) cancels; udev, which probes a device each time a "
           "writer closes it, is held off during a cell's runs, and fio keeps no disk "
           "statistics (its helper thread read them every 250 ms: work by the clock, not "
           "by the I/O). Every tracer stores its trace on the same ext4 file system on a "
           "third disk; blktrace runs with `-b 64 -n 16` (its output is mapped and faulted "
           "in a window at a time: 1 MiB, where the default 8 MiB came in lumps in some "
           "runs and not others) and bpftrace with a 64 MiB perf ring a CPU "
           "(`BPFTRACE_PERF_RB_PAGES`; its default lost a third of the events); a peer's "
           "lost events, like imgrement's drops, are shown in its cell. Each "
           "cell is the median over "
           f"{res['reps']} runs in one set-up, as a ratio to dm-linear's instructions per "
           "I/O in the same boot (dm-linear's own figure in the first column); the worst "
           f"spread of any cell's runs, (max - min) / median, is {worst:.2%} "
           f"(the issue asks at most {MAX_SPREAD:.0%}; configurations all within it: "
           + (", ".join(c for c in configs if all(x["spread"] <= MAX_SPREAD
                                                  for x in cells[c].values())) or "none")
           + f"; cells within it: {within} of {total}). Under TCG "
           "a `rep`-prefixed string instruction counts once per iteration, so "
           "`clear_page_erms` and `rep movsb` copies weigh about one instruction a byte: "
           "a copy of a 4 KiB block is about 4,100. What this does not capture: memory "
           "bandwidth, caches and device time on real hardware (the throughput tables "
           "below stay for that). "
           + ((f"Each row's cells come from one boot ({len(res['boots'])} boots): "
               + "; ".join(", ".join(rows) for rows in res["boots"].values()) + ". ")
              if len(res.get("boots", {})) > 1 else "")
           + "Measured here: "
           + ", ".join(sorted(keys)) + " with " + ", ".join(configs) + "."
           + (" Left out, their boot having ended before all their runs: "
              + ", ".join(res["unfinished"]) + "." if res.get("unfinished") else ""), "",
           "| disk-workload | linear insns/I/O | " + " | ".join(configs[1:])
           + " | floor: meta / data |",
           "| --- | --- | " + " | ".join("---" for _ in configs[1:]) + " | --- |"]
    for k in keys:
        base = cells.get("linear", {}).get(k)
        row = [k, f"{base['insns_per_io']:,}" if base else "-"]
        for c in configs[1:]:
            cell = cells[c].get(k)
            if cell is None or c not in ratio or k not in ratio[c]:
                row.append("-")
                continue
            d = f", {cell['dropped']} dropped" if cell.get("dropped") else ""
            row.append(f"{ratio[c][k]:.3f} (±{cell['spread'] / 2:.1%}{d})")
        fl = floors.get(k, {})
        row.append(" / ".join(f"{1 + fl[m] / base['insns_per_io']:.3f}" if base and m in fl
                              else "-" for m in ("meta", "writes")))
        out.append("| " + " | ".join(row) + " |")
    goals_all = res["goals"] + [g for g in res.get("floor", []) if "goal" in g]
    if goals_all:
        out += ["", "| goal | cell | got | wanted | met |", "| --- | --- | --- | --- | --- |"]
        for g in goals_all:
            out.append(f"| {g['goal']} | {g['cell']} | {g['got']} | {g['wanted']} | "
                       f"{'yes' if g['met'] else '**no**'} |")
    if res.get("floor"):
        out += ["", "The floor is the least a mode must do for a bio, read off its profiled "
                "run: the target's functions that build a record and append it to the ring "
                f"({', '.join(FLOOR_APPEND)}), and for the data modes the copy of each "
                f"written byte ({', '.join(FLOOR_COPY)}). Each traced configuration's extra "
                "instructions an I/O over dm-linear's, as a multiple of its mode's floor:", "",
                "| cell | config | extra insns/I/O | floor insns/I/O | extra / floor |",
                "| --- | --- | --- | --- | --- |"]
        for g in res["floor"]:
            out.append(f"| {g['cell']} | {g['config']} | {g['extra_per_io']:,} | "
                       f"{g['floor_per_io']:,} | {g['times_floor']:.2f} |")
    prof = res.get("profile") or {}
    if prof:
        out += ["", "Where the extra instructions of an I/O go (one more run a cell, "
                "profiled by translated block, the guest's addresses mapped to its kernel's "
                "symbols; user space is one lump): the extra over dm-linear's run, by group, "
                "and the symbols that add the most.", "",
                "| cell | config | extra insns/I/O | by group | top symbols |",
                "| --- | --- | --- | --- | --- |"]
        for cell, configs in prof.items():
            for config in [c for c in ORDER if c in configs and c != "linear"]:
                p = configs[config]
                total = p["extra_per_io"] or 1
                groups = ", ".join(f"{g} {x / total:.0%}" for g, x in
                                   sorted(p["groups"].items(), key=lambda kv: -kv[1]))
                tops = ", ".join(f"`{s}` {x:,}" for s, x in p["top"][:4])
                out.append(f"| {cell} | {config} | {p['extra_per_io']:,} | {groups} | "
                           f"{tops} |")
    out.append(END)
    return out


def place(page: str, section: str) -> str:
    """The page with ``section`` where the old one was, or after the title."""
    if BEGIN in page and END in page:
        return page[:page.index(BEGIN)] + section + page[page.index(END) + len(END):]
    head, sep, rest = page.partition("\n\n")
    return head + "\n\n" + section + "\n\n" + rest if sep else page + "\n" + section + "\n"


def _runs_of(d: Path) -> tuple[list[int], list[dict[str, Any]]]:
    """A boot's counts and runs; a boot ended early (its cells so far) keeps
    the counts of the runs it listed."""
    counts = [int(x) for x in (d / "cost-counts.txt").read_text().split()]
    runs = json.loads((d / "cost-runs.json").read_text())
    return counts[:len(runs)], runs


def main(argv: list[str]) -> int:
    """OUT DOC [DIR...]: the counts and runs of the boot in OUT, and of
    each DIR (another boot's results: say, the virtio disk's); a row (a
    disk's workload) measured in two boots is refused, since its ratios
    must be to the dm-linear of its own boot.  The profile of every boot
    that has one."""
    out, doc = Path(argv[0]), Path(argv[1])
    boots = [out, *map(Path, argv[2:])]
    counts: list[int] = []
    runs: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], Path] = {}
    profile: dict[str, Any] = {}
    rows: dict[str, list[str]] = {}
    for d in boots:
        c, listed = _runs_of(d)
        for cell in sorted({(x["disk"], x["workload"], x["config"]) for x in listed}):
            if seen.get(cell[:2], d) != d:
                raise SystemExit(f"cost_report: {'-'.join(cell)} was measured in both "
                                 f"{seen[cell[:2]]} and {d}; give each row's cells from "
                                 "one boot, so its ratios are to that boot's dm-linear")
            seen[cell[:2]] = d
        counts += c
        runs += listed
        rows[str(d)] = sorted({f"{x['disk']}-{x['workload']}" for x in listed})
        prof, syms = d / "cost-profile.txt", d / "cost-kallsyms.txt"
        if prof.exists() and syms.exists():
            windows = profiles(prof.read_text(), Symbols(syms.read_text()))
            profile.update(profile_summary(listed, windows))
    res = summarise(counts, runs)
    res["reps"] = max((r["rep"] for r in runs if r["rep"] != "profile"), default=-1) + 1
    res["boots"] = rows
    if profile:
        res["profile"] = profile
        res["floor"] = floor_goals(res)
    res["lengths"] = {}
    for r in runs:
        a, b = res["lengths"].setdefault(r["workload"], [r["ios"], r["ios"]])
        res["lengths"][r["workload"]] = [min(a, r["ios"]), max(b, r["ios"])]
    (out / "results-cost.json").write_text(json.dumps(res, indent=1) + "\n")
    section = "\n".join(lines(res))
    doc.write_text(place(doc.read_text() if doc.exists() else "# Benchmarks\n", section))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
