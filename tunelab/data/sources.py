"""Read raw records from files, directories and Hugging Face datasets.

Every record keeps where it came from (`Location`: `file:line` for JSONL/JSON/TXT/CSV,
`file: index N` for Parquet and datasets), so any later stage can point a user back to
the exact line of a bad example. Each file is read from disk exactly once: its bytes are
decoded and parsed in memory.

Supported sources (`read_source`):
  - `.jsonl`            one JSON object per line (blank lines ignored)
  - `.json`             an array of records, or an object holding exactly one list of records
  - `.txt`              examples separated by blank lines, or the whole file as one document
  - `.csv`              a header row, then one record per row
  - `.parquet`          one record per row
  - a directory written by `datasets.Dataset.save_to_disk` (`datasets.load_from_disk`)
  - a directory of the files above (read in name order, not recursive)
  - a Hugging Face hub id (`owner/name`), with an optional config name and split
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from tunelab.data.formats import detect_format
from tunelab.data.records import DataStats, Location, Record
from tunelab.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet")
TextSplit = Literal["paragraphs", "document"]
TEXT_SPLITS: tuple[str, ...] = ("paragraphs", "document")
# List fields inside a single chat record, never a list of records.
CONVERSATION_FIELDS = ("messages", "conversations")


def read_source(
    source: str | Path,
    *,
    split: str = "train",
    hf_config: str | None = None,
    text_split: TextSplit = "paragraphs",
    skip_invalid: bool = False,
    stats: DataStats | None = None,
) -> list[Record]:
    """Read every record of a file, directory, saved dataset or hub dataset.

    `split` and `hf_config` apply to hub datasets (and `split` to saved DatasetDicts);
    `text_split` says how a `.txt` file becomes records ("paragraphs": one example per
    blank-line-separated block; "document": the whole file is one example).
    A malformed record (bad JSON line, not an object, wrong CSV width) raises a DataError
    naming its file and line, unless `skip_invalid` is set: then it is skipped and counted
    in `stats.invalid_skipped`. A source with no records at all is always an error.
    """
    if text_split not in TEXT_SPLITS:
        raise DataError(f"unknown text_split {text_split!r}; expected one of: {', '.join(TEXT_SPLITS)}")
    stats = stats if stats is not None else DataStats()
    path = Path(source).expanduser()
    if path.is_dir():
        records = _read_directory(path, split, text_split, skip_invalid, stats)
    elif path.is_file():
        records = _read_file(path, text_split, skip_invalid, stats)
    elif _looks_like_hub_id(str(source)):
        records = _read_hub_dataset(str(source), hf_config, split)
    else:
        raise DataError(
            f"data file not found: {source}\n  fix: check the path (supported files: {', '.join(FILE_SUFFIXES)}), "
            "or give a Hugging Face dataset id like 'openai/gsm8k'"
        )
    if not records:
        problem = f" ({stats.invalid_skipped} invalid records skipped)" if stats.invalid_skipped else ""
        raise DataError(f"no records found{problem}; the data is empty\n  fix: point to a file that holds examples", path=str(source))
    stats.read += len(records)
    return records


def _looks_like_hub_id(name: str) -> bool:
    """A hub id is `name` or `owner/name`, without a file suffix or a path-like start."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix.lower() in FILE_SUFFIXES:
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def _read_directory(path: Path, split: str, text_split: TextSplit, skip_invalid: bool, stats: DataStats) -> list[Record]:
    """A `save_to_disk` directory, or every supported data file directly inside `path`."""
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return _read_saved_dataset(path, split)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(
            f"the directory holds no data files ({', '.join(FILE_SUFFIXES)}) and is not a saved dataset",
            path=str(path),
        )
    records: list[Record] = []
    for file in files:
        records.extend(_read_file(file, text_split, skip_invalid, stats))
    return records


def _read_file(path: Path, text_split: TextSplit, skip_invalid: bool, stats: DataStats) -> list[Record]:
    """Read one file (once) and parse it by its suffix."""
    suffix = path.suffix.lower()
    name = str(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"unsupported file type {suffix or '(none)'}; expected one of: {', '.join(FILE_SUFFIXES)}", path=name)
    text = _decode(path.read_bytes(), name)
    if suffix == ".jsonl":
        return _parse_jsonl(text, name, skip_invalid, stats)
    if suffix == ".json":
        return _parse_json(text, name, skip_invalid, stats)
    if suffix == ".csv":
        return _parse_csv(text, name, skip_invalid, stats)
    return _parse_txt(text, name, text_split)


def _decode(raw: bytes, name: str) -> str:
    """UTF-8 text (a leading BOM is dropped); a bad byte is reported with its line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"the file is not valid UTF-8 (byte {err.start}); fix: save it as UTF-8", path=name, line=line) from None


def _as_record_data(value: Any, location: Location) -> dict[str, Any]:
    """A record must be a JSON object; a bare string is taken as a plain-text record."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return {"text": value}
    raise location.error(f"expected a JSON object with the example's fields, got {_type_name(value)}")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _parse_jsonl(text: str, name: str, skip_invalid: bool, stats: DataStats) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        location = Location(name, line=number)
        try:
            value = json.loads(line)
            records.append(Record(_as_record_data(value, location), location))
        except json.JSONDecodeError as err:
            error = location.error(f"invalid JSON: {err.msg} (column {err.colno}); each line must be one JSON object")
            _skip_or_raise(error, skip_invalid, stats)
        except DataError as error:
            _skip_or_raise(error, skip_invalid, stats)
    return records


def _skip_or_raise(error: DataError, skip_invalid: bool, stats: DataStats) -> None:
    if not skip_invalid:
        raise error
    stats.skip(error)


# --- JSON documents: parsed with positions so every record keeps its line -------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _parse_json(text: str, name: str, skip_invalid: bool, stats: DataStats) -> list[Record]:
    """An array of records, or an object holding one list of records (or a single record)."""
    try:
        items = _scan_json_document(text, name)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON: {err.msg} (column {err.colno})", path=name, line=err.lineno) from None
    if items is None:
        raise DataError(
            "expected a JSON array of records, or an object holding one list of records "
            '(e.g. {"data": [...]}); found no such list',
            path=name,
        )
    records = []
    line, counted_to = 1, 0  # offsets increase, so lines are counted incrementally
    for value, offset in items:
        line += text.count("\n", counted_to, offset)
        counted_to = offset
        location = Location(name, line=line)
        try:
            records.append(Record(_as_record_data(value, location), location))
        except DataError as error:
            _skip_or_raise(error, skip_invalid, stats)
    return records


def _scan_json_document(text: str, name: str) -> list[tuple[Any, int]] | None:
    """The records of a JSON document with their character offsets, or None if it holds no list.

    A top-level object whose keys already identify a record format (e.g. `{"messages": [...]}`)
    is one record; otherwise it must hold exactly one list, whose items are the records.
    """
    start = _skip_ws(text, 0)
    if text.startswith("[", start):
        items, end = _scan_array(text, start)
    elif text.startswith("{", start):
        members, end = _scan_object(text, start)
        items = _records_in_object(members, start, name)
    else:
        raise json.JSONDecodeError("Expecting '[' or '{' at the start of the document", text, start)
    end = _skip_ws(text, end)
    if end != len(text):
        raise json.JSONDecodeError("Extra data after the end of the document", text, end)
    return items


def _records_in_object(
    members: dict[str, tuple[Any, int, list[tuple[Any, int]] | None]], start: int, name: str
) -> list[tuple[Any, int]] | None:
    """The records held by a top-level JSON object, or the object itself as one record.

    A single list of objects is the records (`{"version": 1, "data": [{...}, ...]}`); the
    lists inside one chat record (`messages`, `conversations`) never are. Without such a
    list, an object whose fields name a format is one record; else one list of any items.
    """
    lists = {key: items for key, (_, _, items) in members.items() if items is not None and key not in CONVERSATION_FIELDS}
    object_lists = {key: items for key, items in lists.items() if items and all(isinstance(v, dict) for v, _ in items)}
    if len(object_lists) == 1:
        return next(iter(object_lists.values()))
    if not object_lists and detect_format(members.keys()) is not None:
        return [({key: value for key, (value, _, _) in members.items()}, start)]
    candidates = object_lists or lists
    if len(candidates) > 1:
        names = ", ".join(repr(key) for key in candidates)
        raise DataError(
            f"the JSON object holds several lists ({names}); expected exactly one list of records\n"
            "  fix: keep one list in the file, or convert it to JSONL",
            path=name,
        )
    return next(iter(candidates.values()), None)


def _skip_ws(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _expect(text: str, pos: int, what: str) -> None:
    if pos >= len(text):
        raise json.JSONDecodeError(f"Unexpected end of file, expecting {what}", text, pos)


def _scan_array(text: str, pos: int) -> tuple[list[tuple[Any, int]], int]:
    """Parse the array starting at `text[pos] == "["`: its items with their offsets, and its end."""
    items: list[tuple[Any, int]] = []
    pos = _skip_ws(text, pos + 1)
    _expect(text, pos, "a value or ']'")
    if text[pos] == "]":
        return items, pos + 1
    while True:
        value, end = _DECODER.raw_decode(text, pos)
        items.append((value, pos))
        pos = _skip_ws(text, end)
        _expect(text, pos, "',' or ']'")
        if text[pos] == "]":
            return items, pos + 1
        if text[pos] != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _skip_ws(text, pos + 1)


def _scan_object(text: str, pos: int) -> tuple[dict[str, tuple[Any, int, list[tuple[Any, int]] | None]], int]:
    """Parse the object at `text[pos] == "{"`; list members keep their items' offsets."""
    members: dict[str, tuple[Any, int, list[tuple[Any, int]] | None]] = {}
    pos = _skip_ws(text, pos + 1)
    _expect(text, pos, "a key or '}'")
    if text[pos] == "}":
        return members, pos + 1
    while True:
        if text[pos] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        _expect(text, pos, "':'")
        if text[pos] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _skip_ws(text, pos + 1)
        _expect(text, pos, "a value")
        value_start = pos
        if text[pos] == "[":
            items, pos = _scan_array(text, pos)
            members[key] = ([value for value, _ in items], value_start, items)
        else:
            value, pos = _DECODER.raw_decode(text, pos)
            members[key] = (value, value_start, None)
        pos = _skip_ws(text, pos)
        _expect(text, pos, "',' or '}'")
        if text[pos] == "}":
            return members, pos + 1
        if text[pos] != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _skip_ws(text, pos + 1)
        _expect(text, pos, "a key")


# --- TXT, CSV, Parquet -------------------------------------------------------------------


def _parse_txt(text: str, name: str, text_split: TextSplit) -> list[Record]:
    """Plain-text records: blank-line-separated blocks, or the whole file as one document."""
    if text_split == "document":
        return [Record({"text": text.strip()}, Location(name, line=1))] if text.strip() else []
    records = []
    block: list[str] = []
    block_start = 1
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not block:
                block_start = number
            block.append(line)
        elif block:
            records.append(Record({"text": "\n".join(block)}, Location(name, line=block_start)))
            block = []
    if block:
        records.append(Record({"text": "\n".join(block)}, Location(name, line=block_start)))
    return records


def _parse_csv(text: str, name: str, skip_invalid: bool, stats: DataStats) -> list[Record]:
    """One record per row, keyed by the header; each row keeps the line it starts on."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as err:
        raise DataError(f"invalid CSV header: {err}", path=name, line=1) from None
    if len(set(header)) != len(header) or any(not column.strip() for column in header):
        raise DataError(f"the CSV header must name every column once, got {header}", path=name, line=1)
    records = []
    row_start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"invalid CSV: {err}", path=name, line=row_start) from None
        location = Location(name, line=row_start)
        row_start = reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            error = location.error(f"the row has {len(row)} fields but the header has {len(header)} ({', '.join(header)})")
            _skip_or_raise(error, skip_invalid, stats)
            continue
        records.append(Record(dict(zip(header, row)), location))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"cannot read the Parquet file: {err}", path=str(path)) from None
    return _indexed_records(rows, str(path))


def _indexed_records(rows: Iterable[dict[str, Any]], name: str) -> list[Record]:
    """Records from a table or dataset: each keeps its 0-based row index."""
    return [Record(dict(row), Location(name, index=index)) for index, row in enumerate(rows)]


# --- Hugging Face datasets ---------------------------------------------------------------


def _read_saved_dataset(path: Path, split: str) -> list[Record]:
    """A directory written by `save_to_disk`: a Dataset, or a DatasetDict (then `split` picks one)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"the saved dataset has no split {split!r}; it has: {', '.join(loaded)}", path=str(path))
        return _indexed_records(loaded[split], f"{path}[{split}]")
    return _indexed_records(loaded, str(path))


def _read_hub_dataset(name: str, hf_config: str | None, split: str) -> list[Record]:
    """A dataset from the Hugging Face hub (or its local cache) via `datasets.load_dataset`."""
    import datasets

    label = f"{name}[{hf_config + '/' if hf_config else ''}{split}]"
    try:
        dataset = datasets.load_dataset(name, name=hf_config, split=split)
    except (OSError, ValueError, ConnectionError) as err:  # not found, offline, bad config/split
        raise DataError(
            f"cannot load the Hugging Face dataset {name!r} (config {hf_config!r}, split {split!r}): {err}\n"
            "  fix: check the dataset id, config name and split, or point to a local file",
        ) from None
    return _indexed_records(dataset, label)
