"""Reading JSON-lines corpora with errors that point at file:line."""

import json
import os
from typing import Iterator, List, Sequence, Tuple

from megatron_effmlm.data.errors import DataError


def check_input_files(paths: Sequence[str], flag: str = "--input") -> List[str]:
    if not paths:
        raise DataError(f"{flag}: no input file given")
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{flag}: input file not found: {path}")
    return list(paths)


def parse_json_line(line: str, keys: Sequence[str], path: str, lineno: int) -> List[str]:
    """The values of ``keys`` in one JSONL line (as strings)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{lineno}: bad JSON line: {err.msg} at column {err.colno}") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: bad JSON line: expected an object, got {type(record).__name__}")
    values = []
    for key in keys:
        if key not in record:
            raise DataError(
                f"{path}:{lineno}: missing json key '{key}' (--json-keys); keys present: "
                f"{sorted(record)}"
            )
        value = record[key]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: json key '{key}' is {type(value).__name__}, not a string")
        values.append(value)
    return values


def iter_jsonl(paths: Sequence[str], keys: Sequence[str]) -> Iterator[Tuple[str, int, List[str]]]:
    """Yield ``(path, lineno, [value per key])`` for each non-blank line of each file."""
    for path in check_input_files(paths):
        with open(path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield path, lineno, parse_json_line(line, keys, path, lineno)
