"""The capture tools at scale, on the host: time and peak memory against the
capture's size, throughput against cp, and crashcheck's listing.

    python tests/bench/scale.py build/bench docs/benchmarks.md [GiB ...]

For each size (1, 2, 4 and 8 GiB unless given) a capture of mixed writes
(4 KiB to 1 MiB), flushes, FUA writes, discards and marks over a 16 GiB
sparse base is made with the package's own capture writer; then each tool
runs in a process of its own, which reports its peak RSS, beside `cp` of
the capture on the same file system. crashcheck lists captures of 1,000,
10,000 and 100,000 fsynced writes, and checks the 1,000-write one with
`true`, counting the bytes written to its work folder.
Results go to OUT/scale.json and to the page, between its scale markers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from imgrement_dm import layout  # noqa: E402
from imgrement_dm.formats.capture import write_capture  # noqa: E402
from tests.host import streams  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
BASE_SIZE = 16 * GIB
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
OP = {name: code for code, name in layout.OPS.items()}
BIT = {name: bit for bit, name in layout.FLAGS.items()}
#: Each tool as run in its own process; {cap}, {base}, {out} filled in.
TOOLS = {
    "apply raw": "increment.apply(Path(base), Path(cap), Path(out + '.img'))",
    "apply qcow2": "increment.apply_qcow2(Path(base), Path(cap), Path(out + '.qcow2'))",
    "replay": "increment.replay(Path(cap), Path(out + '.target'))",
    "diff": "increment.extents(Path(cap))",
    "export log-writes": "export.export_capture(Path(cap), 'log-writes', Path(out + '.lw'))",
    "export blktrace": "export.export_capture(Path(cap), 'blktrace', Path(out + '.bt'))",
    "export jsonl": "export.export_capture(Path(cap), 'jsonl', Path(out + '.jsonl'))",
}
_PRELUDE = """
import json, resource, sys, time
from pathlib import Path
from imgrement_dm import increment, crashcheck
from imgrement_dm.formats import export
cap, base, out = sys.argv[1:4]
t0 = time.monotonic()
"""
_CODA = """
print(json.dumps({"s": time.monotonic() - t0,
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  **globals().get("extra", {})}))
"""


def make_capture(path: Path, size: int, seed: int = 29) -> dict[str, int]:
    """About ``size`` bytes of write data: 4 KiB-1 MiB writes at random places,
    a flush every 16 writes, every 8th write FUA, a 4 MiB discard every 64, a
    mark every 256; submitted as fast as a disk of 1 GB/s takes them, each
    completing up to 5 ms after its submission, so bios overlap. (The reorder
    heap holds a second of I/O: the pace matters; an earlier version of
    this generator wrote 9 GB/s, so the heap held whole captures.)"""
    rng = random.Random(seed)
    pool = os.urandom(2 * MIB)
    counts = {"writes": 0, "bytes": 0, "flushes": 0, "discards": 0, "marks": 0}
    seq, t = 0, 0
    chunk: list[bytes] = []
    held = 0
    with write_capture(path, "traced", BASE_SIZE // 512) as w:
        while counts["bytes"] < size:
            n = 4096 << rng.randrange(9)  # 4 KiB .. 1 MiB
            t += n + rng.randrange(20_000)  # a disk that writes 1 GB/s, and then some
            sector = rng.randrange((BASE_SIZE - n) // 4096) * 8
            at = rng.randrange(MIB)
            flags = BIT["fua"] if counts["writes"] % 8 == 7 else 0
            rec = streams.bio(seq, sector=sector, op=OP["write"], flags=flags,
                              payload=pool[at:at + n], submit_ns=t,
                              complete_ns=t + rng.randrange(5_000_000))
            counts["writes"] += 1
            counts["bytes"] += n
            seq += 1
            extra = []
            if counts["writes"] % 16 == 0:
                extra.append(streams.bio(seq, op=OP["flush"], flags=BIT["preflush"],
                                         submit_ns=t + 1, complete_ns=t + 2_000_000))
                counts["flushes"] += 1
                seq += 1
            if counts["writes"] % 64 == 0:
                extra.append(streams.bio(seq, sector=rng.randrange(BASE_SIZE // 512 - 8192),
                                         op=OP["discard"], size=4 * MIB, submit_ns=t + 2,
                                         complete_ns=t + 1_000_000))
                counts["discards"] += 1
                seq += 1
            if counts["writes"] % 256 == 0:
                extra.append(streams.mark(seq, f"m{seq}", time_ns=t + 3))
                counts["marks"] += 1
                seq += 1
            for r in (rec, *extra):
                chunk.append(r)
                held += len(r)
            if held >= 4 * MIB:
                w.add(b"".join(chunk))
                chunk, held = [], 0
        if chunk:
            w.add(b"".join(chunk))
    return counts


def fsync_capture(path: Path, writes: int) -> None:
    """``writes`` 4 KiB writes over 50,000 blocks, each followed by a flush."""
    with write_capture(path, "traced", 50_000 * 8) as w:
        chunk = []
        for i in range(writes):
            t = i * 1000
            chunk.append(streams.bio(2 * i, sector=(i % 50_000) * 8, op=OP["write"],
                                     payload=i.to_bytes(8, "little") * 512, submit_ns=t,
                                     complete_ns=t + 100))
            chunk.append(streams.bio(2 * i + 1, op=OP["flush"], flags=BIT["preflush"],
                                     submit_ns=t + 200, complete_ns=t + 300))
            if len(chunk) >= 1024:
                w.add(b"".join(chunk))
                chunk = []
        if chunk:
            w.add(b"".join(chunk))


def run_tool(code: str, cap: Path, base: Path, out: Path) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", _PRELUDE + code + _CODA, str(cap), str(base),
                        str(out)], capture_output=True, text=True, cwd=ROOT, check=False)
    if r.returncode:
        raise SystemExit(f"{code} failed: {r.stderr[-2000:]}")
    res: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return res


def _cp_seconds(src: Path, dst: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(["cp", "--sparse=never", "--reflink=never", str(src), str(dst)],
                   check=True)
    os.sync()
    s = time.monotonic() - t0
    dst.unlink()
    return s


def _clean(work: Path) -> None:
    for p in work.glob("out.*"):
        p.unlink()


def scale(work: Path, sizes: list[float]) -> dict[str, Any]:
    base = work / "base.img"
    with base.open("wb") as f:
        f.truncate(BASE_SIZE)
    idle = run_tool("pass", base, base, work / "none")
    out: dict[str, Any] = {"interpreter_rss_kib": idle["rss_kib"], "sizes": {}}
    for gib in sizes:
        cap = work / "scale.cap"
        t0 = time.monotonic()
        counts = make_capture(cap, int(gib * GIB))
        made = time.monotonic() - t0
        os.sync()
        cp = _cp_seconds(cap, work / "copy")
        row: dict[str, Any] = {"capture_bytes": cap.stat().st_size, "records": counts,
                               "generate_s": round(made, 1), "cp_s": round(cp, 2), "tools": {}}
        for name, code in TOOLS.items():
            target = work / "out.target"
            if name == "replay":
                with target.open("wb") as f:
                    f.truncate(BASE_SIZE)
            res = run_tool(code, cap, base, work / "out")
            os.sync()
            row["tools"][name] = {"s": round(res["s"], 2), "rss_kib": int(res["rss_kib"]),
                                  "vs_cp": round(cp / res["s"], 3)}
            print(f"{gib} GiB {name}: {res['s']:.1f} s, {res['rss_kib'] // 1024} MiB, "
                  f"{cp / res['s']:.2f}x cp", flush=True)
            _clean(work)
        out["sizes"][str(gib)] = row
        cap.unlink()
    return out


def listing(work: Path, counts: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in counts:
        cap = work / f"fsync-{n}.cap"
        fsync_capture(cap, n)
        res = run_tool("b, _ = crashcheck.load(Path(cap))\n"
                       "u = crashcheck.unique_states(b, limit=None)\n"
                       "print(len(b), len(u.states))", cap, cap, work / "none")
        out[str(n)] = {"s": round(res["s"], 2), "rss_kib": int(res["rss_kib"])}
        print(f"crashcheck listing {n}: {res['s']:.1f} s, {res['rss_kib'] // 1024} MiB",
              flush=True)
        if n != counts[0]:
            cap.unlink()
    # checking: 1,000 states with `true`; the bytes crashcheck wrote, as the
    # kernel counted them (wchar: write calls and copy_file_range)
    n = counts[0]
    cap = work / f"fsync-{n}.cap"
    base = work / "check-base.img"
    with base.open("wb") as f:
        f.truncate(50_000 * 4096)
        f.write(os.urandom(64 * MIB))  # BASE holds 64 MiB of data
    jobs = 2
    res = run_tool("b, size = crashcheck.load(Path(cap))\n"
                   "io = lambda: int(Path('/proc/self/io').read_text().split()[3])\n"
                   "w0 = io()\n"
                   f"s = crashcheck.check_capture(b, Path(base), size, ['true'], jobs={jobs}, "
                   "max_states=10**9, workdir=Path(out))\n"
                   "extra = {'written': io() - w0, 'states': len(s.results), "
                   "'failed': len(s.failed)}", cap, base, work / "states")
    took, written, states = res["s"], int(res["written"]), int(res["states"])
    if res["failed"] or states != n:
        raise SystemExit(f"crashcheck checked {states} states, {res['failed']} failed")
    setup = (jobs + 1) * 64 * MIB  # the durable image and one image a job: BASE's data
    out["check"] = {"states": states, "s": round(took, 1), "jobs": jobs,
                    "written_bytes": written, "setup_bytes": setup,
                    "bytes_per_state": max(0, written - setup) // states,
                    "changed_bytes_per_state": 4096,
                    "base_data_bytes": 64 * MIB}
    print(f"crashcheck check {states} states: {took:.0f} s, {written // MIB} MiB written, "
          f"{out['check']['bytes_per_state'] // 1024} KiB a state past BASE's "
          f"{jobs + 1} copies", flush=True)
    shutil.rmtree(work / "states", ignore_errors=True)
    cap.unlink()
    base.unlink()
    return out


def goals(res: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's goals, each with what was measured and whether it holds."""
    idle = res["scale"]["interpreter_rss_kib"]
    sizes = res["scale"]["sizes"]
    small, big = min(sizes, key=float), max(sizes, key=float)
    ratio = float(big) / float(small)
    out = []
    for name in TOOLS:
        lo, hi = sizes[small]["tools"][name], sizes[big]["tools"][name]
        above = (hi["rss_kib"] - idle) // 1024
        out.append((f"{name}: peak RSS at most 64 MiB above the interpreter at {big} GiB",
                    f"{above} MiB", above <= 64))
        out.append((f"{name}: peak RSS at {big} GiB at most {small} GiB's plus 10%",
                    f"{lo['rss_kib'] // 1024} -> {hi['rss_kib'] // 1024} MiB",
                    hi["rss_kib"] <= lo["rss_kib"] * 1.1))
        out.append((f"{name}: time at {big} GiB within 10% of {ratio:g}x {small} GiB's",
                    f"{hi['s']} s vs {ratio:g} x {lo['s']} s",
                    hi["s"] <= ratio * lo["s"] * 1.1))
        if not name.startswith(("diff", "export blktrace", "export jsonl")):
            worst = min(sizes[s]["tools"][name]["vs_cp"] for s in sizes)
            out.append((f"{name}: at least 0.5x cp's throughput", f"{worst} (lowest)",
                        worst >= 0.5))
    top = max(res["listing"], key=lambda k: int(k) if k.isdigit() else -1)
    lst = res["listing"][top]
    out.append((f"crashcheck lists {int(top):,} writes in under 30 s and 512 MiB",
                f"{lst['s']} s, {lst['rss_kib'] // 1024} MiB",
                lst["s"] < 30 and lst["rss_kib"] < 512 * 1024))
    c = res["listing"]["check"]
    # a slot comes back every ``jobs`` states and takes the changes since
    # its last one; the durable image takes each once: (jobs + 1) changes a
    # state; BASE's data once for the durable image and once a job
    per = (c["jobs"] + 1) * c["changed_bytes_per_state"]
    out.append((f"checking writes BASE's data once a job (and once for the durable image), "
                f"then what changed: at most (jobs + 1) x {c['changed_bytes_per_state'] // 1024}"
                " KiB a state (each image catches up the changes since its last state), "
                "never a copy a state",
                f"{c['written_bytes'] // MIB} MiB for {c['states']:,} states: "
                f"{c['setup_bytes'] // MIB} MiB of BASE copies, then "
                f"{c['bytes_per_state'] / 1024:.1f} KiB a state",
                c["written_bytes"] <= c["setup_bytes"] + c["states"] * per * 1.05))
    return out


def markdown(res: dict[str, Any]) -> str:
    idle = res["scale"]["interpreter_rss_kib"] // 1024
    sizes = res["scale"]["sizes"]
    lines = [BEGIN, "## The tools at scale (host)", "",
             "`make bench-scale` (tests/bench/scale.py), on the host's own file system "
             f"({res['fs']}): captures of mixed 4 KiB-1 MiB writes, flushes, FUA writes, "
             "discards and marks over a 16 GiB sparse base, made with the package's capture "
             "writer; each tool in a process of its own. Peak RSS is the process's maximum "
             f"resident set; the interpreter with the package imported is {idle} MiB. "
             "\"x cp\" is `cp` of the same capture on the same file system (seconds) over the "
             "tool's seconds: at least 0.5 is the goal. One run of each: cp itself took "
             f"{min(v['cp_s'] / float(k) for k, v in sizes.items()):.1f} to "
             f"{max(v['cp_s'] / float(k) for k, v in sizes.items()):.1f} s per GiB, so a "
             "ratio moves by about that much from size to size.", "",
             "| tool | " + " | ".join(f"{s} GiB: s / MiB / x cp" for s in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    for name in TOOLS:
        cells = []
        for s in sizes:
            t = sizes[s]["tools"][name]
            cells.append(f"{t['s']} / {t['rss_kib'] // 1024} / {t['vs_cp']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| cp (seconds) | " + " | ".join(str(sizes[s]["cp_s"]) for s in sizes) + " |")
    lst = res["listing"]
    lines += ["", "crashcheck, on captures of N 4 KiB writes each followed by a flush "
              "(the listing: boundaries and distinct states, nothing checked):", "",
              "| writes | listing s | peak RSS MiB |", "| --- | --- | --- |"]
    for n, v in lst.items():
        if n != "check":
            lines.append(f"| {int(n):,} | {v['s']} | {v['rss_kib'] // 1024} |")
    lines += ["", "Goals, judged from the figures above:", "",
              "| goal | measured | met |", "| --- | --- | --- |"]
    for goal, measured, met in goals(res):
        lines.append(f"| {goal} | {measured} | {'yes' if met else '**no**'} |")
    c = lst["check"]
    lines += ["", f"Checking the {c['states']:,} states of the 1,000-write capture with "
              f"`true` took {c['s']} s (-j {c['jobs']}) over a BASE holding "
              f"{c['base_data_bytes'] // MIB} MiB of data; crashcheck wrote "
              f"{c['written_bytes'] // MIB} MiB in all, as the kernel counted it "
              "(/proc/self/io's wchar: write calls and copy_file_range): BASE's data for the "
              "durable image and for each job's reused state image, then what each state "
              "changed (docs/crashcheck.md, Running the check).", "", END]
    return "\n".join(lines) + "\n"


def _write_page(doc: Path, res: dict[str, Any]) -> None:
    text = doc.read_text() if doc.exists() else ""
    section = markdown(res)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


def main(argv: list[str]) -> int:
    out, doc = Path(argv[0]), Path(argv[1])
    if argv[2:] == ["--page-only"]:  # the page again from OUT/scale.json
        _write_page(doc, json.loads((out / "scale.json").read_text()))
        return 0
    sizes = [float(x) for x in argv[2:]] or [1, 2, 4, 8]
    counts = [int(x) for x in os.environ.get("SCALE_LISTING", "1000 10000 100000").split()]
    work = out / "scale-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                        text=True, check=False).stdout.strip()
    res = {"fs": fs, "scale": scale(work, sizes), "listing": listing(work, counts)}
    shutil.rmtree(work, ignore_errors=True)
    (out / "scale.json").write_text(json.dumps(res, indent=1) + "\n")
    _write_page(doc, res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
