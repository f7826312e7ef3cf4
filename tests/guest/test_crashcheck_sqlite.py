"""A real application under crashcheck: SQLite on ext4, with acknowledgements.

The application is the ``sqlite3`` shell: one process inserting rows, each in
its own transaction, and after each commit acknowledging the row with
``.shell echo ack:ID > FIFO`` (the recorder's --marks FIFO turns each line
into a mark; no Python in the application).  crashcheck's sqlite check then
asks of every crash state: is the database whole, and does it hold every row
acknowledged by then?  What SQLite documents, seen:

- WAL with synchronous=FULL, and DELETE with synchronous=EXTRA: every
  state passes (no false alarm);
- DELETE with synchronous=FULL: states lose the last acknowledged row.  The
  commit point is the journal's unlink, which FULL does not sync: a power
  cut before the file system commits it leaves a hot journal, and the next
  open rolls the transaction back.  SQLite documents exactly this as what
  EXTRA adds ("the directory containing a rollback journal is synced after
  that journal is unlinked").  One row at most, and never a corrupt file;
- synchronous=OFF: states lose acknowledged rows (a commit does not wait for
  the disk), and ``apply --state`` rebuilds one that sqlite3 itself shows
  without them;
- WAL with synchronous=NORMAL: states lose the last acknowledged rows (SQLite
  says a commit "might roll back following a power loss"), and none is
  corrupt (it says the database stays consistent).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from imgrement_dm import checks
from imgrement_dm import crashcheck as crash
from tests.guest.helpers import cli, sh
from tests.guest.test_crashcheck import _crashcheck, _recorded

ROWS = 6
QUERY = "SELECT id FROM t"


def _sqlite3(db: Path, script: str) -> str:
    return subprocess.run(["sqlite3", str(db)], input=script, capture_output=True, text=True,
                          check=True).stdout


def _record_app(d: Path, journal: str, sync: str) -> tuple[Path, Path]:
    fifo = d / "acks"

    def prepare(mnt: Path) -> None:
        _sqlite3(mnt / "app.db", f"PRAGMA journal_mode={journal};\n"
                                 "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);\n")

    def work(mnt: Path) -> None:
        lines = [f"PRAGMA synchronous={sync};"]
        for i in range(1, ROWS + 1):
            lines += [f"INSERT INTO t VALUES ({i}, randomblob(3000));",
                      f".shell echo ack:{i} > {fifo}"]
        _sqlite3(mnt / "app.db", "\n".join(lines) + "\n")

    return _recorded(d, prepare, work, "", record_args=("--marks", str(fifo)))


def _states(d: Path, journal: str, sync: str) -> tuple[Path, Path, crash.Summary]:
    base, cap = _record_app(d, journal, sync)
    bounds, size = crash.crash_boundaries(cap, base)
    # every line became a mark, in order (the FIFO is gone with the recording)
    assert bounds[-1].listing.acks == [str(i) for i in range(1, ROWS + 1)]
    assert not (d / "acks").exists()
    summary = crash.check_capture(bounds, base, size, checks.sqlite("/app.db", QUERY),
                                  max_states=400, jobs=2, workdir=d / "w")
    print(f"{journal}/{sync}: {summary.describe()}")
    assert not summary.stopped and len(summary.results) == summary.to_check
    return base, cap, summary


def test_wal_full_never_loses_an_acknowledged_row(tmp_path: Path) -> None:
    _, _, summary = _states(tmp_path, "WAL", "FULL")
    assert not summary.failed, [(r.state.id, r.output) for r in summary.failed]
    assert max(len(r.state.acked) for r in summary.results) == ROWS


def test_delete_extra_never_loses_an_acknowledged_row(tmp_path: Path) -> None:
    """Through the CLI, --fsck and --sqlite together, end to end."""
    base, cap = _record_app(tmp_path, "DELETE", "EXTRA")
    r = _crashcheck(base, cap, "--fsck", "--sqlite", "/app.db", QUERY, "-j", "2", states=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    print(f"DELETE/EXTRA: {r.stderr.strip()}")
    assert rows and {x["verdict"] for x in rows} == {"passed"}
    assert max(x["acked"] for x in rows) == ROWS and "(stopped" not in r.stderr


def test_delete_full_may_lose_the_last_acknowledged_row(tmp_path: Path) -> None:
    _, _, summary = _states(tmp_path, "DELETE", "FULL")
    assert summary.lost, summary.describe()
    assert all(r.verdict == crash.LOST for r in summary.failed), \
        [(r.state.id, r.output) for r in summary.failed if r.verdict != crash.LOST]
    for r in summary.lost:  # the newest row, and only it
        assert list(r.lost) == r.state.acked[-1:], (r.state.id, r.lost, r.state.acked)
    # and the file system's next commit makes it durable: the last state holds all
    assert summary.results[-1].passed and len(summary.results[-1].state.acked) == ROWS


def test_synchronous_off_loses_acknowledged_rows(tmp_path: Path) -> None:
    base, cap, summary = _states(tmp_path, "DELETE", "OFF")
    lost = summary.lost
    assert lost, summary.describe()
    assert {r.verdict for r in summary.failed} <= {crash.LOST, "inconsistent"}
    for r in summary.failed:
        print(f"  {r.state.id}: {r.verdict}: {r.output}")
    # the first such state, rebuilt alone: sqlite3 itself lacks the rows
    first = lost[0]
    shown = _sqlite3_of_state(tmp_path, cap, base, first.state.id, QUERY)
    have = set(shown.stdout.split()) if shown is not None else set()
    assert set(first.lost) and not set(first.lost) & have, (first.lost, have)
    assert set(first.state.acked) - have == set(first.lost)
    # a state the check found damaged (seen: one, in the final writeback) is
    # damaged for sqlite3 too
    for r in summary.failed:
        if r.verdict == "inconsistent":
            again = _sqlite3_of_state(tmp_path, cap, base, r.state.id,
                                      "PRAGMA integrity_check")
            assert again is not None and (again.returncode != 0
                                          or again.stdout.strip() != "ok"), again
            assert "malformed" in again.stdout + again.stderr, again


def _sqlite3_of_state(d: Path, cap: Path, base: Path, state_id: str,
                      sql: str) -> subprocess.CompletedProcess[str] | None:
    """The sqlite3 shell's answer to ``sql`` on the state rebuilt alone by
    ``apply --state`` (on a copy of its database; None: there is none)."""
    tag = state_id.replace(":", "-").replace(",", "_")
    img = d / f"state-{tag}.img"
    rebuilt = cli("apply", str(cap), str(base), "--state", state_id, "-o", str(img))
    assert rebuilt.returncode == 0, rebuilt.stderr
    mnt = d / f"look-{tag}"
    mnt.mkdir()
    copy = d / f"copy-{tag}.db"
    sh("mount", "-o", "loop", str(img), str(mnt))
    try:
        for suffix in ("", "-journal"):
            if (mnt / f"app.db{suffix}").exists():
                sh("cp", str(mnt / f"app.db{suffix}"), f"{copy}{suffix}")
    finally:
        sh("umount", str(mnt))
        mnt.rmdir()
        img.unlink()
    if not copy.exists():
        return None
    return subprocess.run(["sqlite3", str(copy), sql], capture_output=True, text=True,
                          check=False)


def test_wal_normal_loses_the_last_rows_but_never_corrupts(tmp_path: Path) -> None:
    _, _, summary = _states(tmp_path, "WAL", "NORMAL")
    assert summary.lost, summary.describe()
    assert all(r.verdict == crash.LOST for r in summary.failed), \
        [(r.state.id, r.output) for r in summary.failed if r.verdict != crash.LOST]
    # what is lost is the newest: a state missing row k misses every later acked one
    for r in summary.lost:
        k = min(int(x) for x in r.lost)
        assert set(r.lost) == {a for a in r.state.acked if int(a) >= k}, (r.state.id, r.lost)
