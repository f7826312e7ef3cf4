"""The I/O benchmark, run inside one sandbox guest by ``make bench``.

For each disk (the virtio scratch disk and a brd RAM disk) and each
repetition, every configuration (raw device, dm-linear, imgrement in each
capture mode) runs every workload for a fixed time with fio, O_DIRECT.  The
order of configurations rotates between repetitions, and ratios are taken
within a repetition, so slow drift of this noisy machine cancels out.  For
imgrement, ``imgrement-dm trace -o`` drains the records into a file, as a
user would, and its CPU time is measured.

Writes raw results to $IMGREMENT_RESULTS/bench-raw.json; the host turns
them into results.json and docs/benchmarks.md (tests/bench/report.py).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import imgrement_dm
from imgrement_dm.output import parts_of
from imgrement_dm.records import stream_path

WORKLOADS: dict[str, list[str]] = {
    "randread-4k-qd1": ["--rw=randread", "--bs=4k", "--iodepth=1"],
    "randread-4k-qd32": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "randwrite-4k-qd1": ["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    "randwrite-4k-qd32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    # (at most 1 GiB, so the consumer's stream file fits the tmpfs: 2 GiB of 4)
    "seqwrite-1m": ["--rw=write", "--bs=1m", "--iodepth=4", "--io_size=1g"],
}
CONFIGS = ["raw", "linear", "meta", "writes", "all"]
# The peers, side by side, on each kind of disk: write workloads (replay needs
# writes) and a mixed one.  "blktrace" traces dm-linear into a directory;
# "bpftrace" prints each bio's block tracepoints (queue and complete) on
# dm-linear into a file, as an eBPF tool would; "meta" and "writes-drop"
# are imgrement drained by `trace -q -o`; all four store on ext4 on a third
# disk;
# "writes-wait" is imgrement in wait mode drained by `record` (lossless);
# "log-writes" is dm-log-writes (xfstests' replay tool).  The lossless two
# write their log to a second disk of the same kind: dm-log-writes onto it
# raw, `record` into a file on ext4 on a third.
PEER_WORKLOADS: dict[str, list[str]] = {
    "randwrite-4k-qd1": ["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    "randwrite-4k-qd32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "randwrite-4k-qd1-fsync8": ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=8"],
    "seqwrite-1m": ["--rw=write", "--bs=1m", "--iodepth=4", "--io_size=512m"],
    "randrw-70-30-4k-qd16": ["--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16"],
}
# (each paired with dm-linear over the same disk: peer_pairs)
PEER_CONFIGS = [c for c in ["blktrace", "bpftrace", "meta", "writes-drop", "writes-wait",
                             "log-writes"]
                if c in os.environ.get("BENCH_PEER_CONFIGS", c).split(",")]
# One line per event, what blktrace and imgrement's meta records also hold.
BPFTRACE = """tracepoint:block:block_bio_queue /args->dev == DEV/ {
  printf("Q %llu %llu %u %s %d %s\\n", nsecs, args->sector, args->nr_sector, args->rwbs,
         pid, comm); }
tracepoint:block:block_bio_complete /args->dev == DEV/ {
  printf("C %llu %llu %u %s %d\\n", nsecs, args->sector, args->nr_sector, args->rwbs,
         args->error); }"""
PEER_REPS = int(os.environ.get("BENCH_PEER_REPS", "3"))
PEER_PAIRS = int(os.environ.get("BENCH_PEER_PAIRS", "2"))
PEER_FS = Path("/tmp/imgrement-bench-fs")  # ext4 on the third disk (the guest's /mnt is read-only)
RUNTIME = int(os.environ.get("BENCH_RUNTIME", "4"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
SIZE = 200 << 20  # bytes of each disk the workloads use
# The goals, measured once more in pairs (see paired()): disk, mode, workload.
GOAL_RUNS = [("virtio", "meta", "randread-4k-qd32"), ("virtio", "meta", "randwrite-4k-qd32"),
             ("brd", "meta", "randread-4k-qd32"), ("brd", "meta", "randwrite-4k-qd32"),
             ("virtio", "writes", "seqwrite-1m"), ("brd", "writes", "seqwrite-1m")]
PAIRS = int(os.environ.get("BENCH_PAIRS", "8"))
PAIR_RUNTIME = 2
# Shorter for the peers: a consumer that keeps up stores everything fio
# writes, and 3 s of seqwrite-1m must fit the capture disk (make bench).
PEER_RUNTIME = int(os.environ.get("BENCH_PEER_RUNTIME", "3"))
OUT = Path(os.environ["IMGREMENT_RESULTS"])
# A tmpfs file, as a user's fast local file would be (the guest's /tmp is an
# overlay on the 9p share, which stores at 60% of tmpfs's rate).
STREAMS = Path("/dev/shm/imgrement-bench")


def sh(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def fio(path: str, workload: str, *extra: str) -> dict[str, Any]:
    out = sh("fio", "--name=bench", f"--filename={path}", "--direct=1",
             "--ioengine=libaio", "--time_based", f"--runtime={RUNTIME}",
             f"--size={SIZE}", "--randrepeat=0", "--norandommap", "--group_reporting",
             "--output-format=json", *{**WORKLOADS, **PEER_WORKLOADS}[workload], *extra)
    job = json.loads(out)["jobs"][0]
    side = job["write"] if "write" in workload else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": side["iops"],
        "bw_bytes": side["bw_bytes"],
        "lat_mean_us": side["lat_ns"]["mean"] / 1000,
        "lat_p99_us": pct.get("99.000000", 0) / 1000,
    }


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def _points_to(link: Path, target: str) -> bool:
    try:
        return os.readlink(link) == target
    except OSError:  # closed meanwhile
        return False


def _ready(pid: int, stream: str | None = None) -> int:
    """Wait until the consumer holds the stream open and has gone quiet.

    Starting Python and importing the CLI takes seconds of CPU under
    software emulation; fio must not run while that happens, or the start-up
    would be billed to tracing.  Returns the CPU ticks spent so far.
    """
    stream = stream or str(stream_path("bench"))
    fds = Path(f"/proc/{pid}/fd")
    deadline = time.monotonic() + 120
    while not any(_points_to(fd, stream) for fd in fds.iterdir()):
        if time.monotonic() > deadline:
            raise RuntimeError("the consumer never opened the stream")
        time.sleep(0.1)
    before = _cpu_ticks(pid)
    while True:
        time.sleep(0.5)
        now = _cpu_ticks(pid)
        if now - before <= 2 or time.monotonic() > deadline:  # <= 20 ms in 0.5 s: idle
            return now
        before = now


class Setup:
    """A configuration over one disk: the path fio uses, and its consumer."""

    def __init__(self, config: str, disk: str, tag: str, disk_name: str) -> None:
        self.config = config
        self.disk_name = disk_name
        self.workload = ""
        self.disk = disk
        self.path = disk
        self.traced: imgrement_dm.TracedDevice | None = None
        self.consumer: subprocess.Popen[bytes] | None = None
        self.cpu_ready = 0  # the consumer's CPU ticks when it was ready
        # a local file (tmpfs), as a user's disk would be; not the 9p share
        self.stream = STREAMS / f"stream-{tag}.rec"
        if config == "linear":
            n = sh("blockdev", "--getsz", disk).strip()
            subprocess.run(["dmsetup", "create", "benchlin", "--table",
                            f"0 {n} linear {disk} 0"], check=True)
            self.path = "/dev/mapper/benchlin"
        elif config != "raw":
            self.traced = imgrement_dm.wrap(disk, name="bench", capture=config,
                                            buffer_kb=64 * 1024)
            self.path = str(self.traced.node)
        sh("udevadm", "settle")

    def start(self, workload: str) -> None:
        self.workload = workload
        if self.traced is not None:
            self.traced.reset_stats()
            self.consumer = subprocess.Popen(
                ["imgrement-dm", "trace", "bench", "-q", "-o", str(self.stream)])
            self.cpu_ready = _ready(self.consumer.pid)

    def stop(self, *, keep: bool = True) -> dict[str, Any]:
        """Stop the consumer; ``keep`` the meta randread stream for the decoder."""
        if self.traced is None or self.consumer is None:
            return {}
        st = self.traced.status()
        time.sleep(0.5)  # the consumer catches up
        self.consumer.send_signal(signal.SIGINT)
        _, _, usage = os.wait4(self.consumer.pid, 0)
        self.consumer.returncode = 0
        self.consumer = None
        size = self.stream.stat().st_size if self.stream.exists() else 0
        if keep and self.config == "meta" and self.workload == "randread-4k-qd32":
            # a real metadata stream of small bios, for the host decoder benchmark
            shutil.copyfile(self.stream, OUT / f"stream-meta-{self.disk_name}.rec")
        self.stream.unlink(missing_ok=True)
        ticks = os.sysconf("SC_CLK_TCK")
        return {
            "records": st.records,
            "captured_bytes": st.bytes,
            "stream_file_bytes": size,
            "dropped": st.dropped,
            # from the moment it held the stream, to its exit
            "consumer_cpu_s": round(usage.ru_utime + usage.ru_stime - self.cpu_ready / ticks, 3),
        }

    def close(self) -> None:
        if self.consumer is not None:  # start() or a run failed: stop() never ran
            self.consumer.kill()
            self.consumer.wait()
            self.consumer = None
        if self.traced is not None:
            self.traced.unwrap()
        elif self.config == "linear":
            # --retry: udev may still be probing the device fio just closed
            subprocess.run(["dmsetup", "remove", "--retry", "benchlin"], check=True)


def paired(disk_name: str, disk: str, mode: str, workload: str) -> dict[str, Any]:
    """dm-linear and imgrement over one disk at once, fio alternating between them.

    The main runs compare configurations seconds apart, each after its own
    set-up; on this machine two 4 s runs of the same thing differ by 10%
    and more.  Here both devices exist together (dm shares its claim on the
    disk), the consumer runs throughout (idle while fio drives dm-linear),
    and PAIRS short runs alternate, first one then the other first, so each
    ratio compares runs taken back to back.
    """
    traced = Setup(mode, disk, f"{disk_name}-{mode}-paired", disk_name)
    linear: Setup | None = None
    metric = "bw_bytes" if workload == "seqwrite-1m" else "iops"
    ratios = []
    try:
        linear = Setup("linear", disk, "", disk_name)
        traced.start(workload)
        for i in range(PAIRS):
            got = {}
            for s in (linear, traced) if i % 2 == 0 else (traced, linear):
                got[s.config] = fio(s.path, workload, f"--runtime={PAIR_RUNTIME}")[metric]
                for part in parts_of(traced.stream):  # trace -o's temporary file
                    # keep the stream file within the tmpfs: drop what is stored
                    # (the consumer writes on past a hole, at the same cost)
                    os.truncate(part, 0)
            ratios.append(got[mode] / got["linear"])
        stats = traced.stop(keep=False)
    finally:
        if linear is not None:
            linear.close()
        traced.close()
    print(f"{disk_name:6} paired {mode:6} {workload:18} "
          f"{[round(r, 3) for r in ratios]}  dropped {stats['dropped']}", flush=True)
    return {"disk": disk_name, "workload": workload, "mode": mode, "metric": metric,
            "ratios": [round(r, 4) for r in ratios], "dropped": stats["dropped"],
            "records": stats["records"], "consumer_cpu_s": stats["consumer_cpu_s"]}


def store_rate() -> dict[str, float]:
    """How fast this guest stores bytes into a file in STREAMS, from memory.

    The ceiling of any consumer that saves captured data here: 512 MiB in
    4 MiB write()s (as the consumer writes its windows), best of two.
    """
    buf = bytearray(os.urandom(1 << 20)) * 4
    best = {"mb_per_s": 0.0, "cpu_s_per_gb": 0.0}
    for _ in range(2):
        path = STREAMS / "store-rate"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        t, c = time.monotonic(), time.process_time()
        for _ in range(128):
            os.write(fd, buf)
        wall, cpu = time.monotonic() - t, time.process_time() - c
        os.close(fd)
        path.unlink()
        if (512 << 20) / wall / 1e6 > best["mb_per_s"]:
            best = {"mb_per_s": round((512 << 20) / wall / 1e6, 1),
                    "cpu_s_per_gb": round(cpu / (512 << 20) * 1e9, 2)}
    return best


def _busy_ticks() -> int:
    """CPU ticks spent by the whole guest (every CPU, not idle or iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(v) - v[3] - v[4]


def store_paths(directory: Path) -> dict[str, dict[str, float]]:
    """What storing 512 MiB from mapped memory into a file in ``directory``
    costs: buffered write()s then fsync, as a consumer that copies does, and
    O_DIRECT, as `record` does (imgrement_dm/directio.py).  4 MiB writes;
    MB/s, the writer's CPU per GB and the whole guest's (writeback runs in
    kernel threads), best of two each."""
    src = mmap.mmap(-1, 64 << 20)
    src[:] = os.urandom(1 << 20) * 64
    view = memoryview(src)
    out: dict[str, dict[str, float]] = {}
    for how in ("buffered", "o_direct"):
        best: dict[str, float] = {}
        for _ in range(2):
            path = directory / "store-rate"
            sh("sync")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                         | (os.O_DIRECT if how == "o_direct" else 0))
            t, c, b = time.monotonic(), time.process_time(), _busy_ticks()
            for i in range(128):
                os.write(fd, view[(i % 16) << 22:((i % 16) + 1) << 22])
            os.fsync(fd)
            wall, cpu = time.monotonic() - t, time.process_time() - c
            busy = (_busy_ticks() - b) / os.sysconf("SC_CLK_TCK")
            os.close(fd)
            path.unlink()
            gb = (512 << 20) / 1e9
            if (512 << 20) / wall / 1e6 > best.get("mb_per_s", 0):
                best = {"mb_per_s": round((512 << 20) / wall / 1e6, 1),
                        "cpu_s_per_gb": round(cpu / gb, 2),
                        "guest_cpu_s_per_gb": round(busy / gb, 2)}
        out[how] = best
    view.release()
    src.close()
    return out


def contention(disk: str) -> dict[str, float]:
    """dm-linear's seqwrite-1m throughput while a process spins on the other vCPU.

    Under emulation the host's two cores run both vCPUs and QEMU's I/O
    thread, which moves the virtio disk's data; this shows what any busy
    consumer costs the disk before the target does anything.
    """
    n = sh("blockdev", "--getsz", disk).strip()
    subprocess.run(["dmsetup", "create", "benchlin", "--table", f"0 {n} linear {disk} 0"],
                   check=True)
    ratios = []
    try:
        for _ in range(REPS):
            # fio on vCPU 0, the spinner on vCPU 1: they never share a vCPU
            alone = fio("/dev/mapper/benchlin", "seqwrite-1m", "--cpus_allowed=0")["bw_bytes"]
            spin = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c",
                                     "while True: pass"])
            try:
                time.sleep(1)
                busy = fio("/dev/mapper/benchlin", "seqwrite-1m",
                           "--cpus_allowed=0")["bw_bytes"]
            finally:
                spin.kill()
                spin.wait()
            ratios.append(busy / alone)
    finally:
        subprocess.run(["dmsetup", "remove", "--retry", "benchlin"], check=True)
    return {"linear_seqwrite_1m_ratio_with_spinner": round(statistics.median(ratios), 3)}


class Peer:
    """One configuration of the peer comparison over one disk."""

    def __init__(self, config: str, disk: str, log_disk: str, *,
                 free_log: bool = True) -> None:
        self.config = config
        self.log_disk = log_disk
        self.free_log = free_log  # discard dm-log-writes' log when done
        self.consumer: subprocess.Popen[bytes] | None = None
        self.traced: imgrement_dm.TracedDevice | None = None
        # every tracer stores into the same ext4 file system on the third
        # disk, so each pays for storing its trace alike (page cache,
        # writeback), where the peers once wrote into tmpfs
        self.out = (PEER_FS / "capture" if config.startswith("writes") or config == "meta"
                    else PEER_FS / config)
        self.cpu_ready = 0
        # the baseline (linear) and blktrace's dm-linear exist side by side
        self.dm_name = {"linear": "benchbase", "blktrace": "benchlin", "bpftrace": "benchbpf",
                        "log-writes": "benchlw"}.get(config, "")
        n = sh("blockdev", "--getsz", disk).strip()
        if config in ("linear", "blktrace", "bpftrace"):
            subprocess.run(["dmsetup", "create", self.dm_name, "--table",
                            f"0 {n} linear {disk} 0"], check=True)
            self.path = f"/dev/mapper/{self.dm_name}"
        elif config == "log-writes":
            self.table = f"0 {n} log-writes {disk} {log_disk}"
            subprocess.run(["dmsetup", "create", self.dm_name, "--table", self.table],
                           check=True)
            self.path = f"/dev/mapper/{self.dm_name}"
        else:
            self.traced = imgrement_dm.wrap(
                disk, name="bench", capture="meta" if config == "meta" else "writes",
                buffer_kb=64 * 1024, overflow="wait" if config == "writes-wait" else "drop")
            self.path = str(self.traced.node)
        sh("udevadm", "settle")

    def start(self) -> None:
        if self.config == "blktrace":
            self.out.mkdir(exist_ok=True)
            # its summary at the end says how many events it dropped.  -b 64
            # -n 16: 1 MiB of relay buffer a CPU, and the output file mapped
            # (and mlocked, so faulted in and zeroed at once) 1 MiB at a time,
            # where its default 512 KiB x 16 = 8 MiB windows came in lumps of
            # 34M instructions, in some of a cell's runs and not in others
            self.consumer = subprocess.Popen(
                ["blktrace", "-b", "64", "-n", "16", "-d", self.path, "-D", str(self.out)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(2)  # its per-CPU threads set up the relay buffers
        elif self.config == "bpftrace":
            rdev = os.stat(self.path).st_rdev  # the kernel's dev_t: major << 20 | minor
            prog = BPFTRACE.replace("DEV", str(os.major(rdev) << 20 | os.minor(rdev)))
            # 64 MiB of perf ring a CPU (its default, 64 pages, lost a third
            # of a cost cell's events, so many that its cost varied 30%
            # with how many): it drains behind fio, and the cost bench waits
            # for it (cost_guest.drained)
            self.consumer = subprocess.Popen(["bpftrace", "-o", str(self.out), "-e", prog],
                                             stdout=subprocess.DEVNULL,
                                             env={**os.environ,
                                                  "BPFTRACE_PERF_RB_PAGES": "16384"})
            deadline = time.monotonic() + 300  # it compiles the program first
            while not (self.out.is_file() and b"Attaching" in self.out.read_bytes()[:200]):
                if self.consumer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bpftrace did not attach its probes")
                time.sleep(0.2)
            self.cpu_ready = _cpu_ticks(self.consumer.pid)
        elif self.traced is not None:
            self.traced.reset_stats()
            cmd = (["imgrement-dm", "record", "bench", "-q", "-o", str(self.out)]
                   if self.config == "writes-wait" else
                   ["imgrement-dm", "trace", "bench", "-q", "-o", str(self.out)])
            self.consumer = subprocess.Popen(cmd)
            self.cpu_ready = _ready(self.consumer.pid)

    def free_store(self) -> None:
        """Give back the space the runs so far stored, between two runs.

        The cost bench's long seqwrite-1m runs write 2 GB each, more than a
        cell's runs leave room for on the capture file system or the log
        disk together: the capture file's blocks are punched out (the
        consumer writes on at its own offset, into a sparse file), and
        dm-log-writes' table is loaded again, whose log then starts again
        at its beginning (its blocks on a RAM disk stay allocated, so no
        run pays for new pages).  Neither touches a run's window."""
        if self.config in ("meta", "writes-drop", "writes-wait"):
            # the consumer writes its .part file and renames it when it ends
            for part in parts_of(self.out):
                size = part.stat().st_size
                if size:
                    sh("fallocate", "--punch-hole", "--keep-size", "--offset", "0",
                       "--length", str(size), str(part))
        elif self.config == "log-writes":
            sh("dmsetup", "suspend", self.dm_name)
            try:
                sh("dmsetup", "load", self.dm_name, "--table", self.table)
            finally:
                # the cost bench holds udev's queue during a cell: waiting
                # for udev to take the resume's event would never end
                sh("dmsetup", "resume", "--noudevsync", self.dm_name)

    def stop(self) -> dict[str, Any]:
        got: dict[str, Any] = {}
        if self.traced is not None:
            st = self.traced.status()
            got.update(dropped=st.dropped, waited=st.waited, records=st.records)
        if self.consumer is not None:
            time.sleep(0.5)
            self.consumer.send_signal(signal.SIGINT)
            if self.consumer.poll() is not None:
                # it ended by itself (it says why on stderr): no figures from it
                raise RuntimeError(f"{self.config}: the consumer exited with "
                                   f"{self.consumer.returncode} during the run")
            # read to its end (it exits), then reaped by wait4 for its usage
            summary = (self.consumer.stdout.read().decode(errors="replace")
                       if self.config == "blktrace" and self.consumer.stdout else "")
            _, _, usage = os.wait4(self.consumer.pid, 0)
            self.consumer.returncode = 0
            if self.config == "blktrace":
                # "Total: N events (dropped D), K KiB data"
                m = re.search(r"Total:\s+(\d+) events \(dropped (\d+)\)", summary)
                if m is None:
                    raise RuntimeError(f"blktrace: no summary in its output: {summary!r}")
                got.update(events=int(m[1]), dropped=int(m[2]))
            if self.out.is_file():
                got["stored_bytes"] = self.out.stat().st_size
            if self.config == "bpftrace":
                events = lost = 0
                with self.out.open("rb") as f:
                    for line in f:
                        if line.startswith((b"Q ", b"C ")):
                            events += 1
                        elif lm := re.match(rb"Lost (\d+) events", line):
                            lost += int(lm[1])  # the perf buffer was full
                got.update(events=events, dropped=lost)
            ticks = os.sysconf("SC_CLK_TCK")
            got["consumer_cpu_s"] = round(usage.ru_utime + usage.ru_stime
                                          - self.cpu_ready / ticks, 3)
            self.consumer = None
        if self.out.is_dir():
            shutil.rmtree(self.out, ignore_errors=True)
        self.out.unlink(missing_ok=True)
        return got

    def close(self) -> None:
        if self.consumer is not None:  # start() or a run failed: stop() never ran
            self.consumer.kill()
            self.consumer.wait()
            self.consumer = None
        if self.traced is not None:
            self.traced.unwrap()
        else:
            subprocess.run(["dmsetup", "remove", "--retry", self.dm_name], check=True)
        if self.config == "log-writes" and self.free_log:
            # the next log starts again at sector 0; a RAM disk frees its pages
            subprocess.run(["blkdiscard", self.log_disk], check=False)


def peer_pairs(disk: str, log_disk: str, config: str, workload: str) -> dict[str, Any]:
    """One peer configuration against dm-linear over the same disk, paired.

    Both devices exist together (dm shares its claim on the disk), the
    peer's consumer runs throughout (idle while fio drives dm-linear), and
    PEER_PAIRS runs of each alternate, first one then the other first
    (ABBA...), so each ratio compares two runs taken seconds apart and slow
    drift stays out of it.  What remains is each run's own noise: the
    report measures it from dm-linear's two runs (report.linear_noise).  The
    consumer's figures (dropped, waited, stored bytes, CPU) cover all of the
    peer's runs in the set-up.
    """
    # the peer first: wrap refuses a disk another device-mapper device holds
    peer = Peer(config, disk, log_disk)
    base: Peer | None = None
    runs: list[dict[str, Any]] = []
    baseline: list[dict[str, Any]] = []
    try:
        base = Peer("linear", disk, log_disk)
        peer.start()
        for i in range(PEER_PAIRS):
            for s in (base, peer) if i % 2 == 0 else (peer, base):
                got = fio(s.path, workload, f"--runtime={PEER_RUNTIME}")
                (runs if s is peer else baseline).append(got)
                time.sleep(0.5)  # what the consumer still drains stays in its own run
        result: dict[str, Any] = {"runs": runs, "linear": baseline}
        result.update(peer.stop())
    finally:
        if base is not None:
            base.close()
        peer.close()
    return result


def peers(disks: dict[str, tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Every peer configuration over each disk, paired with dm-linear
    (peer_pairs), one set-up per configuration and workload (dm-log-writes'
    log starts afresh each time).  One workload at a time, every
    configuration of it back to back, the order rotated per repetition."""
    runs: list[dict[str, Any]] = []
    for disk_name, (disk, log_disk, fs_disk) in disks.items():
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", fs_disk)
        PEER_FS.mkdir(parents=True, exist_ok=True)
        sh("mount", "-o", "discard", fs_disk, str(PEER_FS))  # freed files free RAM disks
        try:
            store = store_paths(PEER_FS)
            print(f"peers  {disk_name:6} store into ext4: {store}", flush=True)
            runs.append({"disk": disk_name, "store": store})
            for rep in range(PEER_REPS):
                for w, workload in enumerate(PEER_WORKLOADS):
                    k = (rep + w) % len(PEER_CONFIGS)
                    for config in PEER_CONFIGS[k:] + PEER_CONFIGS[:k]:
                        result = peer_pairs(disk, log_disk, config, workload)
                        result.update(disk=disk_name, workload=workload, config=config, rep=rep)
                        runs.append(result)
                        print(f"peers  {disk_name:6} rep{rep} {workload:24} {config:11} "
                              + " ".join(f"{r['iops']:.0f}/{b['iops']:.0f}" for r, b in
                                         zip(result["runs"], result["linear"], strict=True))
                              + f" IOPS (peer/linear) dropped {result.get('dropped', '-')}",
                              flush=True)
        finally:
            sh("umount", str(PEER_FS))
    return runs


def main() -> int:
    STREAMS.mkdir(parents=True, exist_ok=True)
    # ram0: the disk (SIZE of it used); ram1: dm-log-writes' log and ram2 the
    # file system for record's capture, whose pages exist only as they are
    # written and are discarded after each run.  3 GiB each: a consumer that
    # keeps up with seqwrite-1m stores about 0.7 GB a second here
    subprocess.run(["modprobe", "brd", "rd_nr=3", f"rd_size={3072 << 10}"], check=True)
    disks = {"virtio": os.environ["IMGREMENT_SCRATCH_DISKS"].split()[0], "brd": "/dev/ram0"}
    # For a quick look at a part (first argument, or BENCH_ONLY): brd-randread-4k-qd32,...;
    # "peers" runs the peer comparison alone (the report then updates only its section)
    only = set(filter(None, (sys.argv[1] if len(sys.argv) > 1
                             else os.environ.get("BENCH_ONLY", "")).split(",")))
    ceilings: dict[str, Any] = {}
    if only != {"peers"}:
        ceilings = {"store": store_rate(), "contention": contention(disks["virtio"])}
        print(f"ceilings: {ceilings}", flush=True)
    runs = []
    pairs: list[dict[str, Any]] = []
    for disk_name, disk in disks.items():
        workloads = [w for w in WORKLOADS if not only or f"{disk_name}-{w}" in only]
        if not workloads:
            continue
        # precondition: every block the reads touch has been written
        sh("fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1m",
           f"--size={SIZE}", "--direct=1", "--ioengine=libaio", "--iodepth=4")
        for rep in range(REPS):
            order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]
            for config in order:
                setup = Setup(config, disk, f"{disk_name}-{config}-{rep}", disk_name)
                try:
                    for workload in workloads:
                        setup.start(workload)
                        before = resource.getrusage(resource.RUSAGE_CHILDREN)
                        result = fio(setup.path, workload)
                        after = resource.getrusage(resource.RUSAGE_CHILDREN)
                        result.update(setup.stop())
                        result.update(disk=disk_name, workload=workload, config=config, rep=rep,
                                      fio_cpu_s=(after.ru_utime + after.ru_stime
                                                 - before.ru_utime - before.ru_stime))
                        runs.append(result)
                        print(f"{disk_name:6} rep{rep} {config:6} {workload:18} "
                              f"{result['iops']:10.0f} IOPS  dropped "
                              f"{result.get('dropped', 0)}", flush=True)
                finally:
                    setup.close()
        for goal_disk, mode, workload in GOAL_RUNS:
            if goal_disk == disk_name and workload in workloads:
                pairs.append(paired(disk_name, disk, mode, workload))
    meta = {"kernel": os.uname().release, "runtime_s": RUNTIME, "reps": REPS,
            "size_bytes": SIZE, "cpus": os.cpu_count(),
            "ceilings": ceilings, "pairs": PAIRS, "pair_runtime_s": PAIR_RUNTIME,
            "peer_reps": PEER_REPS, "peer_pairs": PEER_PAIRS, "peer_runtime_s": PEER_RUNTIME,
            "clocksource": Path("/sys/devices/system/clocksource/clocksource0/"
                                "current_clocksource").read_text().strip()}
    scratch = os.environ["IMGREMENT_SCRATCH_DISKS"].split()
    peer_disks = {"brd": ("/dev/ram0", "/dev/ram1", "/dev/ram2"),
                  "virtio": (scratch[0], scratch[1], scratch[2])}
    peer_runs = peers(peer_disks) if not only or "peers" in only else []
    raw = {"meta": meta, "runs": runs, "paired": pairs, "peers": peer_runs}
    (OUT / "bench-raw.json").write_text(json.dumps(raw, indent=1))
    subprocess.run(["rmmod", "brd"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
