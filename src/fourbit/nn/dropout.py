"""LoRA dropout whose mask is a hash of (seed, element index), computed by the native kernels.

torch's CPU dropout draws one number per element from a sequential generator on one thread; on a QLoRA training
step that was a quarter of the time. The hash mask costs one multithreaded pass, and the backward pass regenerates
it from the seed, so no mask is stored. The seed comes from torch's default generator, so `torch.manual_seed` fixes
it and activation checkpointing (which restores the generator's state) recomputes the same mask.

Elsewhere (GPU tensors, no native kernels) `LoraDropout` is exactly `nn.Dropout`.
"""

from __future__ import annotations

import torch
from torch import nn

from fourbit.quant import native


def _use_hash(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and native.available()


class HashDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, dtype: torch.dtype | None) -> torch.Tensor:
        ctx.p, ctx.seed, ctx.x_dtype = p, seed, x.dtype
        return native.hash_dropout(x, p, seed, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return native.hash_dropout(grad, ctx.p, ctx.seed, ctx.x_dtype), None, None, None


def hash_dropout(x: torch.Tensor, p: float, seed: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x with each element zeroed with probability p and the rest scaled by 1/(1-p), cast to `dtype` in the same
    pass; differentiable."""
    if seed is None:
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    return HashDropoutFunction.apply(x, p, seed, dtype)


class LoraDropout(nn.Dropout):
    """nn.Dropout (same attribute, same train/eval behaviour) with the hash mask on CPU. `dtype` casts the result
    (the adapter's dtype), fused into the dropout pass where the hash path runs."""

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x if dtype is None else x.to(dtype)
        if _use_hash(x) and dtype in (None, torch.float32, torch.bfloat16, torch.float16):
            return hash_dropout(x, self.p, dtype=dtype)
        return super().forward(x if dtype is None else x.to(dtype))
