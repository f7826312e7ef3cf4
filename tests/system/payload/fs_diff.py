"""Compare the root file system listings from before install and after purge.

Usage: fs_diff.py BEFORE AFTER UPGRADE_DEBS_DIR.  Nothing may have gone, and
everything new must belong to the kernel upgrade, which stays installed (the
machine runs it): a file one of its packages owns, its dpkg bookkeeping, or
a file its scripts make for that release (initrd, modules.* indexes).
Anything else, and any path naming imgrement, is a leftover.  Exit 1 then.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def packages(debs: Path) -> list[str]:
    return [subprocess.run(["dpkg-deb", "-f", str(d), "Package"], capture_output=True,
                           text=True, check=True).stdout.strip()
            for d in sorted(debs.glob("*.deb"))]


def owned(pkgs: list[str]) -> set[str]:
    out = subprocess.run(["dpkg", "-L", *pkgs], capture_output=True, text=True, check=False)
    return set(out.stdout.split("\n"))


def main() -> int:
    before = set(Path(sys.argv[1]).read_text().split("\n"))
    after = set(Path(sys.argv[2]).read_text().split("\n"))
    pkgs = packages(Path(sys.argv[3]))
    files = owned(pkgs)
    releases = [p.name for p in Path("/lib/modules").iterdir()]
    new_release = [r for r in releases if f"/lib/modules/{r}" not in before]

    def explained(path: str) -> bool:
        if "imgrement" in path or "/updates" in path:
            return False
        if path in files:
            return True
        if path.startswith("/var/lib/dpkg/info/"):
            # PACKAGE[:ARCH].EXT, and a kernel package's name has dots in it
            return Path(path).name.rsplit(".", 1)[0].split(":")[0] in pkgs
        return any(r in path for r in new_release)

    gone = sorted(before - after)
    left = sorted(p for p in after - before if not explained(p))
    for p in gone:
        print(f"gone: {p}")
    for p in left:
        print(f"left: {p}")
    print(f"{len(before)} paths before, {len(after)} after; {len(after - before)} new, all "
          f"but {len(left)} the upgrade's ({', '.join(pkgs)})")
    return 1 if gone or left else 0


if __name__ == "__main__":
    sys.exit(main())
