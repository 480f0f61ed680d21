"""Quantize, dequantize and small-batch 4-bit products: fourbit against bitsandbytes, in one run, alternating.

    python benchmarks/bench_kernels.py             # prints the table, writes the "Kernels" section of docs/benchmarks.md
                                                   # and the "kernels" rows of docs/benchmarks.json
    python benchmarks/bench_kernels.py --no-write  # prints only
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from common import machine, median_ms, record_results, today, write_section

import fourbit
from fourbit.quant import native
from fourbit.quant.matmul import linear_4bit, linear_4bit_t

warnings.filterwarnings("ignore")
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnb_f  # noqa: E402

N = K = 4096
COPIES = 8  # 8 x 9.4 MB of 4-bit weights, more than the last-level cache: products read from memory
ROUNDS = 3


def bandwidth_gbs() -> float:
    big = torch.ones(1 << 26)  # 256 MiB of fp32: a sum is bound by reading it
    ms = median_ms(lambda: big.sum(), repeat=5)
    return big.numel() * 4 / ms / 1e6


def matmul_gflops(dtype: torch.dtype) -> float:
    """A training-sized product (2048 x 4096 x 4096): which compute dtype is faster on this CPU."""
    a, b = torch.randn(2048, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    return 2 * 2048 * 4096 * 4096 / median_ms(lambda: a @ b, repeat=3) / 1e6


def rotating(fn, weights: list, warm_ms: float = 50.0) -> float:
    """Median ms of fn over the weight copies in turn, so each call reads a weight not in cache. Calls are made for
    warm_ms first: right after the measurement before it (a 256 MiB sum, a large matmul) this VM runs slower for
    several milliseconds (measured: the next 60 products of one row at 0.145-0.19 ms, then 0.132), which would
    otherwise land on whichever side is measured next."""
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(weights[state["i"] % len(weights)])

    start = time.perf_counter()
    while (time.perf_counter() - start) * 1000 < warm_ms or state["i"] < len(weights):
        call()
    return median_ms(call, repeat=15)


def advantage_row(metric: str, ours: float, theirs: float, target: float, peer: str) -> dict:
    return {"metric": metric, "fourbit": round(ours, 3), "reference": round(theirs, 3), "unit": "ms",
            "advantage": round(theirs / ours, 3), "target": target, "met": theirs / ours >= target, "peer": peer}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ untouched")
    args = parser.parse_args()
    assert native.available(), native.build_error()
    torch.manual_seed(0)
    w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    rows = []

    ours = median_ms(lambda: fourbit.quantize_4bit(w, "nf4", 64, True))
    theirs = median_ms(lambda: bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
    rows.append(("quantize 4096x4096 bf16, NF4 + double quant", ours, theirs, 10))
    q = fourbit.quantize_4bit(w)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    # a new tensor per call, as both libraries' dequantize return it. fourbit takes it from its allocator pool, which
    # hands back the pages of the last freed output (the benchmark's previous call); bitsandbytes' is a fresh torch
    # tensor whose 32-64 MB of pages are faulted in, which on this VM costs more than any decode. Shown beside: fourbit
    # with fresh pages too (pool emptied before each call), and into a reused buffer (how its tiled products decode).
    ours = median_ms(lambda: q.dequantize(torch.bfloat16), repeat=15)
    theirs = median_ms(lambda: bnb_f.dequantize_4bit(packed, state), repeat=15)
    rows.append(("dequantize to bf16", ours, theirs, 2))
    ours = median_ms(lambda: q.dequantize(torch.float32), repeat=15)
    theirs = median_ms(lambda: bnb_f.dequantize_4bit(packed, state).float(), repeat=15)
    rows.append(("dequantize to fp32 (bnb: to bf16, then cast)", ours, theirs, 2))
    out_bf16, out_f32 = torch.empty(N, K, dtype=torch.bfloat16), torch.empty(N, K)
    reused = {"bf16": median_ms(lambda: native.dequantize(q, torch.bfloat16, out=out_bf16), repeat=15),
              "fp32": median_ms(lambda: native.dequantize(q, torch.float32, out=out_f32), repeat=15)}
    fresh = {"bf16": median_ms(lambda: (native.release_pool(), q.dequantize(torch.bfloat16)), repeat=15),
             "fp32": median_ms(lambda: (native.release_pool(), q.dequantize(torch.float32)), repeat=15)}

    # the floor: reading the weight once at the measured bandwidth, or the multiply-adds at the rate of the faster
    # dense matmul dtype on this machine, whichever takes longer; the products run in that dtype too (fourbit's
    # compute dtype on this machine), as bitsandbytes' and the dense ones do
    rates = {dtype: matmul_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    best = max(rates, key=rates.get)
    qs = [fourbit.quantize_4bit(torch.randn(N, K, dtype=torch.bfloat16) * 0.02) for _ in range(COPIES)]
    bnb_ws = [bnb_f.quantize_4bit(torch.randn(N, K, dtype=torch.bfloat16) * 0.02, blocksize=64,
                                  compress_statistics=True, quant_type="nf4") for _ in range(COPIES)]  # fmt: skip
    dense = [torch.randn(N, K, dtype=best) for _ in range(COPIES)]
    # This VM's speed drifts by tens of percent over minutes (other guests), so the floor's parts are measured beside
    # the products they bound, in ROUNDS rounds over M, and every quantity is the median of its rounds. The memory
    # part: reading the weight's bytes once, the lower of (its bytes at the bandwidth of a long read) and (a read of
    # the same rotating copies, which is what a product has to do).
    samples = {m: {key: [] for key in ("fwd", "bwd", "ref", "dense", "gbs", "read", "rate")} for m in (1, 8, 16)}
    for _ in range(ROUNDS):
        for m, got in samples.items():
            x = torch.randn(m, K, dtype=best)
            got["gbs"].append(bandwidth_gbs())
            got["read"].append(rotating(lambda q: (q.packed.view(torch.int32).max(), q.absmax.max()), qs))
            got["rate"].append(matmul_gflops(best))
            got["fwd"].append(rotating(lambda w, x=x: linear_4bit(x, w), qs))
            got["bwd"].append(rotating(lambda w, x=x: linear_4bit_t(x, w), qs))
            got["ref"].append(rotating(lambda p, x=x: bnb.matmul_4bit(x.bfloat16(), p[0].t(), p[1]), bnb_ws))
            got["dense"].append(rotating(lambda d, x=x: x @ d.t(), dense))
    med = {m: {key: statistics.median(values) for key, values in got.items()} for m, got in samples.items()}
    products = []
    for m, q in med.items():
        bandwidth_ms = min(qs[0].nbytes / q["gbs"] / 1e6, q["read"])
        floor = max(bandwidth_ms, 2 * m * N * K / q["rate"] / 1e6)
        products.append((m, q["fwd"], q["bwd"], q["ref"], q["dense"], floor, bandwidth_ms, q["rate"]))

    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    lines = [f"Measured {today()} on {machine()}; bitsandbytes {bnb.__version__}; fourbit native path: "
             f"{native.cpu_path()}. Command: `python benchmarks/bench_kernels.py`. Medians; weights rotated over "
             f"{COPIES} copies so products read memory, not cache, each measured after 50 ms of the same calls.", "",
             "| operation | fourbit ms | bitsandbytes ms | fourbit speed-up |", "|---|---|---|---|"]  # fmt: skip
    for metric, a, b, _ in rows:
        lines.append(f"| {metric} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
    lines += ["", "Dequantize returns a new tensor in both libraries. fourbit takes it from its allocator pool, which "
              "hands back the pages of the last freed output (here the previous call's, as when merging or exporting "
              "layer after layer); bitsandbytes' is a fresh torch tensor, whose pages are faulted in. fourbit with "
              f"fresh pages too (pool emptied before each call): {fresh['bf16']:.2f} ms to bf16, "
              f"{fresh['fp32']:.2f} ms to fp32; into a reused output (how its tiled products decode): "
              f"{reused['bf16']:.2f} ms to bf16, {reused['fp32']:.2f} ms to fp32."]
    gbs = statistics.median(v for got in samples.values() for v in got["gbs"])
    lines += ["", f"Memory bandwidth measured: {gbs:.1f} GB/s (a sum over 256 MiB; median of the rounds), so reading "
              f"one 4096x4096 NF4 weight (with its scales, {qs[0].nbytes / 1e6:.1f} MB) takes "
              f"{qs[0].nbytes / gbs / 1e6:.3f} ms; the floor's memory part is the lower of that and a read of the same "
              f"{COPIES} rotating copies the products use. Large products (2048x4096 @ 4096x4096): fp32 "
              f"{rates[torch.float32]:.0f} GFLOP/s, bf16 {rates[torch.bfloat16]:.0f} GFLOP/s, so the products below "
              f"run in {name[best]} (which `fourbit.load` picks here with compute_dtype=None) and the floor is the "
              f"larger of the memory part and 2*M*N*K at the {name[best]} rate. This VM's speed drifts by tens of "
              f"percent over minutes, so each row's floor parts were measured beside its products, in {ROUNDS} "
              "rounds; every figure is the median of its rounds.", "",
              f"| rows M | fourbit x W^T ms | fourbit g W ms | bnb matmul_4bit x W^T ms | dense {name[best]} x W^T ms | "
              f"memory part ms | {name[best]} GFLOP/s | floor ms | x W^T / floor | g W / floor |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, fwd, bwd, ref, dense_ms, floor, bandwidth_ms, rate in products:
        lines.append(f"| {m} | {fwd:.2f} | {bwd:.2f} | {ref:.2f} | {dense_ms:.2f} | {bandwidth_ms:.3f} | {rate:.0f} "
                     f"| {floor:.2f} | {fwd / floor:.2f} | {bwd / floor:.2f} |")  # fmt: skip
    body = "\n".join(lines)
    print(body)
    if args.no_write:
        return
    write_section("Kernels", body)
    results = [advantage_row(metric, a, b, target, "bitsandbytes") for metric, a, b, target in rows]
    for m, fwd, bwd, _, _, floor, _, _ in products:
        for direction, ms in (("x W^T", fwd), ("g W", bwd)):
            results.append(advantage_row(f"{direction}, M={m}, 4096x4096 NF4 ({name[best]})", ms, floor, 1 / 1.5,
                                         "floor: max(bandwidth, best dense matmul rate)"))  # fmt: skip
    record_results("kernels", results)


if __name__ == "__main__":
    main()
