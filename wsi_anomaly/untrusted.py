"""Reading the text files users hand over (YAML configs, GeoJSON annotations, mpp CSVs).

Every reader here bounds what it accepts before parsing — the file's size, how deeply it nests,
how many YAML aliases it uses, how long a CSV field is — and decodes UTF-8 with an error that
names the file, the line and the byte. A file past a bound is refused with one line; no input
reaches a ``MemoryError`` or ``RecursionError``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import InputNotFoundError, InvalidInputError

#: Configs are a few kB.
MAX_YAML_BYTES = 1 << 20
#: QuPath exports of many detailed annotations run to tens of MB.
MAX_JSON_BYTES = 256 << 20
#: A cohort's mpp table: a line per slide.
MAX_CSV_BYTES = 64 << 20
#: Nesting deeper than this is no config, GeoJSON or table (GeoJSON needs about 6).
MAX_DEPTH = 64
#: YAML aliases (``*name``): configs need none; a few are harmless, many build a bomb.
MAX_YAML_ALIASES = 100
#: YAML nodes in one document.
MAX_YAML_NODES = 100_000
#: The longest field of a CSV table (a path, a number).
MAX_CSV_FIELD = 64 << 10


def read_text(path: Path, what: str, max_bytes: int, encoding: str = "utf-8") -> str:
    """The text of ``path``: at most ``max_bytes``, UTF-8 (``utf-8-sig`` also drops a BOM).

    Raises:
        InputNotFoundError; InvalidInputError for a file too large or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} not found: {path}")
    with path.open("rb") as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise InvalidInputError(
            f"{path} is larger than {max_bytes / 2**20:g} MiB; not a {what} this tool reads"
        )
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidInputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the {what} as UTF-8"
        ) from None


#: A JSON string, escapes included (its brackets do not nest anything).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON text (brackets inside strings not counted)."""
    data = np.frombuffer(_JSON_STRING.sub('""', text).encode("utf-8"), np.uint8)
    step = np.zeros(len(data), np.int8)
    step[(data == ord("[")) | (data == ord("{"))] = 1
    step[(data == ord("]")) | (data == ord("}"))] = -1
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def load_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file, bounded in size and depth; ``NaN`` and ``Infinity`` are refused
    (numbers beyond the float range become infinite: check values where they are used).

    Raises:
        InputNotFoundError; InvalidInputError naming the file and the problem.
    """
    text = read_text(path, what, max_bytes, encoding="utf-8-sig")
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise InvalidInputError(f"{path} nests {depth} levels deep (at most {MAX_DEPTH})")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{path}:{exc.lineno}: not a {what} (invalid JSON: {exc.msg})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{path}: not a {what} ({exc})") from None


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts nodes, aliases and nesting as it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases")
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise yaml.YAMLError(f"more than {MAX_YAML_NODES} values")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(path: Path, what: str = "config", max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse a YAML file with the safe loader, bounded in size, nodes, aliases and depth;
    errors name the file and line.

    Raises:
        InputNotFoundError; InvalidInputError.
    """
    text = read_text(path, what, max_bytes)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InvalidInputError(f"{where}: not valid YAML ({exc.problem or 'syntax'})") from None
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: refused: {exc}") from None
    except RecursionError:
        raise InvalidInputError(f"{path}: nested too deeply") from None
    finally:
        loader.dispose()


def read_csv(
    path: Path, what: str, max_bytes: int = MAX_CSV_BYTES
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The stripped header and the rows (with their line numbers) of a UTF-8 CSV table,
    bounded in size and field length; blank lines are skipped.

    Raises:
        InputNotFoundError; InvalidInputError naming the file and line.
    """
    text = read_text(path, what, max_bytes, encoding="utf-8-sig")
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise InvalidInputError(f"{path}:{line}: a NUL byte; not a {what} (a text CSV table)")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        for fields in reader:
            if any(len(f) > MAX_CSV_FIELD for f in fields):
                raise InvalidInputError(
                    f"{path}:{reader.line_num}: a field longer than {MAX_CSV_FIELD >> 10} kB; "
                    f"not a {what}"
                )
            if header is None:
                header = [f.strip() for f in fields]
            elif any(f.strip() for f in fields):
                row = dict.fromkeys(header, "")
                row.update(zip(header, fields))
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise InvalidInputError(f"{path}:{reader.line_num}: not a {what} ({exc})") from None
    return header or [], rows
