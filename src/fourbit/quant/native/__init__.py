"""Native C++ kernels, built on first use with torch's extension tools into a per-user cache.

The build takes about a minute once (mostly torch's headers); later processes load the cached library in
milliseconds. Vector paths are chosen at run time from the CPU's features (AVX-512, else portable C++), never with
-march=native, since the cached library may be used on another machine. Where no compiler is available, or the
build fails, `available()` is False and fourbit runs its pure-torch kernels, which give identical bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from fourbit.quant import torch_kernels
from fourbit.quant.codes import code_table, dynamic_map, rounding_table
from fourbit.quant.tensor import QuantizedTensor

SOURCES = [Path(__file__).with_name(name) for name in ("kernels.cpp", "dropout.cpp", "attention.cpp", "allocator.cpp")]
# -fopenmp: at::parallel_for is OpenMP in torch's CPU wheels and runs serially in code compiled without it; the
# library then needs libgomp.so.1, which resolves to the copy torch has already loaded (one runtime, one pool)
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_module = None
_error: str | None = None


def _cache_dir() -> Path:
    if os.environ.get("FOURBIT_CACHE"):
        root = Path(os.environ["FOURBIT_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fourbit"
    digest = hashlib.sha256(torch.__version__.encode() + sys.version.encode() + " ".join(CFLAGS + LDFLAGS).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    tag = digest.hexdigest()[:16]
    return root / "kernels" / tag


def _build():
    from torch.utils import cpp_extension

    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the first build instead of racing it
        if not any(build_dir.glob("*.so")):
            print("fourbit: building native kernels (once, about a minute)", file=sys.stderr)
        # compile a copy kept in the cache folder: the build rules then name the same path for every checkout
        # with this source, so a second checkout (or CI's clone) reuses the library instead of rebuilding it
        copies = []
        for original in SOURCES:
            copy = build_dir / original.name
            if not copy.exists() or copy.read_bytes() != original.read_bytes():
                copy.write_bytes(original.read_bytes())
            copies.append(str(copy))
        return cpp_extension.load(
            name="fourbit_kernels",
            sources=copies,
            build_directory=str(build_dir),
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            verbose=False,
        )


def available() -> bool:
    """True when the extension is built (building it on first call); never raises."""
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = _build()
        except Exception as err:  # no compiler, unsupported platform, ...: fall back to pure torch
            _error = f"{type(err).__name__}: {err}".splitlines()[0]
    return _module is not None


def build_error() -> str:
    return _error or ""


def cpu_path() -> str:
    return _module.cpu_path() if available() else "unavailable"


def quantize_blocks(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    midpoints, order = rounding_table(quant_type)
    packed, absmax, bad = _module.quantize(x.contiguous(), blocksize, midpoints, order)
    if int(bad[0]):
        torch_kernels.check_finite(x)  # raises, naming the first bad element
    return packed, absmax


def _scale_args(q: QuantizedTensor) -> tuple:
    if q.nested_absmax is None:
        return q.absmax, None, None, 0.0
    return q.absmax, q.nested_absmax, dynamic_map(), q.nested_offset


def dequantize(q: QuantizedTensor, dtype: torch.dtype, start: int = 0, end: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Decode flat elements [start, end) of q (double quantization decoded inside the kernel), into `out` when
    given (a reused buffer avoids faulting in fresh pages, which costs more than the decode itself)."""
    end = q.numel if end is None else end
    return _module.dequantize(q.packed, *_scale_args(q), code_table(q.quant_type), q.blocksize, start, end, dtype,
                              out)  # fmt: skip


def fused_ok(q: QuantizedTensor) -> bool:
    """The fused products need every 32-element chunk of a row inside one block: K % 32 == 0."""
    return len(q.shape) == 2 and q.shape[1] % 32 == 0


def matmul_nt(x2d: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """x2d [M, K] @ W.T, W decoded on the fly (M <= 16), in x2d's dtype, accumulated in fp32 (bf16 inputs multiply
    bf16 weights where the CPU has AVX512_BF16; fp16 is widened to fp32)."""
    n, k = q.shape
    out = _module.matmul_nt(x2d, q.packed, *_scale_args(q), code_table(q.quant_type), q.blocksize, n, k)
    return out if out.dtype == x2d.dtype else out.to(x2d.dtype)


def matmul_nn(g2d: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """g2d [M, N] @ W, W decoded on the fly (M <= 16), in g2d's dtype, accumulated in fp32."""
    n, k = q.shape
    out = _module.matmul_nn(g2d, q.packed, *_scale_args(q), code_table(q.quant_type), q.blocksize, n, k)
    return out if out.dtype == g2d.dtype else out.to(g2d.dtype)


def dense_ok() -> bool:
    """Whether matmul_dense_nt runs on this CPU (AVX512_BF16)."""
    return available() and _module.dense_ok()


def matmul_dense_nt(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d [M <= 16, K] @ weight.T for bf16 x2d and a dense bf16 weight [N, K] (K % 32 == 0), accumulated in fp32,
    returned in bf16."""
    return _module.matmul_dense_nt(x2d, weight).to(x2d.dtype)


def decode_attention_ok() -> bool:
    """Whether decode_attention runs on this CPU (AVX-512)."""
    return available() and _module.decode_attention_ok()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """softmax(q @ keys^T * scale + mask) @ values for one query position: q [B, KV, G, D] (the G query heads of each
    key head), keys and values [B, KV, T, D] with contiguous rows (a view into a longer cache is fine), an additive
    mask [B or 1, 1, 1, T] or None; D 64 or 128, one dtype (bf16 or fp32), computed in fp32. Returns [B, KV, G, D]."""
    return _module.decode_attention(q, keys, values, mask, scale)


def hash_dropout(x: torch.Tensor, p: float, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x * keep / (1 - p) in `dtype` (default x's), keep a hash of (seed, flat index): the same call on the
    gradient is the backward."""
    if not available():
        raise RuntimeError(f"native kernels unavailable: {build_error()}")
    return _module.hash_dropout(x, p, seed, dtype)


@contextlib.contextmanager
def pooled_allocator(cap_bytes: int = 64 << 20) -> Iterator[bool]:
    """Inside the block, torch's CPU tensors of 128 KiB and more get their own mappings, and freed ones (up to
    `cap_bytes` of them) are reused by the next request of their size class instead of going back to glibc's heap
    (see allocator.cpp: on a training step that heap grows to about twice what is live). Yields whether the pool is
    in use: False without the native kernels, or when some other allocator than c10's default is in force. The
    first use makes the pool torch's CPU allocator for the rest of the process; outside the block it only passes
    requests on to c10's allocation, as the default does. On exit the cache is unmapped. Tensors made inside may
    outlive the block: they are freed through the pool whenever they go."""
    if not available():
        yield False
        return
    if _module.pool_stats()[4]:  # a pool already in force (nested use): it stays as it is
        yield True
        return
    if not _module.pool_install(cap_bytes):
        yield False
        return
    try:
        yield True
    finally:
        _module.pool_uninstall()
        _module.pool_release()


def pool_stats() -> dict[str, int]:
    """The pool's counters: bytes in live pooled tensors, bytes cached for reuse, reuses, fresh mappings, and
    whether it is installed now."""
    if not available():
        return {"live": 0, "cached": 0, "hits": 0, "misses": 0, "installed": 0}
    return dict(zip(("live", "cached", "hits", "misses", "installed"), _module.pool_stats(), strict=True))


def release_pool() -> None:
    """Unmap the pool's cached mappings (the next large allocations fault in fresh pages)."""
    if available():
        _module.pool_release()
