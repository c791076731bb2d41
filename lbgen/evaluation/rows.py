"""Checks shared by the report's sections."""

from __future__ import annotations

from typing import Any


def check_row(row: Any, keys: set[str], what: str) -> None:
    """A report row is a mapping with exactly ``keys``: a YAML flow mapping with an unquoted comma in its label
    (``{label: a, b, runs: x}``) reads as an extra key ``b``, and the row would lose half its label silently."""
    if not isinstance(row, dict) or set(row) != keys:
        extra = sorted(set(row) - keys) if isinstance(row, dict) else []
        raise ValueError(f"{what} has the keys {', '.join(sorted(keys))}, got {row!r}"
                         + (f" (unknown {extra}: quote a label that holds a comma)" if extra else "") + ".")
