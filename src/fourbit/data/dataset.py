"""A data file to training examples: read, check every record, tokenize with loss masks, count what was dropped."""

from __future__ import annotations

from dataclasses import dataclass, field

from fourbit.data.records import RecordError, read_records
from fourbit.data.tokenize import Example, encode_record


@dataclass
class Dataset:
    examples: list[Example]
    path: str
    skipped: list[RecordError] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return sum(ex.truncated for ex in self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(ex.input_ids) for ex in self.examples)

    def summary(self) -> str:
        parts = [f"{self.path}: {len(self.examples)} examples, {self.n_tokens} tokens"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the maximum length")
        if self.skipped:
            parts.append(f"{len(self.skipped)} bad records skipped")
        return ", ".join(parts)


def load_dataset(path: str, tokenizer, max_length: int, skip_bad_records: bool = False) -> Dataset:
    """Every record checked before anything trains: the first bad one stops the run (naming its file and line)
    unless skip_bad_records, which skips and counts them."""
    bad: list[RecordError] = []
    records = read_records(path, bad if skip_bad_records else None)
    examples = []
    for rec in records:
        try:
            examples.append(encode_record(tokenizer, rec, max_length))
        except RecordError as err:
            if not skip_bad_records:
                raise
            bad.append(err)
    if not examples:
        raise RecordError(f"{path}: no usable records")
    return Dataset(examples, str(path), bad)
