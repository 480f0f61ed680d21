"""`fourbit merge`: fold a LoRA adapter into the weights and write a standard Hugging Face folder.

Merging into a 4-bit model silently ruins quality in the reference stack; here the target is explicit:
- `into="dequantized"` (default): W' = dequant(Q) + s*B*A, the weights the adapter was trained against;
- `into="original"`: W' = W16 + s*B*A, the original 16-bit weights (MODEL must be a 16-bit checkpoint);
- `quantize="nf4"`: W' is quantized again and written in the transformers + bitsandbytes 4-bit layout.
Every merge measures how far the result moves from the 4-bit base + adapter it replaces (mean KL divergence of the
next-token distributions, and perplexity) on a text sample, prints it and saves it as `merge_report.json`.
Dense outputs are streamed: one merged layer at a time is held beside the 4-bit model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from fourbit.atomic import atomic_directory, write_atomic
from fourbit.models import bnb_checkpoint
from fourbit.models.loader import _read_headers, _weight_files, load
from fourbit.models.quantize_checkpoint import copy_side_files
from fourbit.models.resolve import resolve_model
from fourbit.models.safetensors_stream import DTYPES, mmap_tensors, write_streaming
from fourbit.nn import QLoRALinear, qlora_layers

FROM_SAFETENSORS = {name: dtype for dtype, name in DTYPES.items()}
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

SAMPLE_TEXT = [
    "The capital of France is Paris. It is known for the Eiffel Tower, its museums and its cafes.",
    "Water boils at 100 degrees Celsius at sea level, and freezes at zero degrees.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "In 1969, astronauts landed on the Moon for the first time and walked on its surface.",
]


@dataclass
class MergeReport:
    into: str
    dtype: str
    quantize: str | None
    mean_kl: float  # KL(unmerged 4-bit + adapter || merged), mean over predicted positions, nats
    perplexity_unmerged: float
    perplexity_merged: float
    tokens: int

    def text(self) -> str:
        return (f"merge ({self.into}, {self.dtype}{', ' + self.quantize if self.quantize else ''}): mean KL "
                f"{self.mean_kl:.2e} nats/token; perplexity {self.perplexity_unmerged:.3f} (4-bit + adapter) -> "
                f"{self.perplexity_merged:.3f} (merged) over {self.tokens} tokens")  # fmt: skip


@torch.no_grad()
def _logits(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(ids).logits.float().log_softmax(-1) for ids in batches]


@torch.no_grad()
def merge(model: str, adapter: str, out: str | Path, dtype: str = "bf16", into: str = "dequantized",
          quantize: str | None = None, sample: list[str] | None = None, progress: bool = True) -> MergeReport:  # fmt: skip
    if into not in ("dequantized", "original"):
        raise ValueError(f"--into must be dequantized or original, got {into!r}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    if quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"--quantize must be nf4 or fp4, got {quantize!r}")
    out, out_dtype = Path(out), OUT_DTYPES[dtype]
    folder = resolve_model(model)
    config = json.loads((folder / "config.json").read_text())
    if into == "original" and "quantization_config" in config:
        raise ValueError(f"{folder / 'config.json'}: --into original needs a 16-bit checkpoint; this one is 4-bit")
    # The 4-bit model is held in the output dtype (bf16 output: bf16 embeddings, half the memory of fp32); fp16 is
    # computed in fp32, which CPUs run far better. The report compares the two models in that same dtype.
    compute = torch.float32 if out_dtype == torch.float16 else out_dtype
    base, tokenizer = load(folder, adapter=adapter, compute_dtype=compute, progress=progress)
    layers = qlora_layers(base)
    files = _weight_files(folder)
    where = _read_headers(files)
    handles = {f: safe_open(f, framework="pt") for f in files}

    def layer_for(key: str) -> QLoRALinear | None:
        for path in (key.removesuffix(".weight"), "model." + key.removesuffix(".weight")):
            if key.endswith(".weight") and path in layers:
                return layers[path]
        return None

    def merged_weight(key: str, layer: QLoRALinear) -> torch.Tensor:
        if into == "original":
            w = handles[where[key]].get_tensor(key).float()
        else:
            w = layer.weight_4bit.dequantize(torch.float32)
        if layer.active:
            w.add_(layer.delta_weight())  # in place: one dense fp32 layer and its delta, no third copy
        return w.to(out_dtype)

    def spec_of(key: str) -> tuple[str, torch.dtype, tuple[int, ...]]:
        layer = layer_for(key)
        if layer is not None:
            return key, out_dtype, (layer.out_features, layer.in_features)
        info = handles[where[key]].get_slice(key)
        stored = FROM_SAFETENSORS[info.get_dtype()]
        return key, out_dtype if stored.is_floating_point else stored, tuple(info.get_shape())

    # the output tensors: bnb-quantized inputs collapse back to one dense `weight`
    names = sorted(k for k in where if not any(k.endswith("." + s) for s in bnb_checkpoint.STATE_SUFFIXES)
                   and bnb_checkpoint.QUANT_STATE_SUFFIX not in k)  # fmt: skip
    with atomic_directory(out) as tmp:
        bar = tqdm(total=len(names), desc="merging", unit="tensor", disable=not progress, leave=False)
        if quantize is None:
            specs = [spec_of(key) for key in names]

            def produce(key: str) -> torch.Tensor:
                bar.update(1)
                layer = layer_for(key)
                if layer is not None:
                    return merged_weight(key, layer)
                t = handles[where[key]].get_tensor(key)
                return t.to(out_dtype) if t.is_floating_point() else t

            write_streaming(tmp / "model.safetensors", specs, produce, metadata={"format": "pt"})
        else:
            from fourbit.quant import quantize_4bit

            tensors = {}
            for key in names:
                layer = layer_for(key)
                if layer is not None:
                    q = quantize_4bit(merged_weight(key, layer), quantize, 64, True)
                    tensors.update(bnb_checkpoint.to_bnb_tensors(key.removesuffix("weight"), q))
                else:
                    t = handles[where[key]].get_tensor(key)
                    tensors[key] = t.to(out_dtype) if t.is_floating_point() else t
                bar.update(1)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        bar.close()
        config.pop("quantization_config", None)
        if quantize:
            config["quantization_config"] = bnb_checkpoint.quantization_config(quantize, True, out_dtype)
        config["torch_dtype"] = config["dtype"] = bnb_checkpoint.dtype_name(out_dtype)
        write_atomic(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        copy_side_files(folder, tmp)
    report = measure(base, tokenizer, out, quantize, sample or SAMPLE_TEXT)  # consumes `base`
    report.into, report.dtype, report.quantize = into, dtype, quantize
    write_atomic(out / "merge_report.json", (json.dumps(asdict(report), indent=2) + "\n").encode())
    return report


class _MappedLinear(torch.nn.Module):
    """A linear layer whose weight stays in the memory-mapped output file: one dense layer at a time in memory."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_mapped, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_mapped.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def measure(unmerged, tokenizer, merged_dir: Path, quantize: str | None, sample: list[str]) -> MergeReport:
    """KL(unmerged || merged) per predicted position, and both perplexities, on `sample`. A dense merged model is
    not loaded whole: the unmerged model object itself becomes the merged one, its 4-bit layers replaced by
    layers reading the merged weights from the memory-mapped output, its other tensors rounded as written."""
    batches = [tokenizer(text, return_tensors="pt")["input_ids"] for text in sample]
    ref = _logits(unmerged, batches)
    if quantize:
        merged, _ = load(merged_dir, compute_dtype=next(unmerged.parameters()).dtype, progress=False)
    else:
        written = mmap_tensors(merged_dir / "model.safetensors")
        merged = unmerged
        for path, layer in qlora_layers(merged).items():
            key = next(k for k in (f"{path}.weight", f"{path.removeprefix('model.')}.weight") if k in written)
            parent, _, child = path.rpartition(".")
            setattr(merged.get_submodule(parent), child, _MappedLinear(written[key], layer.bias))
        with torch.no_grad():
            for name, param in merged.named_parameters():
                if name in written and param.is_floating_point():
                    param.copy_(written[name])  # the rounding to --dtype, in place
    got = _logits(merged, batches)
    kl, nll_ref, nll_got, n = 0.0, 0.0, 0.0, 0
    for ids, lp_ref, lp_got in zip(batches, ref, got, strict=True):
        p_ref, p_got = lp_ref[0, :-1], lp_got[0, :-1]
        targets = ids[0, 1:]
        kl += float(F.kl_div(p_got, p_ref, log_target=True, reduction="sum"))
        nll_ref -= float(p_ref.gather(1, targets[:, None]).sum())
        nll_got -= float(p_got.gather(1, targets[:, None]).sum())
        n += targets.numel()
    return MergeReport("", "", None, kl / n, math.exp(nll_ref / n), math.exp(nll_got / n), n)
