"""From a record to token ids and labels: the chat template, and which tokens carry loss.

- chat (`messages`): rendered with the tokenizer's chat template; the loss covers the assistant turns only,
  including the template's end-of-turn marker, so the model learns to stop.
- prompt/completion: rendered as one user turn and one assistant turn when the tokenizer has a chat template (so
  training and `fourbit generate` see the same format), else as prompt + completion + EOS; loss on the completion.
- text: every token carries loss.
A tokenizer without a chat template gets FALLBACK_CHAT_TEMPLATE (ChatML written as plain text).
"""

from __future__ import annotations

from dataclasses import dataclass

from fourbit.data.records import Record, RecordError

IGNORE = -100  # label of a token that carries no loss (PyTorch's cross-entropy ignore_index)

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    where: str
    truncated: bool = False

    @property
    def n_loss_tokens(self) -> int:
        # position t predicts token t+1: a label at position 0 predicts nothing
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def chat_template(tokenizer) -> str:
    return tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template(tokenizer), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _chat_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns, found by rendering each prefix:
    the text an assistant turn adds after the generation prompt is its span. Works for any template that renders
    a conversation's prefix as a prefix of the whole."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise RecordError(f"{where}: the chat template does not render this conversation turn by turn")
        spans.append((len(before), len(upto)))
    if not spans:
        raise RecordError(f"{where}: a chat record needs at least one assistant turn to learn from")
    return full, spans


def encode_record(tokenizer, record: Record, max_length: int) -> Example:
    """Token ids and labels for one record (truncated to max_length, flagged when it was)."""
    rec, where = record.data, record.where
    kind = record.kind
    if kind == "prompt" and tokenizer.chat_template:
        rec = {"messages": [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]}
        kind = "messages"
    if kind == "messages":
        text, spans = _chat_spans(tokenizer, rec["messages"], where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [
            tok if any(s <= start and end <= e for s, e in spans) and end > start else IGNORE
            for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
    elif kind == "prompt":
        prompt = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    else:
        ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    truncated = len(ids) > max_length
    ex = Example(ids[:max_length], labels[:max_length], where, truncated)
    if ex.n_loss_tokens == 0:
        raise RecordError(f"{where}: no token carries loss after truncation to {max_length} tokens")
    return ex
