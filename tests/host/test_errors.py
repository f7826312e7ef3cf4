"""docs/api.md's table of errors is the truth: every class is there, each is
the built-in it says and exits with the code it says, and the promises a
script relies on hold (a missing capture or stream is a FileNotFoundError)."""

from __future__ import annotations

import builtins
import inspect
import re
from pathlib import Path

import pytest

from imgrement_dm import errors
from imgrement_dm.formats.capture import CaptureReader
from imgrement_dm.formats.files import file_items
from imgrement_dm.records import RecordReader

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROW = re.compile(r"^\| `(\w+)` \| `(\w+)`[^|]* \| (\d+) \|", re.M)


def _table() -> dict[str, tuple[str, int]]:
    return {m[1]: (m[2], int(m[3])) for m in ROW.finditer(API_MD.read_text())}


def test_every_error_class_is_in_the_table() -> None:
    ours = {name for name, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.ImgrementError) and cls is not errors.ImgrementError}
    assert ours == set(_table())


@pytest.mark.parametrize("name", sorted(_table()))
def test_each_class_is_what_the_table_says(name: str) -> None:
    builtin, code = _table()[name]
    cls = getattr(errors, name)
    assert issubclass(cls, errors.ImgrementError)
    assert issubclass(cls, getattr(builtins, builtin)), (name, builtin)
    assert cls.exit_code == code


def test_a_missing_capture_or_stream_is_a_file_not_found_error(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError):
        CaptureReader(missing)
    with pytest.raises(FileNotFoundError):
        RecordReader.from_file(missing)
    with pytest.raises(FileNotFoundError), file_items(missing):
        pass
    with pytest.raises(errors.CaptureError):  # and still the package's own
        CaptureReader(missing)


def test_damage_is_a_value_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.cap"
    junk.write_bytes(b"not a capture at all")
    with pytest.raises(ValueError):
        CaptureReader(junk)
