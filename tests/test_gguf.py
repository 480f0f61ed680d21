"""GGUF export: read back with the gguf package and with transformers' own GGUF loader (which undoes the Q/K
permutation), and compared with fourbit's merged model."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import fourbit
from fourbit.nn import qlora_layers
from fourbit.ship.gguf_export import export_gguf, permute_rope_rows

IDS = torch.tensor([[5, 80, 120, 33, 7, 250, 19, 42]])


@pytest.fixture(scope="module")
def adapter_dir(tiny_adapter):
    return tiny_adapter


def merged_logits(tiny_llama, adapter_dir):
    model, _ = fourbit.load(tiny_llama, adapter=adapter_dir, progress=False)
    with torch.no_grad():
        return model(IDS).logits, model


@pytest.mark.parametrize("kind, tol", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 0.1)])
def test_export_reads_back_and_matches_the_merged_model(tiny_llama, adapter_dir, tmp_path, kind, tol):
    path = export_gguf(str(tiny_llama), tmp_path / "m.gguf", adapter=adapter_dir, kind=kind, progress=False)
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"} <= names  # fmt: skip
    assert len(names) == 3 + 2 * 9
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 2
    assert len(fields["tokenizer.ggml.tokens"].data) == 259
    want, model = merged_logits(tiny_llama, adapter_dir)
    # the Q rows are stored permuted, and decode to the merged weights within the type's error
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    stored = torch.from_numpy(np.array(gguf.quants.dequantize(q.data, q.tensor_type))).reshape(64, 64).float()
    merged = qlora_layers(model)["model.layers.0.self_attn.q_proj"].dense_weight(merge_adapters=True,
                                                                                dtype=torch.float32)  # fmt: skip
    assert (stored - permute_rope_rows(merged, 4)).abs().max() <= tol * merged.abs().max()
    # transformers reads the file back (and undoes the permutation): same logits
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        got = back(IDS).logits
    assert (got - want).abs().max() <= tol * 10 * want.abs().max()


def test_lora_only_export(tiny_llama, adapter_dir, tmp_path):
    path = export_gguf(str(tiny_llama), tmp_path / "a.gguf", adapter=adapter_dir, lora_only=True, progress=False)
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 14
    a = tensors["blk.0.attn_k.weight.lora_a"]
    b = tensors["blk.0.attn_k.weight.lora_b"]
    assert list(a.shape) == [64, 4] and list(b.shape) == [4, 32]  # ggml order: {in, r} and {r, out}
    _, model = merged_logits(tiny_llama, adapter_dir)
    k = qlora_layers(model)["model.layers.0.self_attn.k_proj"]
    want_b = permute_rope_rows(k.lora_B["default"].weight.detach(), 2)
    assert np.allclose(np.array(b.data).reshape(32, 4), want_b.numpy())


def test_errors(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="--lora-only needs --adapter"):
        export_gguf(str(tiny_llama), tmp_path / "x.gguf", lora_only=True, progress=False)
    with pytest.raises(ValueError, match="--type"):
        export_gguf(str(tiny_llama), tmp_path / "x.gguf", kind="q2_k", progress=False)
    assert not list(tmp_path.glob("*.gguf*"))
