"""Small helpers for messages meant to be read: counts with the right noun form."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"``, ``"0 tiles"``: ``n`` and ``noun`` in the form the number
    takes (``plural`` where adding an s is wrong, e.g. ``count(2, "category", "categories")``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def about(seconds: float) -> str:
    """A duration as people say it: ``"about 40 s"``, ``"about 12 min"``, ``"about 3 h 5 min"``
    (days are given in hours, ``"about 30 h 0 min"``, with the days after it:
    ``"(1.3 days)"``)."""
    if seconds < 60:
        return f"about {max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min"
    hours, minutes = divmod(minutes, 60)
    text = f"about {hours} h {minutes} min"
    if hours >= 24:
        text += f" ({seconds / 86400:.1f} days)"
    return text
