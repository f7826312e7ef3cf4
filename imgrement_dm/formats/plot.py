"""A picture of a capture: sector over time, reads and writes in two colours,
marks as vertical lines (needs the optional matplotlib: pip install
'imgrement-dm[plot]')."""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from imgrement_dm.errors import ImgrementError
from imgrement_dm.records import BioRecord, Item, MarkRecord


def plot(items: Iterable[Item], out: BinaryIO, title: str = "") -> dict[str, int]:
    """Write a PNG to ``out``; returns how many reads, writes and marks it drew."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImgrementError(
            "plot needs matplotlib: pip install 'imgrement-dm[plot]' (or matplotlib)"
        ) from None
    reads: tuple[list[float], list[int]] = ([], [])
    writes: tuple[list[float], list[int]] = ([], [])
    marks: list[tuple[float, str]] = []
    t0: int | None = None
    for item in items:
        if isinstance(item, BioRecord):
            t0 = item.submit_ns if t0 is None else t0
            dest = reads if item.op_name == "read" else writes
            if item.op_name in ("read", "write", "write-zeroes", "discard"):
                dest[0].append((item.submit_ns - t0) / 1e9)
                dest[1].append(item.sector)
        elif isinstance(item, MarkRecord):
            t0 = item.time_ns if t0 is None else t0
            marks.append(((item.time_ns - t0) / 1e9, item.label))
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    ax.scatter(*reads, s=4, color="tab:blue", label=f"reads ({len(reads[0])})")
    ax.scatter(*writes, s=4, color="tab:red", label=f"writes ({len(writes[0])})")
    for when, label in marks:
        ax.axvline(when, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(label, (when, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("sector")
    ax.set_title(title or "imgrement: sector over time")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return {"reads": len(reads[0]), "writes": len(writes[0]), "marks": len(marks)}
