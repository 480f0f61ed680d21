"""What the fused 4-bit products' building blocks cost on this CPU, next to vdpbf16ps (AVX512_BF16).

    python benchmarks/cpu_ports.py

Each line times one loop body: 16 independent vdpbf16ps (the multiply-adds a product is made of, on 16
accumulators) plus K copies of one other instruction (independent of them and of each other), written in inline
assembly so the compiler can neither drop nor reorder them. "free" means the extra instructions fit beside the
multiply-adds; otherwise they take issue slots from them. A second table times vdpbf16ps fed by loads: a load per
multiply-add from an L1-resident buffer, or a broadcast operand. This is what the designs in kernels.cpp were chosen
by (docs/kernels.md). Prints cycles per loop at the clock it measures with a dependent-add chain. Needs g++ and a CPU
with AVX512_BF16 and AVX512_VBMI; prints nothing else and writes only to a temporary directory.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

# the other instruction, with {r} the register it writes (and reads, so copies chain only through the register)
OPS = {
    "vpermw (16-bit lookup)": "vpermw %%zmm26, {r}, {r}",
    "vpermb (byte lookup)": "vpermb %%zmm26, {r}, {r}",
    "vpshufb": "vpshufb %%zmm26, {r}, {r}",
    "vpermt2b (two-source bytes)": "vpermt2b %%zmm27, %%zmm26, {r}",
    "vpermps": "vpermps %%zmm26, {r}, {r}",
    "vpmovzxbw (bytes to words)": "vpmovzxbw %%ymm27, {r}",
    "vpunpcklbw": "vpunpcklbw %%zmm26, {r}, {r}",
    "vpsrlw": "vpsrlw $4, {r}, {r}",
    "vpternlogd": "vpternlogd $0xEA, %%zmm26, %%zmm27, {r}",
    "vpandd": "vpandd %%zmm26, {r}, {r}",
    "vmulps": "vmulps %%zmm26, {r}, {r}",
    "vcvtne2ps2bf16": "vcvtne2ps2bf16 %%zmm26, %%zmm27, {r}",
    "vbroadcastss from memory": "vbroadcastss (%[p]), {r}",
    "vmovdqu64 load": "vmovdqu64 64(%[p]), {r}",
    "vmovdqu64 store": "vmovdqu64 {r}, 128(%[p])",
}
COUNTS = (4, 8, 16)
CLOBBER = ",".join(f'"xmm{i}"' for i in range(28))


def dp(acc: int, a: str = "%%zmm16", b: str = "%%zmm17") -> str:
    return f'"vdpbf16ps {b}, {a}, %%zmm{acc}\\n\\t"'


def loop(name: str, body: str) -> str:
    return (f"__attribute__((noinline)) void {name}(long n, const char* p) {{\n"
            f"  for (long i = 0; i < n; ++i) asm volatile({body} : : [p] \"r\"(p + (i & 63) * 64) : \"memory\", "
            f"{CLOBBER});\n}}\n")  # fmt: skip


def source() -> tuple[str, list[tuple[str, str, int]]]:
    parts = ["#include <chrono>\n#include <cstdio>\n#include <cstdlib>\n#include <cstring>\n",
             "static double now() { return std::chrono::duration<double>("
             "std::chrono::steady_clock::now().time_since_epoch()).count(); }\n"]  # fmt: skip
    # the clock: a chain of dependent integer adds runs at one per cycle
    parts.append('__attribute__((noinline)) void chain(long n) { long x = 0; for (long i = 0; i < n; ++i) '
                 'asm volatile("add $1, %0\\n\\tadd $1, %0\\n\\tadd $1, %0\\n\\tadd $1, %0" : "+r"(x)); }\n')  # fmt: skip
    regs = [f"%%zmm{18 + i}" for i in range(8)]
    cases = [("base", "vdpbf16ps only", 0)]
    parts.append(loop("base", "".join(dp(i) for i in range(16))))
    for k, (label, op) in enumerate(OPS.items()):
        for count in COUNTS:
            name = f"op{k}_{count}"
            body = "".join(dp(i) for i in range(16)) + "".join(f'"{op.format(r=regs[j % 8])}\\n\\t"'
                                                               for j in range(count))  # fmt: skip
            parts.append(loop(name, body))
            cases.append((name, label, count))
    # vdpbf16ps fed by loads: each multiply-add's second operand a fresh load from a 4 KiB window (one per 64 bytes),
    # or an embedded 32-bit broadcast
    loads = "".join(f'"vmovdqu64 {64 * i}(%[p]), %%zmm{18 + i % 8}\\n\\t"' + dp(i, f"%%zmm{18 + i % 8}")
                    for i in range(16))  # fmt: skip
    parts.append(loop("loads", loads))
    bcast = "".join(f'"vdpbf16ps {4 * i}(%[p])%{{1to16%}}, %%zmm17, %%zmm{i}\\n\\t"' for i in range(16))
    parts.append(loop("bcast", bcast))
    cases += [("loads", "a 64-byte load per vdpbf16ps", -1), ("bcast", "a broadcast operand per vdpbf16ps", -1)]
    parts.append("int main() {\n  char* p = (char*)aligned_alloc(64, 8192); memset(p, 1, 8192);\n"
                 "  const long n = 2000000; chain(n / 10); double t0 = now(); chain(n); "
                 "const double ghz = 4.0 * n / (now() - t0) / 1e9;\n"
                 '  printf("clock %.2f GHz\\n", ghz);\n')  # fmt: skip
    for name, label, count in cases:
        parts.append(f'  {{ {name}(n / 10, p); double t = now(); {name}(n, p); t = now() - t; '
                     f'printf("%s|%d|%.2f\\n", "{label}", {count}, t * ghz * 1e9 / n); }}\n')  # fmt: skip
    parts.append("}\n")
    return "".join(parts), cases


def main() -> None:
    code, _ = source()
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "ports.cpp", Path(tmp) / "ports"
        src.write_text(code)
        built = subprocess.run(["g++", "-O2", "-mavx512f", "-mavx512bw", "-mavx512vbmi", "-mavx512bf16", str(src),
                                "-o", str(exe)], capture_output=True, text=True)  # fmt: skip
        if built.returncode != 0:
            sys.exit(f"cpu_ports.py: g++ could not build the probe: {built.stderr.strip().splitlines()[-1]}")
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    print(out[0])
    rows = [line.split("|") for line in out[1:]]
    base = float(rows[0][2])
    print(f"16 vdpbf16ps alone: {base:.1f} cycles per loop (2 per cycle would be 8.0)\n")
    print("| with K of | K=4 | K=8 | K=16 | cycles a copy takes from the multiply-adds (K=16) |")
    print("|---|---|---|---|---|")
    by_label: dict[str, dict[int, float]] = {}
    for label, count, cycles in rows[1:]:
        by_label.setdefault(label, {})[int(count)] = float(cycles)
    for label, got in by_label.items():
        if -1 in got:
            continue
        cells = " | ".join(f"{got[c]:.1f}" for c in COUNTS)
        print(f"| {label} | {cells} | {max(0.0, got[16] - base) / 16:.2f} |")
    print()
    for label, got in by_label.items():
        if -1 in got:
            print(f"16 vdpbf16ps with {label}: {got[-1]:.1f} cycles ({base / got[-1]:.0%} of their rate alone)")


if __name__ == "__main__":
    main()
