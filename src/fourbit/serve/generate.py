"""Text generation with a (4-bit) model: one prompt streamed, or a file of records answered in batches.

Both go through `decode`, a lean loop around the model's forward (for Llama-family decoders, around
`llama_step.LlamaStepper`, the same computation without transformers' per-step machinery): a KV cache, only the last
position through the output head, the next token picked directly (argmax for greedy; temperature and top-p for sampling, applied exactly as
transformers' warpers do, so seeded samples match `model.generate`'s). At batch 1 on a CPU the per-token cost of
transformers' `generate` machinery (input preparation, logits processors, stopping criteria) is a large share of a
small model's step; the tokens are the same.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from fourbit.data.records import Record, record_kind
from fourbit.serve import llama_step


def prompt_text(tokenizer, rec: dict, where: str = "prompt", chat: bool = True) -> tuple[str, str | None]:
    """(text to feed the model, reference answer or None) for a `messages` or `prompt` record.

    A `messages` record whose last turn is the assistant's is a test record: the prompt is every turn before it and
    that last turn is the reference. The chat template is applied when `chat` and the tokenizer has one.
    """
    kind = record_kind(rec, where, need_completion=False)
    reference = None
    if kind == "messages":
        messages = rec["messages"]
        if messages[-1]["role"] == "assistant":
            messages, reference = messages[:-1], messages[-1]["content"]
    elif kind == "prompt":
        messages, reference = [{"role": "user", "content": rec["prompt"]}], rec.get("completion")
    else:
        raise ValueError(f"{where}: a 'text' record has no prompt to answer")
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), reference
    return "\n\n".join(m["content"] for m in messages), reference


def _sampling(temperature: float, top_p: float, max_new_tokens: int, tokenizer) -> dict:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    args = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if temperature == 0:
        return args | dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return args | dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)


# generation_config settings `decode` does not implement: a model that sets any of them goes through `model.generate`
_UNHANDLED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
              "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
              "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
              "exponential_decay_length_penalty": None, "min_length": 0, "max_time": None, "stop_strings": None,
              "num_beams": 1, "diversity_penalty": 0.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
              "typical_p": 1.0, "renormalize_logits": False, "num_return_sequences": 1}  # fmt: skip


def lean_decode_ok(model) -> bool:
    """Whether `decode` gives what `model.generate` would: a decoder-only model with a KV cache, `logits_to_keep`,
    and no generation_config setting (repetition penalty, forced tokens, ...) that `decode` leaves out."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if not {"logits_to_keep", "position_ids", "attention_mask"} <= set(params) or _cache_argument(model) is None:
        return False
    gen = getattr(model, "generation_config", None)
    for key, default in _UNHANDLED.items():
        value = getattr(gen, key, default)
        if value not in (default, None) and not (default is None and value in ((), [])):
            return False
    return True


def _cache_argument(model) -> str | None:
    """The name under which `model.forward` takes its KV cache: `cache` in newer transformers (5.24 here),
    `past_key_values` in older ones; None if it takes none."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id if tokenizer is not None else None
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper (min_tokens_to_keep=1), step for step, so sampling draws the same tokens."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = 0
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))


@torch.inference_mode()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    min_new_tokens: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The new tokens [batch, steps] for a left-padded batch of prompts, as `model.generate` returns them after the
    prompt: greedy when `temperature == 0`, else sampled (temperature, then top-p). A row that has produced an EOS
    token is filled with `pad_token_id` afterwards; the loop stops when every row has, or after `max_new_tokens`. EOS
    cannot end a row before `min_new_tokens`. `on_tokens` gets each step's tokens [batch] as they come."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    from transformers import DynamicCache

    batch = input_ids.shape[0]
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # As generate: positions count real tokens only (left padding sits at position 0); an all-ones mask is dropped.
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 0)
    mask = None if bool((attention_mask == 1).all()) else attention_mask
    eos = torch.tensor(sorted(set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])),
                       dtype=torch.long, device=device)  # fmt: skip
    if eos.numel() and pad_token_id is None:
        pad_token_id = int(eos[0])
    stepper = None
    if llama_step.supports(model, input_ids.shape[1] + max_new_tokens):
        stepper = llama_step.LlamaStepper(model, batch, input_ids.shape[1] + max_new_tokens)
    else:
        cache = {_cache_argument(model) or "past_key_values": DynamicCache(config=model.config)}
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    step_ids = input_ids
    for step in range(max_new_tokens):
        if stepper is not None:
            logits = stepper.step(step_ids, positions, mask)
        else:
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, **cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]  # fmt: skip
        if temperature > 0 or (step < min_new_tokens and eos.numel()):
            logits = logits.float()  # generate's processors work on fp32 scores
            if step < min_new_tokens and eos.numel():
                logits[:, eos] = -float("inf")
        if temperature > 0:
            if temperature != 1.0:
                logits = logits / temperature
            if top_p < 1.0:
                logits = _top_p(logits, top_p)
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)
        else:
            # fp32 holds the compute dtype's values exactly, so the same index; torch's bf16 argmax is ~10x slower
            nxt = logits.float().argmax(dim=-1)
        if eos.numel():
            if pad_token_id is not None:
                nxt = torch.where(unfinished, nxt, pad_token_id)
            unfinished &= ~torch.isin(nxt, eos)
        tokens.append(nxt)
        if on_tokens is not None:
            on_tokens(nxt)
        if not bool(unfinished.any()):
            break
        step_ids = nxt[:, None]
        positions = positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
    if not tokens:
        return input_ids.new_empty(batch, 0)
    return torch.stack(tokens, dim=1)


def _generate(model, tokenizer, inputs: dict, max_new_tokens: int, temperature: float, top_p: float,
              streamer=None) -> torch.Tensor:  # fmt: skip
    """The new tokens [batch, steps] for tokenized, left-padded `inputs`: `decode` where it applies, else
    `model.generate`."""
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    if not lean_decode_ok(model):
        sampling = _sampling(temperature, top_p, max_new_tokens, tokenizer)
        return model.generate(**inputs, streamer=streamer, **sampling)[:, inputs["input_ids"].shape[1] :]
    on_tokens = None
    if streamer is not None:
        streamer.prompt_seen = True
        on_tokens = streamer.put
    out = decode(model, inputs["input_ids"], inputs.get("attention_mask"), max_new_tokens,
                 eos_token_id=_eos_ids(model, tokenizer), pad_token_id=pad, temperature=temperature, top_p=top_p,
                 on_tokens=on_tokens)  # fmt: skip
    if streamer is not None:
        streamer.end()
    return out


class _Printer:
    """A transformers streamer that hands each decoded piece of the completion to a callback as it is generated."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.prompt_seen, self.ids, self.printed = False, [], 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.on_text(text[self.printed :])
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.printed:
            self.on_text(text[self.printed :])


@torch.inference_mode()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Complete one prompt (the chat template applied when `chat`); `on_text` receives the text as it streams."""
    templated = chat and bool(tokenizer.chat_template)
    if templated:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if seed is not None:
        torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated)
    streamer = _Printer(tokenizer, on_text) if on_text else None
    out = _generate(model, tokenizer, inputs, max_new_tokens, temperature, top_p, streamer)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@torch.inference_mode()
def generate_records(
    model,
    tokenizer,
    records: list[Record],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Answer every record in batches (left-padded, KV cache); each input record comes back, in order, with a
    `completion` field. A test record keeps its reference: the last assistant turn of `messages`, or a prompt
    record's own `completion`, moved to `reference`."""
    prompts = [prompt_text(tokenizer, r.data, r.where, chat)[0] for r in records]
    # Sorting by length keeps padding low; results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[str] = [""] * len(prompts)
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if seed is not None:
        torch.manual_seed(seed)
    add_special = not chat or not tokenizer.chat_template
    try:
        with tqdm(total=len(prompts), desc="generating", unit="record", disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                  add_special_tokens=add_special)  # fmt: skip
                out = _generate(model, tokenizer, batch, max_new_tokens, temperature, top_p)
                for row, i in enumerate(idx):
                    completions[i] = tokenizer.decode(out[row], skip_special_tokens=True)
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = pad_side
    answered = []
    for r, completion in zip(records, completions, strict=True):
        out = dict(r.data)
        if "completion" in out:  # a prompt/completion record: its completion is the reference answer
            out["reference"] = out.pop("completion")
        answered.append(out | {"completion": completion})
    return answered
