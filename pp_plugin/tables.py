"""Plain-text result tables printed by ``pp-prune``."""

from __future__ import annotations

import math
from typing import Any, Sequence

#: A column: (attribute of the row object, header title, ``str.format`` pattern).
Column = tuple[str, str, str]


def render_table(rows: Sequence[Any], columns: Sequence[Column], failures: Sequence[str] = ()) -> str:
    """Return ``rows`` as a right-aligned table, ``-`` for None or NaN cells, then one line per failure."""
    table = [[title for _, title, _ in columns]]
    for row in rows:
        cells = []
        for key, _, pattern in columns:
            value = getattr(row, key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append("-" if missing else pattern.format(value))
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join([*lines, *failures])
