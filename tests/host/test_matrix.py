"""make test's kernel matrix: which kernel runs the whole guest suite, and
which shard of it the debug kernel runs, is recomputable from the commit
(docs/testing.md); every claimed kernel gets its turn, and every guest test
runs on the debug kernel over DEBUG_SHARDS landings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest import shards

ROOT = Path(__file__).resolve().parents[2]
S = shards.SHARDS


def test_the_makefile_and_the_salt_search_agree_on_the_shard_count() -> None:
    assert f"DEBUG_SHARDS := {S}\n" in (ROOT / "Makefile").read_text()


def _runs(*overrides: str) -> list[str]:
    # the matrix's own variables from the caller's environment would decide
    # instead of the rule (a run with FULL_KERNEL=6.12 exported failed here)
    env = {k: v for k, v in os.environ.items()
           if k not in ("FULL_KERNEL", "KERNELS", "GUEST_RUNS", "COMMITS", "ROTATION",
                        "DEBUG_SHARD", "DEBUG_SHARDS",
                        "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), "test-guest", *overrides],
                         capture_output=True, text=True, check=True, env=env).stdout
    line = next(x for x in out.splitlines() if "guest runs (kernel:suite):" in x)
    return line.split(":", 1)[1].strip().rstrip('"').split()[1:]


@pytest.mark.parametrize(("commits", "whole"), [(0, "6.1:main"), (1, "7.2:full"),
                                               (2, "5.10:full"), (3, "6.12:full"),
                                               (206, "5.10:full")])
def test_the_commit_count_picks_the_whole_suite_kernel(commits: int, whole: str) -> None:
    runs = _runs(f"COMMITS={commits}")
    assert whole in runs and runs[-1] == f"debug:shard-{commits % S}/{S}"
    assert len(runs) == 5 and sum(r.endswith(":smoke") for r in runs) == 3


def test_every_kernel_takes_its_turn_and_all_runs_everything() -> None:
    wholes = {next(r for r in _runs(f"COMMITS={n}") if r.endswith(("full", "main")))
              for n in range(4)}
    assert wholes == {"6.1:main", "7.2:full", "5.10:full", "6.12:full"}
    assert _runs("KERNELS=all") == ["6.1:full", "5.10:full", "6.12:full", "7.2:full",
                                    "debug:full"]
    assert "5.10:full" in _runs("FULL_KERNEL=5.10")
    assert _runs("COMMITS=5", "DEBUG_SHARD=3")[-1] == f"debug:shard-3/{S}"
    assert {_runs(f"COMMITS={n}")[-1] for n in range(100, 100 + S)} == {
        f"debug:shard-{k}/{S}" for k in range(S)}


def test_the_debug_kernels_shards_make_the_whole_suite() -> None:
    """Each shard has the stress tests and the kernel-log check; the rest is
    split with nothing left out and nothing twice; 6.1's main is all but the
    stress tests (the debug kernel, the same source, runs them every time)."""
    full = shards.collect()
    every_time = shards.collect("-m", "stress or last")
    assert len(every_time) >= 5 and any("test_kernel_log_is_clean" in t for t in every_time)
    picked = [shards.collect("--shard", f"{k}/{S}") for k in range(S)]
    assert all(p >= every_time for p in picked)
    parts = [p - every_time for p in picked]
    assert sum(len(p) for p in parts) == len(full - every_time)
    assert set().union(*parts) == full - every_time
    assert all(parts)
    main, stress = shards.collect("-m", "not stress"), shards.collect("-m", "stress")
    assert main | stress == full and not main & stress
    for bad in (f"{S}/{S}", "x", "1"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/guest", "--collect-only",
                               "-q", "-p", "no:cacheprovider", "--shard", bad],
                              capture_output=True, text=True, check=False, cwd=ROOT,
                              env={**os.environ, "IMGREMENT_HOST_COLLECT": "1"})
        assert proc.returncode == 4 and "--shard" in proc.stderr, proc.stderr


def test_the_salt_search_balances_and_keeps_every_test() -> None:
    times = {f"tests/guest/test_x.py::test_{i}": float(1 + (i * 37) % 90) for i in range(120)}
    best = shards.best_salt(times, 4, tries=500)
    assert sum(shards.sums(times, 4, best)) == sum(times.values())
    assert max(shards.sums(times, 4, best)) <= max(shards.sums(times, 4, "0"))
    assert max(shards.sums(times, 4, best)) < 1.05 * sum(times.values()) / 4
    assert shards.parse("3/4") == (3, 4)
