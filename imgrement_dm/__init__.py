"""imgrement-dm: see, and keep, every I/O that reaches a disk.

The package drives the ``imgrement`` device-mapper target: it creates and
removes the mapping over a block device through device-mapper ioctls, and
gives both a command line (``imgrement-dm``) and a scripting API.
"""

from imgrement_dm import resources as _resources
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
from imgrement_dm.errors import ImgrementError
from imgrement_dm.recording import Recorded, record
from imgrement_dm.records import BioRecord, Drop, MarkRecord, RecordReader

__all__ = [
    "BioRecord",
    "Drop",
    "ImgrementError",
    "MarkRecord",
    "RecordReader",
    "Recorded",
    "Status",
    "TracedDevice",
    "list_devices",
    "mark",
    "record",
    "set_capture",
    "set_overflow",
    "status",
    "unwrap",
    "wrap",
]
__version__ = _resources.version()
