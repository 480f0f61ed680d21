"""Pure-torch 4-bit kernels: run on every device torch runs on, and are the reference the native kernels must match
byte for byte.

Both kernel modules (this one and `fourbit.quant.native`) offer the same functions:
- `quantize_blocks(x, blocksize, quant_type) -> (packed uint8 [(n+1)//2], absmax fp32 [n_blocks])`
- `dequantize(q, dtype, start=0, end=None, out=None) -> flat elements [start, end) of q`, code * scale in fp32
  then one rounding to dtype (double quantization decoded first).
The native module adds the fused small-batch products `matmul_nt(x2d, q)` (x @ W.T) and `matmul_nn(g2d, q)` (g @ W).
"""

from __future__ import annotations

import torch

from fourbit.quant.codes import code_table, rounding_table
from fourbit.quant.tensor import QuantizedTensor


def check_finite(x: torch.Tensor) -> None:
    """Raise a ValueError naming the first NaN or Inf element: quantizing one silently ruins its whole block."""
    bad = ~torch.isfinite(x.reshape(-1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"cannot quantize a tensor holding NaN or Inf (first at flat index {i}: {x.reshape(-1)[i]})")


def _scale_to_unit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], with bitsandbytes' exact fp32 arithmetic: full blocks
    multiply by the reciprocal, the partial tail block divides."""
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = (head * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax()
        scaled = torch.cat([scaled, (flat[full:] / tail_max.clamp(min=1e-38)).clamp_(-1, 1)])
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
    return absmax, scaled


def quantize_blocks(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1).float()
    check_finite(flat)
    absmax, scaled = _scale_to_unit(flat, blocksize)
    midpoints, order = rounding_table(quant_type, flat.device)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # a scaled 0.0: the pad nibble is the code of zero
    nibbles = order[torch.bucketize(scaled, midpoints, right=False)]
    packed = (nibbles[0::2] << 4) | nibbles[1::2]
    return packed, absmax


def dequantize_blocks(
    packed: torch.Tensor,
    scales: torch.Tensor,
    blocksize: int,
    quant_type: str,
    numel: int,
    dtype: torch.dtype,
    start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """Decode flat elements [start, end): code[nibble] * scale in fp32, then one rounding to `dtype`."""
    end = numel if end is None else end
    code = code_table(quant_type, packed.device)
    # decode whole blocks covering [start, end), so each scale multiplies a row of a [blocks, blocksize] view
    lo = start // blocksize * blocksize
    hi = min(-(-end // blocksize) * blocksize, numel)
    chunk = packed[lo // 2 : (hi + 1) // 2]
    nibbles = torch.stack([chunk >> 4, chunk & 0xF], dim=1).reshape(-1)[: hi - lo]
    values = code[nibbles.long()]
    n_blocks = -(-(hi - lo) // blocksize)
    values = torch.nn.functional.pad(values, (0, n_blocks * blocksize - values.numel())).view(n_blocks, blocksize)
    values = values * scales[lo // blocksize : lo // blocksize + n_blocks].unsqueeze(1)
    return values.reshape(-1)[start - lo : end - lo].to(dtype)


def dequantize(q: QuantizedTensor, dtype: torch.dtype, start: int = 0, end: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    scales = q.block_scales()
    values = dequantize_blocks(q.packed, scales, q.blocksize, q.quant_type, q.numel, dtype, start, end)
    if out is None:
        return values
    view = out.view(-1)[: values.numel()]
    view.copy_(values)
    return view

