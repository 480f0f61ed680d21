"""Quantize, dequantize and small-batch 4-bit products: fourbit against bitsandbytes, in one run, alternating.

    python benchmarks/bench_kernels.py          # prints the table and writes the "Kernels" section of docs/benchmarks.md
"""

from __future__ import annotations

import warnings

import torch
from common import machine, median_ms, today, write_section

import fourbit
from fourbit.quant import native
from fourbit.quant.matmul import linear_4bit, linear_4bit_t

warnings.filterwarnings("ignore")
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnb_f  # noqa: E402

N = K = 4096
COPIES = 4  # 4 x 9.4 MB of 4-bit weights: products read from memory, not cache


def bandwidth_gbs() -> float:
    big = torch.ones(1 << 26)  # 256 MiB of fp32: a sum is bound by reading it
    ms = median_ms(lambda: big.sum(), repeat=5)
    return big.numel() * 4 / ms / 1e6


def matmul_gflops(dtype: torch.dtype) -> float:
    """A training-sized product (2048 x 4096 x 4096): which compute dtype is faster on this CPU."""
    a, b = torch.randn(2048, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    return 2 * 2048 * 4096 * 4096 / median_ms(lambda: a @ b, repeat=3) / 1e6


def rotating(fn, weights: list) -> float:
    """Median ms of fn over the weight copies in turn, so each call reads a weight not in cache."""
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(weights[state["i"] % len(weights)])

    return median_ms(call, repeat=15)


def main() -> None:
    assert native.available(), native.build_error()
    torch.manual_seed(0)
    w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    rows = []

    ours = median_ms(lambda: fourbit.quantize_4bit(w, "nf4", 64, True))
    theirs = median_ms(lambda: bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
    rows.append(("quantize 4096x4096 bf16, NF4 + double quant", ours, theirs))
    q = fourbit.quantize_4bit(w)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = median_ms(lambda: q.dequantize(torch.bfloat16))
    theirs = median_ms(lambda: bnb_f.dequantize_4bit(packed, state))
    rows.append(("dequantize to bf16", ours, theirs))
    ours = median_ms(lambda: q.dequantize(torch.float32))
    theirs = median_ms(lambda: bnb_f.dequantize_4bit(packed, state).float())
    rows.append(("dequantize to fp32 (bnb: to bf16, then cast)", ours, theirs))

    qs = [fourbit.quantize_4bit(torch.randn(N, K, dtype=torch.bfloat16) * 0.02) for _ in range(COPIES)]
    bnb_ws = [bnb_f.quantize_4bit(torch.randn(N, K, dtype=torch.bfloat16) * 0.02, blocksize=64,
                                  compress_statistics=True, quant_type="nf4") for _ in range(COPIES)]  # fmt: skip
    dense = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(COPIES)]
    gbs = bandwidth_gbs()
    floor_ms = qs[0].nbytes / gbs / 1e6
    products = []
    for m in (1, 8, 16):
        x = torch.randn(m, K)
        xb = x.bfloat16()
        fwd = rotating(lambda w, x=x: linear_4bit(x, w), qs)
        bwd = rotating(lambda w, x=x: linear_4bit_t(x, w), qs)
        ref_fwd = rotating(lambda p, xb=xb: bnb.matmul_4bit(xb, p[0].t(), p[1]), bnb_ws)
        dense_bf16 = rotating(lambda d, xb=xb: xb @ d.t(), dense)
        compute_floor = 2 * m * N * K / 150e9 * 1000  # at 150 GFLOP/s, about this CPU's fp32 FMA rate in practice
        products.append((m, fwd, bwd, ref_fwd, dense_bf16, max(floor_ms, compute_floor)))

    fp32_rate, bf16_rate = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    lines = [f"Measured {today()} on {machine()}; bitsandbytes {bnb.__version__}; fourbit native path: "
             f"{native.cpu_path()}. Command: `python benchmarks/bench_kernels.py`. Medians; weights rotated over "
             f"{COPIES} copies so products read memory, not cache.", "",
             "| operation | fourbit ms | bitsandbytes ms | fourbit speed-up |", "|---|---|---|---|"]  # fmt: skip
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
    lines += ["", f"Memory bandwidth measured: {gbs:.1f} GB/s, so reading one 4096x4096 NF4 weight (with its scales, "
              f"{qs[0].nbytes / 1e6:.1f} MB) takes at least {floor_ms:.2f} ms.", "",
              "| rows M | fourbit x W^T ms | fourbit g W ms | bnb matmul_4bit x W^T ms | dense bf16 x W^T ms | floor ms "
              "(max of bandwidth, compute) | fourbit x W^T / floor |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, fwd, bwd, ref, dense_ms, floor in products:
        lines.append(f"| {m} | {fwd:.2f} | {bwd:.2f} | {ref:.2f} | {dense_ms:.2f} | {floor:.2f} | {fwd / floor:.2f} |")
    lines += ["", f"Large products (2048x4096 @ 4096x4096): fp32 {fp32_rate:.0f} GFLOP/s, bf16 {bf16_rate:.0f} GFLOP/s. "
              "Which is faster depends on the CPU: `fourbit.load` measures it once per machine (compute_dtype=None)."]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    write_section("Kernels", body)


if __name__ == "__main__":
    main()
