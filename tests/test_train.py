"""Training: data shapes and masks, packing, exact loss normalisation, paged AdamW, determinism, checkpoints that
survive SIGKILL, two processes, and the command line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import fourbit
from fourbit.data.batching import PAD_TO_MULTIPLE, as_row, collate, pack
from fourbit.data.dataset import load_dataset
from fourbit.data.records import Record, RecordError, read_records
from fourbit.data.tokenize import IGNORE, encode_record
from fourbit.models.adapters import add_adapter
from fourbit.quant import native
from fourbit.train.config import TrainConfig, load_yaml, resolve_config
from fourbit.train.loss import LossModule, loss_sum
from fourbit.train.paged_adamw import PagedAdamW
from fourbit.train.trainer import accumulate_gradients, train

CHATS = [
    {"messages": [{"role": "user", "content": f"add {a} and {b}"}, {"role": "assistant", "content": str(a + b)}]}
    for a in range(6)
    for b in range(6)
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = CHATS + [{"prompt": "say hi", "completion": "hi"}, {"text": "plain text to learn from"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def config(tiny_llama, data_file, out, **kw):
    base = dict(model=str(tiny_llama), data=str(data_file), out=str(out), max_steps=6, batch_size=4, max_length=64,
                lr=5e-3, warmup_steps=1, rank=4, alpha=8, dropout=0.1, save_every=3, seed=3)  # fmt: skip
    return TrainConfig(**(base | kw))


# --- data ---------------------------------------------------------------------------------------------------------


def test_chat_loss_covers_only_the_assistant_turn(tokenizer):
    rec = Record({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "four"}]}, "x:1")  # fmt: skip
    ex = encode_record(tokenizer, rec, 256)
    carried = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(carried) == "four<|im_end|>\n"
    assert tokenizer.decode(ex.input_ids).startswith("<|im_start|>system\nbe brief")


def test_prompt_completion_and_text(tokenizer):
    ex = encode_record(tokenizer, Record({"prompt": "say hi", "completion": "hello"}, "x:1"), 256)
    carried = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(carried) == "hello<|im_end|>\n"  # rendered as a chat turn: same format as generate
    ex = encode_record(tokenizer, Record({"text": "all of it"}, "x:2"), 256)
    assert ex.labels == ex.input_ids


def test_truncation_is_counted(tokenizer, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "x" * 500}) + "\n" + json.dumps(CHATS[0]) + "\n")
    data = load_dataset(str(path), tokenizer, 64)
    assert data.truncated == 1 and "1 truncated" in data.summary()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}', "role 'bot'"),
        ('{"prompt": "q", "completion": ""}', "'completion' is empty"),
        ('{"prompt": "q"}', "needs a 'completion'"),
        ('{"question": "q"}', "needs 'messages'"),
        ('{"prompt": "q", ', "malformed JSON"),
    ],
)
def test_bad_records_name_file_and_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n" + line + "\n" + json.dumps(CHATS[1]) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:2: .*{message}"):
        load_dataset(str(path), tokenizer, 64)
    data = load_dataset(str(path), tokenizer, 64, skip_bad_records=True)
    assert len(data.examples) == 2 and len(data.skipped) == 1


def test_every_file_format_reads_the_same_records(tmp_path):
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with open(tmp_path / "a.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    chats = [CHATS[0], CHATS[1]]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv", "ds"):
        assert [r.data for r in read_records(tmp_path / name)] == rows, name
    assert [r.data for r in read_records(tmp_path / "chat.parquet")] == chats


def test_packed_loss_equals_unpacked(tiny_llama, tokenizer, data_file):
    model, _ = fourbit.load(tiny_llama, progress=False)
    add_adapter(model, "default", r=4, alpha=8)
    examples = load_dataset(str(data_file), tokenizer, 64).examples[:12]
    packed = collate(pack(examples, 200), tokenizer.pad_token_id, packed=True)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row
    unpacked = collate([as_row(e) for e in examples], tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        s_packed, n_packed = loss_sum(model, packed)
        s_unpacked, n_unpacked = loss_sum(model, unpacked)
    assert n_packed == n_unpacked
    torch.testing.assert_close(s_packed, s_unpacked, rtol=1e-5, atol=1e-5)
    assert packed["input_ids"].shape[1] % PAD_TO_MULTIPLE == 0 and unpacked["input_ids"].shape[1] % PAD_TO_MULTIPLE == 0
    with torch.no_grad():  # chunks of 7 (the last one padded with ignored targets) sum to the same loss
        s_chunked, n_chunked = loss_sum(model, packed, chunk_tokens=7)
    assert n_chunked == n_packed and n_packed % 7
    torch.testing.assert_close(s_chunked, s_packed, rtol=1e-5, atol=1e-5)


def test_gradients_do_not_depend_on_micro_batching(tiny_llama, tokenizer, data_file):
    model, _ = fourbit.load(tiny_llama, progress=False)
    add_adapter(model, "default", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.train()
    rows = [as_row(e) for e in load_dataset(str(data_file), tokenizer, 64).examples[:8]]
    lm = LossModule(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(micro_size):
        for p in params:
            p.grad = None
        micro = [collate(rows[i : i + micro_size], tokenizer.pad_token_id, False) for i in range(0, 8, micro_size)]
        loss, n = accumulate_gradients(lm, micro)
        return loss, n, [p.grad.clone() for p in params]

    loss8, n8, g8 = grads(8)
    loss2, n2, g2 = grads(2)
    assert n8 == n2
    assert loss8 == pytest.approx(loss2, rel=1e-6)
    for a, b in zip(g8, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- optimizer ----------------------------------------------------------------------------------------------------


def test_paged_adamw_equals_torch_adamw(tmp_path):
    torch.manual_seed(0)
    ours = [torch.randn(40, 30, requires_grad=True), torch.randn(11, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_a = PagedAdamW(ours, lr=3e-3, weight_decay=0.05, page_dir=tmp_path)
    opt_b = torch.optim.AdamW(theirs, lr=3e-3, weight_decay=0.05, foreach=False)
    for _ in range(6):
        for a, b in zip(ours, theirs, strict=True):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.iterdir())  # the page file is unlinked: nothing is left behind
    # the state survives a save/load round trip
    restored = PagedAdamW([p.detach().clone().requires_grad_() for p in ours], lr=3e-3, weight_decay=0.05)
    restored.load_state_tensors(opt_a.state_tensors())
    assert torch.equal(restored._store, opt_a._store) and restored.steps == 6


# --- the loop ---------------------------------------------------------------------------------------------------


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]  # fmt: skip


def test_same_run_twice_gives_the_same_losses(tiny_llama, data_file, tmp_path):
    train(config(tiny_llama, data_file, tmp_path / "a"), progress=False)
    train(config(tiny_llama, data_file, tmp_path / "b"), progress=False)
    assert native.pool_stats()["installed"] == 0  # the trainer's allocator pool is gone with the run
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a")[-1] < losses(tmp_path / "a")[0]  # it learns
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("adapter_config.json", "config.yaml", "loss.png", "metrics.jsonl"):
        assert (tmp_path / "a" / name).exists()
    # the adapter works everywhere --adapter does
    model, _ = fourbit.load(tiny_llama, adapter=tmp_path / "a", progress=False)
    assert model is not None


def _cli(*args, **kw):
    return [sys.executable, "-m", "fourbit.cli", *args]


def test_sigkill_then_resume_gives_the_same_adapter(tiny_llama, data_file, tmp_path):
    args = ["train", "--model", str(tiny_llama), "--data", str(data_file), "--max-steps", "24", "--batch-size", "4",
            "--max-length", "64", "--lr", "5e-3", "--rank", "4", "--alpha", "8", "--dropout", "0.1",
            "--save-every", "2", "--keep", "2", "--seed", "5"]  # fmt: skip
    subprocess.run(_cli(*args, "--out", str(tmp_path / "whole")), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cli(*args, "--out", str(tmp_path / "killed")), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    def saved_step() -> int:  # the newest complete checkpoint (--keep 2 deletes older ones as the run goes on)
        return max((int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step-")), default=0)

    while time.time() < deadline and not (ckpts.exists() and saved_step() >= 6):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists(), "killed too late to prove anything"
    subprocess.run(_cli(*args, "--out", str(tmp_path / "killed"), "--resume"), check=True, capture_output=True,
                   timeout=600)  # fmt: skip
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    assert len(list(ckpts.iterdir())) == 2  # --keep 2


def test_two_processes_match_one(tiny_llama, data_file, tmp_path):
    common = ["--model", str(tiny_llama), "--data", str(data_file), "--max-steps", "4", "--max-length", "64",
              "--lr", "5e-3", "--rank", "4", "--alpha", "8", "--dropout", "0", "--seed", "2", "--save-every", "10"]  # fmt: skip
    subprocess.run(_cli("train", *common, "--batch-size", "4", "--out", str(tmp_path / "one")), check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                "-m", "fourbit.cli"]  # fmt: skip
    proc = subprocess.run(torchrun + ["train", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_yaml_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.01\nrank: 8\nbatch-size: 2\n")
    cfg = resolve_config(load_yaml(path), {"rank": 4, "lr": None})
    assert (cfg.lr, cfg.rank, cfg.batch_size) == (0.01, 4, 2)  # the flag wins, the file fills in
    path.write_text("learning_rate: 0.01\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        load_yaml(path)


def test_cli_dry_run_and_show_masked(tiny_llama, data_file, tmp_path):
    run = subprocess.run(_cli("train", "--model", str(tiny_llama), "--data", str(data_file), "--out",
                              str(tmp_path / "dry"), "--dry-run"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "trainable parameters" in run.stderr and "memory estimate" in run.stderr and "steps:" in run.stderr
    assert not (tmp_path / "dry").exists()
    run = subprocess.run(_cli("train", "--model", str(tiny_llama), "--data", str(data_file), "--show-masked", "2"),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "<|im_start|>assistant\n[[0<|im_end|>\n]]" in run.stdout


def test_cli_bad_record_stops_before_training(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHATS[0]) + "\n" + '{"prompt": "x", "completion": ""}\n')
    run = subprocess.run(_cli("train", "--model", str(tiny_llama), "--data", str(bad), "--out", str(tmp_path / "o")),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2
    assert f"{bad}:2" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_tokenizer_without_chat_template_gets_the_fallback(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError):  # transformers alone cannot render a chat with this tokenizer
        plain.apply_chat_template(CHATS[7]["messages"], tokenize=False)
    ex = encode_record(plain, Record(CHATS[7], "x:1"), 256)
    carried = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    assert plain.decode(carried) == "2<|im_end|>\n"  # ChatML as plain text: the documented fallback


def test_a_checkpoint_half_written_by_a_killed_process_is_removed(tmp_path):
    from fourbit.train.checkpoints import checkpoint_dirs, save_checkpoint

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".step-000004.partial-{dead.pid}"
    stale.mkdir(parents=True)
    (stale / "adapter.safetensors").write_bytes(b"half")
    # and an old checkpoint the killed process was deleting (pruning renames it away first)
    doomed = tmp_path / f".step-000002.deleting-{dead.pid}"
    doomed.mkdir()
    (doomed / "optimizer.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path, 6, {"a": torch.ones(2)}, {}, {"step": 6}, keep=2)
    assert not stale.exists() and not doomed.exists()
    assert [step for step, _ in checkpoint_dirs(tmp_path)] == [6]
    for step in (8, 10):
        save_checkpoint(tmp_path, step, {"a": torch.ones(2)}, {}, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000008", "step-000010"]  # pruned, nothing left over
