"""Fine-tuning the bundled SmolLM2-135M-Instruct on the demo data: fourbit against transformers + bitsandbytes + PEFT.

    python benchmarks/bench_train.py [--repeats 3] [--stack both|fourbit|reference] [--batch-size 8]
    python benchmarks/bench_train.py --quick          # development: 48 training examples, 16 test, 1 repeat

Both stacks train on the same examples with the same hyperparameters (examples/demo.yaml's, at one micro-batch
size): one epoch, LoRA r=16, alpha 32, dropout 0.05 on every linear layer of the decoder, lr 1e-3, 3 warm-up
steps then cosine, max grad norm 0.3, AdamW without weight decay, NF4 + double quantization, the compute dtype
fourbit picks on this machine, max_length 256, seed 0. fourbit packs examples into rows of up to max_length tokens
(its standard way); the reference pads each batch of examples (its standard way). Both take `--batch-size`
sequences per optimizer step, so they take different numbers of steps. To make both see exactly the same
examples, the training file is cut to the longest prefix of data/demo/train.jsonl whose packed rows fill whole
fourbit steps (fourbit drops an epoch's last partial step); the reference keeps its last partial batch.

Per run, each in a fresh child process, stacks alternating:
- train: the training time (first step to last optimizer step; no loading, no evaluation), the child's whole
  wall time, and its peak private memory (RssAnon, sampled by this process every 5 ms from /proc/PID/status).
  tokens/s = the examples' real (non-padding) tokens / training time, the same for both.
- eval: a fresh process loads the base and the trained adapter and answers the held-out prompts greedily (up to
  64 new tokens, left-padded batches of 8, the same chat-templated prompts), scored by
  fourbit.serve.evaluate.exact_match.
- switch: training right after generation and generation right after training (issue 6: bitsandbytes on a CPU
  keeps its inference layout once a model has generated and then trains through its inference kernel).
  "train first": 1 warm-up step, then SWITCH_CYCLES (3) times: K timed steps, a generation, K timed steps again
  -> median speed after / before. "generate first": a warm-up generation, then SWITCH_CYCLES times: a timed
  generation, K training steps, a timed generation -> median generation tok/s after training / before.
Results: the "Fine-tuning the bundled model" section of docs/benchmarks.md and the "fine-tune" rows of
docs/benchmarks.json (only when both stacks ran).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, record_results, run_sampled, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/fourbit-bench-train")
MAX_LENGTH = 256
HYPER = dict(epochs=1, rank=16, alpha=32, dropout=0.05, lr=1e-3, warmup_steps=3, max_grad_norm=0.3, seed=0)
GEN_BATCH, GEN_MAX_NEW = 8, 64
SWITCH_CYCLES = 3  # before / other mode / after, this many times in one process
PEER = "transformers + bitsandbytes + PEFT (NF4 + double quant, prepare_model_for_kbit_training)"


# --- shared helpers (children) ----------------------------------------------------------------------------------


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _emit(obj: dict) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def _prompts(tokenizer, test_path: str) -> list[tuple[str, str]]:
    """(chat-templated prompt, reference answer) per held-out record, as fourbit eval builds them."""
    from fourbit.data.records import read_records
    from fourbit.serve.generate import prompt_text

    out = []
    for rec in read_records(test_path):
        prompt, reference = prompt_text(tokenizer, rec.data, rec.where)
        if reference is not None:
            out.append((prompt, reference))
    return out


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, exact: bool = False) -> list[str]:
    """Greedy, left-padded batches sorted by length (as fourbit's generate_records), results in input order."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs = [""] * len(prompts)
    try:
        with torch.inference_mode():
            for s in range(0, len(order), GEN_BATCH):
                idx = order[s : s + GEN_BATCH]
                batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                  add_special_tokens=False)  # fmt: skip
                extra = {"min_new_tokens": max_new_tokens} if exact else {}
                gen = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
                                     **extra)  # fmt: skip
                for row, i in enumerate(idx):
                    outs[i] = tokenizer.decode(gen[row, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def _padded(examples, pad_id: int) -> dict:
    """The reference's batch: right-padded rows, attention mask, labels -100 on prompt (from fourbit's tokenization)
    and padding tokens."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- the reference stack -----------------------------------------------------------------------------------------


def _reference_model(model_dir: str, dtype_name: str, adapter: str | None = None, train: bool = False):
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    warnings.filterwarnings("ignore")
    dtype = _dtype(dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu", dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter), tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model)  # gradient checkpointing on (PEFT's default)
    torch.manual_seed(HYPER["seed"])
    lora = LoraConfig(r=HYPER["rank"], lora_alpha=HYPER["alpha"], lora_dropout=HYPER["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, lora), tokenizer


def _reference_optimizer(params):
    import bitsandbytes as bnb

    # on a CPU bitsandbytes warns "Paged optimizers are not supported on CPU" and runs it unpaged
    return bnb.optim.PagedAdamW(params, lr=HYPER["lr"], weight_decay=0.0)


def reference_train(model_dir: str, train_path: str, out: str, dtype_name: str, batch_size: int) -> None:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from fourbit.data.dataset import load_dataset

    model, tokenizer = _reference_model(model_dir, dtype_name, train=True)
    data = load_dataset(train_path, tokenizer, MAX_LENGTH)
    g = torch.Generator().manual_seed(HYPER["seed"])
    order = torch.randperm(len(data.examples), generator=g).tolist()
    batches = [[data.examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _reference_optimizer(params)
    scheduler = get_cosine_schedule_with_warmup(optimizer, HYPER["warmup_steps"], len(batches))
    model.train()
    start = time.perf_counter()
    loss = None
    for examples in batches:
        loss = model(**_padded(examples, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, HYPER["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    _emit({"train_seconds": seconds, "steps": len(batches), "final_loss": float(loss), "dtype": dtype_name,
           "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__})  # fmt: skip


def reference_eval(model_dir: str, test_path: str, adapter: str, dtype_name: str) -> None:
    from fourbit.serve.evaluate import exact_match

    model, tokenizer = _reference_model(model_dir, dtype_name, adapter=adapter)
    model.eval()
    pairs = _prompts(tokenizer, test_path)
    start = time.perf_counter()
    answers = _generate(model, tokenizer, [p for p, _ in pairs], GEN_MAX_NEW)
    seconds = time.perf_counter() - start
    exact = sum(exact_match(a, ref) for a, (_, ref) in zip(answers, pairs, strict=True))
    _emit({"exact": exact, "scored": len(pairs), "eval_seconds": seconds})


# --- fourbit, through its public entry points --------------------------------------------------------------------


def fourbit_train(model_dir: str, train_path: str, out: str, dtype_name: str, batch_size: int) -> None:
    from fourbit.models.loader import default_compute_dtype
    from fourbit.train.config import TrainConfig
    from fourbit.train.trainer import train

    config = TrainConfig(model=model_dir, data=train_path, out=out, epochs=HYPER["epochs"], batch_size=batch_size,
                         max_length=MAX_LENGTH, packing=True, lr=HYPER["lr"], warmup_steps=HYPER["warmup_steps"],
                         scheduler="cosine", optimizer="paged_adamw", weight_decay=0.0,
                         max_grad_norm=HYPER["max_grad_norm"], rank=HYPER["rank"], alpha=HYPER["alpha"],
                         dropout=HYPER["dropout"], target="all-linear", quant_type="nf4", double_quant=True,
                         gradient_checkpointing=True, seed=HYPER["seed"], save_every=10**9)  # fmt: skip
    result = train(config, progress=False)
    used = str(default_compute_dtype("cpu")).removeprefix("torch.")
    _emit({"train_seconds": result.seconds, "steps": result.steps, "final_loss": result.train_loss, "dtype": used,
           "optimizer": "fourbit.train.paged_adamw.PagedAdamW"})  # fmt: skip


def fourbit_eval(model_dir: str, test_path: str, adapter: str, dtype_name: str) -> None:
    from fourbit.serve.evaluate import evaluate

    start = time.perf_counter()  # includes loading and the eval loss: fourbit's evaluate() does all three
    report = evaluate(model_dir, test_path, adapters=adapter, batch_size=GEN_BATCH, max_new_tokens=GEN_MAX_NEW)
    _emit({"exact": report.exact, "scored": report.scored, "eval_seconds": time.perf_counter() - start})


# --- switching between training and generation -------------------------------------------------------------------


def _fourbit_stepper(model_dir: str, train_path: str, batch_size: int):
    """A fourbit model with a fresh adapter, and one optimizer step of the trainer's on a fixed batch (unpacked:
    the same batch_size examples the reference uses). Made of fourbit's public pieces: load, add_adapter, the
    trainer's accumulate_gradients over its LossModule, PagedAdamW."""
    import torch

    import fourbit
    from fourbit.data.batching import as_row, collate
    from fourbit.data.dataset import load_dataset
    from fourbit.models.adapters import add_adapter
    from fourbit.train.loss import LossModule
    from fourbit.train.paged_adamw import PagedAdamW
    from fourbit.train.trainer import accumulate_gradients, release_freed_memory

    torch.manual_seed(HYPER["seed"])
    model, tokenizer = fourbit.load(model_dir, progress=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_adapter(model, "default", HYPER["rank"], HYPER["alpha"], HYPER["dropout"], "all-linear")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = load_dataset(train_path, tokenizer, MAX_LENGTH)
    batch = collate([as_row(e) for e in data.examples[:batch_size]], tokenizer.pad_token_id, packed=False)
    loss_module = LossModule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(params, lr=HYPER["lr"], weight_decay=0.0)

    def step() -> None:
        model.train()
        accumulate_gradients(loss_module, [batch])
        torch.nn.utils.clip_grad_norm_(params, HYPER["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        release_freed_memory()

    return model, tokenizer, step


def _reference_stepper(model_dir: str, train_path: str, batch_size: int, dtype_name: str):
    import torch

    from fourbit.data.dataset import load_dataset

    model, tokenizer = _reference_model(model_dir, dtype_name, train=True)
    data = load_dataset(train_path, tokenizer, MAX_LENGTH)
    batch = _padded(data.examples[:batch_size], tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _reference_optimizer(params)

    def step() -> None:
        model.train()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, HYPER["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, tokenizer, step


def switch(stack: str, order: str, model_dir: str, train_path: str, test_path: str, dtype_name: str,
           batch_size: int, steps: int, new_tokens: int) -> None:  # fmt: skip
    if stack == "fourbit":
        model, tokenizer, step = _fourbit_stepper(model_dir, train_path, batch_size)
    else:
        model, tokenizer, step = _reference_stepper(model_dir, train_path, batch_size, dtype_name)
    prompts = [p for p, _ in _prompts(tokenizer, test_path)][:GEN_BATCH]

    def train_s() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - start

    def gen_tok_s() -> float:
        model.eval()
        start = time.perf_counter()
        _generate(model, tokenizer, prompts, new_tokens, exact=True)
        return len(prompts) * new_tokens / (time.perf_counter() - start)

    # The VM's speed drifts between seconds, so one timing on each side is too little: CYCLES times over, the
    # measurement before, the other mode, the measurement right after; ratio = median(after) / median(before).
    befores, afters = [], []
    if order == "train-first":
        step()  # warm-up
        for _ in range(SWITCH_CYCLES):
            befores.append(train_s())
            gen_tok_s()
            afters.append(train_s())
        _emit({"train_before_s": statistics.median(befores), "train_after_s": statistics.median(afters)})
    else:
        gen_tok_s()  # warm-up
        for _ in range(SWITCH_CYCLES):
            befores.append(gen_tok_s())
            train_s()
            afters.append(gen_tok_s())
        _emit({"gen_before_tok_s": statistics.median(befores), "gen_after_tok_s": statistics.median(afters)})


# --- the parent --------------------------------------------------------------------------------------------------


def prepare(quick: bool, batch_size: int, train_limit: int | None, test_limit: int | None) -> dict:
    """Write the training and test files both stacks use; count the examples' real tokens."""
    from transformers import AutoTokenizer

    from fourbit.data.batching import pack
    from fourbit.data.records import read_records
    from fourbit.data.tokenize import encode_record
    from fourbit.models.bundled import bundled_model_dir
    from fourbit.models.loader import default_compute_dtype

    model_dir = str(bundled_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = read_records(str(ROOT / "data/demo/train.jsonl"))
    records = records[: train_limit or (48 if quick else len(records))]
    examples = [encode_record(tokenizer, r, MAX_LENGTH) for r in records]
    # fourbit's step takes as many packed rows as hold about batch_size examples, so both stacks make about the
    # same number of optimizer steps; then the longest prefix whose packed rows fill whole fourbit steps, so
    # fourbit's epoch uses every example
    n = len(examples)
    rows_per_step = max(1, round(batch_size * len(pack(examples, MAX_LENGTH)) / n))
    while n > 0 and len(pack(examples[:n], MAX_LENGTH)) % rows_per_step:
        n -= 1
    if n == 0:
        raise SystemExit(f"too few examples for one step of {rows_per_step} packed rows")
    rows = len(pack(examples[:n], MAX_LENGTH))
    tests = read_records(str(ROOT / "data/demo/test.jsonl"))
    tests = tests[: test_limit or (16 if quick else len(tests))]
    WORK.mkdir(parents=True, exist_ok=True)
    train_path, test_path = WORK / "train.jsonl", WORK / "test.jsonl"
    train_path.write_text("".join(json.dumps(r.data) + "\n" for r in records[:n]))
    test_path.write_text("".join(json.dumps(r.data) + "\n" for r in tests))
    return {"model_dir": model_dir, "train": str(train_path), "test": str(test_path), "n_train": n,
            "n_available": len(records), "n_test": len(tests), "packed_rows": rows, "rows_per_step": rows_per_step,
            "tokens": sum(len(e.input_ids) for e in examples[:n]),
            "loss_tokens": sum(e.n_loss_tokens for e in examples[:n]),
            "dtype": str(default_compute_dtype("cpu")).removeprefix("torch.")}  # fmt: skip


def run_child(args: list[str]) -> dict:
    out = run_sampled([sys.executable, __file__, "--child", *args], env=dict(os.environ))
    if out["returncode"] != 0:
        raise SystemExit(f"child {args[:2]} failed:\n{out['stderr'][-4000:]}")
    lines = [ln for ln in out["stdout"].splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1].removeprefix("RESULT ")) | {"process_seconds": out["seconds"],
                                                             "peak_mb": out["peak_mb"]}  # fmt: skip


def one_run(stack: str, setup: dict, batch_size: int, switch_steps: int, new_tokens: int, index: int) -> dict:
    out = str(WORK / f"adapter-{stack}-{index}")
    shared = [setup["model_dir"], setup["train"], setup["test"], setup["dtype"], str(batch_size)]
    per_step = str(setup["rows_per_step"] if stack == "fourbit" else batch_size)
    trained = run_child([stack, "train", out, *shared[:-1], per_step])
    evald = run_child([stack, "eval", out, *shared])
    result = trained | {"eval_peak_mb": evald["peak_mb"], "eval_process_seconds": evald["process_seconds"],
                        "exact": evald["exact"], "scored": evald["scored"], "eval_seconds": evald["eval_seconds"]}
    for order in ("train-first", "generate-first"):
        sw = run_child([stack, "switch", order, *shared, str(switch_steps), str(new_tokens)])
        result |= {k: v for k, v in sw.items() if k not in ("process_seconds", "peak_mb")}
    result["tokens_per_s"] = setup["tokens"] / result["train_seconds"]
    result["accuracy"] = 100 * result["exact"] / result["scored"]
    result["train_ratio"] = result["train_before_s"] / result["train_after_s"]  # speed after / before
    result["gen_ratio"] = result["gen_after_tok_s"] / result["gen_before_tok_s"]
    return result


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "bitsandbytes", "peft", "fourbit"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[str, list[dict]], setup: dict, args, command: str) -> None:
    labels = {"fourbit": "fourbit", "reference": "transformers + bitsandbytes + PEFT"}
    lines = [f"Measured {today()} on {machine()}. Command: `{command}`. Median of {args.repeats} alternating "
             "run(s) per stack, each step (train, eval, switch) in a fresh child process.", "",
             f"The bundled SmolLM2-135M-Instruct fine-tuned for one epoch on the first {setup['n_train']} of "
             f"{setup['n_available']} records of data/demo/train.jsonl (the longest prefix whose packed rows fill "
             f"whole fourbit steps: {setup['packed_rows']} rows; {setup['tokens']} real tokens, "
             f"{setup['loss_tokens']} of them carrying loss), the same examples and tokenization "
             f"(fourbit.data.dataset.load_dataset) for both; held-out exact match on {setup['n_test']} records of "
             f"data/demo/test.jsonl. Hyperparameters for both: LoRA r=16, alpha 32, dropout 0.05 on all linear "
             f"layers of the decoder, lr 1e-3, 3 warm-up steps then cosine, max grad norm 0.3, no weight decay, "
             f"NF4 + double quantization, {setup['dtype']} compute (fourbit's choice here), max_length "
             f"{MAX_LENGTH}, seed 0. Per optimizer step: the reference {args.batch_size} padded examples, fourbit "
             f"{setup['rows_per_step']} packed rows of up to {MAX_LENGTH} tokens (about as many examples). "
             f"Adapter weights are fp32 in both; the reference multiplies by them in fp32 (PEFT casts x to the "
             f"adapter's dtype), fourbit in its compute dtype ({setup['dtype']}, fp32 accumulation).", "",
             "| | training s | process s | tokens/s | peak private MB (training process) | exact match | "
             "optimizer steps | final train loss | eval process peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for stack, runs in results.items():
        lines.append(f"| {labels[stack]} | {med(runs, 'train_seconds'):.1f} | {med(runs, 'process_seconds'):.1f} | "
                     f"{med(runs, 'tokens_per_s'):.0f} | {med(runs, 'peak_mb'):.0f} | "
                     f"{med(runs, 'exact'):.0f}/{runs[0]['scored']} = {med(runs, 'accuracy'):.1f}% | "
                     f"{runs[0]['steps']} | {med(runs, 'final_loss'):.3f} | {med(runs, 'eval_peak_mb'):.0f} |")
    lines += ["", "Switching modes (one process per measurement; ratio after / before, 1.0 = no cliff):", "",
              f"| | training speed after a generation / before ({args.switch_steps} steps of {args.batch_size} "
              f"examples) | generation tok/s after {args.switch_steps} training steps / before ({GEN_BATCH} "
              f"prompts x {args.new_tokens} tokens) |", "|---|---|---|"]  # fmt: skip
    for stack, runs in results.items():
        lines.append(f"| {labels[stack]} | {med(runs, 'train_ratio'):.2f} "
                     f"({med(runs, 'train_before_s'):.1f} s -> {med(runs, 'train_after_s'):.1f} s) | "
                     f"{med(runs, 'gen_ratio'):.2f} ({med(runs, 'gen_before_tok_s'):.1f} -> "
                     f"{med(runs, 'gen_after_tok_s'):.1f} tok/s) |")  # fmt: skip
    lines += ["",
              "Training time is the loop from the first step to the last optimizer step (fourbit: its trainer's "
              "RunResult.seconds; reference: timed around its loop), without loading or evaluation; process s is "
              "the training child's whole wall time (imports, loading, training, saving the adapter). tokens/s = "
              "the examples' real tokens / training time for both. Peak private memory = the training child's "
              "highest RssAnon, sampled by the parent every 5 ms (memory-mapped weight files not counted).", "",
              "fourbit ran `fourbit.train.trainer.train(TrainConfig(...))` (paged AdamW, packing, activation "
              "checkpointing), then `fourbit.serve.evaluate.evaluate(model, test, adapters=...)` in a fresh "
              "process (exact match of greedy answers, up to 64 new tokens, batches of 8).", "",
              "The reference ran the standard recipe: `AutoModelForCausalLM.from_pretrained(..., "
              "quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
              f"bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype={setup['dtype']}), dtype={setup['dtype']}, "
              "device_map='cpu')`, `peft.prepare_model_for_kbit_training` (PEFT's defaults: gradient "
              "checkpointing on, non-quantized weights cast to fp32), `get_peft_model(LoraConfig(r=16, "
              "lora_alpha=32, lora_dropout=0.05, target_modules='all-linear', task_type='CAUSAL_LM'))`; a plain "
              "loop (no HF Trainer) over the examples shuffled with seed 0 in right-padded batches (attention mask; "
              "labels -100 on prompt and padding tokens, from fourbit's tokenization; the last, partial batch "
              "kept), loss = model(...).loss (mean over the batch's loss tokens), clip_grad_norm_ 0.3, "
              "`bitsandbytes.optim.PagedAdamW` (on a CPU bitsandbytes warns that paged optimizers are not supported "
              "and runs it unpaged), `transformers.get_cosine_schedule_with_warmup(3, steps)` (its first step has "
              "lr 0). Accuracy: `PeftModel.from_pretrained` on the same 4-bit base in a fresh process, eval mode, "
              "`generate(do_sample=False, max_new_tokens=64)`, left padding, the same prompts and batches of 8, "
              "scored by `fourbit.serve.evaluate.exact_match`.", "",
              "Switching: \"train first\" = load, a fresh adapter and optimizer, 1 warm-up step, then "
              f"{SWITCH_CYCLES} times: {args.switch_steps} timed steps, one generation, {args.switch_steps} timed "
              f"steps; \"generate first\" = a warm-up generation, then {SWITCH_CYCLES} times: a timed generation, "
              f"{args.switch_steps} training steps, a timed generation. Each side is the median of its "
              f"{SWITCH_CYCLES} timings, so every \"after\" comes right after the other mode. "
              f"Training steps use the first {args.batch_size} training examples padded, for both stacks (fourbit: "
              "its trainer's accumulate_gradients over its LossModule, PagedAdamW, gradient clipping). On a CPU "
              "with AVX512-BF16, bitsandbytes repacks each Linear4bit for its inference kernel at the first "
              "eval-mode forward and keeps that layout; training afterwards runs through `gemv_4bit`, which has no "
              "autograd kernel, so gradients silently stop flowing through the 4-bit layers (torch warns): the "
              "reference's training after a generation is then not the same computation, and its ratio reflects "
              "that, not only speed.", "", f"Versions: {_versions()}."]
    if len(results) == 2:
        f, r = results["fourbit"], results["reference"]
        speed = med(r, "train_seconds") / med(f, "train_seconds")
        memory = med(r, "peak_mb") / med(f, "peak_mb")
        points = med(f, "accuracy") - med(r, "accuracy")
        lines += ["", f"fourbit against the reference: {speed:.2f}x faster training (target 1.5x), {memory:.2f}x "
                  f"less peak private memory (target 2x), exact match {points:+.1f} points (target >= -3); training "
                  f"after generation at {med(f, 'train_ratio'):.2f} of its speed before (reference "
                  f"{med(r, 'train_ratio'):.2f}), generation after training at {med(f, 'gen_ratio'):.2f} "
                  f"(reference {med(r, 'gen_ratio'):.2f})."]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    if len(results) < 2:
        print("\n(one stack only: docs/benchmarks.md and .json left unchanged)", file=sys.stderr)
        return
    write_section("Fine-tuning the bundled model", body)
    rows = [
        dict(metric="fine-tune training time (s)", fourbit=med(f, "train_seconds"),
             reference=med(r, "train_seconds"), unit="s", advantage=speed, target=1.5, met=speed >= 1.5, peer=PEER),
        dict(metric="fine-tune peak private memory (MB)", fourbit=med(f, "peak_mb"), reference=med(r, "peak_mb"),
             unit="MB", advantage=memory, target=2.0, met=memory >= 2.0, peer=PEER),
        dict(metric="held-out exact match after fine-tuning (%)", fourbit=med(f, "accuracy"),
             reference=med(r, "accuracy"), unit="%", advantage=points, target=-3.0, met=points >= -3.0, peer=PEER),
        dict(metric="training speed after generation / before (fourbit's ratio; reference's for contrast)",
             fourbit=med(f, "train_ratio"), reference=med(r, "train_ratio"), unit="x",
             advantage=med(f, "train_ratio"), target=0.9, met=med(f, "train_ratio") >= 0.9, peer=PEER),
        dict(metric="generation speed after training / before (fourbit's ratio; reference's for contrast)",
             fourbit=med(f, "gen_ratio"), reference=med(r, "gen_ratio"), unit="x",
             advantage=med(f, "gen_ratio"), target=0.9, met=med(f, "gen_ratio") >= 0.9, peer=PEER),
    ]  # fmt: skip
    record_results("fine-tune", rows)


def child(argv: list[str]) -> None:
    stack, task, *rest = argv
    if task == "switch":
        order, model_dir, train_path, test_path, dtype, batch, steps, tokens = rest
        switch(stack, order, model_dir, train_path, test_path, dtype, int(batch), int(steps), int(tokens))
        return
    out, model_dir, train_path, test_path, dtype, batch = rest
    if task == "train":
        (fourbit_train if stack == "fourbit" else reference_train)(model_dir, train_path, out, dtype, int(batch))
    else:
        (fourbit_eval if stack == "fourbit" else reference_eval)(model_dir, test_path, out, dtype)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="alternating runs per stack (default 3; 1 quick)")
    parser.add_argument("--quick", action="store_true", help="48 training examples, 16 test examples, 1 repeat")
    parser.add_argument("--stack", choices=["fourbit", "reference", "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step, both stacks")
    parser.add_argument("--train-examples", type=int, default=None, help="use at most this many training records")
    parser.add_argument("--test-examples", type=int, default=None, help="use at most this many held-out records")
    parser.add_argument("--switch-steps", type=int, default=3, help="training steps timed around a generation")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per prompt in the switch generations")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    command = "python " + " ".join(["benchmarks/bench_train.py", *sys.argv[1:]])
    setup = prepare(args.quick, args.batch_size, args.train_examples, args.test_examples)
    print(json.dumps(setup), file=sys.stderr)
    stacks = ["fourbit", "reference"] if args.stack == "both" else [args.stack]
    results: dict[str, list[dict]] = {s: [] for s in stacks}
    for i in range(args.repeats):  # alternating, and the order flips each repeat
        for stack in stacks if i % 2 == 0 else stacks[::-1]:
            results[stack].append(one_run(stack, setup, args.batch_size, args.switch_steps, args.new_tokens, i))
            print(stack, json.dumps(results[stack][-1]), file=sys.stderr, flush=True)
    report(results, setup, args, command)


if __name__ == "__main__":
    main()
