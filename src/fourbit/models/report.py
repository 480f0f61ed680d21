"""A quantization report: what NF4/FP4 does to each linear weight of a checkpoint (bytes, bits, error, time)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from fourbit.quant import quantize_4bit


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    dense_bytes: int
    quantized_bytes: int
    relative_error: float  # ||W - Q(W)|| / ||W||
    seconds: float


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    return [single]


def quantization_report(
    model_dir: str | Path, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> list[TensorReport]:
    """Quantize every 2-D weight of the decoder layers (the ones QLoRA stores in 4 bits) one at a time."""
    rows = []
    for path in _weight_files(Path(model_dir)):
        with safe_open(path, framework="pt") as f:
            names = [n for n in f.keys() if ".layers." in n and n.endswith(".weight")]
            for name in tqdm(names, desc=f"quantizing {path.name}", unit="tensor", leave=False):
                w = f.get_tensor(name)
                if w.dim() != 2:
                    continue
                start = time.perf_counter()
                q = quantize_4bit(w, quant_type, blocksize, double_quant)
                seconds = time.perf_counter() - start
                err = (q.dequantize(torch.float32) - w.float()).norm() / w.float().norm()
                rows.append(TensorReport(name, tuple(w.shape), w.numel() * w.element_size(), q.nbytes, float(err), seconds))
    return rows


def format_report(rows: list[TensorReport]) -> str:
    params = sum(r.shape[0] * r.shape[1] for r in rows)
    dense = sum(r.dense_bytes for r in rows)
    quantized = sum(r.quantized_bytes for r in rows)
    seconds = sum(r.seconds for r in rows)
    mean_err = sum(r.relative_error for r in rows) / max(1, len(rows))
    worst = max(rows, key=lambda r: r.relative_error)
    return "\n".join(
        [
            f"linear weights:   {len(rows)} tensors, {params / 1e6:.1f} M parameters",
            f"dense:            {dense / 2**20:.1f} MiB",
            f"4-bit:            {quantized / 2**20:.1f} MiB ({8 * quantized / params:.3f} bits/parameter, "
            f"{dense / quantized:.2f}x smaller)",
            f"relative error:   mean {mean_err:.4f}, worst {worst.relative_error:.4f} ({worst.name})",
            f"quantize time:    {seconds:.2f} s ({params / seconds / 1e6:.0f} M parameters/s)",
        ]
    )
