"""Shared fixtures: tiny random models (built once per session) and the bundled SmolLM2 (converted once)."""

import os

import pytest
from tiny_models import save_tiny_model

# fp32 compute everywhere in tests, whichever dtype this machine measures fastest: references and tolerances are
# fp32's (test_compute_dtype covers the automatic choice). Subprocesses inherit it.
os.environ["FOURBIT_COMPUTE_DTYPE"] = "float32"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def bundled_dir():
    from fourbit.models.bundled import bundled_model_dir

    return bundled_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def bundled(bundled_dir):
    """The bundled model in 4 bits (NF4, double quantization) and its tokenizer, loaded once."""
    import fourbit

    return fourbit.load(bundled_dir, progress=False)


def random_adapter(model_dir, out, target="all-linear", r=4, alpha=8, std=0.05, seed=0):
    """Save an adapter with random B (so it changes the model) for the model at `model_dir`; returns its folder."""
    import torch

    import fourbit
    from fourbit.models.adapters import add_adapter, save_adapter
    from fourbit.nn import qlora_layers

    model, _ = fourbit.load(model_dir, progress=False)
    add_adapter(model, "default", r=r, alpha=alpha, target=target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qlora_layers(model).values():
            if "default" in layer.lora_B:
                layer.lora_B["default"].weight.normal_(0, std, generator=g)
    save_adapter(model, out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_llama, tmp_path_factory):
    return random_adapter(tiny_llama, tmp_path_factory.mktemp("adapter") / "a")
