"""The ready-made checks (imgrement_dm/checks.py) on file-system images.

They mount images through loop devices, as root: this host's kernel has
loop, ext4, XFS and btrfs built in (the guest suite runs them on crash
states of captures made through the target, tests/guest/test_crashcheck.py).
Each verdict is exact: which check fails, as what, naming which labels.
"""

from __future__ import annotations

import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgrement_dm import checks
from imgrement_dm import crashcheck as crash
from imgrement_dm.errors import CrashCheckError
from tests.host import streams
from tests.host.test_ackoracle import _capture

MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"]}
SIZE = {"ext4": 32 << 20, "xfs": 300 << 20, "btrfs": 128 << 20}


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _image(d: Path, kind: str) -> Path:
    img = d / f"{kind}.img"
    with img.open("wb") as f:
        f.truncate(SIZE[kind])
    _sh(*MKFS[kind], str(img))
    return img


def _put(img: Path, kind: str, files: dict[str, Path]) -> None:
    """Copy files into the image's root, through a mount."""
    with checks._mounted(img, kind) as mnt:
        for name, src in files.items():
            _sh("cp", str(src), str(mnt / name))


def _state(acked: list[str]) -> crash.State:
    """A state whose boundary must hold ``acked``: a capture of ack marks."""
    with tempfile.TemporaryDirectory(prefix="acks-") as d:
        cap = _capture(Path(d) / "a.cap", [streams.mark(i, f"ack:{a}", time_ns=i + 1)
                                           for i, a in enumerate(acked)]
                       or [streams.mark(0, "x")])
        bounds, _ = crash.load(cap)
    return crash.State(bounds[-1], None)


@pytest.fixture
def images(tmp_path: Path) -> Iterator[dict[str, Path]]:
    yield {kind: _image(tmp_path, kind) for kind in MKFS}


def test_each_file_system_is_known_by_its_signature(images: dict[str, Path],
                                                    tmp_path: Path) -> None:
    assert {k: checks.fs_type(p) for k, p in images.items()} == {k: k for k in MKFS}
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(1 << 20))
    with pytest.raises(checks.CheckFailed, match="no ext2/3/4, XFS or btrfs signature"):
        checks.fsck(junk, _state([]))


def test_fsck_passes_clean_file_systems(images: dict[str, Path]) -> None:
    for img in images.values():
        assert checks.fsck(img, _state([]))


def test_fsck_finds_what_preen_would_have_hidden(images: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """A wrong link count: e2fsck -fp repairs it silently (exit 1), so a check
    built on it would pass; the ready-made one fails the state."""
    img = images["ext4"]
    (tmp_path / "f").write_text("x")
    _put(img, "ext4", {"f": tmp_path / "f"})
    _sh("debugfs", "-w", "-R", "set_inode_field /f links_count 3", str(img))
    with pytest.raises(checks.CheckFailed, match=r"e2fsck -fn exit 4: .*ref count is 3"):
        checks.fsck(img, _state([]))
    # the control: preen takes it for a routine fix
    copy = tmp_path / "copy.img"
    _sh("cp", "--sparse=always", str(img), str(copy))
    assert subprocess.run(["e2fsck", "-fp", str(copy)], capture_output=True,
                          check=False).returncode == 1


def test_a_state_that_does_not_mount_fails(images: dict[str, Path]) -> None:
    img = images["xfs"]
    with img.open("r+b") as f:  # the signature stays, the rest of the superblock goes
        f.seek(4)
        f.write(b"\xff" * 200)
    with pytest.raises(checks.CheckFailed, match="the xfs state does not mount"):
        checks.fsck(img, _state([]))


def _db(path: Path, rows: int, *, wal: bool = False) -> None:
    con = sqlite3.connect(path)
    if wal:
        con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.commit()
    if wal:  # the table in the database file, the rows only in the WAL
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("PRAGMA wal_autocheckpoint=0")
    for i in range(1, rows + 1):
        con.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 100))
        con.commit()
    if not wal:
        con.close()
        return
    # leave the rows in the WAL alone, as a crash would: copy before closing
    for suffix in ("", "-wal"):
        _sh("cp", f"{path}{suffix}", f"{path}.crash{suffix}")
    con.close()


@pytest.mark.parametrize("kind", list(MKFS))
def test_sqlite_holds_every_acknowledged_row(images: dict[str, Path], tmp_path: Path,
                                             kind: str) -> None:
    _db(tmp_path / "app.db", 5)
    img = images[kind]
    _put(img, kind, {"app.db": tmp_path / "app.db"})
    check = checks.sqlite("/app.db", "SELECT id FROM t")
    assert check(img, _state(["1", "3", "5"]))
    with pytest.raises(crash.LostAcknowledged) as lost:
        check(img, _state(["1", "6", "5", "7"]))
    assert lost.value.labels == ("6", "7")


def test_sqlite_replays_the_wal_of_the_state(images: dict[str, Path], tmp_path: Path) -> None:
    """Rows only in the WAL count: the copy's -wal is taken along."""
    _db(tmp_path / "app.db", 4, wal=True)
    img = images["ext4"]
    _put(img, "ext4", {"app.db": tmp_path / "app.db.crash",
                       "app.db-wal": tmp_path / "app.db.crash-wal"})
    check = checks.sqlite("/app.db", "SELECT id FROM t")
    assert check(img, _state(["1", "2", "3", "4"]))
    _sh("debugfs", "-w", "-R", "rm /app.db-wal", str(img))  # the WAL lost: rows lost
    with pytest.raises(crash.LostAcknowledged) as lost:
        check(img, _state(["1", "2", "3", "4"]))
    assert lost.value.labels == ("1", "2", "3", "4")


def test_sqlite_finds_a_damaged_database(images: dict[str, Path], tmp_path: Path) -> None:
    _db(tmp_path / "app.db", 200)
    raw = bytearray((tmp_path / "app.db").read_bytes())
    raw[4096 + 8:4096 + 200] = b"\xa5" * 192  # a b-tree page's header and cells
    (tmp_path / "bad.db").write_bytes(bytes(raw))
    img = images["ext4"]
    _put(img, "ext4", {"app.db": tmp_path / "bad.db"})
    check = checks.sqlite("/app.db", "SELECT id FROM t")
    with pytest.raises(checks.CheckFailed, match=r"integrity_check|cannot read"):
        check(img, _state(["1"]))


def test_a_missing_database_loses_only_what_was_acknowledged(images: dict[str, Path]) -> None:
    check = checks.sqlite("/app.db", "SELECT id FROM t")
    assert check(images["ext4"], _state([]))
    with pytest.raises(crash.LostAcknowledged):
        check(images["ext4"], _state(["1"]))


def test_a_relative_database_path_is_refused() -> None:
    with pytest.raises(CrashCheckError, match="must be absolute"):
        checks.sqlite("app.db", "SELECT 1")


@pytest.mark.parametrize(("tool", "package"), [("e2fsck", "e2fsprogs"), ("xfs_repair", "xfsprogs"),
                                               ("btrfs", "btrfs-progs"), ("umount", "mount")])
def test_a_missing_tool_names_its_package(tool: str, package: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CrashCheckError, match=f"the check needs {tool}: install {package}$"):
        checks._run([tool, "-V"])
