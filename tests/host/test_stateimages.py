"""crashcheck's state images, made by difference in reusable slots.

- every state made by difference is byte for byte the state built from BASE
  with all its writes, whatever the check did to the slot before (wrote to
  it, truncated it, replaced it, removed it), in boundary order and, falling
  back, out of it;
- a state costs the bytes that changed, not BASE: over 300 fsynced 4 KiB
  writes on an 8 MiB BASE, the work folder gets BASE's data twice (the
  durable image and one slot) and then a few blocks a state, counted both by
  the images' own tally and by the kernel's (/proc/self/io write_bytes);
- a slot a check wrote to is compared with the durable image and only the
  differing blocks are written; a check that wrote nothing is not compared;
- check_all through the CLI checks every state with CHECK seeing each
  state's own bytes, and leaves only kept failing images behind.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from imgrement_dm import crashcheck as crash
from imgrement_dm import stateimages
from imgrement_dm.stateimages import StateImages
from tests.host.test_streaming import _crash_capture, _fsync_records, _write_capture

MIB = 1 << 20


def _make(images: StateImages, st: crash.State, dest: Path) -> None:
    b = st.boundary
    images.make(b.listing.writes, b.upto - len(b.tail), st.tail_writes(), dest)


def _meddle(rng: random.Random, img: Path) -> str:
    """What a check might do to its image."""
    what = rng.choice(["nothing", "nothing", "write", "truncate", "replace", "remove",
                       "extend"])
    size = img.stat().st_size
    if what == "write":
        with img.open("r+b") as f:
            f.seek(rng.randrange(size))
            f.write(os.urandom(rng.randrange(1, 2000)))
    elif what == "truncate":
        os.truncate(img, rng.randrange(size))
    elif what == "extend":
        os.truncate(img, size + 4096)
    elif what == "replace":
        tmp = img.with_suffix(".new")
        tmp.write_bytes(os.urandom(size))
        os.rename(tmp, img)
    elif what == "remove":
        img.unlink()
    return what


@pytest.mark.parametrize("seed", range(6))
def test_states_made_by_difference_are_the_states_built_from_base(tmp_path: Path,
                                                                  seed: int) -> None:
    cap = tmp_path / "c.cap"
    _crash_capture(cap, seed)
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(32 * 512))
    bounds, size = crash.load(cap)
    every = list(crash.states(bounds, exhaustive=3))
    rng = random.Random(seed)
    work = tmp_path / "work"
    work.mkdir()
    images = StateImages(base, size, work, cap)
    done: list[str] = []
    try:
        # the last ones go back: built from BASE; two images lent at once
        # (as with -j 2), given back in a shuffled order
        order = [*every, every[0], every[len(every) // 2]]
        lent: list[Path] = []
        for i, st in enumerate(order):
            dest = work / f"s{i}.img"
            _make(images, st, dest)
            whole = work / "whole.img"
            crash.build(st, base, whole, size)
            assert dest.read_bytes() == whole.read_bytes(), st.id
            assert dest.stat().st_mtime_ns == stateimages.STAMP_NS
            done.append(_meddle(rng, dest))
            lent.append(dest)
            if len(lent) == 2:
                rng.shuffle(lent)
                images.give_back(lent.pop())
        for dest in lent:
            images.give_back(dest)
        assert images.made <= 2 + done.count("remove")
    finally:
        images.close()
    assert sorted(p.name for p in work.iterdir()) == ["whole.img"]


def _fsync_case(tmp_path: Path, n: int = 300) -> tuple[Path, Path, list[crash.State], int]:
    """n fsynced 4 KiB writes (blocks 0..n-1) over an 8 MiB BASE of random data."""
    cap = tmp_path / "f.cap"
    _write_capture(cap, 8 * MIB // 512, list(_fsync_records(n)), per_chunk=64)
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(8 * MIB))
    bounds, size = crash.load(cap)
    todo, _, _ = crash.unique_states(bounds, limit=None)
    assert len(todo) == n
    return cap, base, todo, size


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def test_a_state_costs_its_changed_bytes_not_base(tmp_path: Path) -> None:
    """Each fsync state differs from the one before in one 4 KiB block, its
    write, which the fsync made durable: the durable image takes it, and the
    slot copies that range from it. The old builder wrote a copy of BASE
    (8 MiB) a state."""
    cap, base, todo, size = _fsync_case(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    kernel0 = _write_bytes()
    images = StateImages(base, size, work, cap)
    try:
        setup = images.written
        assert setup == 8 * MIB  # the durable image: a copy of BASE's data
        dest = work / "state.img"
        for st in todo:
            _make(images, st, dest)
            images.give_back(dest)
        written = images.written
        kernel = _write_bytes() - kernel0
    finally:
        images.close()
    assert images.made == 1
    # the second copy of BASE is the one slot's; then each fsync's block
    # twice (durable image and slot) but the first's, which the slot's copy had
    assert written == 2 * setup + (2 * len(todo) - 1) * 4096, written
    # the kernel's count (page cache dirtied by this process) agrees: two
    # copies of BASE and a few blocks a state, not 300 copies (2.4 GiB)
    assert kernel <= 2 * 8 * MIB + len(todo) * 4 * 4096, kernel


def test_a_slot_its_check_wrote_is_compared_and_only_differences_written(
        tmp_path: Path) -> None:
    cap, base, todo, size = _fsync_case(tmp_path, n=20)
    work = tmp_path / "work"
    work.mkdir()
    images = StateImages(base, size, work, cap)
    try:
        dest = work / "state.img"
        _make(images, todo[0], dest)
        images.give_back(dest)
        _make(images, todo[1], dest)
        with dest.open("r+b") as f:  # a check writes over three blocks of BASE's
            for at, data in ((5 * MIB, b"x" * 4096), (7 * MIB + 100, b"y" * 10),
                             (6 * MIB, bytes(4096))):
                f.seek(at)
                f.write(data)
        images.give_back(dest)
        before = images.written
        _make(images, todo[2], dest)  # compared whole
        whole = work / "whole.img"
        crash.build(todo[2], base, whole, size)
        assert dest.read_bytes() == whole.read_bytes()
        # (an fsync state has no tail: its write is durable) the three
        # blocks restored, and the new durable write, in the durable image
        # and in the slot
        assert images.written - before == 5 * 4096
        images.give_back(dest)
        before = images.written
        _make(images, todo[3], dest)  # untouched: not compared, the new write twice
        assert images.written - before == 2 * 4096
        images.give_back(dest)
    finally:
        images.close()


def test_the_stamp_is_what_finds_a_check_s_writes(tmp_path: Path) -> None:
    """Control for the test above: a check that writes and then sets the
    mtime back to the stamp is not seen (the module's doc says so); the
    stamp, not chance, is what the comparison rests on."""
    cap, base, todo, size = _fsync_case(tmp_path, n=4)
    work = tmp_path / "work"
    work.mkdir()
    images = StateImages(base, size, work, cap)
    try:
        dest = work / "state.img"
        _make(images, todo[0], dest)
        with dest.open("r+b") as f:
            f.seek(5 * MIB)
            f.write(b"x" * 4096)
        os.utime(dest, ns=(stateimages.STAMP_NS, stateimages.STAMP_NS))
        images.give_back(dest)
        _make(images, todo[1], dest)
        assert dest.read_bytes()[5 * MIB:5 * MIB + 4096] == b"x" * 4096
        images.give_back(dest)
    finally:
        images.close()


def test_crashcheck_checks_each_state_s_own_bytes_with_two_jobs(tmp_path: Path) -> None:
    """Through check_all, -j 2: every state's check sees the block its last
    write wrote (the fsync case: state k holds writes 0..k), the checks
    scribble on their images, and nothing but the kept failure is left."""
    _cap, base, todo, size = _fsync_case(tmp_path, n=40)
    script = tmp_path / "check.py"
    script.write_text(
        "import os, sys\n"
        "k = int(os.environ['IMGREMENT_STATE_ID'].split(':')[0])\n"
        "with open(sys.argv[1], 'r+b') as f:\n"
        "    f.seek(k * 4096)\n"
        "    got = f.read(8)\n"
        "    f.seek(1000 * 4096)\n"
        "    f.write(b'scribble')\n"
        "sys.exit(0 if got == k.to_bytes(8, 'little') and k != 17 else 1)\n")
    check = [sys.executable, str(script), "{}"]
    work = tmp_path / "work"
    results = crash.check_all(todo, base, size, check, jobs=2, workdir=work,
                              keep_failing=True)
    failed = [r.state.id for r in results if not r.passed]
    assert [r.state.id for r in results] == [st.id for st in todo]
    assert failed == ["17:all"], [r.output for r in results if not r.passed][:3]
    assert sorted(p.name for p in work.iterdir()) == ["state-17-all.img"]
    kept = (work / "state-17-all.img").read_bytes()
    assert kept[17 * 4096:17 * 4096 + 8] == (17).to_bytes(8, "little")


def test_a_python_check_sees_each_state_in_process(tmp_path: Path) -> None:
    """check_capture with a function for CHECK: it gets each state's image
    and the state, at -j 2; False fails a state, an exception fails it with
    its text, and a failing image is kept like a command's."""
    _cap, base, todo, size = _fsync_case(tmp_path, n=60)
    seen: list[str] = []

    def check(img: Path, st: crash.State) -> bool:
        k = st.boundary.upto - 1  # the last write this state holds, block k
        with img.open("rb") as f:
            f.seek(k * 4096)
            got = f.read(8)
            f.seek((k + 1) * 4096)
            after = f.read(8)
        seen.append(st.id)
        if k == 44:
            raise ValueError("block 44 looked at")
        return (got == k.to_bytes(8, "little") and after != (k + 1).to_bytes(8, "little")
                and k != 17)

    work = tmp_path / "work"
    results = crash.check_all(todo, base, size, check, jobs=2, workdir=work, keep_failing=True)
    assert sorted(seen) == sorted(st.id for st in todo)
    failed = {r.state.id: r.output for r in results if not r.passed}
    assert failed == {"17:all": "the check returned False",
                      "44:all": "ValueError: block 44 looked at"}
    assert sorted(p.name for p in work.iterdir()) == ["state-17-all.img", "state-44-all.img"]
