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


def read_records(path: str | Path) -> list[Record]:
    """Every record of a JSONL or JSON file (JSON: a list of objects), each tagged with its file:line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(items, list):
            raise RecordError(f"{path}: a .json data file must hold a list of records")
        return [Record(item, f"{path}:item {i}") for i, item in enumerate(items)]
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(Record(json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
    return records
