"""One decoding step of a Llama-family decoder in plain torch ops, with a preallocated KV cache.

At batch 1 on a CPU a small model's step is mostly the framework around the arithmetic: transformers' forward builds
masks, walks a cache object that concatenates keys and values every step, and dispatches attention through several
layers of Python. This module runs the same computation directly on the model's own modules (so 4-bit layers, their
adapters and adapter routing apply unchanged): RMSNorm modules, the q/k/v/o and gate/up/down projections, the model's
rotary embedding and transformers' `apply_rotary_pos_emb`, `F.scaled_dot_product_attention`. Keys and values go into
tensors sized for the whole generation once. A decoding step's attention (one query per row) runs in fourbit's
native kernel where it can (AVX-512, head_dim 64 or 128): sdpa's flash path, built for blocks of queries, took 60-150
us a call there against about 16 (8 rows of SmolLM2), a quarter of a batch-8 step.

It covers the decoders whose layers are exactly Llama's: llama, mistral (without a sliding window shorter than the
generation) and qwen2; `supports(model)` says whether a model is one. Everything else decodes through the model's
own forward.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fourbit.quant import native

MODEL_TYPES = ("llama", "mistral", "qwen2")


def supports(model, total_length: int | None = None) -> bool:
    """Whether `model` is a Llama-family causal LM this step computes exactly (for a generation of `total_length`
    positions, when given)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES or inner is None:
        return False
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and (total_length is None or total_length > window):
        return False
    if getattr(config, "layer_types", None) and any(t != "full_attention" for t in config.layer_types):
        return False
    layer = inner.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (
        attn is not None
        and mlp is not None
        and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and hasattr(layer, "input_layernorm")
        and hasattr(layer, "post_attention_layernorm")
        and model.get_output_embeddings() is not None
    )


class LlamaStepper:
    """Runs prefill and decode steps of `model` for a batch of `batch` rows and at most `max_length` positions."""

    def __init__(self, model, batch: int, max_length: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        config = model.config
        self.model, self.inner = model, model.model
        self.apply_rope = apply_rotary_pos_emb
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.head = model.get_output_embeddings()
        embed = self.inner.embed_tokens.weight
        shape = (batch, self.kv_heads, max_length, self.head_dim)
        n = len(self.inner.layers)
        self.keys = [torch.empty(shape, dtype=embed.dtype, device=embed.device) for _ in range(n)]
        self.values = [torch.empty(shape, dtype=embed.dtype, device=embed.device) for _ in range(n)]
        self.length = 0  # positions already in the cache
        self.native_attention = (embed.device.type == "cpu" and embed.dtype in (torch.bfloat16, torch.float32)
                                 and self.head_dim in (64, 128) and native.decode_attention_ok())  # fmt: skip

    def _mask(self, key_mask: torch.Tensor | None, steps: int) -> torch.Tensor | None:
        """Additive [batch, 1, steps, length + steps] in the cache's dtype (0 where a query sees a key, -inf where
        not): causal, padding keys hidden (each query still sees itself, so a padding row's attention stays finite).
        None when nothing is hidden. Made once per step, since sdpa would convert a boolean mask again in every layer
        (measured alone, 8 rows: 160 us per call with a boolean mask, 90 with this one)."""
        total = self.length + steps
        if key_mask is None and steps == 1:
            return None
        device = self.keys[0].device
        query = torch.arange(self.length, total, device=device)[:, None]
        allowed = torch.arange(total, device=device)[None, :] <= query  # [steps, total]
        if key_mask is not None:
            allowed = allowed[None] & key_mask[:, None, :total].bool()
            allowed |= torch.arange(total, device=device)[None, None, :] == query[None]
        additive = torch.zeros(allowed.shape, dtype=self.keys[0].dtype, device=device)
        additive.masked_fill_(~allowed, float("-inf"))
        return additive[None, None] if key_mask is None else additive[:, None]

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [batch, vocab] of the last position after feeding `input_ids` [batch, steps] at `position_ids`;
        `key_mask` [batch, >= length + steps] marks real tokens (1) and padding (0), or None for no padding."""
        batch, steps = input_ids.shape
        start, end = self.length, self.length + steps
        if end > self.keys[0].shape[2]:
            raise ValueError(f"the cache holds {self.keys[0].shape[2]} positions, step needs {end}")
        mask = self._mask(key_mask, steps)
        groups = self.heads // self.kv_heads
        h = self.inner.embed_tokens(input_ids)
        cos, sin = self.inner.rotary_emb(h, position_ids)
        for i, layer in enumerate(self.inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.apply_rope(q, k, cos, sin)
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            keys, values = self.keys[i][:, :, :end], self.values[i][:, :, :end]
            if steps == 1:  # the query heads of one key head as that head's queries: no repeated keys
                q = q.reshape(batch, self.kv_heads, groups, self.head_dim)
                if self.native_attention and q.dtype == keys.dtype:
                    out = native.decode_attention(q, keys, values, mask, self.scale)
                else:
                    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
                out = out.reshape(batch, 1, self.heads * self.head_dim)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                                     enable_gqa=groups > 1)  # fmt: skip
                out = out.transpose(1, 2).reshape(batch, steps, self.heads * self.head_dim)
            h = h + attn.o_proj(out)
            x = layer.post_attention_layernorm(h)
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        self.length = end
        return self.head(self.inner.norm(h[:, -1:]))[:, -1]
