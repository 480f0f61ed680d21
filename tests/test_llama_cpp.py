"""The exported GGUF files in llama.cpp itself (through llama-cpp-python, when it is installed): greedy
continuations equal fourbit's merged model's, and base GGUF + LoRA GGUF equal base + adapter."""

import pytest
import torch
from conftest import random_adapter

import fourbit
from fourbit.ship.gguf_export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
NEW = 8


@pytest.fixture(scope="module")
def adapter_dir(bundled_dir, tmp_path_factory):
    return random_adapter(bundled_dir, tmp_path_factory.mktemp("adapter") / "a", r=8, alpha=16, std=0.01,
                          target="q_proj,k_proj,v_proj,o_proj,down_proj")


def fourbit_greedy(bundled_dir, adapter_dir):
    model, tokenizer = fourbit.load(bundled_dir, adapter=adapter_dir, progress=False)
    outs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs, tokenizer


def llama_greedy(model_path, tokenizer, lora_path=None):
    kwargs = {"lora_path": str(lora_path), "lora_scale": 1.0} if lora_path else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=128, n_threads=2, verbose=False, seed=0, **kwargs)
    outs = []
    for prompt in PROMPTS:
        tokens = llm.tokenize(prompt.encode(), add_bos=False)
        assert tokens == tokenizer(prompt)["input_ids"]  # the exported vocabulary tokenizes as Hugging Face does
        got = []
        for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == NEW:
                break
        outs.append(got)
    return outs


def test_merged_gguf_generates_like_fourbit(bundled_dir, adapter_dir, tmp_path):
    want, tokenizer = fourbit_greedy(bundled_dir, adapter_dir)
    path = export_gguf(str(bundled_dir), tmp_path / "m.gguf", adapter=adapter_dir, kind="f32", progress=False)
    assert llama_greedy(path, tokenizer) == want


def test_lora_gguf_on_base_gguf_generates_like_fourbit(bundled_dir, adapter_dir, tmp_path):
    want, tokenizer = fourbit_greedy(bundled_dir, adapter_dir)
    base = export_gguf(str(bundled_dir), tmp_path / "base.gguf", kind="f32", progress=False)
    lora = export_gguf(str(bundled_dir), tmp_path / "lora.gguf", adapter=adapter_dir, lora_only=True, progress=False)
    assert llama_greedy(base, tokenizer, lora) == want
