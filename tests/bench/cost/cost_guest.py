"""The cost benchmark, run inside one sandbox guest by ``make bench-cost``.

Under software emulation a guest's work is instructions, and QEMU can count
them exactly: the guest is booted with the insncount plugin (insncount.c),
and each measured run is fenced by ``insnmark start`` and ``insnmark stop``,
so the plugin appends the instructions every vCPU executed in between,
kernel and user, fio and the consumer alike, to a file on the host.  Each
run is a fixed number of I/Os (not a fixed time), so a configuration's
count divided by its I/Os is what one I/O costs, and its ratio to
dm-linear's is the cost of tracing.

The configurations and workloads are the peer table's (guest_bench.Peer,
PEER_WORKLOADS), on brd and on the virtio disk, every run REPS times in one
set-up; the order of the runs is written to $IMGREMENT_RESULTS/cost-runs.json,
line k of the plugin's file being run k's count (cost_report.py pairs them).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench.guest_bench import PEER_FS, PEER_WORKLOADS, STREAMS, Peer, _cpu_ticks, sh

CONFIGS = [c for c in ["linear", "blktrace", "bpftrace", "meta", "writes-drop",
                       "writes-wait", "log-writes"]
           if c in os.environ.get("COST_CONFIGS", c).split(",")]
WORKLOADS = [w for w in PEER_WORKLOADS
             if w in os.environ.get("COST_WORKLOADS", w).split(",")]
DISKS = os.environ.get("COST_DISKS", "brd,virtio").split(",")
REPS = int(os.environ.get("COST_REPS", "5"))  # 0: the profiled runs alone
#: I/Os of a rep's two runs: a fixed count, the same in every configuration.
#: The report takes the difference of the two (the longer minus the shorter,
#: over the I/Os between them), so what every run costs once (fio starting
#: and ending, the marker programs, the settle, the sync) cancels out.  What
#: does not cancel is work that comes in lumps at times of its own: in a
#: probe, one meta run of five came out 17M instructions short of the others
#: (which agreed within 1M), 2.4% of the 60,000 4 KiB I/Os between the two
#: runs; so that many, and the short run need only be long enough to be
#: steady.  seqwrite-1m's I/Os cost about 30 times as much (dm-linear's
#: 313,000 instructions), but a run's fixed cost varies just as much (its
#: short runs' standard deviation was 2.5M to 4.6M instructions in every
#: cell, 4 KiB or 1 MiB): with 400 I/Os between the runs (125M
#: instructions) the five runs of a cell spread 4 to 15%, so 2,000, about
#: as many instructions as the 4 KiB cells' 60,000 I/Os.  (Most of that
#: fixed cost's variation was fio's clock calibration, since moved out of
#: the window: see measured().)  A long run stores
#: 2 GB, so the stores are freed after every run (Peer.free_store).
DEFAULT_IOS = (int(os.environ.get("COST_SHORT", "5000")),
               int(os.environ.get("COST_LONG", "65000")))
IOS = {"seqwrite-1m": (8, 2008)}
MARK = os.environ["INSNMARK"]
OUT = Path(os.environ["IMGREMENT_RESULTS"])
#: fio's working directory (where it leaves the prerun's output)
FIO_DIR = Path("/tmp/cost-fio")
#: 2 MiB pages reserved for fio's buffers: seqwrite-1m's four 1 MiB buffers
#: and their alignment round up to three, one run at a time
HUGEPAGES = 8
#: The vCPU fio runs on, in every run.  Left to the scheduler, bpftrace's
#: runs came out at two levels about 2,000 instructions an I/O apart: its
#: tracepoints' perf events are opened on CPU 0 alone, and the kernel runs
#: the perf event's own path (perf_tp_event and on) for an event that fires
#: on the CPU where one is open, so its cost followed where fio ran.  CPU 1:
#: on a machine of many CPUs, most of a tracepoint's events fire elsewhere.
FIO_CPU = 1
SETTLE = 1.0  # seconds after fio for the consumer to drain, inside the window
#: Where one more run a cell is profiled by block (not among the REPS).
PROFILE_DISKS = os.environ.get("COST_PROFILE_DISKS", "brd").split(",")
#: Every run profiled, to see what varies between a cell's runs (a probe:
#: cost_report reads only the "profile" rep's windows).
PROFILE_ALL = bool(os.environ.get("COST_PROFILE_ALL"))


def drained(pid: int, quiet: float = 0.3, limit: float = 300.0) -> None:
    """Return once the consumer ``pid`` has used no CPU for ``quiet``
    seconds: what it still had to read and store after fio ended is then
    inside the window.  A consumer that falls behind (bpftrace formats
    each event in user space, several times fio's own work an I/O) would
    otherwise carry part of one run's work into the next, or out of every
    window, as the fixed settle did."""
    deadline = time.monotonic() + limit
    last, since = _cpu_ticks(pid), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the consumer (pid {pid}) still busy {limit:.0f} s after fio")
        time.sleep(0.1)
        now = _cpu_ticks(pid)
        if now != last:
            last, since = now, time.monotonic()


def measured(path: str, workload: str, ios: int, *, profile: bool = False,
             fenced: bool = True, consumer: int | None = None) -> dict[str, Any]:
    """One fenced run of ``ios`` I/Os of ``workload`` on ``path``: fio's own
    figures (``profile``: the plugin also writes the run's profile by block;
    not ``fenced``: no markers, the plugin counts nothing; ``consumer``: the
    pid of the tracer's consumer, waited for until it is idle).

    The window opens inside fio, in its job process just before the first
    I/O (``--exec_prerun``), not before fio starts: fio calibrates its clock
    at start by spinning on the clock for about 65 ms (51 rounds of 1.28 ms,
    fio's gettime.c), and under emulation the instructions a spin of fixed
    guest time executes follow the host's speed.  In a probe that spin was
    the whole spread of a cell's short runs: their user-space instructions
    ranged over 15-19M in five runs, the kernel's under 1M."""
    argv = ["fio", "--name=cost", f"--filename={path}", "--direct=1", "--ioengine=libaio",
            # io_size far beyond: the I/O count ends the run, not the 200M region
            f"--number_ios={ios}", "--size=200M", "--io_size=100G", "--randrepeat=1",
            "--norandommap",
            # no disk statistics: fio's helper thread reads them every 250 ms,
            # work by the clock that made dm-linear's runs spread 2%
            "--disk_util=0",
            # fio's buffers in huge pages reserved at start (HUGEPAGES): see main()
            "--iomem=mmaphuge",
            # fio on one vCPU (FIO_CPU): which one its I/O ran on changed a peer's work
            f"--cpus_allowed={FIO_CPU}",
            "--group_reporting", "--output-format=json",
            # the workload's own io_size (seqwrite's 512m) would end it first
            *(a for a in PEER_WORKLOADS[workload] if not a.startswith("--io_size"))]
    if fenced:
        argv.append(f"--exec_prerun={MARK} {'profile' if profile else 'start'}")
    # the harness's own garbage collection, a lump whenever its allocations
    # reach the threshold, kept out of the window: collected before, none inside
    gc.collect()
    gc.disable()
    try:
        # fio writes the prerun's output to cost.prerun.txt in its directory
        out = subprocess.run(argv, capture_output=True, text=True, check=True,
                             cwd=FIO_DIR).stdout
        time.sleep(SETTLE)
        if consumer is not None:
            drained(consumer)
        # what the consumer stored, written back inside the window: otherwise the
        # page cache's writeback lands in one run or the next as its timer says
        sh("sync")
        if fenced:
            sh(MARK, "stop")
    finally:
        gc.enable()
    # fio says where the prerun's output went on the same stdout, before the JSON
    job = json.loads(out[out.index("{"):])["jobs"][0]
    done = job["read"]["total_ios"] + job["write"]["total_ios"]
    return {"ios": done, "fio_reads": job["read"]["total_ios"],
            "fio_writes": job["write"]["total_ios"]}


def start_and_settle(timeout: int) -> None:
    """Start udev's event queue again and wait up to ``timeout`` seconds for
    it to empty, saying the start again every 30 s.

    Twice a grid stopped here with the queue never emptying (900 s): udevd
    idle in epoll, no worker, no task in D state, so nothing was being
    done; the queued events were simply not started (whether the one start
    message was lost or a retry of a held event was never scheduled, a
    later message wakes it).  On a timeout, what udev's workers and every
    task in D state wait on goes to stderr before the error."""
    deadline = time.monotonic() + timeout
    again = 0
    while True:
        sh("udevadm", "control", "--start-exec-queue")
        if not subprocess.run(["udevadm", "settle", "--timeout=30"], check=False).returncode:
            break
        if time.monotonic() > deadline:
            diagnose_udev()
            raise RuntimeError(f"udevadm settle: udev's queue not empty after {timeout} s")
        again += 1
    if again:
        print(f"udev's queue emptied after the start was said {again + 1} times",
              file=sys.stderr, flush=True)


def diagnose_udev() -> None:
    """What udev and the tasks in D state are doing, to stderr."""
    for cmd in (["ps", "-eo", "pid,stat,wchan:32,etime,args"],
                ["dmsetup", "info", "-c"], ["dmsetup", "status"],
                ["udevadm", "control", "--ping"], ["free", "-m"],
                ["sh", "-c", "dmesg | tail -40"]):
        subprocess.run(cmd, check=False, stdout=sys.stderr)
    for task in Path("/proc").glob("[0-9]*"):
        try:
            # the state follows the comm's closing parenthesis: the last one,
            # since a comm may hold ") " itself
            if (task / "stat").read_text().rsplit(") ", 1)[1][0] == "D":
                print(task.name, (task / "cmdline").read_bytes().replace(b"\0", b" "),
                      (task / "stack").read_text(), file=sys.stderr)
        except OSError:
            continue


def main() -> int:
    STREAMS.mkdir(parents=True, exist_ok=True)
    FIO_DIR.mkdir(parents=True, exist_ok=True)
    # fio's buffers in huge pages, so that every configuration's bios are
    # built from the same physical layout.  A direct 1 MiB write's pages
    # join one segment where they are physically contiguous and make one
    # each where not, and malloc'd buffers were contiguous as the allocator
    # happened to have memory at the time (transparent huge pages): in the
    # 6 Dec afternoon grid, dm-linear's profiled seqwrite-1m run made about
    # 190 calls of __bio_add_page an I/O fewer than blktrace's, meta's and
    # dm-log-writes', and with __bio_release_pages 3,760 instructions an
    # I/O were counted as their cost; run by run, a bio had 3 to 256 segments.
    Path("/proc/sys/vm/nr_hugepages").write_text(f"{HUGEPAGES}\n")
    meminfo = dict(line.split(":", 1) for line in
                   Path("/proc/meminfo").read_text().splitlines())
    if int(meminfo["HugePages_Total"]) < HUGEPAGES:
        raise RuntimeError(f"only {meminfo['HugePages_Total'].strip()} of {HUGEPAGES} "
                           "huge pages could be reserved for fio's buffers")
    # 3 GiB each: the disk, the log, the capture file system, which takes a
    # cell's every written byte in the data modes (up to 2.5 GB)
    subprocess.run(["modprobe", "brd", "rd_nr=3", f"rd_size={3072 << 10}"], check=True)
    scratch = os.environ["IMGREMENT_SCRATCH_DISKS"].split()
    disks = {"brd": ("/dev/ram0", "/dev/ram1", "/dev/ram2"),
             "virtio": (scratch[0], scratch[1], scratch[2])}
    runs: list[dict[str, Any]] = []
    # the symbols now (and again at the end, with dm-log-writes' loaded): a
    # run cut short still has them
    shutil.copyfile("/proc/kallsyms", OUT / "cost-kallsyms.txt")
    for disk_name in DISKS:
        disk, log_disk, fs_disk = disks[disk_name]
        # every block the runs touch written once, the stores' whole disks
        # too: a RAM disk allocates (and zeroes) a page on its first write,
        # which the first configuration to store there would pay alone (a
        # first probe charged writes-drop and dm-log-writes 4,200
        # instructions an I/O of clear_page that later ones did not pay);
        # nothing discards them again (no discard mount option, the log kept)
        # (a virtio disk's host file has no such cost inside the guest)
        stores = ((log_disk, "100%"), (fs_disk, "100%")) if disk_name == "brd" else ()
        for target, size in ((disk, "200M"), *stores):
            sh("fio", "--name=fill", f"--filename={target}", "--rw=write", "--bs=1m",
               f"--size={size}", "--direct=1", "--ioengine=libaio", "--iodepth=4")
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", fs_disk)
        PEER_FS.mkdir(parents=True, exist_ok=True)
        sh("mount", fs_disk, str(PEER_FS))
        try:
            for workload in WORKLOADS:
                for config in CONFIGS:
                    peer = Peer(config, disk, log_disk, free_log=False)
                    try:
                        peer.start()
                        # udev's work stays out of the windows: each fio run ends by
                        # closing the device, whose watch makes udev probe it again,
                        # a burst of work that lands in a window or after it by chance
                        sh("udevadm", "settle")
                        sh("udevadm", "control", "--stop-exec-queue")
                        first = len(runs)
                        short, long = IOS.get(workload, DEFAULT_IOS)
                        pid = peer.consumer.pid if peer.consumer is not None else None
                        measured(peer.path, workload, short, fenced=False,
                                 consumer=pid)  # warm-up
                        reps: list[int | str] = list(range(REPS))
                        if disk_name in PROFILE_DISKS:
                            reps.append("profile")
                        for rep in reps:
                            for part, ios in (("short", short), ("long", long)):
                                got = measured(peer.path, workload, ios,
                                               profile=rep == "profile" or PROFILE_ALL,
                                               consumer=pid)
                                got.update(disk=disk_name, workload=workload, config=config,
                                           rep=rep, part=part)
                                runs.append(got)
                                peer.free_store()
                            (OUT / "cost-runs.json").write_text(json.dumps(runs, indent=1))
                        # the cell's queued probes, one per fio run
                        start_and_settle(int(os.environ.get("COST_SETTLE", "900")))
                        stats = peer.stop()
                        for r in runs[first:]:
                            r["dropped"] = stats.get("dropped")
                        print(f"cost {disk_name:6} {workload:24} {config:11} "
                              f"{REPS} runs, dropped {stats.get('dropped', '-')}", flush=True)
                    finally:
                        subprocess.run(["udevadm", "control", "--start-exec-queue"],
                                       check=False)
                        peer.close()
        finally:
            sh("umount", str(PEER_FS))
    (OUT / "cost-runs.json").write_text(json.dumps(runs, indent=1))
    # the kernel's symbols and the modules' (dm-log-writes' loaded by now), for
    # the profile: root reads the addresses
    shutil.copyfile("/proc/kallsyms", OUT / "cost-kallsyms.txt")
    subprocess.run(["rmmod", "brd"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
