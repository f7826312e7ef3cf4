"""Run make test's long jobs side by side: at most N at once, in the order given.

Why: under software emulation a guest's suite keeps about one of the two
host cores busy (the tests are one Python process; the other vCPU idles),
so one guest after another left half the machine idle for most of CI's 90
minutes.  Two lanes fill it.  Jobs start in the order given, so the longest
go first (the full suite, then the debug kernel's build and suite) and the
short ones fill in behind.

Each job is ``NAME=COMMAND`` (a shell command).  Its output is printed line
by line as ``[NAME] line`` and kept whole in ``LOGS/lane-NAME.log``; at the
end one line per job gives its exit status and minutes.  The exit status is
1 if any job failed.  SIGTERM or SIGINT (a CI timeout, ^C) stops every job's
whole process group (guests included) before this exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType


@dataclass
class Job:
    name: str
    command: str
    proc: subprocess.Popen[bytes] | None = None
    began: float = 0.0
    took: float = 0.0
    code: int | None = None
    reader: threading.Thread | None = field(default=None, repr=False)


def parse(spec: str) -> Job:
    name, sep, command = spec.partition("=")
    if not sep or not name or not command or not name.replace("-", "").replace(".", "").isalnum():
        raise SystemExit(f"lanes: a job is NAME=COMMAND (NAME of letters, digits, '-', '.'), "
                         f"not {spec!r}")
    return Job(name, command)


_print_lock = threading.Lock()


def _pump(job: Job, log: Path) -> None:
    """Copy the job's output to the log and, prefixed, to our stdout."""
    assert job.proc is not None and job.proc.stdout is not None
    with log.open("wb") as f:
        for line in iter(job.proc.stdout.readline, b""):
            f.write(line)
            f.flush()
            text = line.decode(errors="replace").rstrip("\n")
            with _print_lock:
                print(f"[{job.name}] {text}", flush=True)


def _start(job: Job, logs: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with _print_lock:
        print(f"lanes: start {job.name}: {job.command}", flush=True)
    job.began = time.monotonic()
    # its own process group, so that stopping it stops its guest too
    job.proc = subprocess.Popen(["bash", "-c", job.command], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    job.reader = threading.Thread(target=_pump, args=(job, logs / f"lane-{job.name}.log"),
                                  daemon=True)
    job.reader.start()


def _kill(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def _stop_all(jobs: list[Job]) -> None:
    for job in jobs:
        if job.proc is not None and job.proc.poll() is None:
            _kill(job.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for job in jobs:
        if job.proc is None:
            continue
        try:
            job.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(job.proc.pid, signal.SIGKILL)
            job.proc.wait()


def run(jobs: list[Job], lanes: int, logs: Path, poll: float = 0.5) -> int:
    """Run ``jobs``, ``lanes`` at a time; 0 if every one exited 0."""
    logs.mkdir(parents=True, exist_ok=True)
    waiting = list(jobs)
    running: list[Job] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        with _print_lock:
            print(f"lanes: signal {signum}: stopping {[j.name for j in running]}", flush=True)
        _stop_all(running)
        sys.exit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while waiting or running:
            while waiting and len(running) < lanes:
                job = waiting.pop(0)
                _start(job, logs)
                running.append(job)
            time.sleep(poll)
            for job in [j for j in running if j.proc is not None and j.proc.poll() is not None]:
                assert job.proc is not None and job.reader is not None
                job.reader.join(30)  # a child left behind may hold the pipe open
                job.code = job.proc.returncode
                job.took = time.monotonic() - job.began
                running.remove(job)
                with _print_lock:
                    print(f"lanes: {job.name} ended: exit {job.code} after "
                          f"{job.took / 60:.1f} min", flush=True)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    print("lanes: summary")
    for job in jobs:
        print(f"  {job.name:<16} exit {job.code}  {job.took / 60:5.1f} min")
    return 0 if all(j.code == 0 for j in jobs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lanes", type=int, default=2, help="jobs at once (default 2)")
    parser.add_argument("--logs", type=Path, required=True, help="folder for lane-NAME.log")
    parser.add_argument("jobs", nargs="+", metavar="NAME=COMMAND")
    args = parser.parse_args(argv)
    if args.lanes < 1:
        parser.error("--lanes must be 1 or more")
    jobs = [parse(s) for s in args.jobs]
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        parser.error(f"job names must differ: {names}")
    began = time.monotonic()
    rc = run(jobs, args.lanes, args.logs)
    print(f"lanes: {len(jobs)} jobs, {args.lanes} at once, {(time.monotonic() - began) / 60:.1f} "
          f"min in all")
    return rc


if __name__ == "__main__":
    sys.exit(main())
