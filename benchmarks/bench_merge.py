"""Peak memory of `fourbit merge` on the random 1.1B Llama of bench_load.py, beside a fourbit load of the same
checkpoint measured in the same run.

    python benchmarks/bench_merge.py [--repeats N]   # writes the "Merging a random 1.1b Llama" section

A rank-16 adapter on every linear layer (random B) is merged into the dequantized weights and written in bf16, the
quality report included. The issue's bound: merging holds at most one dense layer beyond the 4-bit model, i.e. the
merge's peak private memory is at most the loading peak plus one dense fp32 layer of the model (the largest one,
5632x2048 here). Peak private memory = peak resident anonymous memory (sampled every 5 ms) of a fresh process doing
only that; the loads and the merges alternate, medians are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_load import SIZES, write_checkpoint  # noqa: E402
from common import PeakMemory, machine, record_results, today, write_section  # noqa: E402

FOLDER = Path("/tmp/fourbit-bench-llama-1.1b")
ADAPTER = Path("/tmp/fourbit-bench-llama-1.1b-adapter")
OUT = Path("/tmp/fourbit-bench-merged")


def byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (ids < 259, inside any vocabulary) so the merge report can tokenize its sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)


def child(folder: str, adapter: str, out: str) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    memory = PeakMemory()
    from fourbit.ship.merge import merge

    start = time.perf_counter()
    report = merge(folder, adapter, out, dtype="bf16", progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": memory.stop(), "kl": report.mean_kl}))


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2, help="alternating load and merge runs")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not (FOLDER / "config.json").exists():
        write_checkpoint(FOLDER, "1.1b")
    if not (FOLDER / "tokenizer.json").exists():
        byte_tokenizer(FOLDER)
    if not (ADAPTER / "adapter_config.json").exists():
        import torch

        import fourbit
        from fourbit.models.adapters import add_adapter, save_adapter
        from fourbit.nn import qlora_layers

        model, _ = fourbit.load(FOLDER, compute_dtype=torch.bfloat16, progress=False)
        add_adapter(model, "default", r=16, alpha=32)
        with torch.no_grad():
            for layer in qlora_layers(model).values():
                layer.lora_B["default"].weight.normal_(0, 0.001)
        save_adapter(model, ADAPTER)
        del model

    loads, merges = [], []
    for _ in range(args.repeats):  # alternating, a fresh process each time
        loads.append(_run([str(Path(__file__).parent / "bench_load.py"), "--child", "fourbit", str(FOLDER)]))
        print("load", loads[-1], file=sys.stderr)
        merges.append(_run([__file__, "--child", str(FOLDER), str(ADAPTER), str(OUT)]))
        print("merge", merges[-1], file=sys.stderr)

    def med(rows, key):
        values = sorted(r[key] for r in rows)
        return values[len(values) // 2]

    config = SIZES["1.1b"]
    rows_, cols = max((config["intermediate_size"], config["hidden_size"]), (config["hidden_size"],) * 2)
    layer_mb = rows_ * cols * 4 / 2**20  # the largest linear layer, dense in fp32
    load_peak, merge_peak = med(loads, "peak_mb"), med(merges, "peak_mb")
    bound = load_peak + layer_mb
    met = merge_peak <= bound
    lines = [f"Measured {today()} on {machine()}. Command: `python benchmarks/bench_merge.py`. `fourbit merge` of a "
             f"rank-16 all-linear adapter into the random 1.1B Llama of the loading benchmark (dequantized weights, "
             f"bf16 output, quality report included), beside a fourbit load of the same checkpoint in the same run; "
             f"each in a fresh process, median of {args.repeats} alternating runs. Peak private memory = peak "
             "resident anonymous memory (memory-mapped checkpoint and adapter pages not counted). The bound: the "
             "loading peak plus one dense fp32 layer of the model. Both peaks include freed memory glibc has not "
             "yet returned to the OS; for the load that varies from run to run (measured 778 to 831 MB on a busy "
             "2-core machine; the merge returns it after each layer).", "",
             "| | seconds | peak private MB |", "|---|---|---|",
             f"| fourbit load (4-bit model, no adapter) | {med(loads, 'seconds'):.1f} | {load_peak:.0f} |",
             f"| bound: load peak + one dense layer ({rows_}x{cols} fp32, {layer_mb:.0f} MB) | | {bound:.0f} |",
             f"| fourbit merge | {med(merges, 'seconds'):.1f} | {merge_peak:.0f} |", "",
             f"The merge peak is {'within' if met else 'OVER'} the bound ({merge_peak - load_peak:+.0f} MB over the "
             f"loading peak). The merge makes each merged layer in chunks of rows and streams it to the file, so it "
             f"never holds a whole dense layer; the quality report runs the model unmerged then merged text by text, "
             f"the merged layers reading the written file. Mean KL of the merged model to the unmerged one: "
             f"{med(merges, 'kl'):.1e} nats/token."]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    write_section("Merging a random 1.1b Llama", body)
    record_results("merge", [dict(
        metric="1.1b merge peak private MB (target: <= load peak + one dense layer)", fourbit=merge_peak,
        reference=bound, unit="MB", advantage=bound / merge_peak, target=1.0, met=met,
        peer=f"fourbit's own load peak ({load_peak:.0f} MB) + one dense fp32 layer ({layer_mb:.0f} MB)")])  # fmt: skip


if __name__ == "__main__":
    main()
