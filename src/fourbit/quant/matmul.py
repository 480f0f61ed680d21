"""Products with a 4-bit weight W [N, K], never holding W dense: x @ W.T (forward) and g @ W (gradient to input).

Two paths, chosen by the number of rows M of the activation:
- small M (decoding, small micro-batches): a fused decode-and-multiply kernel, bandwidth-bound (native only);
- large M (training): dequantize a tile of W's rows into the activation's dtype and let torch's matmul run on it,
  tile by tile, so at most one tile of W is ever dense.
"""

from __future__ import annotations

import torch

from fourbit.quant.api import kernels_for
from fourbit.quant.tensor import QuantizedTensor

TILE_ELEMENTS = 1 << 22  # ~4M weights per dense tile: 16 MB in fp32, small next to a layer, big enough for BLAS
FUSED_MAX_ROWS = 16  # below this many activation rows the fused kernel beats dequantize-then-matmul


def _row_tiles(q: QuantizedTensor) -> list[tuple[int, int]]:
    n, k = q.shape
    rows = max(1, min(n, TILE_ELEMENTS // k))
    return [(r, min(n, r + rows)) for r in range(0, n, rows)]


def linear_4bit(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N], in x's dtype."""
    n, k = q.shape
    x2d = x.reshape(-1, k)
    kernels = kernels_for(x.device)
    if x2d.shape[0] <= FUSED_MAX_ROWS and hasattr(kernels, "matmul_nt"):  # only native kernels fuse
        return kernels.matmul_nt(x2d, q).view(*x.shape[:-1], n)
    out = x2d.new_empty(x2d.shape[0], n)
    scales = q.block_scales()
    for r0, r1 in _row_tiles(q):
        tile = kernels.dequantize_blocks(
            q.packed, scales, q.blocksize, q.quant_type, q.numel, x.dtype, r0 * k, r1 * k
        ).view(r1 - r0, k)
        torch.matmul(x2d, tile.t(), out=out[:, r0:r1])
    return out.view(*x.shape[:-1], n)


def linear_4bit_t(g: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """g [..., N] @ W -> [..., K], in g's dtype (the gradient of linear_4bit with respect to x)."""
    n, k = q.shape
    g2d = g.reshape(-1, n)
    kernels = kernels_for(g.device)
    if g2d.shape[0] <= FUSED_MAX_ROWS and hasattr(kernels, "matmul_nn"):
        return kernels.matmul_nn(g2d, q).view(*g.shape[:-1], k)
    out = g2d.new_zeros(g2d.shape[0], k)
    scales = q.block_scales()
    for r0, r1 in _row_tiles(q):
        tile = kernels.dequantize_blocks(
            q.packed, scales, q.blocksize, q.quant_type, q.numel, g.dtype, r0 * k, r1 * k
        ).view(r1 - r0, k)
        out.addmm_(g2d[:, r0:r1], tile)
    return out.view(*g.shape[:-1], k)
