"""Peak memory of `fourbit merge` on the random 1.1B Llama of bench_load.py, beside its 4-bit loading peak.

    python benchmarks/bench_merge.py      # writes the "Merging a random 1.1b Llama" section of docs/benchmarks.md

A rank-16 adapter on every linear layer (random B) is merged into the dequantized weights and written in bf16.
Peak private memory = peak resident anonymous memory (sampled every 5 ms) of a fresh process doing only that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_load import write_checkpoint  # noqa: E402
from common import PeakMemory, machine, today, write_section  # noqa: E402


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


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    folder = Path("/tmp/fourbit-bench-llama-1.1b")
    if not (folder / "config.json").exists():
        write_checkpoint(folder, "1.1b")
    if not (folder / "tokenizer.json").exists():
        byte_tokenizer(folder)
    adapter = Path("/tmp/fourbit-bench-llama-1.1b-adapter")
    if not (adapter / "adapter_config.json").exists():
        import torch

        import fourbit
        from fourbit.models.adapters import add_adapter, save_adapter
        from fourbit.nn import qlora_layers

        model, _ = fourbit.load(folder, compute_dtype=torch.bfloat16, progress=False)
        add_adapter(model, "default", r=16, alpha=32)
        with torch.no_grad():
            for layer in qlora_layers(model).values():
                layer.lora_B["default"].weight.normal_(0, 0.001)
        save_adapter(model, adapter)
        del model
    run = subprocess.run([sys.executable, __file__, "--child", str(folder), str(adapter), "/tmp/fourbit-bench-merged"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    result = json.loads(run.stdout.strip().splitlines()[-1])
    body = (f"Measured {today()} on {machine()}. Command: `python benchmarks/bench_merge.py`. `fourbit merge` of a "
            f"rank-16 all-linear adapter into the random 1.1B Llama of the loading benchmark (dequantized weights, "
            f"bf16 output, quality report included), in a fresh process: {result['seconds']:.1f} s, peak private "
            f"memory {result['peak_mb']:.0f} MB (compare the loading peak above; the merge holds the 4-bit model with its "
            f"adapter, one dense layer at a time, and never the dense model). Mean KL of the merged "
            f"model to the unmerged one: {result['kl']:.1e} nats/token.")  # fmt: skip
    print(body)
    write_section("Merging a random 1.1b Llama", body)


if __name__ == "__main__":
    main()
