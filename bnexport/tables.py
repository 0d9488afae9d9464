"""Plain-text tables for the terminal; every table is a view of a result object."""

from __future__ import annotations


def format_table(rows: list[tuple]) -> str:
    """Plain left-aligned columns; the first row is the header."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
