"""Ready-made crashcheck checks: a file system's own checker, and SQLite.

Both are Python checks (:data:`~imgrement_dm.crashcheck.Check`): they run in
crashcheck's process, so a state costs the checker's own processes, not a
Python start too.  Each first lets the image recover as the kernel would at
the next mount (ext4's journal, XFS's log, btrfs's log tree), because a state
that needs recovery is what a crash leaves, not damage.

- :func:`fsck` picks the checker by the image's signature.  The image is
  mounted and unmounted first: the kernel itself replays ext4's journal,
  XFS's log or btrfs's log tree, releases orphans and writes its summary
  counts, exactly as after a real power cut; a state that does not mount
  fails.  Then the checker, read-only, must find nothing: ``e2fsck -fn``,
  ``xfs_repair -n``, ``btrfs check --readonly``.  (``e2fsck -fy`` first, as
  is often done, would repair real damage and hide it from the ``-fn``
  after it; ``-fp`` silently repairs wrong link counts, which a journaled
  file system must never leave.)
- :func:`sqlite` copies a database out of the mounted state (its
  ``-journal`` and ``-wal`` too) and opens the copy, so SQLite's own
  recovery runs (a hot journal rolled back, a WAL replayed); then
  ``PRAGMA integrity_check`` must say ``ok``, and every acknowledged label
  must be a row the query returns, else the state lost acknowledged data.

Both mount, so both need root and a loop device (as crashcheck's guest
tests have); a check that cannot mount says so instead of failing states.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from imgrement_dm.crashcheck import LostAcknowledged, State
from imgrement_dm.errors import CrashCheckError


class CheckFailed(Exception):  # noqa: N818 (a verdict, not a fault of crashcheck)
    """The state is not consistent: the checker's own words say why."""


#: Where each file system's signature is, and what it is.
_SIGNATURES = (("ext4", 1080, b"\x53\xef"), ("xfs", 0, b"XFSB"), ("btrfs", 65600, b"_BHRfS_M"))

#: btrfs finds a file system's devices by its UUID, and every state image has
#: the same one: two mounted at once would be taken for one file system, and
#: btrfs-progs registers every device it finds with that UUID in the kernel
#: (a guest test saw a mount fail with EEXIST while another state's check ran).
#: So a btrfs state is mounted, unmounted and checked under this lock.
_BTRFS = threading.RLock()

#: How often a btrfs mount refused with EEXIST is tried again (the kernel
#: still holding the previous state's device, a moment after its umount).
_BUSY_TRIES = 3


def fs_type(image: Path) -> str:
    """``ext4`` (any ext2/3/4), ``xfs`` or ``btrfs``, by the image's signature."""
    with image.open("rb") as f:
        for name, offset, magic in _SIGNATURES:
            f.seek(offset)
            if f.read(len(magic)) == magic:
                return name
    raise CheckFailed(f"{image.name} has no ext2/3/4, XFS or btrfs signature: the state "
                      "holds no file system these checks know")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        package = {"e2fsck": "e2fsprogs", "xfs_repair": "xfsprogs", "btrfs": "btrfs-progs",
                   "mount": "mount", "umount": "mount"}.get(argv[0], argv[0])
        raise CrashCheckError(f"the check needs {argv[0]}: install {package}") from None


def _tail(p: subprocess.CompletedProcess[str], lines: int = 6) -> str:
    """What the checker found, without its progress headers and version."""
    said = [x.strip() for x in (p.stdout + "\n" + p.stderr).splitlines()]
    found = [x for x in said if x and not x.startswith(("Pass ", "Phase ", "e2fsck 1.",
                                                       "Opening filesystem", "Checking "))]
    return " / ".join(found[:lines])


def _serial(kind: str) -> contextlib.AbstractContextManager[object]:
    """Held around all a check does with a btrfs state (see _BTRFS)."""
    return _BTRFS if kind == "btrfs" else contextlib.nullcontext()


@contextlib.contextmanager
def _mounted(image: Path, kind: str) -> Iterator[Path]:
    """The image mounted (through a loop device the kernel frees at umount);
    the mount recovers the log.  A mount that fails fails the state."""
    if os.geteuid() != 0:
        raise CrashCheckError("--fsck and --sqlite mount each state (the kernel recovers "
                              "it as after a power cut): run crashcheck as root")
    opts = {"xfs": "loop,nouuid", "ext4": "loop,errors=remount-ro"}.get(kind, "loop")
    with _serial(kind), tempfile.TemporaryDirectory(prefix="imgrement-check-") as mnt:
        for attempt in range(_BUSY_TRIES if kind == "btrfs" else 1):
            p = _run(["mount", "-t", kind, "-o", opts, str(image), mnt])
            if p.returncode == 0 or "File exists" not in p.stderr:
                break
            time.sleep(0.5 * (attempt + 1))
        if p.returncode != 0:
            raise CheckFailed(f"the {kind} state does not mount: {_tail(p)}")
        try:
            yield Path(mnt)
        finally:
            u = _run(["umount", mnt])
            if u.returncode != 0:
                # detached lazily at least: the folder's removal must not walk
                # into a file system still mounted on it
                _run(["umount", "-l", mnt])
                raise CrashCheckError(f"cannot unmount the state at {mnt}: {_tail(u)}")


def fsck(image: Path, state: State) -> bool:
    """The file system in the state is consistent once recovered (see the
    module's text for each checker); a failure raises :class:`CheckFailed`."""
    kind = fs_type(image)
    argv = {"ext4": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"],
            "btrfs": ["btrfs", "check", "--readonly"]}[kind] + [str(image)]
    with _serial(kind):
        with _mounted(image, kind):
            pass
        p = _run(argv)
    if p.returncode != 0:
        raise CheckFailed(f"{' '.join(argv[:-1])} exit {p.returncode}: {_tail(p)}")
    return True


def _copy_out(image: Path, kind: str, path: str, dest: Path) -> None:
    with _mounted(image, kind) as mnt:
        for suffix in ("", "-journal", "-wal"):
            src = mnt / (path.lstrip("/") + suffix)
            if src.exists():
                shutil.copyfile(src, dest / (Path(path).name + suffix))


def sqlite(db: str, query: str) -> Callable[[Path, State], bool]:
    """A check: the database at ``db`` (its path inside the file system) is
    whole, and holds every acknowledged label among the first column of
    ``query``'s rows (compared as text: an ack of ``42`` is a row id 42)."""
    if not db.startswith("/"):
        raise CrashCheckError(f"the database's path {db!r} must be absolute in the file "
                              "system on the disk, e.g. /app/data.db")

    def check(image: Path, state: State) -> bool:
        kind = fs_type(image)
        with tempfile.TemporaryDirectory(prefix="imgrement-sqlite-") as tmp:
            out = Path(tmp)
            _copy_out(image, kind, db, out)
            copy = out / Path(db).name
            if not copy.exists():
                if state.acked:
                    raise LostAcknowledged(state.acked)
                return True  # not made yet, and nothing acknowledged
            con = sqlite3.connect(copy, isolation_level=None)  # recovers the copy
            try:
                found = con.execute("PRAGMA integrity_check").fetchall()
                if found != [("ok",)]:
                    raise CheckFailed("integrity_check: " + "; ".join(str(r[0])
                                                                      for r in found[:5]))
                try:
                    rows = {str(r[0]) for r in con.execute(query)}
                except sqlite3.Error as e:
                    raise CheckFailed(f"the query failed on this state: {e}") from None
            except sqlite3.DatabaseError as e:
                raise CheckFailed(f"SQLite cannot read the database: {e}") from None
            finally:
                con.close()
        missing = [a for a in state.acked if a not in rows]
        if missing:
            raise LostAcknowledged(missing)
        return True

    return check


def all_of(*checks: Callable[[Path, State], bool]) -> Callable[[Path, State], bool]:
    """One check that runs each in turn (the first that fails decides)."""
    def check(image: Path, state: State) -> bool:
        return all(c(image, state) for c in checks)

    return check
