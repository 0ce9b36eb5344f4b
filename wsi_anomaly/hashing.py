"""Hashes that identify and name things: a file's sha256, and the short path tag that keeps two
inputs of the same name apart."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (a checkpoint's or weights file's
    identity)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tagged_name(name: str, path: str | Path) -> str:
    """``<name>-<8 hex>``: ``name`` and the first 8 hex digits of the sha1 of ``path`` (the
    caller's resolved path), so two inputs of the same name never share an output name."""
    return f"{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
