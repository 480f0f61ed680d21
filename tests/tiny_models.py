"""Tiny random Hugging Face causal LMs written to disk, with a real byte-level tokenizer and a chat template."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 256 + len(SPECIAL)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token, plus three special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=VOCAB - 1, pad_token_id=256,
        bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    if model_type in ("gemma", "gemma2", "qwen3"):
        common["head_dim"] = 16
    common.update(overrides)
    return AutoConfig.for_model(model_type, **common)


def save_tiny_model(folder: Path, model_type: str = "llama", dtype=torch.bfloat16, seed: int = 0, **overrides) -> Path:
    """Write a random model of `model_type` with a tokenizer into `folder` (safetensors, like any HF checkpoint)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # larger-than-default weights so 4-bit errors and LoRA effects are visible in logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
