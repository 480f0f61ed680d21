"""Greedy decoding with the bundled SmolLM2-135M-Instruct: fourbit against transformers + bitsandbytes and the dense
model, each stack in a fresh process, alternating.

    python benchmarks/bench_generate.py                 # [--repeats N, default 3] [--no-fp32] [--new-tokens 48]

Work is equal across stacks: the same chat prompts (the first 8 of data/demo/test.jsonl through the chat template;
batch 1 is the first alone, batch 8 all of them, left-padded), tokenized once the same way, and exactly `--new-tokens`
new tokens per row (EOS is held off with min_new_tokens, so no row stops early). tokens/s = batch x new tokens / wall
time of the whole generation call, prefill included, for every stack alike; one short warm-up call per batch size
first, then CALLS (3) timed calls, median. fourbit decodes through `fourbit.serve.generate.decode` (what `fourbit
generate` and `fourbit eval` use); the others through `model.generate(do_sample=False)`.

A sanity check (not timed) runs once: fourbit's greedy tokens (fp32 compute) against transformers' generate on the
same weights dequantized, for two prompts.

Writes the "Decoding" section of docs/benchmarks.md and the "decode" rows of docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, record_results, today, write_section  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "demo" / "test.jsonl"
BATCHES = (1, 8)
CALLS = 3  # timed generations per batch size in each process, median (this VM's speed drifts within seconds)
STACKS = {  # key: (label, dtype)
    "fourbit": ("fourbit (NF4 + double quant, bf16 compute)", "auto"),
    "bnb-bf16": ("transformers + bitsandbytes (NF4 + double quant, bf16 compute)", "bfloat16"),
    "dense-bf16": ("transformers, dense bf16", "bfloat16"),
    "bnb-fp32": ("transformers + bitsandbytes (NF4 + double quant, fp32 compute)", "float32"),
    "dense-fp32": ("transformers, dense fp32", "float32"),
}


def _prompts(tokenizer) -> list[str]:
    from fourbit.serve.generate import prompt_text

    records = [json.loads(line) for line in DATA.read_text().splitlines()[:8]]
    return [prompt_text(tokenizer, r)[0] for r in records]


def _inputs(tokenizer, prompts: list[str]) -> dict:
    tokenizer.padding_side = "left"
    return dict(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False))


def child(stack: str, new_tokens: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fourbit.models.bundled import bundled_model_dir

    folder = bundled_model_dir("smollm2-135m-instruct")
    kind, dtype_name = stack.split("-")[0], STACKS[stack][1]
    if kind == "fourbit":
        import fourbit
        from fourbit.serve.generate import _eos_ids, decode

        model, tokenizer = fourbit.load("smollm2-135m-instruct", progress=False)
        eos = _eos_ids(model, tokenizer)
        compute = str(next(iter(fourbit.nn.qlora_layers(model).values())).compute_dtype).removeprefix("torch.")

        def run(inputs, n):
            return decode(model, inputs["input_ids"], inputs["attention_mask"], n, n, eos, tokenizer.pad_token_id)
    else:
        dtype = getattr(torch, dtype_name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if kind == "bnb":
            from transformers import BitsAndBytesConfig

            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=dtype)  # fmt: skip
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                         dtype=dtype)  # fmt: skip
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        model.eval()
        compute = dtype_name

        def run(inputs, n):
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            return out[:, inputs["input_ids"].shape[1] :]

    prompts = _prompts(tokenizer)
    result = {"compute": compute}
    with torch.inference_mode():
        for batch in BATCHES:
            inputs = _inputs(tokenizer, prompts[:batch])
            run(inputs, 4)  # warm-up: first-call allocations, kernel builds, caches
            speeds = []
            for _ in range(CALLS):
                start = time.perf_counter()
                out = run(inputs, new_tokens)
                seconds = time.perf_counter() - start
                assert out.shape == (batch, new_tokens), out.shape
                speeds.append(batch * new_tokens / seconds)
            result[f"b{batch}"] = statistics.median(speeds)
    print(json.dumps(result))


def sanity() -> None:
    """fourbit's greedy tokens against transformers' generate on the dequantized weights (fp32 compute both)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM

    import fourbit
    from fourbit.models.bundled import bundled_model_dir
    from fourbit.serve.generate import _eos_ids, decode

    model, tokenizer = fourbit.load("smollm2-135m-instruct", compute_dtype=torch.float32, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(bundled_model_dir("smollm2-135m-instruct"), dtype=torch.float32)
    for name, layer in fourbit.nn.qlora_layers(model).items():
        ref.get_submodule(name).weight.data = layer.dense_weight(dtype=torch.float32)
    prompts = _prompts(tokenizer)[:2]
    equal = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = _inputs(tokenizer, [prompt])
            ours = decode(model, inputs["input_ids"], inputs["attention_mask"], 24, 0, _eos_ids(model, tokenizer),
                          tokenizer.pad_token_id)  # fmt: skip
            theirs = ref.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            equal.append(ours[0].tolist() == theirs[0, inputs["input_ids"].shape[1] :].tolist())
    print(json.dumps({"equal": equal, "prompts": len(prompts)}))


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", "--runs", dest="repeats", type=int, default=3, help="alternating runs per stack")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 transformers stacks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sanity", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sanity:
        sanity()
        return
    if args.child:
        child(args.child, args.new_tokens)
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    stacks = [s for s in STACKS if not (args.no_fp32 and s.endswith("fp32"))]
    runs: dict[str, list[dict]] = {s: [] for s in stacks}
    for _ in range(args.repeats):  # alternating, a fresh process each time
        for stack in stacks:
            runs[stack].append(_run_child(["--child", stack, "--new-tokens", str(args.new_tokens)]))
            print(stack, runs[stack][-1], file=sys.stderr)
    check = _run_child(["--sanity"])

    med = {s: {b: statistics.median(r[f"b{b}"] for r in rows) for b in BATCHES} for s, rows in runs.items()}
    compute = runs["fourbit"][0]["compute"]
    label = dict((s, lab) for s, (lab, _) in STACKS.items())
    label["fourbit"] = f"fourbit (NF4 + double quant, {compute.replace('bfloat16', 'bf16').replace('float32', 'fp32')} compute)"
    command = "python benchmarks/bench_generate.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else "") + (
        " --no-fp32" if args.no_fp32 else "")  # fmt: skip
    lines = [f"Measured {today()} on {machine()}. Command: `{command}`. "
             f"Greedy decoding with the bundled SmolLM2-135M-Instruct: {args.new_tokens} new tokens per row, forced "
             "(EOS held off with min_new_tokens, so every stack does the same work), for the first chat prompt of "
             "data/demo/test.jsonl (batch 1) and the first 8 left-padded (batch 8). tokens/s = batch x new tokens / "
             "wall time of the whole generation call, prefill included, after one short warm-up call; in each "
             f"process the median of {CALLS} calls, then the median of {args.repeats} alternating runs, each stack "
             "in a fresh process. fourbit decodes through its own loop "
             "(`fourbit.serve.generate.decode`, used by `fourbit generate` and `fourbit eval`), the others through "
             "`model.generate(do_sample=False)`.", "",
             "| | batch 1 tok/s | batch 8 tok/s |", "|---|---|---|"]  # fmt: skip
    for s in stacks:
        lines.append(f"| {label[s]} | {med[s][1]:.1f} | {med[s][8]:.1f} |")
    four = med["fourbit"]
    targets = [("bnb-bf16", 1, 1.0), ("bnb-bf16", 8, 1.0), ("dense-bf16", 1, 2.0), ("dense-bf16", 8, 1.5)]
    rows, verdicts = [], []
    for peer, batch, target in targets:
        adv = four[batch] / med[peer][batch]
        met = adv >= target
        verdicts.append(f"batch {batch}: {adv:.2f}x {label[peer]} (target {target:g}x, {'met' if met else 'NOT met'})")
        rows.append(dict(metric=f"decode tok/s, batch {batch}, vs {peer}", fourbit=four[batch],
                         reference=med[peer][batch], unit="tok/s", advantage=adv, target=target, met=met,
                         peer=label[peer]))  # fmt: skip
    equal = check["equal"]
    lines += ["", "fourbit: " + "; ".join(verdicts) + ".", "",
              f"Sanity (untimed): fourbit's greedy tokens (fp32 compute, 24 new tokens) equal transformers' generate "
              f"on the same weights dequantized for {sum(equal)} of {len(equal)} prompts."]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    write_section("Decoding", body)
    record_results("decode", rows)


if __name__ == "__main__":
    main()
