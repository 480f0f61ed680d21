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

import ctypes
import json
import math
import re
from collections.abc import Iterator
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
from fourbit.quant.api import kernels_for

FROM_SAFETENSORS = {name: dtype for dtype, name in DTYPES.items()}
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

SAMPLE_TEXT = [
    "The capital of France is Paris. It is known for the Eiffel Tower, its museums and its cafes.",
    "Water boils at 100 degrees Celsius at sea level, and freezes at zero degrees.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "In 1969, astronauts landed on the Moon for the first time and walked on its surface.",
]


# Merged weights are made in chunks of rows of about this many fp32 bytes. A chunk has at least MIN_CHUNK_ROWS rows
# (a short tail joins the chunk before it): BLAS computes each row of a product of that many rows exactly as in the
# product of the whole matrix, while for a handful of rows it may switch to kernels that round differently.
CHUNK_BYTES = 4 << 20
MIN_CHUNK_ROWS = 64


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(cols, 1)))
    bounds = list(range(0, rows, step)) + [rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_CHUNK_ROWS:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _map_adapter_weights(model, folder: Path, name: str = "default") -> None:
    """Merging only reads the adapter: point each LoRA weight of adapter `name` at the memory-mapped adapter file
    instead of a private copy, wherever the file holds exactly the loaded values (same dtype and shape, equal), as
    the loader does for embeddings. The map's pages are the OS's to drop and read again."""
    from fourbit.models.adapters import PEFT_PREFIX, WEIGHTS_NAME

    if not (folder / WEIGHTS_NAME).exists():
        return
    layers = qlora_layers(model)
    pattern = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight")
    for key, mapped in mmap_tensors(folder / WEIGHTS_NAME).items():
        match = pattern.fullmatch(key)
        if match is None or match.group(1) not in layers:
            continue
        modules = getattr(layers[match.group(1)], match.group(2))
        if name not in modules:
            continue
        loaded = modules[name].weight
        if mapped.dtype == loaded.dtype and mapped.shape == loaded.shape and torch.equal(mapped, loaded):
            modules[name]._parameters["weight"] = torch.nn.Parameter(mapped, requires_grad=False)


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


# Texts run padded on the right to a multiple of this many tokens: causal attention keeps the real positions' logits
# as they were, and the matmul library meets a few shapes instead of one per text length (oneDNN keeps a compiled
# kernel per shape: on a Xeon with AMX that cache took a 1.1B merge's peak 70 MB over its bound)
_LENGTH_STEP = 128


@torch.no_grad()
def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    length = ids.shape[1]
    padded = -(-length // _LENGTH_STEP) * _LENGTH_STEP
    if padded > length:
        ids = torch.cat([ids, ids[:, -1:].expand(ids.shape[0], padded - length)], 1)
    # the output object, and its logits in the compute dtype, are freed here
    logits = model(ids).logits[:, :length].float()
    # log_softmax(-1) written over its input (each row's max and sum are taken before the row is written): the same
    # values without a second tensor of the vocabulary's size
    return torch._log_softmax(logits, -1, False, out=logits)


def release_freed_memory() -> None:
    """Hand memory freed so far back to the OS: glibc keeps freed tensors in its heaps, where they count in the
    resident set as if still held (measured: +200 MB over a 1.1B merge without it). A no-op without glibc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (not glibc: AttributeError)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


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
    if isinstance(adapter, (str, Path)):
        _map_adapter_weights(base, Path(adapter))
    release_freed_memory()  # what loading freed, before the dense work starts
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

    def merged_rows(key: str, layer: QLoRALinear) -> Iterator[torch.Tensor]:
        """merged_weight(key, layer) in chunks of rows, each rounded to the output dtype: the same values, while
        only a few MB are held instead of the dense fp32 layer, its delta and its rounded copy."""
        n_out, n_in = layer.out_features, layer.in_features
        original = handles[where[key]].get_tensor(key) if into == "original" else None  # memory-mapped
        q = layer.weight_4bit
        kernels = kernels_for(q.device)
        adapters = [(layer.lora_B[name].weight.float(), layer.lora_A[name].weight.float(),
                     layer.lora_settings[name].scaling * weight) for name, weight in layer.active.items()]  # fmt: skip
        chunks = _row_chunks(n_out, n_in)
        rows = max(hi - lo for lo, hi in chunks)
        dense = torch.empty(rows * n_in, dtype=torch.float32, device=q.device)
        delta = torch.empty(rows * n_in, dtype=torch.float32, device=q.device) if adapters else None
        for lo, hi in chunks:
            if original is not None:
                w = dense[: (hi - lo) * n_in].view(hi - lo, n_in).copy_(original[lo:hi])
            else:  # each element is code * block scale in fp32 whatever the range decoded
                w = kernels.dequantize(q, torch.float32, lo * n_in, hi * n_in, out=dense).view(hi - lo, n_in)
            if adapters:  # as QLoRALinear.delta_weight: zeros, then addmm_ of each active adapter, then added to W
                d = delta[: (hi - lo) * n_in].view(hi - lo, n_in).zero_()
                for b, a, scale in adapters:
                    d.addmm_(b[lo:hi], a, alpha=scale)
                w.add_(d)
            yield w.to(out_dtype)  # may be `dense` itself (fp32 output): written before the next chunk is made
        del dense, delta, w
        release_freed_memory()

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
                    return merged_rows(key, layer)
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
    handles.clear()  # the input checkpoint is read
    release_freed_memory()
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
    layers reading the merged weights from the memory-mapped output, its other tensors by the memory-mapped ones
    as written (rounded to --dtype). Text by text, the model runs unmerged then merged, so only one text's
    log-probabilities of each are held."""
    batches = [tokenizer(text, return_tensors="pt")["input_ids"] for text in sample]
    if quantize:
        merged, _ = load(merged_dir, compute_dtype=next(unmerged.parameters()).dtype, progress=False)

        def run(ids: torch.Tensor, merged_state: bool) -> torch.Tensor:
            return _log_probs(merged if merged_state else unmerged, ids)
    else:
        swaps = _merged_swaps(unmerged, mmap_tensors(merged_dir / "model.safetensors"))

        def run(ids: torch.Tensor, merged_state: bool) -> torch.Tensor:
            for container, key, before, after in swaps:
                container[key] = after if merged_state else before
            return _log_probs(unmerged, ids)

    # freed activations and scratch go back to the OS after each decoder layer, not at the end of the pass
    hooks = [layer.register_forward_hook(lambda *_: release_freed_memory())
             for model in ([unmerged, merged] if quantize else [unmerged]) for stack in model.modules()
             if isinstance(stack, torch.nn.ModuleList) for layer in stack]  # fmt: skip
    kl, nll_ref, nll_got, n = 0.0, 0.0, 0.0, 0
    for ids in batches:
        lp_ref = run(ids, False)
        lp_got = run(ids, True)
        p_ref, p_got = lp_ref[0, :-1], lp_got[0, :-1]
        targets = ids[0, 1:]
        nll_ref -= float(p_ref.gather(1, targets[:, None]).sum())
        nll_got -= float(p_got.gather(1, targets[:, None]).sum())
        # F.kl_div(p_got, p_ref, log_target=True, reduction="sum") is exp(p_ref) * (p_ref - p_got), summed: the same
        # operations in place, so no three more tensors of the vocabulary's size are made
        diff = p_got.neg_().add_(p_ref)
        kl += float(diff.mul_(p_ref.exp_()).sum())
        n += targets.numel()
        del lp_ref, lp_got, p_ref, p_got, diff
        release_freed_memory()
    for hook in hooks:
        hook.remove()
    return MergeReport("", "", None, kl / n, math.exp(nll_ref / n), math.exp(nll_got / n), n)


def _merged_swaps(model, written: dict[str, torch.Tensor]) -> list[tuple[dict, str, object, object]]:
    """(container, key, unmerged value, merged value) for every module and parameter of `model` that the written
    file replaces: each 4-bit layer by a _MappedLinear, each floating-point parameter by its written tensor (a view on
    the map when the dtypes agree, so nothing is copied; a shared parameter is replaced wherever it is used)."""
    replaced = {}
    for name, param in model.named_parameters():
        if name in written and param.is_floating_point():
            value = written[name] if written[name].dtype == param.dtype else written[name].to(param.dtype)
            replaced[id(param)] = torch.nn.Parameter(value, requires_grad=False)
    swaps = []
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) in replaced:
                swaps.append((module._parameters, key, param, replaced[id(param)]))
    for path, layer in qlora_layers(model).items():
        key = next(k for k in (f"{path}.weight", f"{path.removeprefix('model.')}.weight") if k in written)
        bias = None if layer.bias is None else replaced.get(id(layer.bias), layer.bias)
        parent, _, child = path.rpartition(".")
        swaps.append((model.get_submodule(parent)._modules, child, layer, _MappedLinear(written[key], bias)))
    return swaps
