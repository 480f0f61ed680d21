"""Quantize-on-load of a random Llama checkpoint: fourbit against transformers + bitsandbytes, each in a fresh process.

    python benchmarks/bench_load.py              # 1.1B (hidden 2048, 22 layers): writes the "Loading" section
    python benchmarks/bench_load.py --size 7b    # 7B (hidden 4096, 32 layers); needs ~14 GB of disk

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
from common import PeakMemory, machine, rss_anon_mb, today, write_section  # noqa: E402

SIZES = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32),
}  # fmt: skip


def write_checkpoint(folder: Path, size: str) -> None:
    """Random bf16 weights in two safetensors shards with an index, tensor by tensor (never the whole model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, **SIZES[size])
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(names)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for i, part in enumerate(halves):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {}
        for name in part:
            shape = names[name]
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else \
                (torch.randn(shape, generator=g) * 0.02).bfloat16()  # fmt: skip
            weight_map[name] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    parser.add_argument("--dir", default=None, help="where the random checkpoint is written (kept for reuse)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    folder = Path(args.dir or f"/tmp/fourbit-bench-llama-{args.size}")
    if not (folder / "config.json").exists():
        print(f"writing a random {args.size} Llama checkpoint to {folder} ...", file=sys.stderr)
        write_checkpoint(folder, args.size)
    bf16_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    results: dict[str, list[dict]] = {"fourbit": [], "transformers + bitsandbytes": []}
    for _ in range(args.runs):  # alternating, a fresh process each time
        for which, label in (("fourbit", "fourbit"), ("bnb", "transformers + bitsandbytes")):
            out = subprocess.run([sys.executable, __file__, "--child", which, str(folder)], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(label, results[label][-1], file=sys.stderr)

    def med(rows, key):
        values = sorted(r[key] for r in rows)
        return values[len(values) // 2]

    ours, theirs = results["fourbit"], results["transformers + bitsandbytes"]
    lines = [f"Measured {today()} on {machine()}. Command: `python benchmarks/bench_load.py --size {args.size}`. "
             f"A random Llama checkpoint ({args.size}: {SIZES[args.size]}, vocab 32000, bf16, two safetensors "
             f"shards, {bf16_gb:.2f} GiB), loaded with NF4 + double quantization, bf16 compute; median of "
             f"{args.runs} alternating runs, each in a fresh process. Peak private memory = peak resident "
             "anonymous memory, including the baseline of Python with torch and transformers imported "
             f"({med(ours, 'baseline_mb'):.0f} MB).", "",
             "| | seconds | peak private MB | loaded footprint MB (weights held) |", "|---|---|---|---|"]  # fmt: skip
    for label, rows in results.items():
        lines.append(f"| {label} | {med(rows, 'seconds'):.1f} | {med(rows, 'peak_mb'):.0f} | "
                     f"{med(rows, 'footprint_mb'):.0f} |")  # fmt: skip
    lines += ["", f"fourbit: {med(theirs, 'seconds') / med(ours, 'seconds'):.1f}x faster, "
              f"{med(theirs, 'peak_mb') / med(ours, 'peak_mb'):.2f}x less peak private memory."]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    write_section(f"Loading a random {args.size} Llama", body)


if __name__ == "__main__":
    main()
