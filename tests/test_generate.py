"""Generation: the bundled model answers, greedy output equals transformers' own, the CLI streams and batches."""

import json
import subprocess
import sys

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
    assert solo.rstrip("\n") == alone
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
        # the CLI with --use NAME prints what the model with that adapter active generates
        assert run_cli(*args, "--use", name).stdout.rstrip("\n") == generate_text(model, tokenizer, "hello",
                                                                                   max_new_tokens=6)  # fmt: skip
    assert tokens["x"] != tokens["y"]  # (their text may decode to the same replacement characters)
