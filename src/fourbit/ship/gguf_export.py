"""`fourbit export-gguf`: the (merged) model, or the adapter alone, as a GGUF file for llama.cpp.

The model file holds the llama architecture's hyperparameters, the byte-level BPE tokenizer (tokens, types, merges,
special ids, chat template) and every tensor under llama.cpp's names, with the Q and K rows permuted from the
Hugging Face rotate-half RoPE layout to GGML's adjacent pairs. The adapter file (`lora_only`) holds `<name>.lora_a`
and `<name>.lora_b` per layer and `adapter.lora.alpha`, as llama.cpp's LoRA loader expects.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fourbit.models.loader import load
from fourbit.models.resolve import resolve_model
from fourbit.nn import qlora_layers

# HF tensor name -> llama.cpp tensor name: the one GGUF name map
GGUF_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "blk.{}.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "blk.{}.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "blk.{}.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight"),
]
SUPPORTED = ("llama", "mistral")  # the decoders llama.cpp runs under its "llama" architecture
TYPES = ("f32", "f16", "q8_0", "q4_0")


def gguf_name(hf_name: str) -> str:
    for pattern, template in GGUF_NAMES:
        m = re.fullmatch(pattern, hf_name)
        if m:
            return template.format(*m.groups())
    raise ValueError(f"tensor {hf_name} has no llama.cpp name")


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Q or K projection from rotate-half order to GGML's adjacent pairs: within each head of size d,
    new row 2j = old row j and new row 2j+1 = old row d/2 + j."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(hf_name: str, config) -> int | None:
    if hf_name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _add_tensor(writer, name: str, w: torch.Tensor, kind: str) -> None:
    import gguf

    array = w.detach().float().cpu().numpy()
    if array.ndim == 1 or kind == "f32":
        writer.add_tensor(name, array.astype(np.float32))
    elif kind == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
        if array.shape[-1] % 32:  # block types need rows in whole 32-element blocks: keep this one in f16
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _tokenizer_metadata(writer, folder: Path, tokenizer, config) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{folder / 'tokenizer.json'}: only byte-level BPE tokenizers are exported, got {model.get('type')}")
    vocab_size = config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED until filled
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, 1  # NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = 3 if added.get("special") else 4  # CONTROL or USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    # llama.cpp picks its pre-tokenizer regex by name; SmolLM's is "smollm", others fall back to "default"
    writer.add_tokenizer_pre("smollm" if "<|im_start|>" in model["vocab"] and vocab_size == 49152 else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id,
                             tokenizer.eos_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):  # fmt: skip
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(model: str, out: str | Path, adapter: str | Path | None = None, kind: str = "f16",
                lora_only: bool = False, progress: bool = True) -> Path:  # fmt: skip
    import gguf

    if kind not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, got {kind!r}")
    if lora_only and adapter is None:
        raise ValueError("--lora-only needs --adapter DIR")
    folder, out = resolve_model(model), Path(out)
    net, tokenizer = load(folder, adapter=adapter, compute_dtype=torch.float32, progress=progress)
    config = net.config
    if config.model_type not in SUPPORTED:
        raise ValueError(f"{folder / 'config.json'}: GGUF export supports {', '.join(SUPPORTED)}, not "
                         f"{config.model_type!r}")  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        if lora_only:
            _write_adapter(writer, net, config, progress)
        else:
            _write_model(writer, net, folder, tokenizer, config, kind, progress)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_model(writer, net, folder: Path, tokenizer, config, kind: str, progress: bool) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type("model")
    writer.add_name(folder.name)
    writer.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}[kind])
    writer.add_quantization_version(2)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    _tokenizer_metadata(writer, folder, tokenizer, config)

    layers = qlora_layers(net)
    tied = getattr(config, "tie_word_embeddings", False)
    names = [n for n, _ in net.named_parameters() if "lora_" not in n] + [f"{p}.weight" for p in layers]
    for hf_name in tqdm(sorted(set(names)), desc="exporting", unit="tensor", disable=not progress, leave=False):
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd
        path = hf_name.removesuffix(".weight")
        w = layers[path].dense_weight(merge_adapters=True, dtype=torch.float32) if path in layers else \
            net.get_parameter(hf_name).detach().float()  # fmt: skip
        heads = _rope_heads(hf_name, config)
        if heads:
            w = permute_rope_rows(w, heads)
        _add_tensor(writer, gguf_name(hf_name), w, kind)


def _write_adapter(writer, net, config, progress: bool) -> None:
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    entries = []
    for path, layer in sorted(qlora_layers(net).items()):
        if not layer.active:
            continue
        if len(layer.active) != 1:
            raise ValueError("--lora-only writes one adapter: activate exactly one")
        name, weight = next(iter(layer.active.items()))
        settings = layer.lora_settings[name]
        entries.append((path, layer.lora_A[name].weight, layer.lora_B[name].weight, settings.r,
                        settings.scaling * weight))  # fmt: skip
    # llama.cpp scales each layer by alpha / r (r read from the tensor). One alpha serves when alpha = scale * r is
    # the same everywhere (rsLoRA included: alpha*sqrt(r)); otherwise each scale is baked into lora_b, no alpha.
    alphas = {round(scale * r, 6) for _, _, _, r, scale in entries}
    uniform = len(alphas) == 1
    if uniform:
        writer.add_float32("adapter.lora.alpha", float(next(iter(alphas))))
    for path, a, b, _, scale in tqdm(entries, desc="exporting adapter", unit="layer", disable=not progress,
                                     leave=False):  # fmt: skip
        b = b.detach().float() * (1.0 if uniform else scale)
        heads = _rope_heads(f"{path}.weight", config)
        if heads:
            b = permute_rope_rows(b, heads)  # the rows of B follow the base weight's permutation; A is unchanged
        base = gguf_name(f"{path}.weight")
        writer.add_tensor(f"{base}.lora_a", a.detach().float().numpy())
        writer.add_tensor(f"{base}.lora_b", b.numpy())
