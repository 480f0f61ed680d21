"""Quantize-on-load: a Hugging Face causal LM with its linear layers in 4 bits, streamed tensor by tensor.

The model is built on the meta device (no memory), then every tensor of the checkpoint is read from the memory-mapped
safetensors files one at a time: a linear weight is quantized as it arrives and only its 4-bit form is kept; other
tensors (embeddings, norms, output head) are kept in the compute dtype. Peak memory is the 4-bit model plus one
tensor. Checkpoints already in the transformers + bitsandbytes 4-bit layout load without re-quantizing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from fourbit.atomic import write_atomic
from fourbit.models import bnb_checkpoint
from fourbit.models.resolve import resolve_model
from fourbit.nn import QLoRALinear
from fourbit.nn.small_batch_linear import use_small_batch_head
from fourbit.quant import quantize_4bit

# Architectures fourbit tests; others that transformers builds as a causal LM with nn.Linear layers usually work too,
# and load with a warning.
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: names the file and tensor."""


@dataclass
class LoadOptions:
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | None = None  # None: the fastest on the device, measured once per machine
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])  # linear layers kept in compute dtype
    device: str = "cpu"


def default_compute_dtype(device: str | torch.device) -> torch.dtype:
    """The fastest matmul dtype on `device`. On CUDA bf16 where supported, else fp16. On a CPU it depends on the
    chip (measured: a Xeon without AMX runs fp32 at about twice bf16's rate, an EPYC with AVX512-BF16 runs bf16 at
    twice fp32's), so fourbit measures once per machine and remembers. `FOURBIT_COMPUTE_DTYPE` overrides."""
    forced = os.environ.get("FOURBIT_COMPUTE_DTYPE")
    if forced:
        return bnb_checkpoint.parse_dtype(forced)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        return torch.float32
    return _measured_cpu_dtype()


@functools.cache
def _measured_cpu_dtype() -> torch.dtype:
    from fourbit.models.bundled import cache_root

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    key = f"{cpu}|{torch.__version__}|{torch.get_num_threads()}"
    path = cache_root() / "compute_dtype.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
            a @ b  # warm-up
            start = time.perf_counter()
            for _ in range(8):
                a @ b
            rates[str(dtype).removeprefix("torch.")] = time.perf_counter() - start
        known[key] = min(rates, key=rates.get)
        try:
            write_atomic(path, json.dumps(known, indent=1).encode())
        except OSError:
            pass  # a read-only cache only means measuring again next time
    return bnb_checkpoint.parse_dtype(known[key])


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.exists():
            has_bin = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
            hint = " (only pickle .bin/.pt weights found: fourbit reads safetensors only)" if has_bin else ""
            raise FileNotFoundError(f"{f}: weights file not found{hint}")
    return files


def _read_headers(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file, from the safetensors headers only (nothing is read)."""
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for key in handle.keys():
                    where[key] = f
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{f}: not a readable safetensors file ({err})") from None
    return where


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Inside the block, every parameter a module registers is replaced by a meta tensor (no memory, and its random
    init costs nothing), while buffers stay real: computed ones, such as rotary frequencies or embedding scales, are
    then right without knowing each architecture."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_on_meta(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as err:
            raise CheckpointError(f"unsupported architecture {config.model_type!r}: {err}") from None


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def _linear_targets(model: nn.Module, skip: list[str]) -> dict[str, nn.Linear]:
    output = model.get_output_embeddings()
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not output and name.split(".")[-1] not in skip and name not in skip
    }


def load(
    model: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    adapter: str | Path | list | dict | None = None,
    blocksize: int = 64,
    device: str = "cpu",
    progress: bool = True,
):
    """Load MODEL (a Hugging Face folder, a llama-family .gguf file, or a bundled name) with its linear layers
    quantized to 4 bits as QLoRA layers. Returns (model, tokenizer): the transformers model, so `generate`,
    `model(input_ids, labels=...)` and the rest keep working."""
    from transformers import AutoTokenizer

    folder = resolve_model(model)
    opts = LoadOptions(quant_type, double_quant, blocksize, compute_dtype or default_compute_dtype(device))
    opts.device = device
    net = load_model(folder, opts, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if adapter is not None:
        from fourbit.models.adapters import load_adapters

        load_adapters(net, adapter)
    return net, tokenizer


def load_model(folder: Path, opts: LoadOptions, progress: bool = True) -> nn.Module:
    from transformers import AutoConfig

    if opts.compute_dtype is None:
        opts.compute_dtype = default_compute_dtype(opts.device)

    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: not found (is {folder} a Hugging Face model folder?)")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    prequantized = getattr(config, "quantization_config", None)
    if prequantized is not None:
        qc = prequantized if isinstance(prequantized, dict) else prequantized.to_dict()
        if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
            raise CheckpointError(f"{config_path}: quantization {qc.get('quant_method')!r} is not bitsandbytes 4-bit")
        config.quantization_config = None  # we build plain modules and place the 4-bit weights ourselves
        if hasattr(config, "_pre_quantization_dtype"):
            del config._pre_quantization_dtype

    files = _weight_files(folder)
    where = _read_headers(files)
    model = _build_on_meta(config, opts.compute_dtype)
    targets = _linear_targets(model, opts.skip_modules)
    state_names = set(model.state_dict().keys())
    keys = set(where)

    def model_name(key: str) -> str | None:
        if key in state_names:
            return key
        if f"model.{key}" in state_names:  # checkpoints of the bare decoder (LlamaModel) lack the "model." prefix
            return f"model.{key}"
        return None

    loaded: set[str] = set()
    bar = tqdm(total=len(keys), desc=f"loading {folder.name}", unit="tensor", disable=not progress, leave=False)
    handles = {f: safe_open(f, framework="pt") for f in files}
    try:
        for name, linear in targets.items():
            prefix = next((p for p in (f"{name}.", name.removeprefix("model.") + ".") if f"{p}weight" in keys), None)
            if prefix is None:
                raise CheckpointError(f"{folder}: checkpoint has no tensor {name}.weight")
            if bnb_checkpoint.is_bnb_quantized(prefix, keys):
                parts = {k: handles[where[k]].get_tensor(k) for k in keys if k.startswith(f"{prefix}weight")}
                q = bnb_checkpoint.from_bnb_tensors(prefix, parts, where=str(where[f"{prefix}weight"]))
            else:
                w = handles[where[f"{prefix}weight"]].get_tensor(f"{prefix}weight")
                if tuple(w.shape) != (linear.out_features, linear.in_features):
                    raise CheckpointError(
                        f"{where[f'{prefix}weight']}: tensor {prefix}weight has shape {list(w.shape)}, config.json "
                        f"implies {[linear.out_features, linear.in_features]}"
                    )
                try:
                    q = quantize_4bit(w.to(opts.device), opts.quant_type, opts.blocksize, opts.double_quant)
                except ValueError as err:
                    raise CheckpointError(f"{where[f'{prefix}weight']}: tensor {prefix}weight: {err}") from None
                del w
            if tuple(q.shape) != (linear.out_features, linear.in_features):
                raise CheckpointError(f"{folder}: 4-bit tensor {prefix}weight has shape {list(q.shape)}, config.json "
                                      f"implies {[linear.out_features, linear.in_features]}")  # fmt: skip
            bias = None
            if linear.bias is not None:
                if f"{prefix}bias" not in keys:
                    raise CheckpointError(f"{folder}: checkpoint has no tensor {prefix}bias")
                bias = handles[where[f"{prefix}bias"]].get_tensor(f"{prefix}bias").to(opts.device, opts.compute_dtype)
            layer = QLoRALinear(q.to(opts.device), bias=bias, compute_dtype=opts.compute_dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
            used = {k for k in keys if k.startswith(prefix) and k[len(prefix) :].split(".")[0] in ("weight", "bias")}
            loaded |= used
            bar.update(len(used))

        for key in sorted(keys - loaded):
            target = model_name(key)
            if target is None:
                continue  # extra tensors (e.g. rotary caches of old checkpoints) are not an error
            module_name, _, tensor_name = target.rpartition(".")
            module = model.get_submodule(module_name)
            current = getattr(module, tensor_name)
            value = handles[where[key]].get_tensor(key)
            if tuple(value.shape) != tuple(current.shape):
                raise CheckpointError(
                    f"{where[key]}: tensor {key} has shape {list(value.shape)}, config.json implies "
                    f"{list(current.shape)}"
                )
            dtype = opts.compute_dtype if value.is_floating_point() else value.dtype
            _set_tensor(module, tensor_name, value.to(opts.device, dtype))
            loaded.add(key)
            bar.update(1)
    finally:
        bar.close()
        handles.clear()

    if getattr(model.config, "tie_word_embeddings", False) or getattr(
        model.config.get_text_config(), "tie_word_embeddings", False
    ):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight.is_meta:
            out.weight = inp.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{folder}: checkpoint has no tensor {missing[0]} ({len(missing)} missing in all)")
    model.to(opts.device)  # computed buffers were made on the CPU
    model.requires_grad_(False)
    model.eval()
    use_small_batch_head(model)
    model.fourbit_load_options = opts
    return model
