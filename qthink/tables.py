"""Markdown tables: the one writer behind every table qthink prints (bench, eval, demo, validation samples)."""

from __future__ import annotations


def cell(value) -> str:
    """A value as table text: yes/NO for booleans, 3 significant digits (thousands separated) for floats."""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def text_cell(value) -> str:
    """`cell`, then made safe inside a table row: pipes escaped, newlines as spaces."""
    text = value if isinstance(value, str) else cell(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; cells that are not text go through `cell`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(text_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def records_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A table of dict rows over `columns` (default: every scalar key, in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, dict | list)))
    return markdown_table(columns, [[cell(r.get(c)) for c in columns] for r in rows])
