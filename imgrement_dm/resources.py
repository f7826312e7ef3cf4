"""Where the files the package ships with are, however it was installed.

A wheel or a Debian package carries them in ``imgrement_dm/data/`` (setup.py
copies them there); a checkout, editable install included, has them at the
top of the tree (``udev/``, ``dm_target/``, ``VERSION``); ``make install``
also puts the udev files under /usr/share/imgrement-dm/udev.  One lookup
serves the CLI, autowrap and ``--version`` so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

from imgrement_dm.errors import MissingResourceError

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent


def _candidates(name: str) -> list[Path]:
    return [PACKAGE / "data" / name, CHECKOUT / "udev" / name, CHECKOUT / "dm_target" / name,
            CHECKOUT / name, Path("/usr/share/imgrement-dm/udev") / name]


def data_file(name: str) -> Path:
    """The path of a shipped file (the udev rule, unit, policy example, header, VERSION)."""
    for path in _candidates(name):
        if path.is_file():
            return path
    raise MissingResourceError(f"{name} is not installed with this package (looked in "
                          f"{', '.join(str(p.parent) for p in _candidates(name))}); "
                          "reinstall imgrement-dm")


def version() -> str:
    """The project's one version number (the file VERSION, as shipped)."""
    return data_file("VERSION").read_text().strip()
