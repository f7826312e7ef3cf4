"""The debug kernel's suite in shards, one a landing.

The whole guest suite on the debug kernel takes nearly two hours under
emulation (its checkers make the tests about 3.5 times slower than on a
distro kernel: 4270 s against about 1200 s for the same 104), which does
not fit in CI beside the rest.  So every `make test`
runs the stress tests there (the races its checkers exist for) and one of
SHARDS shards of the others, picked by the commit count; over SHARDS
landings in a row every test has run on it (docs/testing.md, "The kernel
matrix").

A test's shard is a hash of its node id, so it does not move when other
tests are added or removed.  SALT is chosen so that the measured times of
today's tests split evenly: ``python -m tests.guest.shards TSV...`` (the
``timing-<release>.tsv`` files of debug-kernel runs) searches for it and
prints each shard's time; docs/testing.md has the figures.  A new test
lands wherever its hash puts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

SALT = "8537"
SHARDS = 5  # the Makefile's DEBUG_SHARDS
ROOT = Path(__file__).resolve().parents[2]


def shard_of(nodeid: str, shards: int, salt: str = SALT) -> int:
    """The shard (0 to shards - 1) that ``nodeid`` runs in."""
    return zlib.crc32(f"{salt}:{nodeid}".encode()) % shards


def parse(spec: str) -> tuple[int, int]:
    """``"K/S"`` as (K, S), refused unless 0 <= K < S."""
    try:
        k, s = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard wants K/S (say 1/4), not {spec!r}") from None
    if not 0 <= k < s:
        raise ValueError(f"--shard {spec}: K must be 0 to S - 1")
    return k, s


def sums(times: dict[str, float], shards: int, salt: str = SALT) -> list[float]:
    """Each shard's total of ``times`` (seconds by node id)."""
    out = [0.0] * shards
    for nodeid, t in times.items():
        out[shard_of(nodeid, shards, salt)] += t
    return out


def best_salt(times: dict[str, float], shards: int, tries: int = 10000) -> str:
    """The salt among "0".."tries-1" whose largest shard is smallest."""
    return min((str(i) for i in range(tries)), key=lambda salt: max(sums(times, shards, salt)))


def _read(paths: list[str]) -> dict[str, float]:
    times: dict[str, float] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines()[1:]:
            nodeid, wall = line.split("\t")[:2]
            times[nodeid] = float(wall)
    return times


def collect(*args: str) -> set[str]:
    """The node ids of the guest tests pytest's ``args`` select, collected
    here on the host (no guest needed)."""
    env = {**os.environ, "IMGREMENT_HOST_COLLECT": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/guest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args],
                         capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout
    return {x for x in out.splitlines() if "::" in x}


def main(argv: list[str]) -> None:
    """Print the best salt for the tests the TSVs time, but those every
    shard runs."""
    every = collect("-m", "stress or last")
    times = {k: v for k, v in _read(argv).items() if k not in every}
    salt = best_salt(times, SHARDS)
    for name, s in (("now", SALT), ("best", salt)):
        print(f"{name} salt {s!r}: " + ", ".join(f"{t:.0f}" for t in sums(times, SHARDS, s))
              + f" s (of {sum(times.values()):.0f} s, {len(times)} tests)")


if __name__ == "__main__":
    main(sys.argv[1:])

