"""Files → rows, each row remembering where it came from (file and 1-based row) for error messages.

We read JSON Lines, JSON and CSV ourselves rather than through `datasets.load_dataset`: its errors name
neither the file nor the row (a ragged CSV row or one bad JSON line surfaces as an Arrow cast error), and
"one line naming file, row and field" is a product promise. Parquet, `save_to_disk` folders and hub
datasets go through pyarrow / `datasets`, whose rows cannot be malformed in those ways. Every row, from any
reader, then passes data/guard.py (size, nesting, Unicode, duplicate keys): one place for those rules.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medtune.data import guard
from medtune.data.guard import DEFAULT_MAX_ROW_BYTES
from medtune.errors import MedtuneError
from medtune.model_names import offline

DEMO_FILES = {"terms": "terms.jsonl", "doctor_chats": "doctor_chats.jsonl", "remedies": "remedies.csv", "qa": "qa.jsonl",
              "preferences": "preferences.jsonl", "general": "general.jsonl", "rubrics": "rubrics.jsonl",
              "benign": "benign.jsonl", "feedback": "feedback.jsonl"}


@dataclass
class Row:
    source: str  # file (or dataset) name
    number: int  # 1-based: the line for .jsonl, the record otherwise
    data: dict[str, Any]


def demo_path(name: str) -> Path:
    if name not in DEMO_FILES:
        raise MedtuneError(f"no demo data named '{name}'; choose from {', '.join(DEMO_FILES)}", field="data.path")
    return Path(str(resources.files("medtune.demo_data").joinpath(DEMO_FILES[name])))


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        # In .csv/.json rows are records, not lines: name the line, not a row.
        raise MedtuneError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); re-save the file as UTF-8",
                           file=str(path)) from None


def _decode_line(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise MedtuneError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} on line {n}); re-save the file as UTF-8",
                           file=str(path), row=n) from None


def read_jsonl(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[Row]:
    """One row per line: lines end at "\n" only (U+2028 and friends are text inside a JSON string)."""
    rows = []
    with path.open("rb") as f:
        for n, raw in guard.lines(f, str(path), max_row_bytes):
            line = _decode_line(raw, path, n)
            if not line.strip():
                continue
            try:
                obj, check = guard.parse_json(line, str(path), n, max_row_bytes)
            except json.JSONDecodeError as e:
                raise MedtuneError(f"malformed JSON on line {n}: {e.msg} at column {e.colno}", file=str(path),
                                   row=n) from None
            if not isinstance(obj, dict):
                raise MedtuneError(f"each line must be a JSON object, got {type(obj).__name__}", file=str(path), row=n)
            if check:
                guard.check_row(obj, str(path), n, max_row_bytes)
            rows.append(Row(str(path), n, obj))
    return rows


def _read_json(path: Path, max_row_bytes: int) -> list[Row]:
    text = _decode(path)
    try:
        obj, check = guard.parse_json(text, str(path), None, max_row_bytes)
    except json.JSONDecodeError as e:
        raise MedtuneError(f"malformed JSON on line {e.lineno}: {e.msg}", file=str(path)) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise MedtuneError('expected a list of objects or {"data": [...]}', file=str(path))
    rows = []
    for n, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise MedtuneError(f"each record must be a JSON object, got {type(item).__name__}", file=str(path), row=n)
        if check:
            guard.check_row(item, str(path), n, max_row_bytes)
        rows.append(Row(str(path), n, item))
    return rows


def _read_csv(path: Path, max_row_bytes: int) -> list[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    text = _decode(path)
    check = len(text) > max_row_bytes  # (a row of a smaller file cannot be larger; UTF-8 has no lone surrogates)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[Row] = []
    with guard.csv_cells_up_to(max_row_bytes):
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise MedtuneError("empty CSV file (no header row)", file=str(path)) from None
        except csv.Error as e:
            raise _csv_error(e, path, None, reader.line_num, max_row_bytes) from None
        guard.unique_header(header, str(path))
        n = 0
        try:
            for n, values in enumerate(reader, start=1):  # noqa: B007 (n names the row a csv.Error stops at)
                if not values:
                    continue
                if len(values) != len(header):
                    raise MedtuneError(f"row has {len(values)} fields but the header has {len(header)} "
                                       f"(line {reader.line_num} of the file)", file=str(path), row=n)
                row = dict(zip(header, values, strict=True))
                if check:
                    guard.check_row(row, str(path), n, max_row_bytes)
                rows.append(Row(str(path), n, row))
        except csv.Error as e:
            raise _csv_error(e, path, n + 1, reader.line_num, max_row_bytes) from None
    return rows


def _csv_error(e: csv.Error, path: Path, row: int | None, line: int, max_row_bytes: int) -> MedtuneError:
    if "field larger than field limit" in str(e):
        return guard.too_big(max_row_bytes, str(path), row, what=f"a cell (line {line} of the file)")
    return MedtuneError(f"malformed CSV on line {line}: {e}", file=str(path), row=row)


def _from_records(source: str, records, max_row_bytes: int) -> list[Row]:
    rows = []
    for n, record in enumerate(records, start=1):
        data = dict(record)
        guard.check_row(data, source, n, max_row_bytes)
        rows.append(Row(source, n, data))
    return rows


def _read_parquet(path: Path, max_row_bytes: int) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise MedtuneError(f"not a Parquet file pyarrow can read ({str(e).splitlines()[0]})", file=str(path),
                           field="data.path") from None
    return _from_records(str(path), table.to_pylist(), max_row_bytes)


def _read_saved(path: Path, split: str, max_row_bytes: int) -> list[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise MedtuneError("folder is not a datasets.save_to_disk folder", file=str(path), field="data.path") from None
    except Exception as e:  # a damaged folder: bad JSON metadata, truncated Arrow files, ...
        raise MedtuneError(f"cannot read this datasets.save_to_disk folder ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})", file=str(path), field="data.path") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise MedtuneError(f"no split '{split}' (has {', '.join(ds)})", file=str(path), field="data.split")
        ds = ds[split]
    return _from_records(str(path), ds, max_row_bytes)


def read_rows(spec: str, split: str = "train", max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[Row]:
    """Read a data spec: a file, a datasets folder, demo:<name>, or a hub dataset id (online only). Every row
    passes data/guard.py, with rows of at most `max_row_bytes` (data.max_row_bytes)."""
    path = demo_path(spec.split(":", 1)[1]) if spec.startswith("demo:") else Path(spec).expanduser()
    if path.is_dir():
        return _read_saved(path, split, max_row_bytes)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
                   ".parquet": _read_parquet}
        if suffix in readers:
            return readers[suffix](path, max_row_bytes)
        raise MedtuneError(f"unknown data file type '{suffix}': use .jsonl, .json, .csv, .tsv or .parquet",
                           file=str(path), field="data.path")
    looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.suffix
    if looks_like_hub:
        if offline():
            raise MedtuneError("data file not found, and hub datasets need a connection (HF_HUB_OFFLINE is set)",
                               file=spec, field="data.path")
        from datasets import load_dataset

        try:
            ds = load_dataset(spec, split=split)
        except Exception as e:  # network, missing dataset, missing split: user-facing
            raise MedtuneError(f"cannot load hub dataset: {str(e).splitlines()[0]}", file=spec, field="data.path") from None
        return _from_records(spec, ds, max_row_bytes)
    raise MedtuneError("data file not found", file=spec, field="data.path")
