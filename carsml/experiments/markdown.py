"""The one Markdown table writer: reports, the transfer comparison, the feature heads and the benchmarks all use it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd


def cell(value: Any) -> str:
    """A table cell: floats to 4 decimals, NaN as "–", anything else as str; a literal "|" is escaped."""
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (pandas' `to_markdown` would need tabulate), ending in a newline."""
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def frame_markdown(frame: pd.DataFrame) -> str:
    """`frame` (its columns and rows, not its index) as a Markdown table."""
    return markdown_table(list(frame.columns), frame.itertuples(index=False))
