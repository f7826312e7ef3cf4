"""The project's pytest configuration, as the guest suite relies on it.

The guest's /tmp is memory of a 2 GiB guest (under 1 GiB); every test's
tmp_path kept to the end of a whole suite filled it, and a late test's loop
image (a sparse file there) failed writes with ENOSPC.  So a passing test's
tmp_path must be gone when it ends, and a failing test's kept to look at.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_TESTS = '''
import pathlib

def test_passes(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 4096)
    pathlib.Path({record!r}, "passed").write_text(str(tmp_path))

def test_then_one_after(tmp_path):
    # runs after test_passes ended: its directory must be gone by now
    passed = pathlib.Path(pathlib.Path({record!r}, "passed").read_text())
    pathlib.Path({record!r}, "gone").write_text(str(not passed.exists()))

def test_fails(tmp_path):
    pathlib.Path({record!r}, "failed").write_text(str(tmp_path))
    assert False
'''


def test_a_passing_tests_tmp_path_is_removed_when_it_ends(tmp_path: Path) -> None:
    record = tmp_path / "record"
    record.mkdir()
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_tmp.py").write_text(_TESTS.format(record=str(record)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tests), "-p", "no:cacheprovider", "-q",
         "--basetemp", str(tmp_path / "base"), str(tests / "test_tmp.py")],
        capture_output=True, text=True, check=False, cwd=tests)
    assert "1 failed, 2 passed" in proc.stdout, proc.stdout + proc.stderr
    assert (record / "gone").read_text() == "True"
    assert not Path((record / "passed").read_text()).exists()
    assert Path((record / "failed").read_text()).is_dir()
