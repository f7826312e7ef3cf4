"""Turn the guest benchmark's raw runs into results.json and a markdown page,
and measure the record decoder on the host over the stream the guest saved.

    python tests/bench/report.py build/bench docs/benchmarks.md
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from imgrement_dm.records import STREAM_MAGIC, BioRecord, decode

MODES = ["meta", "writes", "all"]
GOALS = [
    # (mode, disk-workload, metric, at least)
    ("meta", "virtio-randread-4k-qd32", "iops", 0.97),
    ("meta", "virtio-randwrite-4k-qd32", "iops", 0.97),
    ("meta", "brd-randread-4k-qd32", "iops", 0.97),
    ("meta", "brd-randwrite-4k-qd32", "iops", 0.97),
    ("writes", "virtio-seqwrite-1m", "bw_bytes", 0.90),
    ("writes", "brd-seqwrite-1m", "bw_bytes", 0.45),
]


def _key(run: dict[str, Any]) -> str:
    return f"{run['disk']}-{run['workload']}"


def _metric(workload: str) -> str:
    """What a workload is judged by: throughput for seqwrite, IOPS otherwise."""
    return "bw_bytes" if "seqwrite" in workload else "iops"


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    runs = raw["runs"]
    by: dict[tuple[str, str, int], dict[str, Any]] = {
        (_key(r), r["config"], r["rep"]): r for r in runs
    }
    keys = sorted({_key(r) for r in runs})
    reps = sorted({r["rep"] for r in runs})
    ratio: dict[str, dict[str, float]] = {}
    dropped: dict[str, dict[str, int]] = {}
    absolute: dict[str, dict[str, dict[str, float]]] = {}
    for mode in ["raw", *MODES]:
        ratio[mode] = {}
        if mode != "raw":
            dropped[mode] = {}
        for k in keys:
            metric = _metric(k)
            per_rep = [
                by[(k, mode, rep)][metric] / by[(k, "linear", rep)][metric]
                for rep in reps
                if by[(k, "linear", rep)][metric]
            ]
            ratio[mode][k] = round(statistics.median(per_rep), 4)
            if mode != "raw":
                dropped[mode][k] = sum(by[(k, mode, rep)].get("dropped", 0) for rep in reps)
    for config in ["raw", "linear", *MODES]:
        absolute[config] = {}
        for k in keys:
            rows = [by[(k, config, rep)] for rep in reps]
            absolute[config][k] = {
                f: round(statistics.median(r[f] for r in rows), 2)
                for f in ("iops", "bw_bytes", "lat_mean_us", "lat_p99_us")
            }
            if config in MODES:
                for f in ("records", "captured_bytes", "stream_file_bytes", "consumer_cpu_s"):
                    absolute[config][k][f] = round(statistics.median(r[f] for r in rows), 3)
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    for p in raw.get("paired", []):
        paired.setdefault(p["mode"], {})[_key(p)] = {
            "median": round(statistics.median(p["ratios"]), 4),
            "min": min(p["ratios"]), "max": max(p["ratios"]), "ratios": p["ratios"],
            "dropped": p["dropped"], "records": p["records"],
        }
    goals = []
    for m, k, metric, g in GOALS:
        pair = paired.get(m, {}).get(k)
        # judged by the paired runs where there are some: back-to-back ratios
        judged = pair["median"] if pair else ratio[m].get(k)
        goals.append({"mode": m, "workload": k, "metric": metric, "goal": g,
                      "ratio": ratio[m].get(k), "paired": pair["median"] if pair else None,
                      "met": (judged or 0) >= g})
    res = {"meta": raw["meta"], "ratio_to_linear": ratio, "dropped": dropped,
           "absolute": absolute, "paired": paired, "goals": goals}
    res.update(peer_results(raw.get("peers", [])))
    merge_peers(ratio, dropped, res["peers"])
    return res


def peer_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What results.json says of the peer runs, for the whole page or the peers alone."""
    peers = summarise_peers(runs)
    return {"peers": peers, "peer_goals": peer_goals(peers), "store": store_rows(runs),
            "peer_noise": linear_noise(runs)}


def merge_peers(ratio: dict[str, dict[str, float]], dropped: dict[str, dict[str, int]],
                peers: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The peer runs into ratio_to_linear[config][disk-workload] and dropped[...].

    Where the main table measured the same config and workload (meta), its
    figure stays: it is the median of more runs.
    """
    for k, row in peers.items():
        for config, x in row.items():
            ratio.setdefault(config, {}).setdefault(k, x["ratio"])
            if config in ("meta", "writes-drop", "writes-wait"):
                dropped.setdefault(config, {}).setdefault(k, x["dropped"])


PEER_CONFIGS = ["blktrace", "bpftrace", "meta", "writes-drop", "writes-wait", "log-writes"]


def summarise_peers(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per workload and configuration: the median, over every pair of every
    repetition, of the peer's run over the dm-linear run taken next to it
    (guest_bench.peer_pairs); the records dropped in all repetitions; the
    consumer's CPU per set-up and per GB it stored."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    setups = [r for r in runs if "workload" in r]
    for w in sorted({f"{r['disk']}-{r['workload']}" for r in setups}):
        metric = _metric(w)
        out[w] = {}
        for c in PEER_CONFIGS:
            rows = [r for r in setups if f"{r['disk']}-{r['workload']}" == w
                    and r["config"] == c]
            ratios = [run[metric] / lin[metric] for r in rows
                      for run, lin in zip(r["runs"], r["linear"], strict=True) if lin[metric]]
            if not ratios:
                continue
            cpu: list[float] = [r["consumer_cpu_s"] for r in rows if r.get("consumer_cpu_s")]
            per_gb = [r["consumer_cpu_s"] / r["stored_bytes"] * 1e9 for r in rows
                      if r.get("consumer_cpu_s") and r.get("stored_bytes", 0) > 64 << 20]
            out[w][c] = {
                "consumer_cpu_s_per_gb": round(statistics.median(per_gb), 2) if per_gb else None,
                "ratio": round(statistics.median(ratios), 3),
                "ratio_min": round(min(ratios), 3),
                "ratio_max": round(max(ratios), 3),
                "pairs": len(ratios),
                "dropped": sum(r.get("dropped", 0) for r in rows),
                "waited": sum(r.get("waited", 0) for r in rows),
                "consumer_cpu_s": round(statistics.median(cpu), 3) if cpu else None,
            }
    return out


def linear_noise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per disk kind: how much dm-linear's two runs in one set-up differ.

    Nothing changes between them but time, so this is the machine's own
    noise at the length of one run: the floor under which a ratio in the
    peer table says nothing. The difference is the larger over the smaller,
    minus one; median, 90th percentile and largest, over every set-up.
    """
    out: dict[str, dict[str, float]] = {}
    for disk in sorted({r["disk"] for r in runs if "linear" in r}):
        diffs = []
        for r in runs:
            if r.get("disk") != disk or len(r.get("linear", [])) < 2:
                continue
            metric = _metric(r["workload"])
            a, b = r["linear"][0][metric], r["linear"][1][metric]
            if a and b:
                diffs.append(max(a, b) / min(a, b) - 1)
        if diffs:
            diffs.sort()
            out[disk] = {"setups": len(diffs),
                         "median_pct": round(100 * statistics.median(diffs), 1),
                         "p90_pct": round(100 * diffs[int(0.9 * (len(diffs) - 1))], 1),
                         "max_pct": round(100 * diffs[-1], 1)}
    return out


def store_rows(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """The store measurements (guest_bench.store_paths), per disk kind."""
    return {r["disk"]: r["store"] for r in runs if "store" in r}


def decoder_rate(stream: Path) -> dict[str, Any]:
    """Best of five full decodes of a stream the guest recorded."""
    data = stream.read_bytes()
    assert data[:16] == STREAM_MAGIC, f"{stream} is not a saved stream"
    body = data[16:]
    recs, used = decode(body)
    assert used == len(body)
    count = len(recs)
    bios = sum(isinstance(r, BioRecord) for r in recs)
    del recs  # each run starts with the memory the last one freed, as a reader's would
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        n = len(decode(body)[0])
        best = min(best, time.perf_counter() - t)
        assert n == count
    return {"stream_bytes": len(body), "records": count, "bio_records": bios,
            "records_per_s": round(count / best), "mb_per_s": round(len(body) / best / 1e6, 1)}


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    keys = sorted(res["ratio_to_linear"]["meta"])
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (tests/bench/): fio, O_DIRECT, in one sandbox guest "
        f"(kernel {m['kernel']}, {m['cpus']} vCPUs under QEMU software emulation, "
        f"clocksource {m.get('clocksource', 'not recorded')}), "
        f"{m['runtime_s']} s per run, {m['reps']} repetitions with the order of "
        "configurations rotated. Each figure is the median over repetitions of the ratio "
        "to dm-linear in the same repetition (IOPS; throughput for seqwrite-1m). "
        "imgrement runs with `imgrement-dm trace -o FILE` draining the records, as a user "
        "would, and a 64 MiB record buffer; fio starts once the consumer holds the stream "
        "and is idle (starting Python takes seconds of CPU under emulation), and its CPU "
        "time is counted from then to its exit.",
        "",
        "Under software emulation every instruction of the guest costs the same host time, "
        "so copying data in the target weighs far more than on real hardware; treat these "
        "as upper bounds of the cost. The guest boots with `tsc=reliable "
        "clocksource=tsc` (`BENCH_APPEND` in the Makefile): otherwise the kernel finds the "
        "emulated TSCs unsynchronized and reads the HPET, each read a trap into QEMU, for "
        "every timestamp (fio's, the block layer's and the target's two per bio).",
        "",
        "| disk-workload | raw | meta | writes | all | dropped (meta/writes/all) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    r, d = res["ratio_to_linear"], res["dropped"]
    for k in keys:
        lines.append(
            f"| {k} | {r['raw'][k]:.3f} | {r['meta'][k]:.3f} | {r['writes'][k]:.3f} | "
            f"{r['all'][k]:.3f} | {d['meta'][k]} / {d['writes'][k]} / {d['all'][k]} |"
        )
    pairs = m.get("pairs")
    lines += ["", "## Goals", ""]
    if pairs:
        lines += [
            "Each goal was also measured in pairs: dm-linear and imgrement over the disk "
            f"at once, the consumer running throughout, {pairs} pairs of {m['pair_runtime_s']} s "
            "fio runs alternating which goes first; \"paired\" is the median of the "
            "back-to-back ratios (min and max beside it), and decides \"met\". The table "
            "above compares runs set up separately, seconds apart, on a machine where two "
            "runs of the same thing differ by 10% and more.",
            "",
        ]
    lines += ["| mode | workload | goal | ratio (table) | paired (min-max) | dropped (paired) "
              "| met |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for g in res["goals"]:
        pair = res.get("paired", {}).get(g["mode"], {}).get(g["workload"])
        cell = f"{pair['median']} ({pair['min']}-{pair['max']})" if pair else "-"
        drops = pair["dropped"] if pair else "-"
        lines.append(f"| {g['mode']} | {g['workload']} | {g['goal']} | {g['ratio']} | {cell} | "
                     f"{drops} | {'yes' if g['met'] else '**no**'} |")
    lines += ["", "## Absolute figures (medians)", "",
              "| config | disk-workload | IOPS | MB/s | mean lat (us) | p99 lat (us) | "
              "consumer CPU (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for config, rows in res["absolute"].items():
        for k in keys:
            a = rows[k]
            lines.append(
                f"| {config} | {k} | {a['iops']:.0f} | {a['bw_bytes'] / 1e6:.1f} | "
                f"{a['lat_mean_us']:.0f} | {a['lat_p99_us']:.0f} | "
                f"{a.get('consumer_cpu_s', '-')} |"
            )
    lines += peer_lines(res)
    ceil = m.get("ceilings")
    if ceil:
        lin = res["absolute"]["linear"].get("virtio-seqwrite-1m", {}).get("bw_bytes", 0) / 1e6
        store = ceil["store"]["mb_per_s"]
        spin = ceil["contention"]["linear_seqwrite_1m_ratio_with_spinner"]
        lines += [
            "", "## What bounds the data modes here", "",
            f"- Storing: this guest writes {store:.0f} MB/s from memory into a tmpfs file "
            f"({ceil['store']['cpu_s_per_gb']} s of CPU per GB; 4 MiB writes, as the consumer "
            "makes). Any consumer that saves what it captures is bounded by that: on "
            f"virtio-seqwrite-1m dm-linear moves {lin:.0f} MB/s, "
            f"{lin / store if store else 0:.1f} times as much, so with data capture the "
            "buffer fills and records are dropped (counted, never silently), and the consumer "
            "spends its vCPU.",
            f"- Sharing the host: dm-linear keeps {spin:.3f} of its virtio-seqwrite-1m "
            "throughput while a process merely spins on the other vCPU (fio pinned to vCPU "
            "0). The host's two cores run both vCPUs and QEMU's I/O thread, which moves the "
            "virtio disk's data, so a busy consumer costs the virtio disk that much before "
            "the target does anything.",
        ]
    if "decoder" in res:
        dec = res["decoder"]
        lines += ["", "## Record decoder (host)", "",
                  "Decoding the metadata stream the guest recorded during the virtio "
                  f"randread-4k-qd32 run in capture mode meta ({dec['records']} records, "
                  f"{dec['stream_bytes']} bytes), best of five: **{dec['records_per_s']:,} "
                  f"records/s**, {dec['mb_per_s']} MB/s."]
    return "\n".join(lines) + "\n"


PEER_HEADING = "## The peers, side by side"


def peer_lines(res: dict[str, Any]) -> list[str]:
    """The peer table, for the page or for its section alone (BENCH_ONLY=peers)."""
    peers = res.get("peers") or {}
    if not peers:
        return []
    m = res["meta"]
    lines = [
        "", PEER_HEADING, "",
        f"Kernel {m['kernel']}, {m.get('peer_reps', '?')} repetitions of "
        f"{m.get('peer_pairs', '?')} pairs, {m.get('peer_runtime_s', m['runtime_s'])} s "
        "per run. Each configuration is set up afresh, per workload and repetition, beside "
        "a dm-linear over the same disk, and fio alternates between the two (dm-linear "
        "first, then the configuration first, and so on), so each ratio compares two runs "
        "taken seconds apart; the configurations of one workload run back to back, their "
        "order rotated. Each cell is the median of those ratios (IOPS; throughput for "
        "seqwrite-1m), with their range, and the records dropped over all runs. "
        "blktrace traces dm-linear into a directory (`-b 64 -n 16`); bpftrace prints each "
        "bio's block_bio_queue and block_bio_complete tracepoints on dm-linear into a file, "
        "one line per event (the eBPF tools' way); meta and "
        "writes-drop are imgrement drained by `trace -q -o` (drop mode); writes-wait is "
        "imgrement in wait mode drained by `record` (\"waited\": bios that waited for it); "
        "all four store on ext4 on a third disk of the same kind; log-writes is "
        "dm-log-writes logging to a second disk of the same kind. For randrw, the ratio is "
        "of read IOPS.",
        "",
    ]
    if m.get("second_boot_configs"):
        lines += [f"The {', '.join(m['second_boot_configs'])} column comes from a second boot "
                  "of the same kernel, paired with dm-linear the same way: its ratios are "
                  "within their own set-ups, but the other columns did not run beside it.", ""]
    if m.get("peer_reps", 0) < 3:
        lines += [
            f"**{m.get('peer_reps')} repetition(s) only:** each ratio carries this machine's "
            "run-to-run noise (two runs of the same thing differ by 10% and more here); the "
            "drop counts are exact. `make bench` repeats each run three times.",
            "",
        ]
    lines += [
        "| disk-workload | " + " | ".join(PEER_CONFIGS) + " |",
        "| --- |" + " --- |" * len(PEER_CONFIGS),
    ]
    for k, row in peers.items():
        cells = []
        for c in PEER_CONFIGS:
            x = row.get(c)
            if x is None:
                cells.append("-")
                continue
            extra = ""
            if c in ("meta", "writes-drop", "writes-wait"):
                extra = f" ({x['dropped']} dropped"
                extra += f", {x['waited']} waited)" if c == "writes-wait" else ")"
            cells.append(f"{x['ratio']:.3f} [{x['ratio_min']:.2f}-{x['ratio_max']:.2f}]{extra}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    noise = res.get("peer_noise") or {}
    if noise:
        lines += ["", "This machine's own noise: dm-linear's two runs in one set-up, seconds "
                  "apart with nothing changed, differ by "
                  + "; ".join(f"{x['median_pct']}% (median), {x['p90_pct']}% (90th "
                              f"percentile), {x['max_pct']}% (largest) on {d}"
                              for d, x in noise.items())
                  + f", over {sum(x['setups'] for x in noise.values())} set-ups. Each "
                  "paired ratio carries that noise, and each cell is the median of "
                  f"{m.get('peer_reps', '?')} x {m.get('peer_pairs', '?')} of them: "
                  "differences between cells well inside it are not resolved here."]
    store = res.get("store") or {}
    if store:
        lines += ["", "Storing captured data: 512 MiB from mapped memory into a file on the ext4 "
                  "that `record` writes to, in 4 MiB writes then fsync, best of two; CPU is the "
                  "writer's and the whole guest's (writeback runs in kernel threads). `record` "
                  "writes with O_DIRECT from the kernel's mapped buffer.", "",
                  "| disk | write | MB/s | writer CPU s/GB | guest CPU s/GB |",
                  "| --- | --- | --- | --- | --- |"]
        for d, how in store.items():
            for name, x in how.items():
                lines.append(f"| {d} | {name} | {x['mb_per_s']} | {x['cpu_s_per_gb']} | "
                             f"{x['guest_cpu_s_per_gb']} |")
        cpu = {k: row["writes-wait"]["consumer_cpu_s_per_gb"] for k, row in peers.items()
               if row.get("writes-wait", {}).get("consumer_cpu_s_per_gb") is not None}
        if cpu:
            lines += ["", "`record`'s own CPU per GB of capture it stored (writes-wait, "
                      "runs storing over 64 MiB, median): "
                      + ", ".join(f"{k} {v} s" for k, v in cpu.items()) + "."]
    goals = res.get("peer_goals") or []
    if goals:
        lines += ["", "| goal | disk-workload | wanted | got | met |",
                  "| --- | --- | --- | --- | --- |"]
        for g in goals:
            lines.append(f"| {g['goal']} | {g['workload']} | {g['wanted']} | {g['got']} | "
                         f"{'yes' if g['met'] else '**no**'} |")
    return lines


def peer_goals(peers: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """writes-wait: 0 dropped and at least 1.3x log-writes; meta at least blktrace."""
    out = []
    for k, row in peers.items():
        ww, lw, meta, bt = (row.get(c) for c in ("writes-wait", "log-writes", "meta",
                                                  "blktrace"))
        if ww and lw:
            out.append({"goal": "writes-wait >= 1.3 x log-writes, 0 dropped", "workload": k,
                        "wanted": round(1.3 * lw["ratio"], 3),
                        "got": f"{ww['ratio']} ({ww['dropped']} dropped)",
                        "met": ww["ratio"] >= 1.3 * lw["ratio"] and ww["dropped"] == 0})
        if meta and bt:
            out.append({"goal": "meta >= blktrace", "workload": k, "wanted": bt["ratio"],
                        "got": meta["ratio"], "met": meta["ratio"] >= bt["ratio"]})
    return out


def _kept_section(doc: Path, begin: str, end: str) -> str:
    """A section another bench writes (between its markers), kept as it is."""
    text = doc.read_text() if doc.exists() else ""
    if begin not in text or end not in text:
        return ""
    return "\n" + text[text.index(begin):text.index(end) + len(end)] + "\n"


def _scale_section(doc: Path) -> str:
    """The page's section that tests/bench/scale.py writes."""
    return _kept_section(doc, "<!-- scale:begin -->", "<!-- scale:end -->")


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    doc = Path(argv[1])
    raw = json.loads((out / "bench-raw.json").read_text())
    if not raw["runs"]:
        # BENCH_ONLY=peers: only the peers' section of the page is replaced
        res = {"meta": raw["meta"], "ratio_to_linear": {}, "dropped": {},
               **peer_results(raw.get("peers", []))}
        merge_peers(res["ratio_to_linear"], res["dropped"], res["peers"])
        (out / "results-peers.json").write_text(json.dumps(res, indent=1) + "\n")
        page = doc.read_text()
        head, _, rest = page.partition("\n" + PEER_HEADING + "\n")
        tail = rest[rest.index("\n## "):] if "\n## " in rest else ""
        doc.write_text(head.rstrip("\n") + "\n" + "\n".join(peer_lines(res)) + "\n" + tail)
        print(doc.read_text())
        return 0
    res = summarise(raw)
    stream = out / "stream-meta-virtio.rec"
    if stream.exists():
        res["decoder"] = decoder_rate(stream)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    cost = _kept_section(doc, "<!-- cost:begin -->", "<!-- cost:end -->").strip()
    page = markdown(res)
    if cost:  # make bench-cost's section leads, after the title
        head, _, rest = page.partition("\n\n")
        page = head + "\n\n" + cost + "\n\n" + rest
    doc.write_text(page + _scale_section(doc))
    print(doc.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
