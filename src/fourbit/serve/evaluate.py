"""`fourbit eval`: loss and perplexity on a data file, and exact-match accuracy where records carry an answer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fourbit.data.batching import as_row, collate
from fourbit.data.records import read_records
from fourbit.data.tokenize import encode_record
from fourbit.serve.generate import generate_records, prompt_text
from fourbit.train.loss import loss_sum


@dataclass
class EvalReport:
    records: int
    loss: float
    perplexity: float
    loss_tokens: int
    scored: int  # records with a reference answer
    exact: int  # of those, answered exactly (after stripping surrounding white space)

    @property
    def accuracy(self) -> float | None:
        return self.exact / self.scored if self.scored else None


def exact_match(completion: str, reference: str) -> bool:
    return completion.strip() == reference.strip()


@torch.no_grad()
def evaluate_model(model, tokenizer, records, batch_size: int = 8, max_new_tokens: int = 64, max_length: int = 1024,
                   progress: bool = True) -> tuple[EvalReport, list[dict]]:  # fmt: skip
    """Loss over every record's loss tokens (as training counts them); greedy answers for records that have a
    reference (a chat ending in an assistant turn, or prompt + completion), scored by exact match."""
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = [encode_record(tokenizer, r, max_length) for r in records]
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate([as_row(e) for e in examples[i : i + batch_size]], tokenizer.pad_token_id, packed=False)
        s, n = loss_sum(model, batch)
        total, count = total + float(s), count + n
    loss = total / max(1, count)
    with_reference = [r for r in records if prompt_text(tokenizer, r.data, r.where)[1] is not None]
    answered = generate_records(model, tokenizer, with_reference, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, progress=progress)  # fmt: skip
    exact = 0
    for rec, row in zip(with_reference, answered, strict=True):
        reference = prompt_text(tokenizer, rec.data, rec.where)[1]
        row["exact_match"] = exact_match(row["completion"], reference)
        exact += row["exact_match"]
    report = EvalReport(len(records), loss, math.exp(min(loss, 50)), count, len(with_reference), exact)
    return report, answered


def evaluate(model_name, data, adapters=None, batch_size: int = 8, max_new_tokens: int = 64, max_length: int = 1024,
             out=None) -> EvalReport:  # fmt: skip
    from fourbit.atomic import write_jsonl_atomic
    from fourbit.models.loader import load

    records = read_records(data)  # bad input fails before the model loads
    model, tokenizer = load(model_name, adapter=adapters)
    report, answered = evaluate_model(model, tokenizer, records, batch_size, max_new_tokens, max_length)
    if out:
        write_jsonl_atomic(out, answered)
    return report


def format_eval(report: EvalReport) -> str:
    lines = [f"records:     {report.records}",
             f"loss:        {report.loss:.4f} (mean over {report.loss_tokens} loss tokens)",
             f"perplexity:  {report.perplexity:.3f}"]  # fmt: skip
    if report.scored:
        lines.append(f"exact match: {report.exact}/{report.scored} = {100 * report.accuracy:.1f}%")
    return "\n".join(lines)
