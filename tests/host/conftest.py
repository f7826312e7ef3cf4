"""Host-suite guards.

Every host test runs with the temporary folder pointed at a private one
(``tempfile.tempdir`` and ``$TMPDIR``, so child processes use it too), and
fails if it leaves anything there: a helper or a library path that forgets
its temporary files would otherwise fill the machine's /tmp one run at a
time (seen: 150 ``acks-*`` folders from one helper).  pytest's own
``tmp_path`` lives elsewhere and is pytest's to clean.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _private_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp_path_factory.getbasetemp()  # pytest's, fixed before $TMPDIR moves
    d = Path(tempfile.mkdtemp(prefix="imgrement-host-tmp-"))
    d.chmod(0o1777)  # like /tmp: tests share folders with an unprivileged user
    old_env, old_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(d)
    tempfile.tempdir = str(d)
    yield d
    tempfile.tempdir = old_dir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _leaves_no_temporary_files(_private_tmp: Path) -> Iterator[None]:
    yield
    left = sorted(p.name for p in _private_tmp.iterdir())
    for name in left:
        p = _private_tmp / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    assert not left, f"the test left temporary files behind: {left}"
