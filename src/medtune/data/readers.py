"""Files → rows, each row remembering where it came from (file and 1-based row) for error messages.

We read JSON Lines, JSON and CSV ourselves rather than through `datasets.load_dataset`: its errors name
neither the file nor the row (a ragged CSV row or one bad JSON line surfaces as an Arrow cast error), and
"one line naming file, row and field" is a product promise. Parquet, `save_to_disk` folders and hub
datasets go through pyarrow / `datasets`, whose rows cannot be malformed in those ways.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError

DEMO_FILES = {"terms": "terms.jsonl", "doctor_chats": "doctor_chats.jsonl", "remedies": "remedies.csv", "qa": "qa.jsonl",
              "preferences": "preferences.jsonl", "general": "general.jsonl", "benign": "benign.jsonl"}


@dataclass
class Row:
    source: str  # file (or dataset) name
    number: int  # 1-based: the line for .jsonl, the record otherwise
    data: dict[str, Any]


def demo_path(name: str) -> Path:
    if name not in DEMO_FILES:
        raise MedtuneError(f"no demo data named '{name}'; choose from {', '.join(DEMO_FILES)}", field="data.path")
    return Path(str(resources.files("medtune.demo_data").joinpath(DEMO_FILES[name])))


def _decode(path: Path, rows_are_lines: bool = False) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        # Only in .jsonl is a line a row; in .csv/.json rows are records, so name the line instead.
        raise MedtuneError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); re-save the file as UTF-8",
                           file=str(path), row=line if rows_are_lines else None) from None


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    for n, line in enumerate(_decode(path, rows_are_lines=True).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MedtuneError(f"malformed JSON on line {n}: {e.msg} at column {e.colno}", file=str(path), row=n) from None
        if not isinstance(obj, dict):
            raise MedtuneError(f"each line must be a JSON object, got {type(obj).__name__}", file=str(path), row=n)
        rows.append(Row(str(path), n, obj))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(_decode(path))
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
        rows.append(Row(str(path), n, item))
    return rows


def _read_csv(path: Path) -> list[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise MedtuneError("empty CSV file (no header row)", file=str(path)) from None
    header = [h.strip() for h in header]
    rows = []
    for n, values in enumerate(reader, start=1):
        if not values:
            continue
        if len(values) != len(header):
            raise MedtuneError(f"row has {len(values)} fields but the header has {len(header)} "
                               f"(line {reader.line_num} of the file)", file=str(path), row=n)
        rows.append(Row(str(path), n, dict(zip(header, values, strict=True))))
    return rows


def _from_records(source: str, records) -> list[Row]:
    return [Row(source, n, dict(r)) for n, r in enumerate(records, start=1)]


def read_rows(spec: str, split: str = "train") -> list[Row]:
    """Read a data spec: a file, a datasets folder, demo:<name>, or a hub dataset id (online only)."""
    path = demo_path(spec.split(":", 1)[1]) if spec.startswith("demo:") else Path(spec).expanduser()
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except FileNotFoundError:
            raise MedtuneError("folder is not a datasets.save_to_disk folder", file=str(path), field="data.path") from None
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise MedtuneError(f"no split '{split}' (has {', '.join(ds)})", file=str(path), field="data.split")
            ds = ds[split]
        return _from_records(str(path), ds)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return _from_records(str(path), pq.read_table(path).to_pylist())
        raise MedtuneError(f"unknown data file type '{suffix}': use .jsonl, .json, .csv, .tsv or .parquet",
                           file=str(path), field="data.path")
    looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.suffix
    if looks_like_hub:
        from medtune.models import offline

        if offline():
            raise MedtuneError("data file not found, and hub datasets need a connection (HF_HUB_OFFLINE is set)",
                               file=spec, field="data.path")
        from datasets import load_dataset

        try:
            return _from_records(spec, load_dataset(spec, split=split))
        except Exception as e:  # network, missing dataset, missing split: user-facing
            raise MedtuneError(f"cannot load hub dataset: {str(e).splitlines()[0]}", file=spec, field="data.path") from None
    raise MedtuneError("data file not found", file=spec, field="data.path")
