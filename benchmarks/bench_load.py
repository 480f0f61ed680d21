"""Quantize-on-load of a random Llama checkpoint: fourbit against transformers + bitsandbytes, each in a fresh process.

    python benchmarks/bench_load.py                    # 1.1B (hidden 2048, 22 layers)
    python benchmarks/bench_load.py --size 7b          # 7B (hidden 4096, 32 layers); needs ~14 GB of disk
    python benchmarks/bench_load.py --size 1.1b 7b     # both, one after the other [--repeats N, default 2]

Each size writes its "Loading a random ... Llama" section of docs/benchmarks.md; the rows (time and peak memory,
fourbit against the reference, per size) go to docs/benchmarks.json as the "load" workload. The checkpoints stay in
/tmp/fourbit-bench-llama-SIZE for reuse.

Peak private memory is the highest resident *anonymous* memory seen while loading (sampled every 5 ms): pages of a
memory-mapped checkpoint are not counted, as the OS can drop them at will. The baseline (Python with torch and
transformers imported) is measured in the same child process before loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, PeakMemory, machine, record_results, rss_anon_mb, today, write_section  # noqa: E402

SIZES = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32),
}  # fmt: skip


def write_checkpoint(folder: Path, size: str) -> None:
    """Random bf16 weights in two safetensors shards with an index, tensor by tensor (never the whole model)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fourbit.models.safetensors_stream import write_streaming

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, **SIZES[size])
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(names)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    g = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        shape = names[name]
        return torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else \
            (torch.randn(shape, generator=g) * 0.02).bfloat16()  # fmt: skip

    for i, part in enumerate(halves):  # streamed: one tensor in memory at a time (a 7B half is 6.7 GB)
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        specs = [(name, torch.bfloat16, names[name]) for name in part]
        write_streaming(folder / shard, specs, produce, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)


def child(which: str, folder: str) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    baseline = rss_anon_mb()
    memory = PeakMemory()
    start = time.perf_counter()
    if which == "fourbit":
        from fourbit.models.loader import LoadOptions, load_model

        model = load_model(Path(folder), LoadOptions(compute_dtype=torch.bfloat16), progress=False)
        from fourbit.nn import qlora_layers

        four = sum(layer.weight_4bit.nbytes for layer in qlora_layers(model).values())
    else:
        import warnings

        warnings.filterwarnings("ignore")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
        four = 0
    seconds = time.perf_counter() - start
    peak = memory.stop()
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype != torch.uint8)
    packed = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == torch.uint8)
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "baseline_mb": baseline,
                      "footprint_mb": (four + dense + packed) / 2**20}))  # fmt: skip


PEER = "transformers + bitsandbytes (NF4 + double quant)"
MEMORY_BOUND_MB = {"7b": 5000}  # the absolute target for fourbit's peak private memory


def _median(rows: list[dict], key: str) -> float:
    values = sorted(r[key] for r in rows)
    return values[len(values) // 2]


def run_size(size: str, folder: Path, repeats: int) -> list[dict]:
    """Benchmark one size, write its section of docs/benchmarks.md, return its rows for docs/benchmarks.json."""
    if not (folder / "config.json").exists():  # config.json is written last: its presence means a whole checkpoint
        print(f"writing a random {size} Llama checkpoint to {folder} ...", file=sys.stderr)
        write_checkpoint(folder, size)
    bf16_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    results: dict[str, list[dict]] = {"fourbit": [], "transformers + bitsandbytes": []}
    for _ in range(repeats):  # alternating, a fresh process each time
        for which, label in (("fourbit", "fourbit"), ("bnb", "transformers + bitsandbytes")):
            out = subprocess.run([sys.executable, __file__, "--child", which, str(folder)], capture_output=True,
                                 text=True)  # fmt: skip
            if out.returncode != 0:
                sys.exit(f"{label} load of {folder} failed:\n{out.stderr[-3000:]}")
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(size, label, results[label][-1], file=sys.stderr)

    ours, theirs = results["fourbit"], results["transformers + bitsandbytes"]
    command = "python benchmarks/bench_load.py --size " + size
    lines = [f"Measured {today()} on {machine()}. Command: `{command}`. "
             f"A random Llama checkpoint ({size}: {SIZES[size]}, vocab 32000, bf16, two safetensors "
             f"shards, {bf16_gb:.2f} GiB), loaded with NF4 + double quantization, bf16 compute; median of "
             f"{repeats} alternating runs, each in a fresh process. Peak private memory = peak resident "
             "anonymous memory, including the baseline of Python with torch and transformers imported "
             f"({_median(ours, 'baseline_mb'):.0f} MB); pages of the memory-mapped checkpoint are not counted "
             "(fourbit keeps the embeddings and output head as views on them, which the OS may drop and read "
             "again; the loaded footprint counts them).", "",
             "| | seconds | peak private MB | loaded footprint MB (weights held) |", "|---|---|---|---|"]  # fmt: skip
    for label, rows in results.items():
        lines.append(f"| {label} | {_median(rows, 'seconds'):.1f} | {_median(rows, 'peak_mb'):.0f} | "
                     f"{_median(rows, 'footprint_mb'):.0f} |")  # fmt: skip
    speed = _median(theirs, "seconds") / _median(ours, "seconds")
    memory = _median(theirs, "peak_mb") / _median(ours, "peak_mb")
    summary = f"fourbit: {speed:.1f}x faster, {memory:.2f}x less peak private memory"
    bound = MEMORY_BOUND_MB.get(size)
    if bound:
        verdict = "under" if _median(ours, "peak_mb") < bound else "NOT under"
        summary += f"; fourbit's peak is {verdict} the {bound} MB target"
    lines += ["", summary + "."]
    body = "\n".join(lines)
    print(body)
    write_section(f"Loading a random {size} Llama", body)

    rows = [dict(metric=f"{size} load time (s)", fourbit=_median(ours, "seconds"),
                 reference=_median(theirs, "seconds"), unit="s", advantage=speed, target=1.0, met=speed > 1.0,
                 peer=PEER)]  # fmt: skip
    peak_ours, peak_theirs = _median(ours, "peak_mb"), _median(theirs, "peak_mb")
    if bound:  # the target is absolute; as an advantage it is reference / bound, so the marker means the same
        rows.append(dict(metric=f"{size} load peak private MB (target: fourbit < {bound} MB)", fourbit=peak_ours,
                         reference=peak_theirs, unit="MB", advantage=memory, target=peak_theirs / bound,
                         met=peak_ours < bound, peer=PEER))  # fmt: skip
    else:
        rows.append(dict(metric=f"{size} load peak private MB", fourbit=peak_ours, reference=peak_theirs, unit="MB",
                         advantage=memory, target=1.0, met=memory > 1.0, peer=PEER))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["1.1b"], help="one or more sizes")
    parser.add_argument("--dir", default=None, help="where the random checkpoint is written (kept for reuse); "
                        "one size only")  # fmt: skip
    parser.add_argument("--repeats", "--runs", dest="repeats", type=int, default=2, help="alternating runs per side")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.dir and len(args.size) > 1:
        parser.error("--dir names one checkpoint: give one --size with it")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows = []
    for size in args.size:
        rows += run_size(size, Path(args.dir or f"/tmp/fourbit-bench-llama-{size}"), args.repeats)
    # keep the rows of sizes not run this time, so `--size 7b` alone does not drop the 1.1b rows
    previous = json.loads(RESULTS.read_text()).get("load", {}).get("rows", []) if RESULTS.exists() else []
    ran = tuple(f"{size} " for size in args.size)
    rows = [r for r in previous if not r["metric"].startswith(ran)] + rows
    rows.sort(key=lambda r: list(SIZES).index(r["metric"].split()[0]) if r["metric"].split()[0] in SIZES else 99)
    record_results("load", rows)


if __name__ == "__main__":
    main()
