"""Check JUnit XML from the test runs: the guest suite really ran, clean.

``make test`` would otherwise pass when the guest never booted, collected no
test, or skipped some: all three are failures here.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(path: Path) -> dict[str, int]:
    """Totals over every testsuite in one JUnit file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, "0"))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--expect-guest", type=int, default=0, metavar="N",
                        help="fail unless N guest-*.xml files (one per kernel) are present")
    args = parser.parse_args(argv)
    files = sorted(args.results.glob("guest-*.xml"))
    # A guest the hang guard powered off wrote no XML; its note says why.
    for note in sorted(args.results.glob("hang-guard-*.txt")):
        print(f"{note.name}: {note.read_text().strip()}", file=sys.stderr)
    if len(files) < args.expect_guest:
        print(f"check_junit: {len(files)} guest-*.xml in {args.results}, expected "
              f"{args.expect_guest}: a guest suite did not run", file=sys.stderr)
        return 1
    bad = False
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for f in files:
        c = counts(f)
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        failed = c["failures"] + c["errors"]
        print(f"{f.name}: {c['tests']} tests, {failed} failing, {c['skipped']} skipped")
        total["passed"] += passed
        total["failed"] += failed
        total["skipped"] += c["skipped"]
        if c["tests"] == 0 or failed or c["skipped"]:
            bad = True
    print(f"guest: {total['passed']} passed, {total['failed']} failed, "
          f"{total['skipped']} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
