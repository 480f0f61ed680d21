"""The hash dropout: its mask is the documented hash of (seed, index), has the right rate, is regenerated exactly in
backward and under activation checkpointing, and LoraDropout falls back to nn.Dropout where it cannot run."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fourbit.nn.dropout import LoraDropout, hash_dropout
from fourbit.quant import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

M32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def keeps(seed: int, i: int, p: float) -> bool:
    """The spec in dropout.cpp, written again in Python."""
    s = seed & (2**64 - 1)
    key = fmix32((s & M32) ^ fmix32(((s >> 32) + (i >> 32)) & M32))
    return fmix32(((i & M32) * 0x9E3779B1 & M32) ^ key) >= int(p * 2**32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_is_the_documented_hash_on_every_path(dtype):
    # 100_003 elements: several threads' ranges, vector groups and a scalar tail
    x = torch.ones(100_003, dtype=dtype)
    seed = -123456789012345
    y = hash_dropout(x, 0.3, seed)
    kept = (y != 0).tolist()
    for i in list(range(40)) + list(range(50_000, 50_040)) + list(range(100_003 - 40, 100_003)):
        assert kept[i] == keeps(seed, i, 0.3), i
    assert torch.equal(y[y != 0].float(), torch.full_like(y[y != 0].float(), (1 / 0.7)).to(dtype).float())


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_rate_and_independence(p):
    x = torch.ones(1000, 1000)
    kept = hash_dropout(x, p, 7) != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    # neighbouring elements and rows are independent: both-kept rate ~ (1-p)^2
    both = (kept[:, 1:] & kept[:, :-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 0.01
    assert (hash_dropout(x, p, 8) != 0).ne(kept).any()
    assert torch.equal(hash_dropout(x, p, 7) != 0, kept)


def test_backward_uses_the_same_mask():
    x = torch.randn(37, 129, requires_grad=True)
    y = hash_dropout(x, 0.2, 99)
    g = torch.randn_like(y)
    y.backward(g)
    mask = (y != 0).float()
    torch.testing.assert_close(x.grad, g * mask / 0.8, rtol=1e-6, atol=0)


def test_checkpoint_recompute_matches_plain_backward():
    torch.manual_seed(0)
    drop = LoraDropout(0.3)
    lin = torch.nn.Linear(64, 8)
    x = torch.randn(16, 64, requires_grad=True)

    def f(t):
        return lin(drop(t)).square().sum()

    torch.manual_seed(5)
    f(x).backward()
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(5)
    checkpoint(f, x, use_reentrant=False).backward()
    torch.testing.assert_close(x.grad, plain, rtol=0, atol=0)


def test_eval_mode_and_fallback():
    drop = LoraDropout(0.5)
    x = torch.randn(8, 32, dtype=torch.float64)
    y = drop(x)  # float64: nn.Dropout's path
    assert ((y == 0) | torch.isclose(y, 2 * x)).all() and (y == 0).any()
    drop.eval()
    assert drop(x) is x
    assert isinstance(drop, torch.nn.Dropout)


def test_cast_fused_into_the_pass():
    x = torch.randn(33, 70, dtype=torch.bfloat16, requires_grad=True)
    y = hash_dropout(x, 0.25, 11, dtype=torch.float32)
    assert y.dtype == torch.float32
    same_mask = hash_dropout(x.detach(), 0.25, 11) != 0
    assert torch.equal(y != 0, same_mask)
    torch.testing.assert_close(y[same_mask], x.detach().float()[same_mask] * float(torch.tensor(1 / 0.75)),
                               rtol=0, atol=0)  # fmt: skip
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad != 0, same_mask)
