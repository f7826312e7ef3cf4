"""Captured writes rebuild the disk: apply at each mark and at the end equals
the device byte for byte, replay to a mark gives a clean filesystem, and
blkparse reads the exported trace."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from imgrement_dm import increment
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.output import parts_of
from imgrement_dm.records import BioRecord
from tests.guest.helpers import CLI, cli, sh, sha256, start_record

SIZE = 64 << 20


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One recorded ext4 session over a loop disk, with the device's sha256 at each mark."""
    d = tmp_path_factory.mktemp("inc")
    disk_img = d / "disk.img"
    with disk_img.open("wb") as f:
        f.truncate(SIZE)
    base = d / "base.img"
    shutil.copyfile(disk_img, base)
    loop = sh("losetup", "--find", "--show", str(disk_img)).strip()
    sh("udevadm", "settle")
    cap = d / "session.cap"
    shas: dict[str, str] = {}
    try:
        r = cli("wrap", loop)
        assert r.returncode == 0, r.stderr
        rec = start_record("traced", cap)
        node = "/dev/mapper/traced"
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", node)
        mnt = d / "mnt"
        mnt.mkdir()
        sh("mount", node, str(mnt))

        def checkpoint(label: str) -> None:
            sh("sync")
            sh("fsfreeze", "--freeze", str(mnt))  # no write can slip past the mark
            try:
                assert cli("mark", "traced", label).returncode == 0
                shas[label] = sha256(node)
            finally:
                sh("fsfreeze", "--unfreeze", str(mnt))

        (mnt / "kept.txt").write_text("written before m1\n" * 100)
        (mnt / "big.bin").write_bytes(os.urandom(3 << 20))
        checkpoint("m1")
        (mnt / "big.bin").unlink()
        (mnt / "later.txt").write_text("after m1\n")
        checkpoint("m2")
        sh("umount", str(mnt))
        shas["end"] = sha256(node)
        assert cli("unwrap", "traced").returncode == 0
        _, err = rec.communicate(timeout=120)
        assert rec.returncode == 0, err
    finally:
        subprocess.run(["dmsetup", "remove", "traced"], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
    return {"dir": d, "base": base, "cap": cap, "shas": shas}


@pytest.mark.parametrize("point", ["m1", "m2", "end"])
def test_apply_reproduces_the_device_at_each_mark(session: dict[str, object],
                                                  point: str) -> None:
    d, base, cap = Path(str(session["dir"])), Path(str(session["base"])), session["cap"]
    out = d / f"applied-{point}.img"
    args = ["apply", str(cap), str(base), "-o", str(out)]
    if point != "end":
        args += ["--until-mark", point]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert not parts_of(out)
    shas = session["shas"]
    assert isinstance(shas, dict)
    assert sha256(out) == shas[point]
    out.unlink()


@pytest.mark.parametrize("point", ["m1", "end"])
def test_a_qcow2_increment_reads_as_the_device(session: dict[str, object], point: str) -> None:
    """The overlay qemu-img reads (backing: the base) equals the device at the
    point, and stores the changed clusters only: far less than the disk."""
    d, base, cap = (Path(str(session[k])) for k in ("dir", "base", "cap"))
    out = d / f"inc-{point}.qcow2"
    raw = d / f"inc-{point}.raw"
    args = ["apply", str(cap), str(base), "-o", str(out), "--format", "qcow2"]
    if point != "end":
        args += ["--until-mark", point]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    sh("qemu-img", "check", str(out))
    info = json.loads(sh("qemu-img", "info", "--output=json", str(out)))
    assert info["backing-filename"] == str(base.resolve()) and info["virtual-size"] == SIZE
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw))
    shas = session["shas"]
    assert isinstance(shas, dict)
    assert sha256(raw) == shas[point]
    entries = json.loads(sh("qemu-img", "map", "--output=json", str(out)))
    stored = sum(int(e["length"]) for e in entries if e["depth"] == 0 and e["data"])
    said = re.search(r"(\d+) clusters of 64 KiB stored", r.stdout)
    assert said and stored == int(said.group(1)) * 65536 > 0, r.stdout
    # mkfs discarded the whole disk: those clusters are marked zero, not stored
    assert out.stat().st_size < SIZE // 2
    out.unlink()
    raw.unlink()


def test_replay_to_a_mark_gives_a_clean_filesystem(session: dict[str, object]) -> None:
    d, base, cap = Path(str(session["dir"])), Path(str(session["base"])), session["cap"]
    img = d / "replayed.img"
    shutil.copyfile(base, img)
    r = cli("replay", str(cap), str(img), "--until-mark", "m1")
    assert r.returncode == 0, r.stderr
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", str(img)], capture_output=True,
                          text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    mnt = d / "check"
    mnt.mkdir(exist_ok=True)
    sh("mount", "-o", "ro,loop,noload", str(img), str(mnt))
    try:
        assert (mnt / "kept.txt").read_text() == "written before m1\n" * 100
        assert (mnt / "big.bin").stat().st_size == 3 << 20
        assert not (mnt / "later.txt").exists()
    finally:
        sh("umount", str(mnt))
        sh("udevadm", "settle")
    img.unlink()


def test_replay_onto_a_device_refuses_one_in_use(session: dict[str, object], disk2: str,
                                                 tmp_path: Path) -> None:
    """replay writes below whatever uses the disk: it refuses as wrap does (mounted,
    wrapped, held open exclusively, too small) and changes nothing then; onto a
    free disk, the first SIZE bytes become the device at the mark."""
    cap, shas = str(session["cap"]), session["shas"]
    assert isinstance(shas, dict)
    sh("mkfs.ext4", "-q", "-F", disk2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", disk2, str(mnt))
    try:
        r = cli("replay", cap, disk2, "--until-mark", "m1")
        assert r.returncode == 4, r.stderr
        assert r.stderr == (f"imgrement-dm: error: {disk2} is mounted at {mnt}; unmount it "
                            f"first ('umount {mnt}')\n")
    finally:
        sh("umount", str(mnt))  # (which writes to the disk: compare from here on)
    sh("udevadm", "settle")
    before = sha256(disk2, SIZE)
    assert cli("wrap", disk2, "--name", "held").returncode == 0
    try:
        r = cli("replay", cap, disk2, "--until-mark", "m1")
        assert r.returncode == 4, r.stderr
        assert (f"{disk2} is already wrapped by imgrement device 'held' (/dev/mapper/held); "
                "writing below it would bypass the trace: replay onto /dev/mapper/held, or "
                "unwrap it first") in r.stderr
    finally:
        assert cli("unwrap", "held").returncode == 0
    holder = subprocess.Popen(
        ["python3", "-c", "import os, sys, time\n"
         f"fd = os.open({disk2!r}, os.O_RDONLY | os.O_EXCL)\n"
         "print('held', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        r = cli("replay", cap, disk2, "--until-mark", "m1")
        assert r.returncode == 4, r.stderr
        assert "is in use (the kernel refuses an exclusive open)" in r.stderr
    finally:
        holder.communicate("", timeout=30)
    assert sha256(disk2, SIZE) == before  # every refusal left it as it was

    small = tmp_path / "small.img"
    small.write_bytes(bytes(1 << 20))
    loop = sh("losetup", "--find", "--show", str(small)).strip()
    try:
        r = cli("replay", cap, loop)
        assert r.returncode == 11 and (f"{loop} is 1048576 bytes, smaller than the traced "
                                       f"device ({SIZE} bytes)") in r.stderr, r.stderr
    finally:
        sh("losetup", "-d", loop)

    sh("blkdiscard", "-z", "-l", str(SIZE), disk2)  # the base image was all zeros
    r = cli("replay", cap, disk2, "--until-mark", "m1")
    assert r.returncode == 0, r.stderr
    assert sha256(disk2, SIZE) == shas["m1"]


def test_diff_covers_every_changed_sector(session: dict[str, object]) -> None:
    base, cap = Path(str(session["base"])), Path(str(session["cap"]))
    r = cli("diff", str(cap), "--json")
    assert r.returncode == 0, r.stderr
    spans = json.loads(r.stdout)
    assert spans == sorted(spans) and all(n > 0 for _, n in spans)
    assert spans == [list(s) for s in increment.extents(cap).spans]
    final = Path(str(session["dir"])) / "final.img"
    increment.apply(base, cap, final)
    a, b = base.read_bytes(), final.read_bytes()
    changed = {i for i in range(SIZE // 512)
               if a[i * 512 : (i + 1) * 512] != b[i * 512 : (i + 1) * 512]}
    covered: set[int] = set()
    for start, n in spans:
        covered.update(range(start, start + n))
    assert changed and changed <= covered
    final.unlink()


def test_blkparse_reads_the_exported_trace(session: dict[str, object]) -> None:
    d, cap = Path(str(session["dir"])), Path(str(session["cap"]))
    r = cli("export", str(cap), "--format", "blktrace", "-o", str(d / "bt"))
    assert r.returncode == 0, r.stderr
    with CaptureReader(cap) as reader:
        bios = [i for i in reader.items() if isinstance(i, BioRecord)]
    parsed = subprocess.run(["blkparse", "-i", str(d / "bt"), "-f", "%a %d %n\n"],
                            capture_output=True, text=True, check=True, cwd=d).stdout
    q = [ln.split() for ln in parsed.splitlines() if ln.startswith("Q ")]
    reads = [x for x in q if x[1].startswith("R")]
    writes = [x for x in q if x[1].startswith("W")]
    assert len(q) == len(bios)
    assert len(reads) == sum(b.op_name == "read" for b in bios)
    assert len(writes) == sum(b.op_name in ("write", "write-zeroes") for b in bios)
    assert sum(int(x[2]) for x in writes) * 512 == sum(
        b.size for b in bios if b.op_name in ("write", "write-zeroes"))
    assert sum(int(x[2]) for x in reads) * 512 == sum(b.size for b in bios
                                                      if b.op_name == "read")
    subprocess.run(["blkparse", "-i", str(d / "bt"), "-d", str(d / "bt.bin"), "-O"],
                   check=True, cwd=d, capture_output=True)
    btt = subprocess.run(["btt", "-i", str(d / "bt.bin")], capture_output=True,
                         text=True, check=False, cwd=d)
    assert btt.returncode == 0 and "Q2C" in btt.stdout


def test_damaged_captures_are_refused(session: dict[str, object]) -> None:
    d, base, cap = Path(str(session["dir"])), Path(str(session["base"])), session["cap"]
    raw = Path(str(cap)).read_bytes()
    cut = d / "cut.cap"
    cut.write_bytes(raw[: len(raw) // 2])
    out = d / "never.img"
    r = cli("apply", str(cut), str(base), "-o", str(out))
    assert r.returncode == 9 and "is truncated" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not parts_of(out)
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    bad = d / "bad.cap"
    bad.write_bytes(bytes(flipped))
    r = cli("apply", str(bad), str(base), "-o", str(out))
    assert r.returncode == 9 and "corrupted" in r.stderr
    assert not out.exists()


def test_record_is_stopped_cleanly_by_ctrl_c(tmp_path: Path, disk: str) -> None:
    assert cli("wrap", disk).returncode == 0
    try:
        out = tmp_path / "stop.cap"
        rec = subprocess.Popen([*CLI, "record", "traced", "-o", str(out)],
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60  # the CLI starts slowly under emulation
        while not parts_of(out):
            assert time.monotonic() < deadline and rec.poll() is None
            time.sleep(0.2)
        time.sleep(1)
        assert not out.exists()
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err
        assert "records " in err and str(out) in err
        with CaptureReader(out) as reader:
            assert reader.validate().drops == 0
    finally:
        assert cli("unwrap", "traced").returncode == 0


def test_plot_of_the_session(session: dict[str, object]) -> None:
    d, cap = Path(str(session["dir"])), session["cap"]
    out = d / "access.png"
    # in a process of its own: matplotlib keeps its font files open for later
    # drawings, which the fixture around each test would take for a leak
    r = cli("plot", str(cap), "-o", str(out), process=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    writes = int(r.stdout.split(" writes")[0].rsplit(" ", 1)[1])
    with CaptureReader(Path(str(cap))) as reader:
        expected = sum(isinstance(i, BioRecord) and i.op_name in
                       ("write", "write-zeroes", "discard") for i in reader.items())
    assert writes == expected > 0
