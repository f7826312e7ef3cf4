"""setuptools hooks: the cffi extension, and the files the package carries.

All metadata lives in pyproject.toml.  The udev rule, the systemd unit, the
example policy and the record header live at the top of the source tree
(udev/, dm_target/), where the Makefile and DKMS use them; a built package
carries copies in imgrement_dm/data/ so that an installed CLI finds them
without a checkout (imgrement_dm.resources looks there first).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

#: Source-tree path -> name under imgrement_dm/data/.
DATA = [
    "udev/60-imgrement-autowrap.rules",
    "udev/imgrement-autowrap@.service",
    "udev/autowrap.conf.example",
    "dm_target/imgrement_record.h",
    "VERSION",
]


class BuildPyWithData(build_py):
    """build_py that also copies DATA into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout
        dest = Path(self.build_lib) / "imgrement_dm" / "data"
        dest.mkdir(parents=True, exist_ok=True)
        for name in DATA:
            shutil.copyfile(name, dest / Path(name).name)


# cffi builds the extension against the stable ABI (_kernel_ffi.abi3.so);
# the wheel says so in its tag, so one wheel serves every CPython from 3.11.
setup(cffi_modules=["imgrement_dm/_ffi_build.py:ffibuilder"],
      cmdclass={"build_py": BuildPyWithData},
      options={"bdist_wheel": {"py_limited_api": "cp311"}})
