"""MODEL, as a user writes it, to a Hugging Face folder on disk: a folder, a .gguf file, or a bundled name."""

from __future__ import annotations

from pathlib import Path


def resolve_model(model: str | Path) -> Path:
    """A local Hugging Face folder as is; a llama-family .gguf file converted once into a cached folder; a bundled
    name (`smollm2-135m-instruct`) to its cached folder. Nothing is downloaded."""
    from fourbit.models import bundled

    if isinstance(model, str) and bundled.is_bundled_name(model):
        return bundled.bundled_model_dir(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return bundled.gguf_model_dir(path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path}: expected a model folder or a .gguf file")
    known = ", ".join(bundled.BUNDLED_MODELS)
    raise FileNotFoundError(f"{model}: no such model folder or file, and not a bundled model name ({known})")
