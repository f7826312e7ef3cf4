"""The Python distribution: sdist and wheel built from a fresh clone install anywhere.

A new user runs ``python -m build`` and ``pip install`` on what it made, in
a clean venv outside the checkout.  The installed package must work without
the source tree: the CLI runs, its version is the one in VERSION, and the
files it carries (udev rule, unit, example policy, record header) are found
inside the installed package, byte for byte the checkout's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from tests import checkout

DATA = {
    "60-imgrement-autowrap.rules": "udev/60-imgrement-autowrap.rules",
    "imgrement-autowrap@.service": "udev/imgrement-autowrap@.service",
    "autowrap.conf.example": "udev/autowrap.conf.example",
    "imgrement_record.h": "dm_target/imgrement_record.h",
    "VERSION": "VERSION",
}

#: Run inside the installed venv, from a directory with no checkout in reach.
PROBE = f"""
import json, imgrement_dm
from imgrement_dm import resources
names = {sorted(DATA)!r}
print(json.dumps(dict(version=imgrement_dm.__version__, package=str(resources.PACKAGE),
                      data=dict((n, str(resources.data_file(n))) for n in names))))
"""


def _run(*argv: str | Path, cwd: Path) -> str:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=900)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel, built by python -m build from a copy of the checkout."""
    src = checkout.copy_to(tmp_path_factory.mktemp("clone"))
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, src, cwd=src)
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_version_is_the_one_in_VERSION(dist: Path) -> None:  # noqa: N802
    version = (checkout.ROOT / "VERSION").read_text().strip()
    assert _one(dist, "*.tar.gz").name == f"imgrement_dm-{version}.tar.gz"
    assert _one(dist, "*.whl").name.startswith(f"imgrement_dm-{version}-")


def test_the_wheel_is_tagged_for_the_stable_abi(dist: Path) -> None:
    """The extension is _kernel_ffi.abi3.so: the tag says cp311-abi3, not
    cp311-cp311 (which would refuse every other CPython)."""
    name = _one(dist, "*.whl").name
    assert "-cp311-abi3-" in name, name
    with zipfile.ZipFile(_one(dist, "*.whl")) as z:
        assert any(n.endswith("_kernel_ffi.abi3.so") for n in z.namelist())


def test_twine_check_passes(dist: Path) -> None:
    out = _run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()),
               cwd=dist)
    assert out.count("PASSED") == 2, out


def test_sdist_is_a_whole_source_release(dist: Path) -> None:
    with tarfile.open(_one(dist, "*.tar.gz")) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for path in (*DATA.values(), "dm_target/dm-imgrement.c", "dm_target/Kbuild",
                 "dm_target/dkms.conf", "imgrement_dm/_ffi_build.py", "imgrement_dm/_stream.c",
                 "setup.py", "tests/host/test_records.py", "tests/host/streams.py",
                 "tests/guest/conftest.py", "tests/guest/run-suite"):
        assert path in names, path


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_in_a_clean_venv_and_runs_without_the_checkout(
        dist: Path, tmp_path: Path, kind: str) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    what = _one(dist, "*.whl" if kind == "wheel" else "*.tar.gz")
    _run(py, "-m", "pip", "install", "--quiet", what, cwd=tmp_path)

    version = (checkout.ROOT / "VERSION").read_text().strip()
    assert _run(env / "bin" / "imgrement-dm", "--version", cwd=tmp_path).split() == [
        "imgrement-dm,", "version", version]
    probe = json.loads(_run(py, "-c", PROBE, cwd=tmp_path))
    assert probe["version"] == version
    package = Path(probe["package"])
    assert package.is_relative_to(env), package
    for name, source in DATA.items():
        installed = Path(probe["data"][name])
        assert installed == package / "data" / name
        assert installed.read_bytes() == (checkout.ROOT / source).read_bytes(), name
    example = _run(env / "bin" / "imgrement-dm", "autowrap", "example", cwd=tmp_path)
    assert example == (checkout.ROOT / "udev/autowrap.conf.example").read_text()
