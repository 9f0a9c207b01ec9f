"""The reader-level guard: the rules every row obeys, whichever reader made it (see readers.py).

  - size: a row holds at most data.max_row_bytes (default DEFAULT_MAX_ROW_BYTES, 8 MiB) of text. JSON Lines are
    cut at that length before parsing and CSV cells are refused past it, so a 50 MB line costs 8 MiB, not GBs
    of tokenizer and near-duplicate memory;
  - nesting: lists/objects at most MAX_DEPTH deep (deeper JSON cannot even be parsed without a RecursionError);
  - text: no lone surrogates (`"\\ud800"` is valid JSON but not Unicode: no tokenizer or file can take it);
  - JSON: an object with the same key twice is refused (json.loads would silently keep the last), and an
    integer over MAX_INT_DIGITS digits (Python cannot even print it) is refused with its field;
  - CSV: a header with the same column twice is refused (the last would silently win).
Each breach is a MedtuneError naming the file, the row and, where there is one, the field.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from medtune.errors import MedtuneError

DEFAULT_MAX_ROW_BYTES = 8 * 2**20
MAX_DEPTH = 100
MAX_INT_DIGITS = 4300  # Python's default int <-> str limit (sys.get_int_max_str_digits)
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a (lone or paired) surrogate gets into JSON text


class _BigInt:
    """Stands in for a JSON integer too long to convert, until check_row names its field."""

    def __init__(self, digits: int):
        self.digits = digits


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


class _Ints:
    """json's parse_int: an int, or a _BigInt marker for one too long to convert (and a note that one was seen)."""

    def __init__(self):
        self.too_long = False

    def __call__(self, text: str) -> int | _BigInt:
        digits = len(text.lstrip("-"))
        if digits <= MAX_INT_DIGITS:
            return int(text)
        self.too_long = True
        return _BigInt(digits)


def too_big(limit: int, file: str, row: int | None, what: str = "row") -> MedtuneError:
    return MedtuneError(f"{what} is over data.max_row_bytes={limit} bytes (raise it if this is real data)",
                        file=file, row=row)


def parse_json(text: str, file: str, row: int | None, limit: int) -> tuple[Any, bool]:
    """json.loads with the JSON rules above, and whether the rows it holds need check_row (usually not: the
    text is small, flat enough, has no surrogate escape and no over-long integer). A syntax error is left to
    the caller, whose message names the line."""
    ints = _Ints()
    try:
        obj = json.loads(text, object_pairs_hook=_object, parse_int=ints)
    except _DuplicateKey as e:
        raise MedtuneError(f"key '{e.key}' appears more than once in one object (JSON keeps only the last)",
                           file=file, row=row, field=e.key) from None
    except RecursionError:
        raise MedtuneError(f"lists/objects nested more than {MAX_DEPTH} deep", file=file, row=row) from None
    needs_check = (ints.too_long or len(text) > limit or text.count("[") + text.count("{") > MAX_DEPTH
                   or bool(_SURROGATE_ESCAPE.search(text)))
    return obj, needs_check


def _name(path: tuple) -> str:
    """The linked path check_row keeps, (((), "messages"), 0), as a field name: messages[0]."""
    parts = []
    while path:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(reversed(parts)).lstrip(".")


def check_row(data: dict, file: str, row: int | None, limit: int) -> None:
    """Size, nesting, surrogates and over-long integers of one row (iteratively: rows may be deep)."""
    size = 0
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            size += len(value)
            if bad := _SURROGATE.search(value):
                raise _surrogate(bad.group(0), file, row, _name(path))
        elif isinstance(value, dict | list | tuple):
            if depth >= MAX_DEPTH:
                raise MedtuneError(f"lists/objects nested more than {MAX_DEPTH} deep", file=file, row=row,
                                   field=_name(_top(path)) if path else None)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    size += len(key)
                    if bad := _SURROGATE.search(key):
                        printable = key.encode("utf-8", "backslashreplace").decode("utf-8")
                        raise _surrogate(bad.group(0), file, row, _name((path, printable)))
                stack.append((item, (path, key), depth + 1))
        elif isinstance(value, _BigInt):
            raise MedtuneError(f"an integer of {value.digits} digits: write it as a string if it is meant as text",
                               file=file, row=row, field=_name(path))
        if size > limit:
            raise too_big(limit, file, row)


def _surrogate(char: str, file: str, row: int | None, field: str) -> MedtuneError:
    return MedtuneError(f"lone surrogate \\u{ord(char):04x} in the text: not valid Unicode (fix or remove the escape)",
                        file=file, row=row, field=field)


def _top(path: tuple) -> tuple:
    """The path of the row's top-level column that holds `path`."""
    while path[0]:
        path = path[0]
    return path


def lines(f: BinaryIO, file: str, limit: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its end) of a binary file, each read with at most `limit` bytes of memory."""
    n = 0
    while raw := f.readline(limit + 2):  # + room for "\r\n"
        n += 1
        line = raw.rstrip(b"\r\n")
        if len(line) > limit:
            raise too_big(limit, file, n)
        yield n, line


@contextmanager
def csv_cells_up_to(limit: int) -> Iterator[None]:
    """csv's own cell limit (131072 by default) raised to the row limit, for one read."""
    previous = csv.field_size_limit()
    csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def unique_header(header: list[str], file: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        if name in seen:
            raise MedtuneError(f"column '{name}' appears more than once in the header (columns {seen[name]} and {i})",
                               file=file, field=name)
        seen[name] = i
