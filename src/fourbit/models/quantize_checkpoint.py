"""`fourbit quantize`: write a model as a 4-bit checkpoint in the transformers + bitsandbytes layout.

The output folder loads with `AutoModelForCausalLM.from_pretrained(out)` where bitsandbytes is installed, and with
`fourbit.load(out)` where it is not. Tensors are streamed: one dense weight at a time is held, and the folder is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from fourbit.atomic import atomic_directory
from fourbit.models import bnb_checkpoint
from fourbit.models.loader import _build_on_meta, _linear_targets, _read_headers, _weight_files
from fourbit.models.resolve import resolve_model
from fourbit.quant import quantize_4bit

# Files copied beside the weights so the folder is a complete model (tokenizer, chat template, generation defaults).
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)  # fmt: skip


def copy_side_files(src: Path, dst: Path) -> None:
    """The tokenizer, chat template and generation defaults that make a weights folder a complete model."""
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def quantize_checkpoint(
    model: str | Path,
    out: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    progress: bool = True,
) -> Path:
    """Quantize MODEL's linear layers (all but the output head) and write a 4-bit HF folder at `out`."""
    from transformers import AutoConfig

    folder, out = resolve_model(model), Path(out)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{folder / 'config.json'}: this model is already quantized")
    files = _weight_files(folder)
    where = _read_headers(files)
    targets = _linear_targets(_build_on_meta(config, torch.float32), ["lm_head"])
    weight_keys = {f"{name}.weight" for name in targets} | {f"{name.removeprefix('model.')}.weight" for name in targets}

    tensors: dict[str, torch.Tensor] = {}
    dtype = None
    handles = {f: safe_open(f, framework="pt") for f in files}
    for key in tqdm(sorted(where), desc="quantizing", unit="tensor", disable=not progress, leave=False):
        value = handles[where[key]].get_tensor(key)
        if key in weight_keys:
            dtype = value.dtype
            try:
                q = quantize_4bit(value, quant_type, blocksize, double_quant)
            except ValueError as err:
                raise ValueError(f"{where[key]}: tensor {key}: {err}") from None
            tensors.update(bnb_checkpoint.to_bnb_tensors(key.removesuffix("weight"), q))
        else:
            tensors[key] = value
    if dtype is None:
        raise ValueError(f"{folder}: no linear weights found to quantize")

    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config_dict = json.loads((folder / "config.json").read_text())
        config_dict["quantization_config"] = bnb_checkpoint.quantization_config(quant_type, double_quant, dtype)
        config_dict.setdefault("architectures", list(config.architectures or []))
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        copy_side_files(folder, tmp)
    return out
