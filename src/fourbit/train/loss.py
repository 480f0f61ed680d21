"""The causal-LM loss, computed only where labels exist and in chunks.

A full-vocabulary logits tensor at every position (vocab x tokens, fp32, plus its gradient) is most of a small
model's training memory. Here the decoder's hidden states are gathered at the positions that carry loss, and the
output head + cross-entropy run over chunks of them under activation checkpointing, so at most one chunk of logits
exists at a time, in forward and in backward.

The function returns the *sum* of token losses: the trainer divides by the number of loss tokens in the whole
optimizer step, so micro-batching, packing and the number of processes do not change the loss (transformers#24725).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fourbit.data.tokenize import IGNORE

# 32 tokens of fp32 logits over a 49k vocabulary are 6 MB; larger chunks bought no speed on the bundled model
CHUNK_TOKENS = 32


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:  # Gemma 2 caps its final logits
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)


def loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropy over every token that carries loss, how many tokens that is)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    n_loss = int(targets.numel())
    # the last chunk is padded to full size (IGNORE targets add nothing to the sum), so every chunk has one shape:
    # each new shape leaves memory cached for good in the libraries under torch (see data/batching.py)
    pad = -n_loss % chunk_tokens
    if pad:
        hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[-1])])
        targets = torch.cat([targets, targets.new_full((pad,), IGNORE)])
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, targets.numel(), chunk_tokens):
        h, t = hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, h, t, head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, t, head, softcap)
    return total, n_loss


class LossModule(torch.nn.Module):
    """The model with `loss_sum` as its forward, so DistributedDataParallel sees the whole computation."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return loss_sum(self.model, batch)
