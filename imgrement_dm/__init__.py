"""imgrement-dm: see, and keep, every I/O that reaches a disk.

The package drives the ``imgrement`` device-mapper target: it creates and
removes the mapping over a block device through device-mapper ioctls, and
gives both a command line (``imgrement-dm``) and a scripting API.
"""

from imgrement_dm.api import TracedDevice, list_devices, wrap
from imgrement_dm.errors import ImgrementError

__all__ = ["ImgrementError", "TracedDevice", "list_devices", "wrap"]
__version__ = "0.1.0"
