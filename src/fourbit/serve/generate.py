"""Text generation with a (4-bit) model: one prompt streamed, or a file of records answered in batches."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from fourbit.data.records import Record, record_kind


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
    out = model.generate(**inputs, streamer=streamer, **_sampling(temperature, top_p, max_new_tokens, tokenizer))
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


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
                out = model.generate(**batch, **_sampling(temperature, top_p, max_new_tokens, tokenizer))
                for row, i in enumerate(idx):
                    completions[i] = tokenizer.decode(out[row, batch["input_ids"].shape[1] :], skip_special_tokens=True)
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
