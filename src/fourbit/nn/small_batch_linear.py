"""The 16-bit output head for decoding: a dense bf16 linear layer whose products with a few rows (M <= 16, no
gradient) go to the native kernel instead of torch's bf16 matmul, which on these CPUs reads the weight at about a
third of the memory bandwidth. For a small model the head is the largest weight read per token."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fourbit.quant import native

SMALL_BATCH_ROWS = 16


class SmallBatchLinear(nn.Linear):
    """nn.Linear with the native small-batch bf16 product where it applies; the same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if (x2d.shape[0] <= SMALL_BATCH_ROWS and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and self.weight.dtype == torch.bfloat16 and self.in_features % 32 == 0
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):  # fmt: skip
            y = native.matmul_dense_nt(x2d, self.weight)
            if self.bias is not None:
                y = y.add_(self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_small_batch_head(model: nn.Module) -> bool:
    """Give `model`'s output head (a bf16 nn.Linear) the native small-batch product, where this CPU has it. Returns
    whether it did. The module keeps its parameters (a tied head stays tied)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.dtype != torch.bfloat16 or head.weight.device.type != "cpu":
        return False
    if not native.dense_ok():
        return False
    head.__class__ = SmallBatchLinear
    return True
