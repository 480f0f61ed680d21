"""quantize_4bit / dequantize_4bit, and the choice between the native and the pure-torch kernels."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from fourbit.quant import torch_kernels
from fourbit.quant.codes import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, dynamic_lut
from fourbit.quant.tensor import QuantizedTensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# "auto": native kernels on CPU when they build, pure torch elsewhere; "torch": pure torch everywhere.
_backend_choice = os.environ.get("FOURBIT_KERNELS", "auto")


_cpu_kernels: ModuleType | None = None  # what "auto" picks on a CPU, decided on first use (a product per layer asks)


def kernels_for(device: torch.device) -> ModuleType:
    """The kernel module for tensors on `device`: native C++ on a CPU where it builds, pure torch otherwise."""
    global _cpu_kernels
    if _backend_choice == "torch" or device.type != "cpu":
        return torch_kernels
    if _cpu_kernels is None:
        from fourbit.quant import native

        _cpu_kernels = native if native.available() else torch_kernels
    return _cpu_kernels


@contextlib.contextmanager
def use_kernels(choice: str) -> Iterator[None]:
    """Force "torch", "native" or "auto" kernels inside a block (tests and benchmarks compare the two)."""
    global _backend_choice
    if choice not in ("auto", "torch", "native"):
        raise ValueError(f"kernels must be auto, torch or native, got {choice!r}")
    if choice == "native":
        from fourbit.quant import native

        if not native.available():
            raise RuntimeError(f"native kernels unavailable: {native.build_error()}")
    previous, _backend_choice = _backend_choice, choice
    try:
        yield
    finally:
        _backend_choice = previous


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantization of fp32 block scales: subtract their mean, then 8-bit dynamic-map codes in blocks of 256
    with one fp32 max per block. Returns (uint8 codes, fp32 nested maxima, offset), bit-exact with bitsandbytes' CPU
    `quantize_blockwise` (which bins the scaled value into 65536 steps and looks its code up)."""
    offset = absmax.mean()
    centred = absmax - offset
    if not bool(torch.isfinite(centred).all()):  # bitsandbytes would store an inf offset: every value decodes NaN
        raise ValueError(
            f"block maxima up to {float(absmax.max()):.3g} overflow fp32 in double quantization; "
            "quantize this tensor with double_quant=False"
        )
    n = centred.numel()
    n_nested = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centred, (0, n_nested * NESTED_BLOCKSIZE - n)).view(n_nested, NESTED_BLOCKSIZE)
    nested_absmax = padded.abs().amax(dim=1)
    scaled = (padded / nested_absmax.unsqueeze(1)).clamp_(-1, 1)
    scaled = torch.where(nested_absmax.unsqueeze(1) == 0, -1.0, scaled)  # an all-zero block gets code 0
    bins = ((scaled + 1) * 0.5 * 65535 + 0.5).to(torch.int32)
    codes = dynamic_lut(absmax.device)[bins.reshape(-1)[:n]]
    return codes, nested_absmax, float(offset)


def quantize_4bit(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedTensor:
    """Quantize a float tensor (fp32, fp16 or bf16, any shape) to 4 bits, byte-compatible with bitsandbytes
    `quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type=quant_type)`.

    Raises ValueError for NaN/Inf (bitsandbytes would silently produce NaN blocks), unknown types or blocksizes.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"can only quantize fp32, fp16 or bf16 tensors, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    with torch.no_grad():
        packed, absmax = kernels_for(w.device).quantize_blocks(w.detach(), blocksize, quant_type)
        q = QuantizedTensor(packed, absmax, w.shape, w.dtype, quant_type, blocksize)
        if double_quant:
            q.absmax, q.nested_absmax, q.nested_offset = quantize_absmax(absmax)
    return q


def dequantize_4bit(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense tensor back, in `dtype` (default: the original dtype), bit-exact with bitsandbytes
    `dequantize_4bit`: code * scale in fp32, then one rounding."""
    dtype = q.dtype if dtype is None else dtype
    with torch.no_grad():
        if dtype not in FLOAT_DTYPES:  # e.g. float64 for references: the fp32 values are exact
            return kernels_for(q.device).dequantize(q, torch.float32).view(q.shape).to(dtype)
        return kernels_for(q.device).dequantize(q, dtype).view(q.shape)
