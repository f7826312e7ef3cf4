"""make test's kernel matrix: which kernel runs the whole guest suite is
recomputable from the commit (docs/testing.md), and every claimed kernel
gets its turn."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _runs(*overrides: str) -> list[str]:
    # the matrix's own variables from the caller's environment would decide
    # instead of the rule (a run with FULL_KERNEL=6.12 exported failed here)
    env = {k: v for k, v in os.environ.items()
           if k not in ("FULL_KERNEL", "KERNELS", "GUEST_RUNS", "COMMITS", "ROTATION",
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
    assert whole in runs and runs[-1] == "debug:debug"
    assert len(runs) == 5 and sum(r.endswith(":smoke") for r in runs) == 3


def test_every_kernel_takes_its_turn_and_all_runs_everything() -> None:
    wholes = {next(r for r in _runs(f"COMMITS={n}") if not r.endswith(("smoke", "debug")))
              for n in range(4)}
    assert wholes == {"6.1:main", "7.2:full", "5.10:full", "6.12:full"}
    assert _runs("KERNELS=all") == ["6.1:full", "5.10:full", "6.12:full", "7.2:full",
                                    "debug:full"]
    assert "5.10:full" in _runs("FULL_KERNEL=5.10")
