"""LoRA adapters in PEFT's layout, read and written: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter's tensors after the wrapped model with the adapter name stripped:
  base_model.model.<module path>.lora_A.weight   [r, in]
  base_model.model.<module path>.lora_B.weight   [out, r]
and its config carries r, lora_alpha, target_modules, use_rslora and per-module rank_pattern / alpha_pattern.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fourbit.atomic import write_atomic
from fourbit.nn import QLoRALinear, qlora_layers

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter fourbit cannot load: names the adapter file and key."""


def peft_key(module_path: str, part: str) -> str:
    """The saved key of `part` ("lora_A" or "lora_B") of the module at `module_path`."""
    return f"{PEFT_PREFIX}{module_path}.{part}.weight"


def _pattern_value(patterns: dict, module_path: str, default):
    # PEFT matches a pattern against the end of the module's dotted path
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def add_adapter(model: nn.Module, name: str, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                target: str | list[str] = "all-linear", use_rslora: bool = False) -> list[str]:  # fmt: skip
    """Add a fresh adapter to the QLoRA layers `target` names ("all-linear", or module names such as q_proj,v_proj).
    Returns the module paths it was added to."""
    wanted = None if target == "all-linear" else set(target.split(",") if isinstance(target, str) else target)
    added = []
    for path, layer in qlora_layers(model).items():
        if wanted is None or path.rsplit(".", 1)[-1] in wanted:
            layer.add_adapter(name, r, alpha, dropout, use_rslora)
            added.append(path)
    if not added:
        known = sorted({p.rsplit(".", 1)[-1] for p in qlora_layers(model)})
        raise ValueError(f"--target {target}: no such layers; the model has {', '.join(known)}")
    return added


def save_adapter(model: nn.Module, out: str | Path, name: str = "default", base_model: str = "") -> Path:
    """Write adapter `name` in PEFT's layout (fp32 tensors, as PEFT saves them), atomically."""
    out = Path(out)
    tensors, settings, targets = {}, {}, set()
    for path, layer in qlora_layers(model).items():
        if name not in layer.lora_A:
            continue
        tensors[peft_key(path, "lora_A")] = layer.lora_A[name].weight.detach().float().contiguous()
        tensors[peft_key(path, "lora_B")] = layer.lora_B[name].weight.detach().float().contiguous()
        settings[path] = layer.lora_settings[name]
        targets.add(path.rsplit(".", 1)[-1])
    if not tensors:
        raise ValueError(f"the model has no adapter named {name!r}")
    first = next(iter(settings.values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout, "use_rslora": first.use_rslora,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False, "layers_to_transform": None,
        "rank_pattern": {p: s.r for p, s in settings.items() if s.r != first.r},
        "alpha_pattern": {p: s.alpha for p, s in settings.items() if s.alpha != first.alpha},
    }  # fmt: skip
    if any(s.use_rslora != first.use_rslora for s in settings.values()):
        raise ValueError(f"adapter {name!r} mixes rsLoRA and plain scaling across layers: PEFT cannot express it")
    # each file is replaced atomically (the folder may also hold a training run's other outputs)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    write_atomic(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return out


def read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (is {folder} a PEFT adapter folder?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    unsupported = [
        ("peft_type", config.get("peft_type", "LORA") != "LORA", "only LoRA adapters are supported"),
        ("use_dora", bool(config.get("use_dora")), "DoRA adapters are not supported"),
        ("modules_to_save", bool(config.get("modules_to_save")), "modules_to_save (full trained layers) is not supported"),
        ("bias", config.get("bias", "none") != "none", "trained biases are not supported"),
        ("lora_bias", bool(config.get("lora_bias")), "lora_bias is not supported"),
        ("fan_in_fan_out", bool(config.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D bases) is not supported"),
    ]  # fmt: skip
    for key, bad, why in unsupported:
        if bad:
            raise AdapterError(f"{path}: key {key!r} = {config.get(key)!r}: {why}")
    return config


def load_adapter(model: nn.Module, folder: str | Path, name: str = "default", activate: bool = True) -> None:
    """Load a PEFT LoRA adapter onto the QLoRA layers of `model` under `name`."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: not found (fourbit reads safetensors adapters only)")
    layers = qlora_layers(model)
    try:
        handle = safe_open(weights, framework="pt")
    except Exception as err:
        raise AdapterError(f"{weights}: not a readable safetensors file ({err})") from None
    keys = set(handle.keys())
    modules = {}
    for key in keys:
        match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise AdapterError(f"{weights}: key {key!r} is not a LoRA A/B weight fourbit can load")
        modules.setdefault(match.group(1), {})[match.group(2)] = key
    if not modules:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    for path, parts in sorted(modules.items()):
        if path not in layers:
            raise AdapterError(f"{weights}: key {next(iter(parts.values()))!r} names {path}, which is not a 4-bit "
                               f"linear layer of this model (was the adapter trained on another base?)")  # fmt: skip
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{weights}: {path} has only {', '.join(parts)}")
        a, b = handle.get_tensor(parts["lora_A"]), handle.get_tensor(parts["lora_B"])
        layer: QLoRALinear = layers[path]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features \
                or a.shape[0] != b.shape[1]:  # fmt: skip
            raise AdapterError(
                f"{weights}: key {parts['lora_A']!r} {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                f"{path} [{layer.out_features}, {layer.in_features}] of this model"
            )
        r = a.shape[0]
        expect_r = _pattern_value(config.get("rank_pattern"), path, config.get("r", r))
        if expect_r != r:
            raise AdapterError(f"{weights}: key {parts['lora_A']!r} has rank {r}, adapter_config.json says {expect_r}")
        alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", r))
        if name in layer.lora_A:
            layer.delete_adapter(name)
        layer.add_adapter(name, r, alpha, float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora")),
                          activate=activate)  # fmt: skip
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)


def load_adapters(model: nn.Module, adapters: str | Path | list | dict) -> list[str]:
    """One folder (named "default"), a list of folders (named after the folder), or {name: folder}. All loaded
    adapters are active (summed) until `set_active_adapters` picks."""
    if isinstance(adapters, (str, Path)):
        adapters = {"default": adapters}
    elif isinstance(adapters, list):
        adapters = {Path(p).name: p for p in adapters}
    for name, folder in adapters.items():
        load_adapter(model, folder, name)
    return list(adapters)
