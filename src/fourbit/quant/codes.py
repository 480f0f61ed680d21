"""The 4-bit and 8-bit code tables, each defined once.

NF4 and FP4 are the 16-entry tables bitsandbytes uses (`get_4bit_type`), in nibble order. The dynamic map is the
256-entry signed table bitsandbytes uses to quantize the block scales again (double quantization).
"""

from __future__ import annotations

import functools

import torch

# NormalFloat4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1), normalized to [-1, 1]. Sorted, so the nibble is
# the index. These are the exact fp32 values bitsandbytes stores as `weight.quant_map`.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2), in bit-pattern order, divided by its max (12).
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # double quantization quantizes the fp32 block scales in blocks of 256


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 values a nibble decodes to (before scaling), indexed by nibble."""
    table = _code_cpu(quant_type)
    return table if device == "cpu" else table.to(device)  # CPU callers (every fused product) skip the .to


@functools.cache
def _rounding_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    order = torch.argsort(code, stable=True)  # FP4 is not sorted; NF4 order is the identity
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2  # in fp32, as bitsandbytes computes them
    return midpoints, order.to(torch.uint8)


def rounding_table(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints, order): a scaled value s gets nibble order[#{m in midpoints : m < s}].

    A value exactly on a midpoint goes to the lower code, as in bitsandbytes (CPU and CUDA).
    """
    midpoints, order = _rounding_cpu(quant_type)
    return midpoints.to(device), order.to(device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: for each exponent e = 0..6,
    # the 2**e midpoints of linspace(0.1, 1, 2**e + 1) scaled by 10**(e - 6), both signs; then 0 and 1.
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(values, dtype=torch.float32).sort().values


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted fp32 values of the signed dynamic 8-bit type (saved as `weight.nested_quant_map`)."""
    table = _dynamic_map_cpu()
    return table if device == "cpu" else table.to(device)


@functools.cache
def _dynamic_lut_cpu() -> torch.Tensor:
    # bitsandbytes' CPU blockwise quantizer does not search the 256 codes: it maps the scaled value to one of 65536
    # bins and looks the code up, lut[j] = #{m : m < -1 + 2j/65535}. Reproducing it keeps our bytes identical to
    # theirs (an exact nearest search differs on about 0.15% of values).
    code = _dynamic_map_cpu()
    midpoints = (code[:-1] + code[1:]) / 2
    grid = -1.0 + 2.0 * torch.arange(65536, dtype=torch.float32) / 65535.0
    return torch.bucketize(grid, midpoints, right=False).to(torch.uint8)


def dynamic_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """65536-entry uint8 table from a 16-bit bin of a scaled value in [-1, 1] to its dynamic-map index."""
    return _dynamic_lut_cpu().to(device)
