"""What each training lever is worth: fourbit's trainer on the bundled model and the demo data, one lever turned
back to the plain way at a time, each run in a fresh process.

    python benchmarks/bench_levers.py [--steps 8] [--repeats 1]

Levers (the baseline is fourbit as shipped):
- hash dropout -> torch's dropout (one generator draw per element, on one thread);
- loss on labelled positions in chunks -> full-vocabulary fp32 logits at every position (transformers' way);
- packing -> one padded row per example (the same examples per step: batch_size rows of packed sequences vs
  as many padded rows as those packed rows held examples);
- activation checkpointing -> off (faster, more memory);
- compute dtype bf16 -> fp32 (which one wins depends on the CPU; fourbit measures it);
- adapter products in the compute dtype -> in the adapters' fp32 (PEFT's way; the weights are fp32 either way);
- returning freed memory to the OS after each step -> off;
- the allocator pool for large tensors -> glibc's heap for everything;
- batch widths rounded up to a multiple of 8 -> the longest row's width (a new shape for most batches).
Time is the training loop (first to last step, the first step included); memory is the child's peak resident
anonymous memory while training, sampled every 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakMemory, machine, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LEVERS = {
    "fourbit as shipped": {},
    "torch dropout instead of hash dropout": {"dropout": "torch"},
    "full-vocabulary logits instead of chunked labelled-only loss": {"loss": "full"},
    "padding instead of packing": {"packing": False},
    "no activation checkpointing": {"checkpointing": False},
    "fp32 compute instead of bf16": {"dtype": "float32"},
    "fp32 adapter products instead of bf16": {"adapter_dtype": "float32"},
    "no memory trim after each step": {"trim": False},
    "glibc heap instead of the allocator pool": {"pool": False},
    "batch widths not rounded to a multiple of 8": {"pad_to": 1},
}


def full_vocabulary_loss(model, batch, chunk_tokens: int = 0):
    """The plain way: logits for every position over the whole vocabulary, in fp32, then the loss."""
    import torch.nn.functional as F

    from fourbit.data.tokenize import IGNORE

    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")  # fmt: skip
    return loss, int((targets != IGNORE).sum())


def child(options: dict, steps: int) -> None:
    import contextlib

    import torch

    import fourbit.data.batching
    import fourbit.nn.dropout
    import fourbit.nn.qlora_linear
    import fourbit.quant.native
    import fourbit.train.loss
    import fourbit.train.trainer
    from fourbit.train.config import TrainConfig
    from fourbit.train.trainer import train

    if options.get("dropout") == "torch":
        fourbit.nn.dropout._use_hash = lambda x: False
    if "adapter_dtype" in options:
        fourbit.nn.qlora_linear.adapter_dtype = lambda layer: getattr(torch, options["adapter_dtype"])
    if options.get("loss") == "full":
        fourbit.train.loss.loss_sum = full_vocabulary_loss
    if options.get("trim") is False:
        fourbit.train.trainer.release_freed_memory = lambda: None
    if options.get("pool") is False:
        fourbit.quant.native.pooled_allocator = lambda cap_bytes: contextlib.nullcontext(False)
    if "pad_to" in options:
        fourbit.data.batching.PAD_TO_MULTIPLE = options["pad_to"]
    packing = options.get("packing", True)
    # the demo's settings; unpacked, 4 packed rows' worth of examples per step (about 3.4 examples per row)
    config = TrainConfig(data=str(ROOT / "data/demo/train.jsonl"), out=f"/tmp/fourbit-levers-{os.getpid()}",
                         epochs=1, max_steps=steps, batch_size=4 if packing else 14, max_length=256, lr=1e-3,
                         warmup_steps=3, scheduler="cosine", dropout=0.05, save_every=10_000, packing=packing,
                         gradient_checkpointing=options.get("checkpointing", True))  # fmt: skip
    memory = PeakMemory()
    result = train(config, progress=False)
    peak = memory.stop()
    print(json.dumps({"seconds": result.seconds, "peak_mb": peak}))


def run_child(options: dict, steps: int) -> dict:
    env = dict(os.environ)
    if "dtype" in options:
        env["FOURBIT_COMPUTE_DTYPE"] = options["dtype"]
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(options), "--steps", str(steps)],
                         capture_output=True, text=True, env=env)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"lever run {options} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child), args.steps)
        return
    results: dict[str, list[dict]] = {name: [] for name in LEVERS}
    for _ in range(args.repeats):  # round-robin, so drift in the machine's speed spreads over all levers
        for name, options in LEVERS.items():
            results[name].append(run_child(options, args.steps))
            print(name, results[name][-1], file=sys.stderr)

    def med(name, key):
        values = sorted(r[key] for r in results[name])
        return values[len(values) // 2]

    base_s, base_mb = med("fourbit as shipped", "seconds"), med("fourbit as shipped", "peak_mb")
    lines = [f"Measured {today()} on {machine()}. Command: `python benchmarks/bench_levers.py --steps {args.steps} "
             f"--repeats {args.repeats}`. fourbit's trainer on the bundled model and the demo data "
             f"({args.steps} optimizer steps of about 13 examples, LoRA r=16 on every linear layer, dropout 0.05), "
             "one lever switched back to the plain way per run, each in a fresh process; median of "
             f"{args.repeats}. Unpacked runs take 14 padded examples per step, about what 4 packed rows hold.", "",
             "| run | seconds | peak private MB | time vs shipped | memory vs shipped |", "|---|---|---|---|---|"]
    for name in LEVERS:
        s, mb = med(name, "seconds"), med(name, "peak_mb")
        lines.append(f"| {name} | {s:.1f} | {mb:.0f} | {s / base_s:.2f}x | {mb / base_mb:.2f}x |")
    body = "\n".join(lines)
    print(body)
    write_section("Training levers", body)


if __name__ == "__main__":
    main()
