"""How the commands print: tables sized to their cells. Every table a command prints goes
through `table`, so a long task name widens its column instead of shifting the others."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, right: Collection[str] = ()
) -> str:
    """Rows under a header, each column as wide as its widest cell, two spaces apart. The
    columns named in `right` (numbers) are right-aligned; the last column is not padded."""
    cells = [[str(cell) for cell in row] for row in (header, *rows)]
    widths = [max(len(cell) for cell in column) for column in zip(*cells, strict=True)]
    aligned = [str.rjust if name in right else str.ljust for name in header]
    return "\n".join(
        "  ".join(
            align(cell, width) for cell, width, align in zip(row, widths, aligned, strict=True)
        ).rstrip()
        for row in cells
    )
