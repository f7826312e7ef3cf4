"""The imgrement table line, built and parsed in one place.

Grammar (documented with the constructor in dm_target/dm-imgrement.c):
``<start> <length> imgrement <device> [<offset>]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgrement_dm.dm import Target

TARGET_TYPE = "imgrement"


@dataclass(frozen=True)
class ImgrementTable:
    """The arguments of one imgrement target."""

    device: str  # major:minor (or a path, as the kernel accepts both)
    length: int  # in 512-byte sectors
    offset: int = 0

    def target(self) -> Target:
        return Target(0, self.length, TARGET_TYPE, f"{self.device} {self.offset}")

    @classmethod
    def parse(cls, target: Target) -> ImgrementTable:
        """From the TABLE status line the kernel gives back."""
        if target.target_type != TARGET_TYPE:
            raise ValueError(f"not an {TARGET_TYPE} target: {target.target_type}")
        args = target.params.split()
        if not 1 <= len(args) <= 2:
            raise ValueError(f"unexpected {TARGET_TYPE} table arguments: {target.params!r}")
        offset = int(args[1]) if len(args) == 2 else 0
        return cls(device=args[0], length=target.length, offset=offset)
