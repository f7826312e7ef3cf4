"""The peer table's arithmetic (tests/bench/report.py): each ratio is of a
peer's run over the dm-linear run paired with it in the same set-up, never
over another set-up's; drops add up over every set-up; and the noise line
measures dm-linear against itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.bench import report


def _setup(config: str, peer: list[float], linear: list[float], *, rep: int = 0,
           workload: str = "randwrite-4k-qd1", **extra: Any) -> dict[str, Any]:
    metric = "bw_bytes" if "seqwrite" in workload else "iops"
    return {"disk": "brd", "workload": workload, "config": config, "rep": rep,
            "runs": [{metric: x} for x in peer], "linear": [{metric: x} for x in linear],
            **extra}


def test_each_ratio_is_over_its_own_pair() -> None:
    # Set-up 0 ran on a fast moment, set-up 1 on a slow one: paired, both are
    # 0.5 of dm-linear.  Mixing set-ups (1000 over 2000, or 500 over 1000) would
    # give 0.25 or 1.0.
    runs = [_setup("meta", [1000, 1000], [2000, 2000], rep=0, dropped=3, waited=0),
            _setup("meta", [250, 250], [500, 500], rep=1, dropped=4, waited=0)]
    got = report.summarise_peers(runs)["brd-randwrite-4k-qd1"]["meta"]
    assert got["ratio"] == 0.5
    assert (got["ratio_min"], got["ratio_max"], got["pairs"]) == (0.5, 0.5, 4)
    assert got["dropped"] == 7


def test_median_and_range_of_the_pairs() -> None:
    runs = [_setup("writes-wait", [900, 1200], [1000, 1000], rep=0, dropped=0, waited=5),
            _setup("writes-wait", [700, 800], [1000, 1000], rep=1, dropped=0, waited=6)]
    got = report.summarise_peers(runs)["brd-randwrite-4k-qd1"]["writes-wait"]
    assert got["ratio"] == pytest.approx((0.8 + 0.9) / 2)
    assert (got["ratio_min"], got["ratio_max"]) == (0.7, 1.2)
    assert got["waited"] == 11


def test_seqwrite_is_judged_by_throughput() -> None:
    runs = [_setup("log-writes", [100.0, 300.0], [1000.0, 1000.0], workload="seqwrite-1m")]
    got = report.summarise_peers(runs)["brd-seqwrite-1m"]["log-writes"]
    assert got["ratio"] == 0.2


def test_a_workload_without_pairs_has_no_cell() -> None:
    runs = [_setup("blktrace", [], [], rep=0)]
    assert report.summarise_peers(runs)["brd-randwrite-4k-qd1"] == {}


def test_noise_is_dm_linear_against_itself() -> None:
    runs = [_setup("meta", [1, 1], [1000, 1100]), _setup("meta", [1, 1], [1000, 1500]),
            _setup("meta", [1, 1], [2000, 1000]), {"disk": "brd", "store": {}}]
    got = report.linear_noise(runs)["brd"]
    assert got == {"setups": 3, "median_pct": 50.0, "p90_pct": 50.0, "max_pct": 100.0}


def test_goals_use_the_paired_medians() -> None:
    runs = [_setup("writes-wait", [650, 650], [1000, 1000], dropped=0, waited=0),
            _setup("log-writes", [500, 500], [1000, 1000]),
            _setup("meta", [900, 900], [1000, 1000], dropped=0),
            _setup("blktrace", [950, 950], [1000, 1000])]
    goals = {g["goal"]: g for g in report.peer_goals(report.summarise_peers(runs))}
    lossless = goals["writes-wait >= 1.3 x log-writes, 0 dropped"]
    assert (lossless["wanted"], lossless["met"]) == (0.65, True)
    meta = goals["meta >= blktrace"]
    assert (meta["wanted"], meta["got"], meta["met"]) == (0.95, 0.9, False)


def test_the_whole_page_carries_the_peer_table(tmp_path: Path) -> None:
    """make bench's path (main runs and peers in one raw file): results.json
    holds the peers' ratios and noise, and the page their table."""
    fio = {"iops": 1000.0, "bw_bytes": 4e6, "lat_mean_us": 10.0, "lat_p99_us": 20.0}
    data = {"records": 1, "captured_bytes": 1, "stream_file_bytes": 1, "consumer_cpu_s": 0.1}
    runs = [{"disk": "brd", "workload": "randwrite-4k-qd1", "config": c, "rep": 0, **fio,
             **(data if c in report.MODES else {})}
            for c in ("raw", "linear", *report.MODES)]
    peers = [_setup("meta", [800, 900], [1000, 1000], dropped=0, waited=0),
             _setup("blktrace", [700, 700], [1000, 1000])]
    raw = {"meta": {"kernel": "k", "runtime_s": 3, "reps": 1, "cpus": 2, "peer_reps": 1,
                    "peer_pairs": 2, "peer_runtime_s": 3, "second_boot_configs": ["blktrace"]},
           "runs": runs, "paired": [], "peers": peers}
    (tmp_path / "bench-raw.json").write_text(json.dumps(raw))
    page = tmp_path / "benchmarks.md"
    assert report.main([str(tmp_path), str(page)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["ratio_to_linear"]["blktrace"]["brd-randwrite-4k-qd1"] == 0.7
    assert res["peer_noise"]["brd"]["median_pct"] == 0.0
    text = page.read_text()
    assert report.PEER_HEADING in text
    assert "The blktrace column comes from a second boot" in text  # said where it is so
    assert ("| brd-randwrite-4k-qd1 | 0.700 [0.70-0.70] | - | 0.850 [0.80-0.90] "
            "(0 dropped) |") in text
