"""imgrement-dm: see, and keep, every I/O that reaches a disk.

The package drives the ``imgrement`` device-mapper target: it creates and
removes the mapping over a block device through device-mapper ioctls, and
gives both a command line (``imgrement-dm``) and a scripting API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from imgrement_dm import resources as _resources

if TYPE_CHECKING:
    from imgrement_dm.api import (
        Status,
        TracedDevice,
        list_devices,
        mark,
        set_capture,
        set_overflow,
        status,
        unwrap,
        wrap,
    )
    from imgrement_dm.crashcheck import (
        Summary,
        build_state,
        check_capture,
        crash_boundaries,
    )
    from imgrement_dm.errors import ImgrementError
    from imgrement_dm.formats.capture import CaptureReader
    from imgrement_dm.formats.export import export_capture
    from imgrement_dm.increment import StopAt, apply, apply_qcow2, extents, replay
    from imgrement_dm.recording import Recorded, record
    from imgrement_dm.records import BioRecord, Drop, MarkRecord, RecordReader

# The API's names are imported when first used, not with the package: every
# command of the CLI (and every udev-started autowrap) imports the package,
# and under emulation or on a slow machine importing all of it costs more
# than the command itself. A script sees no difference.
_WHERE = {
    **dict.fromkeys(["Status", "TracedDevice", "list_devices", "mark", "set_capture",
                     "set_overflow", "status", "unwrap", "wrap"], "imgrement_dm.api"),
    "ImgrementError": "imgrement_dm.errors",
    "Recorded": "imgrement_dm.recording",
    "record": "imgrement_dm.recording",
    **dict.fromkeys(["BioRecord", "Drop", "MarkRecord", "RecordReader"],
                    "imgrement_dm.records"),
    # what the file commands do: apply, replay, diff, export, crashcheck
    **dict.fromkeys(["StopAt", "apply", "apply_qcow2", "extents", "replay"],
                    "imgrement_dm.increment"),
    **dict.fromkeys(["Summary", "build_state", "check_capture", "crash_boundaries"],
                    "imgrement_dm.crashcheck"),
    "CaptureReader": "imgrement_dm.formats.capture",
    "export_capture": "imgrement_dm.formats.export",
}


def __getattr__(name: str) -> Any:
    """The API name ``name``, from the module that defines it (PEP 562)."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'imgrement_dm' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "BioRecord",
    "CaptureReader",
    "Drop",
    "ImgrementError",
    "MarkRecord",
    "RecordReader",
    "Recorded",
    "Status",
    "StopAt",
    "Summary",
    "TracedDevice",
    "apply",
    "apply_qcow2",
    "build_state",
    "check_capture",
    "crash_boundaries",
    "export_capture",
    "extents",
    "list_devices",
    "mark",
    "record",
    "replay",
    "set_capture",
    "set_overflow",
    "status",
    "unwrap",
    "wrap",
]
__version__ = _resources.version()
