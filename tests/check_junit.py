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
    parser.add_argument("--expect-guest", action="store_true",
                        help="fail unless at least one guest-*.xml is present")
    args = parser.parse_args(argv)
    files = sorted(args.results.glob("guest-*.xml"))
    if args.expect_guest and not files:
        print(f"check_junit: no guest-*.xml in {args.results}: the guest suite did not run",
              file=sys.stderr)
        return 1
    bad = False
    for f in files:
        c = counts(f)
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        print(f"{f.name}:")
        print(f"guest: {passed} passed, {c['failures'] + c['errors']} failed, "
              f"{c['skipped']} skipped")
        if c["tests"] == 0 or c["failures"] or c["errors"] or c["skipped"]:
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
