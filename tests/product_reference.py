"""What the fused bf16 g @ W computes, in float64, for the tests that pin its rounding down."""

import torch

from fourbit.quant import native
from fourbit.quant.codes import code_table
from fourbit.quant.tensor import QuantizedTensor


def g_w_folds(rows: int, q: QuantizedTensor) -> bool:
    """Whether bf16 g @ W with this many rows of g folds each block's scale into g (nn_folded_cols in kernels.cpp):
    the AVX512_BF16 path with at most 4 rows, blocks of at least 64 and K % 64 == 0, N even, where the tile unit (from
    2 rows of g and N % 32 == 0, on a CPU with AMX) does not take it."""
    n, k = q.shape
    path = native.cpu_path()
    if path not in ("avx512-bf16", "avx512-amx") or rows > 4 or q.blocksize < 64 or k % 64 or n % 2:
        return False
    return not (path == "avx512-amx" and rows >= 2 and n % 32 == 0)


def g_w_reference(g: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """bf16 g @ W in float64, as the fused path multiplies: dequantize's bf16 weights bf16(code * scale) or, where
    g_w_folds, the code table rounded to bf16 times bf16(g * scale), one scale per row of W and 64-column step."""
    n, k = q.shape
    if not g_w_folds(g.shape[0], q):
        return g.double() @ q.dequantize(torch.bfloat16).double()
    steps = (torch.arange(n)[:, None] * k + torch.arange(0, k, 64)[None, :]) // q.blocksize
    folded = (g.float()[:, :, None] * q.block_scales()[steps][None]).bfloat16().double()  # [rows, n, k / 64]
    nibbles = torch.stack([q.packed.reshape(-1) >> 4, q.packed.reshape(-1) & 15], 1).reshape(-1)[: n * k].long()
    unit = code_table(q.quant_type)[nibbles].bfloat16().double().view(n, k // 64, 64)
    return torch.einsum("mnj,njc->mjc", folded, unit).reshape(g.shape[0], k)
