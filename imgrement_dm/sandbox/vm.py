"""Boot a prepared kernel in QEMU (through virtme-ng) and run one command.

The guest sees the host's files read-only at the same paths (so the checkout
and its venv are usable as they are), gets empty virtio scratch disks with
serials ``imgrement-scratchN``, and a results folder shared read-write.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from imgrement_dm import resources as package_files
from imgrement_dm.errors import SandboxError
from imgrement_dm.sandbox.roots import Kernel

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``256M`` -> bytes; refuses zero and anything unparseable."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and not t[-1:].isdigit() else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit() or int(number) == 0:
        raise SandboxError(f"invalid disk size {text!r}: use a number with K, M, G or T, e.g. 256M")
    size = int(number) * SIZE_UNITS[unit]
    if size % 512:
        raise SandboxError(f"invalid disk size {text!r}: not a multiple of 512 bytes")
    return size


@dataclass
class GuestRun:
    """Everything one boot needs."""

    kernel: Kernel
    module: Path
    command: list[str]
    results: Path
    cwd: Path
    disks: list[int] = field(default_factory=list)
    memory: str = "2G"
    cpus: int = 2
    kvm: bool = False
    append: str = ""  # more kernel command line
    extra_env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # seconds; the guest is killed after it (exit 124)
    qemu_args: list[str] = field(default_factory=list)  # passed to QEMU as they are


def _vng() -> str:
    here = Path(sys.executable).parent
    for candidate in (here / "vng", shutil.which("vng")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SandboxError(
        "virtme-ng (vng) is not installed; run 'make' to create .venv with it"
    )


#: The tag of the second, cached share of the host root (guest_init.sh mounts it).
CACHE_TAG = "imgrement-cache"
#: Prefixes too wide to lay a read-only cached view over: the guest writes below them.
_SYSTEM_PREFIXES = {"/", "/usr", "/usr/local"}


def python_paths() -> list[str]:
    """The host directories the guest's Python runs from, for the cached share.

    Why: the guest reads the host root over 9p with no cache, so every start
    of Python (each CLI call a test makes) read its interpreter, shared
    library and modules again through QEMU: measured under TCG, ``python -c
    pass`` took 2.8-6 s and ``imgrement-dm --version`` 11-13 s, against 1.2-2
    and 5.5-6 s with these directories on a ``cache=loose`` share.  None of
    them changes while a guest runs.  The venv, and the base interpreter's
    prefix unless that is a system prefix (then only its standard library).
    """
    paths = []
    base = os.path.realpath(sys.base_prefix)
    if base in _SYSTEM_PREFIXES:
        paths.append(os.path.realpath(sysconfig.get_paths()["stdlib"]))
    else:
        paths.append(base)
    venv = os.path.realpath(sys.prefix)
    if venv != base:
        paths.append(venv)
    # guest_init.sh gets them space-separated: a path with a space stays uncached
    return [p for p in paths if os.path.isdir(p) and " " not in p]


def system_paths() -> list[str]:
    """The host's executables and shared libraries, for the cached share too.

    Why: every test starts dmsetup, losetup, udevadm, mkfs or fio, and udev
    runs its rules' helpers for every event; each start read the binary and
    its libraries again over the uncached share.  Measured in a 5.10 guest
    under TCG, ten starts of /bin/true took 6.9 s uncached and 5.3 s with
    these on the cached share.  The guest writes none of them (its /usr is
    an overlay whose writes would otherwise go to tmpfs); they are laid over
    read-only.
    """
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    paths = ["/usr/bin", "/usr/sbin", f"/usr/lib/{multiarch}"]
    return [p for p in paths if os.path.isdir(p) and not os.path.islink(p)]


def write_bytecode(cwd: Path) -> list[Path]:
    """Compile this package, and ``cwd``'s tests/, to .pyc files on the host.

    Why: the guest cannot write bytecode (its view of the host is read-only,
    and guest_init.sh sets PYTHONDONTWRITEBYTECODE so nothing root-owned is
    left in a checkout), and a checkout may hold none of its own (pip
    compiles what it installs, not an editable source tree, and where the
    host's shell sets PYTHONDONTWRITEBYTECODE too, as on the machine this
    was measured on, nothing does). So every Python start in the
    guest, each CLI call of a test, compiled the modules it imported from
    source (on the host, compile() was 28 of the API's 63 ms of import).
    The whole 6.1 suite measured no faster for it (1463 s against 1473 s),
    but the guest no longer depends on what the host happened to write.
    The .pyc files name the sources' mtime and size, which the guest sees
    unchanged over 9p, so it uses them. Directories this user cannot write
    are left alone.
    """
    done = []
    for tree in (package_files.PACKAGE, cwd / "tests"):
        if tree.is_dir() and os.access(tree, os.W_OK):
            compileall.compile_dir(tree, quiet=2)
            done.append(tree)
    return done


def run(spec: GuestRun) -> int:
    """Boot, run ``spec.command`` as root in the guest, return its exit status."""
    spec.results.mkdir(parents=True, exist_ok=True)
    write_bytecode(spec.cwd)
    with tempfile.TemporaryDirectory(prefix="imgrement-disks-", dir=_disk_dir()) as tmp:
        drives: list[str] = []
        for i, size in enumerate(spec.disks):
            img = Path(tmp) / f"scratch{i}.img"
            with img.open("wb") as f:
                f.truncate(size)
            drives += [
                "-drive", f"file={img},format=raw,if=none,id=scratch{i},cache=unsafe",
                "-device", f"virtio-blk-pci,drive=scratch{i},serial=imgrement-scratch{i}",
            ]
        # the host root again, read-only, for guest_init.sh's cached mount
        drives += [
            "-fsdev", "local,id=imgrement-cache,path=/,security_model=none,readonly=on,"
            "multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=imgrement-cache,mount_tag={CACHE_TAG}",
            *spec.qemu_args,
        ]
        for attempt in (1, 2):
            token = uuid.uuid4().hex
            marker = spec.results / f".started-{token}"
            rc = _boot(spec, drives, marker)
            started = marker.exists()
            marker.unlink(missing_ok=True)
            if started:
                return rc
            # virtme-ng has been seen to die once, early and silently: retry once.
            print(f"sandbox: the guest did not start (vng exit {rc}), attempt {attempt}",
                  file=sys.stderr)
            time.sleep(1)
    raise SandboxError("the guest failed to start twice; see the output above")


def _disk_dir() -> str:
    # Scratch images are sparse; keep them off tmpfs so large ones cost nothing.
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def _boot(spec: GuestRun, drives: list[str], marker: Path) -> int:
    init = resources.files("imgrement_dm.sandbox").joinpath("guest_init.sh")
    env = {
        "IMGREMENT_KO": str(spec.module),
        "IMGREMENT_RESULTS": str(spec.results),
        "IMGREMENT_DISKS": str(len(spec.disks)),
        "IMGREMENT_VENV_BIN": str(Path(sys.executable).parent),
        "IMGREMENT_CWD": str(spec.cwd),
        "IMGREMENT_KERNEL_SERIES": spec.kernel.series,
        "IMGREMENT_CACHE_TAG": CACHE_TAG,
        "IMGREMENT_CACHED_PATHS": " ".join([*python_paths(), *system_paths()]),
        **spec.extra_env,
    }
    # The command reaches the guest as a script in the results folder, not
    # on the kernel command line that vng would put it on: that line holds
    # 2048 bytes on x86, and a longer one (a pytest run with a few
    # --deselect options) left a guest that never started its init, idle
    # until killed.
    script = marker.with_name(marker.name + ".sh")
    guest = ["env", *(f"{k}={v}" for k, v in env.items()), "bash", str(init), *spec.command]
    script.write_text(f"touch {shlex.quote(str(marker))}\nexec {shlex.join(guest)}\n")
    try:
        return _run_vng(spec, drives, f"bash {shlex.quote(str(script))}")
    finally:
        script.unlink(missing_ok=True)


def _run_vng(spec: GuestRun, drives: list[str], guest: str) -> int:
    """vng booting ``spec``'s kernel with ``guest`` as the command, its console relayed."""
    cmd = [
        _vng(),
        "--force-9p",
        "-r", str(spec.kernel.image),
        f"--rwdir={spec.results}",
        "--memory", spec.memory,
        "--cpus", str(spec.cpus),
        "--cwd", str(spec.cwd),
    ]
    if not spec.kvm:
        cmd.append("--disable-kvm")
    if spec.append:
        cmd += ["--append", spec.append]
    if drives:
        cmd.append("--qemu-opts=" + " ".join(shlex.quote(d) for d in drives))
    cmd += ["--exec", guest]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path}
    if not spec.command:
        # An interactive shell needs the terminal itself.
        return subprocess.run(cmd, env=env, check=False).returncode
    # Relay the console through a pipe: QEMU would otherwise reopen (and
    # truncate) a redirected stdout, and terminal resets reach our caller's log.
    with subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True) as proc:
        timer = None
        expired = threading.Event()
        if spec.timeout is not None:
            def kill() -> None:
                expired.set()
                _kill_group(proc.pid)
            timer = threading.Timer(spec.timeout, kill)
            timer.daemon = True
            timer.start()
        console = proc.stdout
        assert console is not None  # for mypy: stdout=PIPE
        out = sys.stdout.buffer
        try:
            with _termination_raises():
                while chunk := os.read(console.fileno(), 65536):
                    out.write(chunk.replace(b"\x1bc", b""))
                    out.flush()
        except BaseException:
            # Ctrl-C, SIGTERM or SIGHUP reach only us (the guest has its own
            # session): take it down
            _kill_group(proc.pid)
            raise
        finally:
            if timer is not None:
                timer.cancel()
    if expired.is_set():
        sys.stderr.write(f"imgrement-dm: error: the guest ran longer than {spec.timeout:.0f} s "
                         "and was killed\n")
        return 124
    return proc.returncode


@contextlib.contextmanager
def _termination_raises() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit in the block, as Ctrl-C raises.

    By default they end this process at once, and the guest, in a session
    of its own so that a terminal's Ctrl-C does not reach it, would run on
    without anyone reading its console: ``timeout 600 imgrement-dm sandbox``
    once left a QEMU computing for an hour. Raised, they take the guest down
    on the way out (exit status 128 + the signal, as the shell reports).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; its own stay
        return

    def end(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, end) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _kill_group(pid: int) -> None:
    """vng, virtme-run and QEMU alike (the guest's process group); gone already is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
