"""Records: reading data files and checking each record's shape, with the file and line of anything wrong.

Three shapes:
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   chat
  {"prompt": str, "completion": str}                                           prompt/completion
  {"text": str}                                                                 plain text
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A bad record: the message starts with file:line."""


@dataclass
class Record:
    data: dict
    where: str  # "file:line" (or "file:row N" for tables)

    @property
    def kind(self) -> str:
        return record_kind(self.data, self.where)


def record_kind(rec: dict, where: str, need_completion: bool = True) -> str:
    """'messages', 'prompt' or 'text', or a RecordError saying what is wrong."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RecordError(f"{where}: messages[{i}] must have 'role' and 'content'")
            if m["role"] not in ROLES:
                raise RecordError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise RecordError(f"{where}: messages[{i}].content must be a string")
        return "messages"
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise RecordError(f"{where}: 'prompt' must be a string")
        if need_completion:
            if "completion" not in rec:
                raise RecordError(f"{where}: a 'prompt' record needs a 'completion'")
            if not isinstance(rec["completion"], str) or not rec["completion"].strip():
                raise RecordError(f"{where}: 'completion' is empty")
        return "prompt"
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise RecordError(f"{where}: 'text' must be a non-empty string")
        return "text"
    raise RecordError(f"{where}: a record needs 'messages', 'prompt' (+ 'completion') or 'text'; got keys {sorted(rec)}")


def _decode_json_columns(row: dict) -> dict:
    # tables store a chat as a JSON string (CSV) or as a list of structs (Parquet, datasets)
    msgs = row.get("messages")
    if isinstance(msgs, str):
        try:
            row = dict(row, messages=json.loads(msgs))
        except json.JSONDecodeError:
            pass  # record_kind reports the bad shape with its row
    return {k: v for k, v in row.items() if v is not None}


def read_records(path: str | Path, bad: list[RecordError] | None = None) -> list[Record]:
    """Every record of a data file, each tagged with where it came from (file:line, or file:row N for tables).
    JSONL (any other suffix), JSON (a list of objects), Parquet, CSV, or a folder saved by `datasets`.
    A malformed JSONL line raises a RecordError, or is appended to `bad` when a list is given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{path}: reading a dataset folder needs the `datasets` package") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise RecordError(f"{path}: not a dataset folder saved by `datasets` ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [Record(_decode_json_columns(row), f"{path}:row {i + 1}") for i, row in enumerate(ds)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:
            raise RecordError(f"{path}: not a readable Parquet file ({err})") from None
        return [Record(_decode_json_columns(row), f"{path}:row {i + 1}") for i, row in enumerate(rows)]
    if path.suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            # the header is line 1; a record that spans lines is named by the line it starts on
            return [Record(_decode_json_columns(row), f"{path}:{i + 2}") for i, row in enumerate(reader)]
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(items, list):
            raise RecordError(f"{path}: a .json data file must hold a list of records")
        return [Record(item, f"{path}:item {i + 1}") for i, item in enumerate(items)]
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(Record(json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as err:
                error = RecordError(f"{path}:{lineno}: malformed JSON ({err.msg})")
                if bad is None:
                    raise error from None
                bad.append(error)
    return records
