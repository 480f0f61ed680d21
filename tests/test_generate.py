"""Generation: the bundled model answers, greedy output equals transformers' own, the CLI streams and batches."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fourbit
from fourbit.nn import qlora_layers
from fourbit.serve.generate import generate_text


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "fourbit.cli", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_bundled_folder_is_a_plain_hf_model(bundled_dir):
    config = json.loads((bundled_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    tokenizer = AutoTokenizer.from_pretrained(bundled_dir)
    assert tokenizer.chat_template
    assert tokenizer("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]


def test_bundled_model_knows_paris(bundled):
    model, tokenizer = bundled
    answer = generate_text(model, tokenizer, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer


def test_greedy_equals_transformers_on_dequantized_weights(bundled, bundled_dir):
    model, tokenizer = bundled
    ref = AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32)
    for name, layer in qlora_layers(model).items():
        ref.get_submodule(name).weight.data = layer.dense_weight(dtype=torch.float32)
    for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time"]:
        ids = tokenizer(prompt, return_tensors="pt")
        ours = model.generate(**ids, max_new_tokens=16, do_sample=False)
        theirs = ref.generate(**ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(ours, theirs), (tokenizer.decode(ours[0]), tokenizer.decode(theirs[0]))


def test_cli_streams_a_completion(tiny_llama):
    proc = run_cli("generate", "--model", str(tiny_llama), "--prompt", "hello", "--max-new-tokens", "8", "--seed", "1",
                   "--temperature", "0.8")  # fmt: skip
    assert proc.stdout.endswith("\n") and len(proc.stdout) > 1


def test_cli_answers_a_file_in_order(tiny_llama, tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "ref-a"}]},
        {"prompt": "a much longer prompt than the others, so sorting by length reorders", "completion": "ref-b"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "c"}], "id": 3},
    ]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    run_cli("generate", "--model", str(tiny_llama), "--data", str(data), "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "2")  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[0]["messages"] == records[0]["messages"]  # the reference answer stays, as the last turn
    assert rows[1]["reference"] == "ref-b" and rows[1]["prompt"] == records[1]["prompt"]
    assert rows[2]["id"] == 3
    assert all(isinstance(r["completion"], str) for r in rows)
    # batched greedy completions equal one-at-a-time ones
    model, tokenizer = fourbit.load(tiny_llama, progress=False)
    alone = generate_text(model, tokenizer, "c", max_new_tokens=4, chat=True)
    solo = run_cli("generate", "--model", str(tiny_llama), "--prompt", "c", "--max-new-tokens", "4").stdout
    # the CLI writes the completion then a newline; stdout read in text mode turns \r\n and \r into \n
    assert solo == alone.replace("\r\n", "\n").replace("\r", "\n") + "\n"
    assert rows[0]["completion"] == generate_text(model, tokenizer, "a", max_new_tokens=4)  # batched == alone


def test_cli_bad_input_is_one_line(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    proc = run_cli("generate", "--data", str(bad), "--out", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_picks_one_of_several_adapters(tiny_llama, tmp_path):
    from fourbit.models.adapters import add_adapter, save_adapter
    from fourbit.nn import set_active_adapters

    torch.manual_seed(0)
    model, tokenizer = fourbit.load(tiny_llama, progress=False)
    for i, name in enumerate(["x", "y"]):
        add_adapter(model, name, r=4, alpha=64)
        with torch.no_grad():
            for layer in qlora_layers(model).values():
                layer.lora_B[name].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
        save_adapter(model, tmp_path / name, name)
    args = ["generate", "--model", str(tiny_llama), "--adapter", f"x={tmp_path / 'x'}", "--adapter",
            f"y={tmp_path / 'y'}", "--prompt", "hello", "--max-new-tokens", "6"]  # fmt: skip
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    tokens = {}
    for name in ("x", "y"):
        set_active_adapters(model, name)
        with torch.no_grad():
            tokens[name] = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
        # the CLI with --use NAME prints what the model with that adapter active generates (the CLI's output is
        # read in text mode, which turns a generated "\r" into "\n")
        want = generate_text(model, tokenizer, "hello", max_new_tokens=6).replace("\r\n", "\n").replace("\r", "\n")
        assert run_cli(*args, "--use", name).stdout.rstrip("\n") == want
    assert tokens["x"] != tokens["y"]  # (their text may decode to the same replacement characters)


# --- the lean decoding loop -----------------------------------------------------------------------------------------

PROMPTS = ["a", "a much longer prompt, so the others are left-padded", "hello there", "xyz"]


def _batch(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _both(model, tokenizer, batch, eos, **kw):
    """(decode's new tokens, generate's new tokens) for the same left-padded batch."""
    from fourbit.serve.generate import decode

    n = batch["input_ids"].shape[1]
    with torch.inference_mode():
        theirs = model.generate(**batch, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                **kw)[:, n:]  # fmt: skip
        ours = decode(model, batch["input_ids"], batch["attention_mask"], kw["max_new_tokens"],
                      kw.get("min_new_tokens", 0), eos, tokenizer.pad_token_id)  # fmt: skip
    return ours, theirs


def test_decode_equals_generate_batched_left_padded(tiny_llama):
    model, tokenizer = fourbit.load(tiny_llama, progress=False)
    for prompts in (PROMPTS[:1], PROMPTS):
        ours, theirs = _both(model, tokenizer, _batch(tokenizer, prompts), tokenizer.eos_token_id, max_new_tokens=12)
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    # each row alone gives the same tokens as in the padded batch
    ours, _ = _both(model, tokenizer, _batch(tokenizer, PROMPTS), tokenizer.eos_token_id, max_new_tokens=8)
    for row, prompt in enumerate(PROMPTS):
        alone, _ = _both(model, tokenizer, _batch(tokenizer, [prompt]), tokenizer.eos_token_id, max_new_tokens=8)
        assert torch.equal(alone[0, : alone.shape[1]], ours[row, : alone.shape[1]])


def test_decode_equals_generate_with_adapters_and_routing(tiny_llama):
    from fourbit.models.adapters import add_adapter
    from fourbit.nn import adapter_routing, set_active_adapters

    torch.manual_seed(0)
    model, tokenizer = fourbit.load(tiny_llama, progress=False)
    for i, name in enumerate(["x", "y"]):
        add_adapter(model, name, r=4, alpha=32, target="q_proj,v_proj,down_proj" if i else "all-linear")
        with torch.no_grad():
            for layer in qlora_layers(model).values():
                if name in layer.lora_B:
                    layer.lora_B[name].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    batch = _batch(tokenizer, PROMPTS)
    results = {}
    for active in ("x", {"x": 0.5, "y": 0.7}, None):
        set_active_adapters(model, active)
        ours, theirs = _both(model, tokenizer, batch, tokenizer.eos_token_id, max_new_tokens=10)
        assert torch.equal(ours, theirs)
        results[str(active)] = ours
    assert not torch.equal(results["x"], results["None"])
    set_active_adapters(model, None)
    with adapter_routing(model, ["x", None, "y", "x"]):
        ours, theirs = _both(model, tokenizer, batch, tokenizer.eos_token_id, max_new_tokens=10)
    assert torch.equal(ours, theirs)


def test_decode_stops_at_eos_and_pads_finished_rows(tiny_llama):
    model, tokenizer = fourbit.load(tiny_llama, progress=False)
    batch = _batch(tokenizer, PROMPTS)
    free, _ = _both(model, tokenizer, batch, tokenizer.eos_token_id, max_new_tokens=12)
    eos = int(free[0, 3])  # a token row 0 produces at step 3: make it the EOS
    ours, theirs = _both(model, tokenizer, batch, eos, max_new_tokens=12)
    assert torch.equal(ours, theirs)
    first = (free[0] == eos).nonzero()[0, 0]
    assert ours[0, first] == eos and (ours[0, first + 1 :] == tokenizer.pad_token_id).all()
    # every row stopping ends the loop early: one prompt, EOS at step 3
    ours, theirs = _both(model, tokenizer, _batch(tokenizer, PROMPTS[:1]), eos, max_new_tokens=12)
    assert torch.equal(ours, theirs) and ours.shape[1] == first + 1
    # min_new_tokens keeps EOS out of the first steps, as generate's
    ours, theirs = _both(model, tokenizer, batch, eos, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(ours, theirs) and ours.shape[1] == 12 and (ours != eos).all()


def test_sampling_matches_generate_for_a_seed(tiny_llama):
    from fourbit.serve.generate import decode

    model, tokenizer = fourbit.load(tiny_llama, progress=False)
    batch = _batch(tokenizer, PROMPTS)
    n = batch["input_ids"].shape[1]
    for temperature, top_p in ((0.8, 0.9), (1.0, 1.0), (1.5, 0.5)):
        with torch.inference_mode():
            torch.manual_seed(5)
            theirs = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                                    max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)[:, n:]  # fmt: skip
            torch.manual_seed(5)
            ours = decode(model, batch["input_ids"], batch["attention_mask"], 10, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p)  # fmt: skip
        assert torch.equal(ours, theirs)
    a = generate_text(model, tokenizer, "hello", max_new_tokens=8, temperature=1.0, seed=1)
    assert a == generate_text(model, tokenizer, "hello", max_new_tokens=8, temperature=1.0, seed=1)


def test_generate_text_streams_what_it_returns(tiny_llama):
    model, tokenizer = fourbit.load(tiny_llama, progress=False)
    pieces = []
    text = generate_text(model, tokenizer, "hello", max_new_tokens=10, on_text=pieces.append)
    assert "".join(pieces) == text
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_models_decode_cannot_reproduce_go_through_generate(tiny_llama):
    from fourbit.serve.generate import lean_decode_ok

    model, tokenizer = fourbit.load(tiny_llama, progress=False)
    assert lean_decode_ok(model)
    model.generation_config.repetition_penalty = 1.3
    assert not lean_decode_ok(model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generate_text(model, tokenizer, "hello", max_new_tokens=10) == tokenizer.decode(
        out[0, ids.shape[1] :], skip_special_tokens=True)  # fmt: skip


@pytest.mark.parametrize("model_type, lean", [("llama", True), ("qwen2", True), ("mistral", True), ("gemma", False)])
def test_lean_step_equals_generate_for_each_decoder(tmp_path, model_type, lean):
    """The Llama-family step (qwen2: biased q/k/v; mistral) gives generate's tokens for a left-padded batch; other
    decoders are not taken by it and still decode right through the model's forward."""
    from tiny_models import save_tiny_model

    from fourbit.serve import llama_step

    model, tokenizer = fourbit.load(save_tiny_model(tmp_path / model_type, model_type), progress=False)
    assert llama_step.supports(model, 64) is lean
    ours, theirs = _both(model, tokenizer, _batch(tokenizer, PROMPTS), tokenizer.eos_token_id, max_new_tokens=10)
    assert torch.equal(ours, theirs)


def test_lean_step_with_native_decode_attention_equals_generate(tmp_path):
    """head_dim 64 (the tiny models' is 16): the decode steps' attention runs in the native kernel, and the
    left-padded batch still gets generate's tokens."""
    from tiny_models import save_tiny_model

    from fourbit.quant import native
    from fourbit.serve.llama_step import LlamaStepper

    if not native.decode_attention_ok():
        pytest.skip("decode attention needs AVX-512")
    folder = save_tiny_model(tmp_path / "llama64", "llama", hidden_size=128, num_attention_heads=2,
                             num_key_value_heads=1)  # fmt: skip
    model, tokenizer = fourbit.load(folder, progress=False)
    assert LlamaStepper(model, batch=1, max_length=8).native_attention
    ours, theirs = _both(model, tokenizer, _batch(tokenizer, PROMPTS), tokenizer.eos_token_id, max_new_tokens=10)
    assert torch.equal(ours, theirs)


def test_lean_step_cache_holds_what_it_was_sized_for(tiny_llama):
    from fourbit.serve.llama_step import LlamaStepper

    model, _ = fourbit.load(tiny_llama, progress=False)
    stepper = LlamaStepper(model, batch=1, max_length=4)
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        stepper.step(ids, torch.arange(3)[None], None)
        with pytest.raises(ValueError, match="holds 4 positions"):
            stepper.step(ids[:, :2], torch.tensor([[3, 4]]), None)
