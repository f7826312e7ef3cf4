"""Plain-text rendering for the CLI, kept apart from the commands."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imgrement_dm.api import MappedDevice


def device_rows(found: Iterable[MappedDevice]) -> Iterator[str]:
    """One aligned row per device, with a header; nothing when there are none."""
    rows = [("NAME", "DEV", "OPEN", "TABLE", "STATUS")]
    for d in found:
        rows.append((
            d.name,
            f"{d.major}:{d.minor}",
            str(d.open_count),
            "; ".join(t.line() for t in d.table) or "-",
            "; ".join(t.params for t in d.status) or ("suspended" if d.suspended else "-"),
        ))
    if len(rows) == 1:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        yield "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4]
