"""The checkout as a fresh clone would have it, for tests that build from it.

Tracked files and new ones not ignored: what a clone of the commit about to
be made holds, and nothing the working tree has built (.venv, build/, the
compiled extension), so that a missing MANIFEST entry or install step shows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_to(dest: Path) -> Path:
    """Copy the checkout's files into ``dest``; returns ``dest``."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard",
                            "-z"], capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, names):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest
