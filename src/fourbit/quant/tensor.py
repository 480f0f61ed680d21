"""The quantized-tensor object: packed 4-bit codes plus the statistics needed to decode them.

Layout (identical to bitsandbytes `quantize_4bit`, see docs/formats in the README):
- the tensor is flattened in row-major order and cut into blocks of `blocksize` consecutive elements (the last block
  may be partial); each block is scaled by its absolute maximum;
- two codes per byte, flat element 2k in the high nibble, 2k+1 in the low one; an odd count is padded with the code
  of 0.0;
- with double quantization the fp32 block maxima are stored as 8-bit dynamic-map indices over blocks of 256, plus one
  fp32 maximum per 256 blocks and the mean (offset) that was subtracted first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fourbit.quant.codes import NESTED_BLOCKSIZE, dynamic_map


@dataclass
class QuantizedTensor:
    packed: torch.Tensor  # uint8, [(numel + 1) // 2], flat
    absmax: torch.Tensor  # float32 [n_blocks]; uint8 [n_blocks] (dynamic-map indices) with double quantization
    shape: torch.Size  # the original shape
    dtype: torch.dtype  # the original dtype: what dequantize returns by default
    quant_type: str = "nf4"  # "nf4" | "fp4"
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(n_blocks / 256)], double quantization only
    nested_offset: float | None = None  # fp32 value subtracted from the block maxima before they were quantized

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the tensors of this object (the dynamic map is a shared constant, not counted)."""
        held = [self.packed, self.absmax] + ([self.nested_absmax] if self.nested_absmax is not None else [])
        total = sum(t.numel() * t.element_size() for t in held)
        return total + (4 if self.nested_offset is not None else 0)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def block_scales(self) -> torch.Tensor:
        """The fp32 per-block scales, decoding double quantization the way bitsandbytes does (two fp32 roundings:
        code * nested max, then + offset)."""
        if self.nested_absmax is None:
            return self.absmax
        code = dynamic_map(self.absmax.device)
        nested = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
        scales = code[self.absmax.long()] * nested
        return scales + torch.tensor(self.nested_offset, dtype=torch.float32, device=scales.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from fourbit.quant.api import dequantize_4bit

        return dequantize_4bit(self, dtype)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, packed=move(self.packed), absmax=move(self.absmax), nested_absmax=move(self.nested_absmax)
        )

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedTensor({self.quant_type}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"blocksize={self.blocksize}{dq}, {self.bits_per_param:.3f} bits/param)"
        )
