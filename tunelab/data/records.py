"""What a raw record is, where it came from, and the counts collected along the data pipeline.

The types every data stage shares: `sources.py` makes `Record`s with their `Location`,
`formats.py`, `render.py` and the task readers turn them into examples, and all of them add
to one `DataStats`. They live apart from the readers so that no stage imports another in a
circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import DataError

# How many skipped-record messages a DataStats keeps to show the user (the count is exact).
MAX_PROBLEMS_KEPT = 20


@dataclass(frozen=True)
class Location:
    """Where a record came from: a file line (1-based) or a dataset/Parquet index (0-based)."""

    path: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.index is not None:
            return f"{self.path}: index {self.index}"
        return self.path

    def error(self, message: str) -> DataError:
        """A DataError pointing at this location (`file:line: message`)."""
        if self.index is not None:
            return DataError(f"index {self.index}: {message}", path=self.path)
        return DataError(message, path=self.path, line=self.line)


@dataclass(frozen=True)
class Record:
    """One raw record (field name -> value) and where it came from."""

    data: dict[str, Any]
    source: Location


@dataclass
class DataStats:
    """Counts collected along the data pipeline, reported to the user.

    Stages add to the same object: `read` (records read), `invalid_skipped` (bad records
    skipped because skip_invalid was on; the first messages are kept in `problems`),
    `duplicates_removed`, `filtered` (length filters), `truncated` and `dropped` (over
    max_length), `examples` (tokenized examples kept), `formats` (examples per format),
    `tokens` and `trained_tokens` (over the kept examples).
    """

    read: int = 0
    invalid_skipped: int = 0
    duplicates_removed: int = 0
    filtered: int = 0
    truncated: int = 0
    dropped: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        """Count a skipped invalid record, keeping its message for the report."""
        self.invalid_skipped += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(str(error))

    def count_format(self, fmt: str) -> None:
        self.formats[fmt] = self.formats.get(fmt, 0) + 1

    def summary(self) -> str:
        """One line with every count, for logs and progress output."""
        formats = ", ".join(f"{name} {count}" for name, count in sorted(self.formats.items())) or "none"
        return (
            f"{self.read} read, {self.invalid_skipped} invalid skipped, {self.duplicates_removed} duplicates removed, "
            f"{self.filtered} filtered by length, {self.truncated} truncated, {self.dropped} dropped as too long; "
            f"{self.examples} examples ({formats}), {self.tokens} tokens, {self.trained_tokens} trained"
        )
