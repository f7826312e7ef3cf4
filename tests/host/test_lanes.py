"""tests/lanes.py: make test's jobs side by side, never more than N at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import lanes

ROOT = Path(__file__).resolve().parents[2]


def _spans(log: Path) -> list[tuple[str, float, float]]:
    out = []
    for line in log.read_text().splitlines():
        name, start, end = line.split()
        out.append((name, float(start), float(end)))
    return out


def _job(name: str, log: Path, seconds: float, code: int = 0) -> str:
    """A job that notes when it ran, prints two lines and exits with ``code``."""
    return (f"{name}=s=$(date +%s.%N); echo one; sleep {seconds}; echo two; "
            f"echo {name} $s $(date +%s.%N) >> {log}; exit {code}")


def test_at_most_n_at_once_in_the_order_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    spans = tmp_path / "spans"
    jobs = [lanes.parse(_job(n, spans, 0.6)) for n in ("a", "b", "c", "d", "e")]
    assert lanes.run(jobs, 2, tmp_path / "logs", poll=0.05) == 0
    ran = _spans(spans)
    assert sorted(n for n, _, _ in ran) == ["a", "b", "c", "d", "e"]
    for _, start, _ in ran:  # at every job's start, at most two were running
        assert sum(1 for _, s, e in ran if s <= start < e) <= 2
    starts = {n: s for n, s, _ in ran}
    assert starts["a"] < starts["c"] and starts["b"] < starts["c"] < starts["e"]
    # ran side by side: five 0.6 s jobs in well under their 3 s sum
    assert max(e for _, _, e in ran) - min(starts.values()) < 2.6
    out = capsys.readouterr().out
    for n in "abcde":
        assert f"[{n}] one\n" in out and f"[{n}] two\n" in out
        assert (tmp_path / "logs" / f"lane-{n}.log").read_text() == "one\ntwo\n"


def test_one_lane_runs_them_one_after_another(tmp_path: Path) -> None:
    spans = tmp_path / "spans"
    jobs = [lanes.parse(_job(n, spans, 0.2)) for n in ("a", "b", "c")]
    assert lanes.run(jobs, 1, tmp_path / "logs", poll=0.02) == 0
    ran = _spans(spans)
    assert [n for n, _, _ in ran] == ["a", "b", "c"]
    for (_, _, end), (_, start, _) in zip(ran, ran[1:]):
        assert end <= start


def test_a_failed_job_fails_the_run_and_the_others_still_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spans = tmp_path / "spans"
    jobs = [lanes.parse(_job("ok1", spans, 0.1)), lanes.parse(_job("bad", spans, 0.1, code=3)),
            lanes.parse(_job("ok2", spans, 0.1))]
    assert lanes.run(jobs, 2, tmp_path / "logs", poll=0.02) == 1
    assert sorted(n for n, _, _ in _spans(spans)) == ["bad", "ok1", "ok2"]
    assert [j.code for j in jobs] == [0, 3, 0]
    assert "bad              exit 3" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["noequals", "=cmd", "name=", "a b=cmd", "a/b=cmd"])
def test_a_malformed_job_is_refused(spec: str) -> None:
    with pytest.raises(SystemExit, match="a job is NAME=COMMAND"):
        lanes.parse(spec)


def test_sigterm_stops_every_job_and_its_children(tmp_path: Path) -> None:
    """A CI timeout must not leave a guest running: the job's whole group goes."""
    pids = tmp_path / "pids"
    job = f"long=sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "lanes.py"), "--logs",
                             str(tmp_path / "logs"), job, job.replace("long=", "long2=")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (pids.exists() and len(pids.read_text().split()) == 4):
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert proc.returncode == 128 + signal.SIGTERM
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 5
        while _alive(pid):
            assert time.monotonic() < deadline, f"pid {pid} outlived lanes.py"
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    # a zombie (reaped by nobody yet in this test's tree) counts as gone
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
