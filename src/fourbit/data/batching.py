"""Packing and batching examples into tensors.

Packing puts several examples into one row without letting them see each other: positions restart at 0 for each
example, and with `attention_mask=None` transformers derives a block-diagonal causal mask from the restarts. The
first token of each packed example gets no label (it would otherwise be predicted from the previous example), so a
packed batch has exactly the loss tokens of the same examples unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fourbit.data.tokenize import IGNORE, Example


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def as_row(ex: Example) -> Row:
    return Row(list(ex.input_ids), list(ex.labels), list(range(len(ex.input_ids))))


def pack(examples: list[Example], max_length: int) -> list[Row]:
    """Greedy packing in order: each example goes into the current row if it fits, else starts a new one. Keeping
    the order keeps runs deterministic and resumable by position."""
    rows: list[Row] = []
    current: Row | None = None
    for ex in examples:
        n = len(ex.input_ids)
        if current is None or len(current.input_ids) + n > max_length:
            current = Row([], [], [])
            rows.append(current)
        current.input_ids += ex.input_ids
        current.labels += [IGNORE] + ex.labels[1:]
        current.position_ids += list(range(n))
    return rows


# Batch widths are rounded up to a multiple of this: a few shapes instead of one per batch. Every new shape left
# memory cached for good in the libraries under torch (oneDNN's primitive cache among them): 3 MB a step on the
# bundled model, steadily.
PAD_TO_MULTIPLE = 8


def collate(rows: list[Row], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch as wide as the longest row, rounded up to a multiple of PAD_TO_MULTIPLE. Packed
    batches carry position_ids and no attention mask (the padding becomes one more segment that nothing attends
    across); unpacked ones carry an attention mask."""
    width = max(len(r.input_ids) for r in rows)
    width += -width % PAD_TO_MULTIPLE
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        positions[i, :n] = torch.tensor(r.position_ids)
        positions[i, n:] = torch.arange(width - n)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss: labels shifted by one (position t predicts token t+1)."""
    return int((labels[:, 1:] != IGNORE).sum())
