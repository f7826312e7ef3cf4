"""The ioctl payload builders and parsers, against buffers laid out by cffi."""

from __future__ import annotations

import pytest

from imgrement_dm import dm
from imgrement_dm._kernel_ffi import ffi, lib
from imgrement_dm.errors import InvalidNameError


def test_header_layout_comes_from_the_kernel_header() -> None:
    assert dm.HEADER_SIZE == 312
    assert ffi.offsetof("struct dm_name_list", "name") == 12
    assert lib.DM_VERSION_MAJOR == 4
    # _IOWR(0xfd, nr, struct dm_ioctl): direction 3, size 312, type 0xfd
    assert lib.DM_DEV_CREATE == (3 << 30) | (312 << 16) | (0xFD << 8) | 3
    assert lib.DM_TABLE_STATUS & 0xFF == 12


@pytest.mark.parametrize("major,minor", [(8, 0), (253, 7), (259, 1 << 12), (7, 300)])
def test_dev_encoding_round_trips(major: int, minor: int) -> None:
    assert dm.decode_dev(dm.encode_dev(major, minor)) == (major, minor)


def test_dev_encoding_matches_kernel_huge_encode() -> None:
    # huge_encode_dev(MKDEV(259, 300)): (300 & 0xff) | (259 << 8) | ((300 & ~0xff) << 12)
    assert dm.encode_dev(259, 300) == 44 | (259 << 8) | (256 << 12)


def _name_list(entries: list[tuple[int, str]]) -> bytes:
    out = bytearray()
    name_at = ffi.offsetof("struct dm_name_list", "name")
    for i, (dev, name) in enumerate(entries):
        size = (name_at + len(name) + 1 + 7) & ~7
        entry = bytearray(size)
        e = ffi.from_buffer("struct dm_name_list *", entry)
        e.dev = dev
        e.next = size if i < len(entries) - 1 else 0
        entry[name_at : name_at + len(name)] = name.encode()
        out += entry
    return bytes(out)


def test_name_list_parsing() -> None:
    data = _name_list([(dm.encode_dev(253, 0), "traced"), (dm.encode_dev(253, 1), "other")])
    assert list(dm._parse_name_list(data)) == [("traced", 253, 0), ("other", 253, 1)]


def test_empty_name_list() -> None:
    assert list(dm._parse_name_list(bytes(16))) == []


def test_status_specs_parse_with_absolute_next() -> None:
    out = bytearray()
    rows = [(0, 100, "imgrement", "bios=3"), (100, 50, "linear", "8:0 0")]
    for start, length, ttype, params in rows:
        body = params.encode() + b"\0"
        size = (dm.SPEC_SIZE + len(body) + 7) & ~7
        entry = bytearray(size)
        s = ffi.from_buffer("struct dm_target_spec *", entry)
        s.sector_start, s.length = start, length
        s.next = len(out) + size  # replies: offset from the first spec
        entry[8 * 3 : 8 * 3] = b""
        ffi.memmove(s.target_type, ttype.encode(), len(ttype))
        entry[dm.SPEC_SIZE : dm.SPEC_SIZE + len(body)] = body
        out += entry
    parsed = list(dm._parse_specs(bytes(out), 2))
    assert parsed == [dm.Target(*r) for r in rows]
    assert parsed[0].line() == "0 100 imgrement bios=3"


@pytest.mark.parametrize("name", ["traced", "traced-sdb", "a.b_c:d=e@f+g#h"])
def test_good_names(name: str) -> None:
    assert dm.check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "x" * 128, "é"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid device name"):
        dm.check_name(name)


def test_the_table_reason_is_this_devices_line_not_the_last_one() -> None:
    """Two tables refused at once: each device gets its own line of the log."""
    lines = [
        "device-mapper: table: 253:0: imgrement: Invalid capture mode",
        "device-mapper: ioctl: error adding target to table",
        "device-mapper: table: 253:10: linear: Device lookup failed (-ENXIO)",
        "device-mapper: table: 253:1: imgrement: Buffer size out of range",
        "device-mapper: ioctl: error adding target to table",
    ]
    assert dm.table_reason(lines, 253, 0) == lines[0]
    assert dm.table_reason(lines, 253, 1) == lines[3]
    assert dm.table_reason(lines, 253, 10) == lines[2]  # not 253:1's line
    assert dm.table_reason(lines, 253, 2) is None


def test_errors_are_also_the_builtin_a_script_expects() -> None:
    import errno

    from imgrement_dm import errors

    e = errors.DeviceMapperError("DM_TABLE_LOAD", errno.EINVAL, "why")
    assert isinstance(e, OSError) and e.errno == errno.EINVAL
    assert str(e) == "device-mapper DM_TABLE_LOAD failed: EINVAL (Invalid argument): why"
    assert isinstance(errors.NoSuchMappingError("x"), LookupError)
    assert isinstance(errors.NotRootError("x"), PermissionError)
    assert isinstance(errors.DeviceNotFoundError("x"), FileNotFoundError)
    assert isinstance(errors.NameTakenError("x"), FileExistsError)
    assert isinstance(errors.UdevTimeoutError("x"), TimeoutError)
    assert isinstance(errors.InvalidNameError("x"), ValueError)
    # every exit-code error is in errors.py, so the list there is the whole list
    import imgrement_dm.cli  # noqa: F401  (imports every module that raises)

    todo: list[type[errors.ImgrementError]] = [errors.ImgrementError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        assert cls.__module__ == "imgrement_dm.errors", cls
