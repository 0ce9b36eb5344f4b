"""Small helpers for messages meant to be read: counts with the right noun form."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"``, ``"0 tiles"``: ``n`` and ``noun`` in the form the number
    takes (``plural`` where adding an s is wrong, e.g. ``count(2, "category", "categories")``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
