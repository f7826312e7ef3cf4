"""apply --format qcow2: an overlay QEMU reads as the raw result, holding only what changed.

Judged by qemu-img itself (check, compare, map, info), not by our reader.
The guest suite does the same on a capture made through the target
(tests/guest/test_increment.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgrement_dm import cli, layout
from imgrement_dm.formats import qcow2
from imgrement_dm.formats.capture import write_capture
from tests.host import streams

OP = {name: code for code, name in layout.OPS.items()}
W, ZEROES, DISCARD = OP["write"], OP["write-zeroes"], OP["discard"]
MIB = 1 << 20
#: Past one L2 table's reach (512 MiB with 64 KiB clusters): two L2 tables.
SIZE = 520 * MIB


def _qemu_img(*args: str) -> str:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    """A patterned sparse base and a capture whose changes straddle clusters and L2s."""
    base = tmp_path / "base.img"
    with base.open("wb") as f:
        f.truncate(SIZE)
        for at in (0, 3 * MIB, 515 * MIB):  # base content the overlay must keep around writes
            f.seek(at)
            f.write(bytes((at // MIB + i) % 251 for i in range(256 * 1024)))
    recs = [
        streams.bio(0, sector=1, op=W, payload=b"\x11" * 4096, complete_ns=10),  # inside cl 0
        streams.bio(1, sector=120, op=W, payload=bytes(range(256)) * 64, complete_ns=11),
        streams.bio(2, sector=(3 * MIB) // 512 + 7, op=ZEROES, size=70 * 1024, complete_ns=12),
        streams.bio(3, sector=(515 * MIB) // 512, op=W, payload=b"\x22" * 8192, complete_ns=13),
        streams.bio(4, sector=(515 * MIB) // 512 + 4, op=DISCARD, size=1024, complete_ns=14),
        # later in completion order, same place: must win
        streams.bio(5, sector=1, op=W, payload=b"\x33" * 512, complete_ns=15),
        streams.bio(6, sector=(SIZE // 512) - 8, op=W, payload=b"\x44" * 4096, complete_ns=16),
        # whole clusters made zero (as mkfs's discard of the disk): marked, not stored,
        # over zeros (100 MiB) and over the base's data (3 MiB + 128 KiB)
        streams.bio(7, sector=(100 * MIB) // 512, op=DISCARD, size=MIB, complete_ns=17),
        streams.bio(8, sector=(3 * MIB + 131072) // 512, op=ZEROES, size=65536,
                    complete_ns=18),
    ]
    cap = tmp_path / "s.cap"
    with write_capture(cap, "traced", SIZE // 512) as w:
        for raw in recs:
            w.add(raw)
    return {"base": base, "cap": cap, "dir": tmp_path}


def test_the_overlay_reads_as_the_raw_result_and_stores_only_changed_clusters(
        case: dict[str, Path]) -> None:
    runner = CliRunner()
    raw = case["dir"] / "raw.img"
    over = case["dir"] / "over.qcow2"
    r = runner.invoke(cli.main, ["apply", str(case["cap"]), str(case["base"]), "-o", str(raw)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli.main, ["apply", str(case["cap"]), str(case["base"]), "-o", str(over),
                                 "--format", "qcow2"])
    assert r.exit_code == 0, r.output
    # clusters: 0 and 1 (the write at byte 61440 straddles them), 48 and 49 (70 KiB of
    # zeroes from 3 MiB + 3.5 KiB), 8240 (515 MiB: a write and a discard) and the last
    assert "9 changes, 6 clusters of 64 KiB stored, 17 marked zero" in r.output, r.output

    _qemu_img("check", str(over))
    info = json.loads(_qemu_img("info", "--output=json", str(over)))
    assert info["format"] == "qcow2" and info["virtual-size"] == SIZE
    assert info["backing-filename"] == str(case["base"].resolve())
    assert info["backing-filename-format"] == "raw"
    assert "identical" in _qemu_img("compare", "-f", "qcow2", "-F", "raw", str(over), str(raw))
    differs = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(over),
                              str(case["base"])], capture_output=True, text=True, check=False)
    assert (differs.returncode, differs.stdout) == (1, "Content mismatch at offset 512!\n")

    allocated = [e for e in json.loads(_qemu_img("map", "--output=json", str(over)))
                 if e["depth"] == 0 and e["data"]]
    zeroed = [(e["start"], e["length"]) for e in json.loads(_qemu_img(
        "map", "--output=json", str(over))) if e["depth"] == 0 and e["zero"]]
    assert zeroed == [(50 * qcow2.CLUSTER, qcow2.CLUSTER), (100 * MIB, MIB)]
    assert [(e["start"], e["length"]) for e in allocated] == [
        (0, 2 * qcow2.CLUSTER), (48 * qcow2.CLUSTER, 2 * qcow2.CLUSTER),
        (8240 * qcow2.CLUSTER, qcow2.CLUSTER), (SIZE - qcow2.CLUSTER, qcow2.CLUSTER)]
    # header, refcount table and block, L1, two L2 tables, six data clusters
    assert os.path.getsize(over) == (6 + 6) * qcow2.CLUSTER


def test_a_relative_backing_name_and_refusals(case: dict[str, Path]) -> None:
    runner = CliRunner()
    over = case["dir"] / "rel.qcow2"
    r = runner.invoke(cli.main, ["apply", str(case["cap"]), str(case["base"]), "-o", str(over),
                                 "--format", "qcow2", "--backing", "base.img"])
    assert r.exit_code == 0, r.output
    info = json.loads(_qemu_img("info", "--output=json", str(over)))
    assert info["backing-filename"] == "base.img"
    _qemu_img("check", str(over))

    r = runner.invoke(cli.main, ["apply", str(case["cap"]), str(case["base"]), "--backing",
                                 "x"])
    assert r.exit_code == 2 and "--backing is for --format qcow2" in r.output

    small = case["dir"] / "small.img"
    small.write_bytes(bytes(MIB))
    r = runner.invoke(cli.main, ["apply", str(case["cap"]), str(small), "-o",
                                 str(case["dir"] / "no.qcow2"), "--format", "qcow2"])
    assert r.exit_code == 11 and "smaller than the traced device" in r.output
    assert not (case["dir"] / "no.qcow2").exists()
    assert not list(case["dir"].glob("*.part"))


def test_diff_maps_in_bytes_and_qemu_img_s_own_shape(case: dict[str, Path]) -> None:
    runner = CliRunner()
    r = runner.invoke(cli.main, ["diff", str(case["cap"]), "--format", "sectors"])
    assert r.exit_code == 0, r.output
    sectors = [tuple(int(x) for x in line.split("+")) for line in r.output.split()]
    r = runner.invoke(cli.main, ["diff", str(case["cap"]), "--format", "bytes"])
    assert r.exit_code == 0, r.output
    lines = [tuple(int(x) for x in line.split()) for line in r.output.strip().split("\n")]
    assert lines == [(a * 512, n * 512) for a, n in sectors]
    assert lines[0] == (512, 4096)  # sectors 1..8, then 120..151 apart from it
    assert lines[1] == (120 * 512, 16384)

    r = runner.invoke(cli.main, ["diff", str(case["cap"]), "--format", "qemu-map"])
    assert r.exit_code == 0, r.output
    ours = json.loads(r.output)
    at = 0
    for e in ours:  # tiles the disk, alternating, in qemu-img's keys
        assert set(e) == {"start", "length", "depth", "present", "zero", "data"}
        assert e["start"] == at and e["length"] > 0
        at += e["length"]
    assert at == SIZE
    changed = [(e["start"], e["length"]) for e in ours if e["depth"] == 0]
    assert changed == lines

    # the qcow2 overlay, mapped by qemu-img, holds every changed byte (in whole clusters)
    over = case["dir"] / "over.qcow2"
    assert runner.invoke(cli.main, ["apply", str(case["cap"]), str(case["base"]), "-o",
                                    str(over), "--format", "qcow2"]).exit_code == 0
    theirs = [(e["start"], e["start"] + e["length"])
              for e in json.loads(_qemu_img("map", "--output=json", str(over)))
              if e["depth"] == 0]
    for start, length in changed:
        assert any(a <= start and start + length <= b for a, b in theirs), (start, theirs)
