"""The transformers + bitsandbytes 4-bit checkpoint layout, read and written without bitsandbytes.

Each quantized Linear `P` is stored as six tensors (four without double quantization):
  P.weight                              uint8 [(numel+1)//2, 1]   packed codes
  P.weight.absmax                       uint8 [n_blocks] with double quantization, else fp32
  P.weight.quant_map                    fp32 [16]                 the 4-bit code table
  P.weight.nested_absmax                fp32 [ceil(n_blocks/256)] (double quantization only)
  P.weight.nested_quant_map             fp32 [256]                the dynamic map (double quantization only)
  P.weight.quant_state.bitsandbytes__nf4 (or __fp4) uint8 [len]  UTF-8 JSON: quant_type, blocksize, dtype, shape,
                                                                  and nested_blocksize/nested_dtype/nested_offset
and config.json carries a `quantization_config` with `quant_method: "bitsandbytes"`.
"""

from __future__ import annotations

import json
import math

import torch

from fourbit.quant.codes import NESTED_BLOCKSIZE, code_table, dynamic_map
from fourbit.quant.tensor import QuantizedTensor

QUANT_STATE_SUFFIX = "weight.quant_state.bitsandbytes__"
STATE_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPE_NAMES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPE_NAMES)}") from None


def to_bnb_tensors(prefix: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The state-dict entries transformers + bitsandbytes write for a quantized Linear at `prefix` (e.g.
    "model.layers.0.self_attn.q_proj.")."""
    state = {
        "quant_type": q.quant_type,
        "blocksize": q.blocksize,
        "dtype": dtype_name(q.dtype),
        "shape": list(q.shape),
    }
    out = {
        f"{prefix}weight": q.packed.reshape(-1, 1),
        f"{prefix}weight.absmax": q.absmax,
        f"{prefix}weight.quant_map": code_table(q.quant_type, q.device).clone(),  # own storage per tensor
    }
    if q.double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=q.nested_offset)
        out[f"{prefix}weight.nested_absmax"] = q.nested_absmax
        out[f"{prefix}weight.nested_quant_map"] = dynamic_map(q.device).clone()
    blob = json.dumps(state).encode()
    out[f"{prefix}{QUANT_STATE_SUFFIX}{q.quant_type}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return out


def is_bnb_quantized(prefix: str, keys: set[str]) -> bool:
    return any(f"{prefix}{QUANT_STATE_SUFFIX}{t}" in keys for t in ("nf4", "fp4"))


def from_bnb_tensors(prefix: str, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> QuantizedTensor:
    """Rebuild a QuantizedTensor from the entries `to_bnb_tensors` writes; `where` names the file in errors."""

    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ValueError(f"{where}: missing tensor {key}")
        return tensors[key]

    state_key = next((k for k in tensors if k.startswith(f"{prefix}{QUANT_STATE_SUFFIX}")), None)
    if state_key is None:
        raise ValueError(f"{where}: missing tensor {prefix}{QUANT_STATE_SUFFIX}nf4 (the 4-bit quant state)")
    try:
        state = json.loads(bytes(tensors[state_key].to(torch.uint8).tolist()).decode())
        shape = torch.Size(state["shape"])
        quant_type, blocksize, dtype = state["quant_type"], int(state["blocksize"]), parse_dtype(state["dtype"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: {state_key} is not a valid bitsandbytes quant state ({err})") from None
    q = QuantizedTensor(need(f"{prefix}weight").reshape(-1), need(f"{prefix}weight.absmax"), shape, dtype, quant_type,
                        blocksize)  # fmt: skip
    if "nested_offset" in state:
        q.nested_absmax = need(f"{prefix}weight.nested_absmax").float()
        q.nested_offset = float(state["nested_offset"])
        nested_map = tensors.get(f"{prefix}weight.nested_quant_map")
        if nested_map is not None and not torch.equal(nested_map.float(), dynamic_map()):
            raise ValueError(f"{where}: {prefix}weight.nested_quant_map is not the dynamic map fourbit decodes")
    quant_map = tensors.get(f"{prefix}weight.quant_map")
    if quant_map is not None and not torch.equal(quant_map.float(), code_table(quant_type)):
        raise ValueError(f"{where}: {prefix}weight.quant_map is not the standard {quant_type} table")
    expect_bytes = (q.numel + 1) // 2
    if q.packed.dtype != torch.uint8 or q.packed.numel() != expect_bytes:
        raise ValueError(
            f"{where}: {prefix}weight holds {q.packed.numel()} {q.packed.dtype} values; shape {list(shape)} needs "
            f"{expect_bytes} uint8"
        )
    if q.absmax.numel() != q.n_blocks:
        raise ValueError(f"{where}: {prefix}weight.absmax has {q.absmax.numel()} entries, expected {q.n_blocks}")
    # a NaN or infinite scale would decode its whole block to NaN or infinities (or zeros, where a path rounds a NaN
    # with a full payload to bf16 as -0): refuse it
    scale_key, scales = ("weight.nested_absmax", q.nested_absmax) if q.double_quant else ("weight.absmax", q.absmax)
    bad = (~torch.isfinite(scales.float())).nonzero()
    if bad.numel():
        raise ValueError(f"{where}: {prefix}{scale_key}[{bad[0].item()}] is {scales[bad[0]].item()}; scales must be finite")
    if q.double_quant and not math.isfinite(q.nested_offset):
        raise ValueError(f"{where}: {prefix}{QUANT_STATE_SUFFIX}{q.quant_type} has nested_offset {q.nested_offset}; it must be finite")
    return q


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                        skip_modules: list[str] | None = None) -> dict:  # fmt: skip
    """The `quantization_config` entry of config.json that transformers + bitsandbytes write for a 4-bit model."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
