"""The imgrement table line, built and parsed in one place.

Grammar (documented with the constructor in dm_target/dm-imgrement.c):
``<device> [<offset> [<#opts> <opt>...]]`` with the optional words
``capture:meta|writes|all``, ``buffer_kb:N``, ``log:on|off``,
``overflow:drop|wait`` and ``wait_ms:N``.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgrement_dm.dm import Target

TARGET_TYPE = "imgrement"
CAPTURE_MODES = ("meta", "writes", "all")
OVERFLOW_POLICIES = ("drop", "wait")
MIN_BUFFER_KB = 64
MAX_BUFFER_KB = 1024 * 1024
MIN_WAIT_MS = 10
MAX_WAIT_MS = 60000


@dataclass(frozen=True)
class ImgrementTable:
    """The arguments of one imgrement target; ``None`` options are left to the kernel."""

    device: str  # major:minor (or a path, as the kernel accepts both)
    length: int  # in 512-byte sectors
    offset: int = 0
    capture: str | None = None
    buffer_kb: int | None = None
    log: bool | None = None
    overflow: str | None = None
    wait_ms: int | None = None

    def __post_init__(self) -> None:
        if self.capture is not None and self.capture not in CAPTURE_MODES:
            raise ValueError(
                f"capture mode {self.capture!r} is not one of {', '.join(CAPTURE_MODES)}"
            )
        if self.buffer_kb is not None and not MIN_BUFFER_KB <= self.buffer_kb <= MAX_BUFFER_KB:
            raise ValueError(
                f"buffer size {self.buffer_kb} KiB is outside {MIN_BUFFER_KB}..{MAX_BUFFER_KB}"
            )
        if self.overflow is not None and self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow policy {self.overflow!r} is not one of {', '.join(OVERFLOW_POLICIES)}"
            )
        if self.wait_ms is not None and not MIN_WAIT_MS <= self.wait_ms <= MAX_WAIT_MS:
            raise ValueError(f"wait of {self.wait_ms} ms is outside {MIN_WAIT_MS}..{MAX_WAIT_MS}")

    def options(self) -> list[str]:
        opts = []
        if self.capture is not None:
            opts.append(f"capture:{self.capture}")
        if self.buffer_kb is not None:
            opts.append(f"buffer_kb:{self.buffer_kb}")
        if self.log is not None:
            opts.append(f"log:{'on' if self.log else 'off'}")
        if self.overflow is not None:
            opts.append(f"overflow:{self.overflow}")
        if self.wait_ms is not None:
            opts.append(f"wait_ms:{self.wait_ms}")
        return opts

    def params(self) -> str:
        opts = self.options()
        tail = f" {len(opts)} {' '.join(opts)}" if opts else ""
        return f"{self.device} {self.offset}{tail}"

    def target(self) -> Target:
        return Target(0, self.length, TARGET_TYPE, self.params())

    @classmethod
    def parse(cls, target: Target) -> ImgrementTable:
        """From the TABLE status line the kernel gives back."""
        if target.target_type != TARGET_TYPE:
            raise ValueError(f"not an {TARGET_TYPE} target: {target.target_type}")
        args = target.params.split()
        if not args:
            raise ValueError(f"empty {TARGET_TYPE} table arguments")
        offset = int(args[1]) if len(args) >= 2 else 0
        opts = args[3:]
        if len(args) >= 3 and int(args[2]) != len(opts):
            raise ValueError(f"option count does not match in {target.params!r}")
        fields: dict[str, object] = {}
        for opt in opts:
            key, _, value = opt.partition(":")
            if key == "capture":
                fields["capture"] = value
            elif key == "buffer_kb":
                fields["buffer_kb"] = int(value)
            elif key == "log":
                fields["log"] = value == "on"
            elif key == "overflow":
                fields["overflow"] = value
            elif key == "wait_ms":
                fields["wait_ms"] = int(value)
            else:
                raise ValueError(f"unknown {TARGET_TYPE} option {opt!r}")
        return cls(device=args[0], length=target.length, offset=offset, **fields)  # type: ignore[arg-type]
