"""Plain-text tables for the terminal (rich), at most WIDTH columns wide."""

from __future__ import annotations

import io
from typing import Iterable, Optional, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

WIDTH = 100


def render(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    caption: Optional[str] = None,
    right_from: int = 1,
) -> str:
    """A table as text: the first `right_from` columns left-aligned (labels), the rest right-aligned (numbers)."""
    table = Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        caption_justify="left",
        pad_edge=False,
        collapse_padding=True,
        padding=(0, 1),
    )
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < right_from else "right", no_wrap=i < right_from)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    console = Console(file=io.StringIO(), width=WIDTH, color_system=None, force_terminal=False, record=True)
    console.print(table)
    text = console.export_text()
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")
