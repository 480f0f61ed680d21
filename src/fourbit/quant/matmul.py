"""Products with a 4-bit weight W [N, K], never holding W dense: x @ W.T (forward) and g @ W (gradient to input).

Two paths, chosen by the number of rows M of the activation:
- small M (decoding, small micro-batches): a fused decode-and-multiply kernel, bandwidth-bound (native only);
- large M (training): dequantize a tile of W's rows into the activation's dtype and let torch's matmul run on it,
  tile by tile, so at most one tile of W is ever dense (g @ W sums 16-bit tiles' products in fp32).
"""

from __future__ import annotations

import threading

import torch

from fourbit.quant.api import kernels_for
from fourbit.quant.tensor import QuantizedTensor

TILE_ELEMENTS = 1 << 22  # ~4M weights per dense tile: 16 MB in fp32, small next to a layer, big enough for BLAS
FUSED_MAX_ROWS = 16  # below this many activation rows the fused kernel beats dequantize-then-matmul


def _row_tiles(q: QuantizedTensor) -> list[tuple[int, int]]:
    n, k = q.shape
    rows = max(1, min(n, TILE_ELEMENTS // k))
    return [(r, min(n, r + rows)) for r in range(0, n, rows)]


_local = threading.local()  # one decode buffer per thread: two threads multiplying at once must not share one


def tile_buffers() -> dict[tuple[torch.dtype, torch.device], torch.Tensor]:
    """This thread's reusable decode buffers, by dtype and device."""
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers


def _tile_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # a reused buffer: a fresh tile each call would fault in new pages every time, which costs more than decoding
    buffers = tile_buffers()
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor even when first asked for under inference mode
            buf = torch.empty(numel, dtype=dtype, device=device)
        buffers[(dtype, device)] = buf
    return buf


def _tiles(q: QuantizedTensor, dtype: torch.dtype, device: torch.device):
    """(first row, last row, dense tile) over W, each tile decoded into the same buffer."""
    n, k = q.shape
    kernels = kernels_for(device)
    tiles = _row_tiles(q)
    buf = _tile_buffer(max(r1 - r0 for r0, r1 in tiles) * k, dtype, device)
    for r0, r1 in tiles:
        yield r0, r1, kernels.dequantize(q, dtype, r0 * k, r1 * k, out=buf).view(r1 - r0, k)


def _fused(kernels, rows: int, q: QuantizedTensor) -> bool:
    return rows <= FUSED_MAX_ROWS and hasattr(kernels, "fused_ok") and kernels.fused_ok(q)  # native only


def linear_4bit(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N], in x's dtype."""
    n, k = q.shape
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    kernels = kernels_for(x.device)
    if _fused(kernels, x2d.shape[0], q):
        out = kernels.matmul_nt(x2d, q)
    else:
        out = x2d.new_empty(x2d.shape[0], n)
        for r0, r1, tile in _tiles(q, x.dtype, x.device):
            torch.matmul(x2d, tile.t(), out=out[:, r0:r1])
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)  # a 2-D input gets a fresh tensor, not a view


def linear_4bit_t(g: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """g [..., N] @ W -> [..., K], in g's dtype (the gradient of linear_4bit with respect to x)."""
    n, k = q.shape
    g2d = g if g.dim() == 2 else g.reshape(-1, n)
    kernels = kernels_for(g.device)
    if _fused(kernels, g2d.shape[0], q):
        out = kernels.matmul_nn(g2d, q)
    elif len(_row_tiles(q)) == 1 or g.dtype == torch.float32:
        out = g2d.new_zeros(g2d.shape[0], k)
        for r0, r1, tile in _tiles(q, g.dtype, g.device):
            out.addmm_(g2d[:, r0:r1], tile)
    else:
        # 16-bit tiles' products summed in fp32: a 16-bit running sum would be rounded once per tile (twice the error
        # of one matmul over W at 8 tiles, against 1.4x this way), for 4 more bytes per output element while it runs
        acc = g2d.new_zeros(g2d.shape[0], k, dtype=torch.float32)
        part = g2d.new_empty(g2d.shape[0], k)
        for r0, r1, tile in _tiles(q, g.dtype, g.device):
            torch.matmul(g2d[:, r0:r1], tile, out=part)
            acc += part
        del part
        out = acc.to(g.dtype)
    return out if g.dim() == 2 else out.view(*g.shape[:-1], k)
