"""The native kernels against the pure-torch ones (bytes) and a float64 reference (products)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from product_reference import g_w_folds, g_w_reference

import fourbit
from fourbit.quant import native, torch_kernels, use_kernels
from fourbit.quant.matmul import FUSED_MAX_ROWS, linear_4bit, linear_4bit_t

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.build_error()}")


def test_builds_and_dispatches():
    assert native.cpu_path() in ("avx512-amx", "avx512-bf16", "avx512", "avx2", "scalar")


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 2000),
    blocksize=st.sampled_from([32, 64, 128, 256]),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    data=st.data(),
)
def test_dequantize_any_range_equals_torch(n, blocksize, double_quant, dtype, data):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    q = fourbit.quantize_4bit(w, "nf4", blocksize, double_quant)
    start = data.draw(st.integers(0, n - 1))
    end = data.draw(st.integers(start + 1, n))
    ours = native.dequantize(q, dtype, start, end)
    ref = torch_kernels.dequantize(q, dtype, start, end)
    assert torch.equal(ours, ref)
    buf = torch.full((end - start + 5,), 7.0, dtype=dtype)
    assert torch.equal(native.dequantize(q, dtype, start, end, out=buf), ref)


@pytest.mark.parametrize("shape", [(64, 128), (130, 96), (7, 33), (1, 1), (3, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_equals_torch(shape, dtype):
    w = (torch.randn(shape) * 0.05).to(dtype)
    for quant_type in ("nf4", "fp4"):
        with use_kernels("native"):
            a = fourbit.quantize_4bit(w, quant_type)
        with use_kernels("torch"):
            b = fourbit.quantize_4bit(w, quant_type)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
        assert torch.equal(a.nested_absmax, b.nested_absmax) and a.nested_offset == b.nested_offset


def _check_products(q, n, k, act_dtype, rows):
    w = q.dequantize(torch.float64)
    # bf16 activations multiply weights rounded to bf16 (as dequantize-to-bf16 gives), and every output is rounded to
    # the activation dtype: half-precision results agree to about 1e-2 of the largest output; fp32 ones to 1e-5
    tol = 1e-5 if act_dtype == torch.float32 else 2e-2
    for m in rows:
        x = torch.randn(m, k).to(act_dtype)
        g = torch.randn(m, n).to(act_dtype)
        y, gx = linear_4bit(x, q), linear_4bit_t(g, q)
        assert y.dtype == gx.dtype == act_dtype
        want_y, want_gx = x.double() @ w.t(), g.double() @ w
        assert ((y.double() - want_y).abs().max() / want_y.abs().max()) < tol, m
        assert ((gx.double() - want_gx).abs().max() / want_gx.abs().max()) < tol, m


ALL_ROWS = list(range(1, FUSED_MAX_ROWS + 2)) + [40]  # every fused row count, then the tiled path


# 96: K a multiple of 32 but not 64 (the bf16 path needs 64: fp32 path); 100 and 33: not a multiple of 32 (tiled)
@pytest.mark.parametrize("k", [64, 96, 576, 100, 33])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_products_match_float64(k, double_quant, act_dtype):
    torch.manual_seed(k)
    n = 80
    q = fourbit.quantize_4bit(torch.randn(n, k), "nf4", 64, double_quant)
    _check_products(q, n, k, act_dtype, ALL_ROWS)


# blocksizes from 32 (half a bf16 step: fp32 path) to larger than a row (a block spans rows); FP4; an odd N (the bf16
# g @ W pairs rows of W: fp32 path)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [48, 37])
def test_products_any_blocksize(blocksize, quant_type, act_dtype, n):
    torch.manual_seed(blocksize + n)
    k = 192
    q = fourbit.quantize_4bit(torch.randn(n, k) * 3, quant_type, blocksize, blocksize != 128)
    _check_products(q, n, k, act_dtype, [1, 2, 3, 5, 8, 9, 16])


@pytest.mark.parametrize("n", [200, 600])
def test_products_long_rows_many_outputs(n):
    """K large enough that x is walked in slices and N spanning several row tiles (g @ W takes 256 rows at a time
    from 5 rows of g up) and both threads' ranges."""
    torch.manual_seed(n)
    k = 2304
    q = fourbit.quantize_4bit(torch.randn(n, k), "nf4", 64, True)
    for act_dtype in (torch.float32, torch.bfloat16):
        _check_products(q, n, k, act_dtype, [1, 2, 4, 7, 9, 16])


@pytest.mark.parametrize("rows", [3, 13, 16])  # 13, 16: x @ W^T with the rows of x in the vector lanes
# blocks of 64 with double quant have their own instantiation of each product; the others take the general one
@pytest.mark.parametrize("blocksize, double_quant", [(64, True), (64, False), (128, True)])
def test_bf16_product_is_dequantize_then_bf16_matmul(rows, blocksize, double_quant):
    """The bf16 path multiplies exactly the bf16 weights dequantize gives, accumulating in fp32 (g @ W with up to 4
    rows of g: the code table times g with the scales folded in, see g_w_reference)."""
    torch.manual_seed(2)
    n, k = 72, 320  # x @ W^T in the lanes: 4 blocks of 16 rows of W, then 8 rows over the other path
    q = fourbit.quantize_4bit(torch.randn(n, k), "nf4", blocksize, double_quant)
    wb = q.dequantize(torch.bfloat16).double()
    x = torch.randn(rows, k).bfloat16()
    g = torch.randn(rows, n).bfloat16()
    torch.testing.assert_close(linear_4bit(x, q), (x.double() @ wb.t()).bfloat16(), rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(linear_4bit_t(g, q), g_w_reference(g, q).bfloat16(), rtol=8e-3, atol=1e-6)


# one row of bf16 x has its own walk, which looks the rows' scales up first, 16 blocks at a time: k = 320 gives rows of
# 5 blocks, so runs of 16 start anywhere in a group of 256 and cross into the next one; 8256 = two slices of x, the
# second of one step; 37 rows leave one row past the groups of 4; 9 rows of x put the ninth through it too
@pytest.mark.parametrize("n, k", [(96, 320), (37, 8256), (8, 576)])
@pytest.mark.parametrize("blocksize, double_quant", [(64, True), (64, False), (128, True)])
@pytest.mark.parametrize("rows", [1, 9])
def test_one_row_of_bf16_x_multiplies_dequantized_weights(n, k, blocksize, double_quant, rows):
    torch.manual_seed(n + k)
    # each group of 256 blocks (about 51 rows at k = 320) gets a different maximum, 2**0 .. 2**3 times, so a scale
    # taken from the wrong group is far off
    magnitude = 2.0 ** (torch.arange(n) * k // (256 * blocksize) % 4)
    q = fourbit.quantize_4bit(torch.randn(n, k) * magnitude[:, None], "nf4", blocksize, double_quant)
    wb = q.dequantize(torch.bfloat16).double()
    x = torch.randn(rows, k).bfloat16()
    torch.testing.assert_close(linear_4bit(x, q), (x.double() @ wb.t()).bfloat16(), rtol=8e-3, atol=1e-6)


# g @ W with up to 4 rows of bf16 g folds each block's scale into g, a tile of rows at a time, its scales looked up
# first in one run over its rows: 130 rows are two tiles of 64 and a pair; k = 512 (256 columns per pass at one row),
# 384 (a multiple of 128: 128 columns per pass up to 2 rows) and 320 (64 per pass); each group of 256 blocks with its
# own maximum, as above, so a scale taken from the wrong group, row or step is far off
@pytest.mark.parametrize("k", [512, 384, 320])
@pytest.mark.parametrize("blocksize, double_quant", [(64, True), (64, False), (128, True)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_few_rows_of_bf16_g_fold_the_scales_into_g(k, blocksize, double_quant, rows):
    torch.manual_seed(k + rows)
    n = 130
    magnitude = 2.0 ** (torch.arange(n) * k // (256 * blocksize) % 4)
    q = fourbit.quantize_4bit(torch.randn(n, k) * magnitude[:, None], "nf4", blocksize, double_quant)
    g = torch.randn(rows, n).bfloat16()
    if native.cpu_path() in ("avx512-bf16", "avx512-amx"):
        assert g_w_folds(rows, q)
    torch.testing.assert_close(linear_4bit_t(g, q), g_w_reference(g, q).bfloat16(), rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("n, k", [(96, 320), (160, 2304), (48, 128)])  # 48: x @ W^T on the tiles, g @ W not
@pytest.mark.parametrize("blocksize, double_quant", [(64, True), (64, False), (128, True), (256, False)])
def test_tile_unit_products(n, k, blocksize, double_quant):
    """Shapes the AMX path takes where the CPU has it (rows of W in groups of 16, 32 for g @ W; K % 64 == 0), from 2
    rows up; elsewhere the vdpbf16ps path. Either way: dequantize's bf16 weights times bf16 activations, fp32 sums."""
    torch.manual_seed(n + blocksize)
    q = fourbit.quantize_4bit(torch.randn(n, k), "nf4", blocksize, double_quant)
    wb = q.dequantize(torch.bfloat16).double()
    for rows in (2, 5, 8, 9, 16):
        x, g = torch.randn(rows, k).bfloat16(), torch.randn(rows, n).bfloat16()
        torch.testing.assert_close(linear_4bit(x, q), (x.double() @ wb.t()).bfloat16(), rtol=8e-3, atol=1e-6)
        torch.testing.assert_close(linear_4bit_t(g, q), g_w_reference(g, q).bfloat16(), rtol=8e-3, atol=1e-6)


TESTS = os.path.dirname(os.path.abspath(__file__))  # product_reference, for the forced-path checks
_PATH_CHECK = """
import sys
import torch, fourbit
from fourbit.quant import native, torch_kernels, use_kernels
from fourbit.quant.matmul import linear_4bit, linear_4bit_t
assert native.cpu_path() == "{path}", native.cpu_path()
torch.manual_seed(0)
for n, k, bs in ((48, 192, 64), (37, 96, 32), (20, 128, 4096), (160, 2304, 64)):  # the last: K slices, row tiles
    w = torch.randn(n, k)
    with use_kernels("native"):
        q = fourbit.quantize_4bit(w, "nf4", bs, True)
    with use_kernels("torch"):
        r = fourbit.quantize_4bit(w, "nf4", bs, True)
    assert torch.equal(q.packed, r.packed) and torch.equal(q.absmax, r.absmax)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(native.dequantize(q, dtype, 3, n * k - 5), torch_kernels.dequantize(q, dtype, 3, n * k - 5))
    wd = q.dequantize(torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for m in (1, 3, 9, 16):
            x, g = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
            want_y, want_gx = x.double() @ wd.t(), g.double() @ wd
            y, gx = linear_4bit(x, q).double(), linear_4bit_t(g, q).double()
            assert (y - want_y).abs().max() / want_y.abs().max() < tol, (m, dtype)
            assert (gx - want_gx).abs().max() / want_gx.abs().max() < tol, (m, dtype)
# bf16 activations multiply exactly dequantize's bf16 weights on every path: with small-integer activations the fp32
# sums are exact, so the result is the exact product rounded once to the output dtype. Where g @ W folds the scales
# into g (bf16 paths, up to 4 rows of g), it agrees with that reference as the other tests check it.
sys.path.insert(0, {tests!r})
from product_reference import g_w_folds, g_w_reference
for n, k, bs in ((64, 96, 64), (64, 128, 64), (64, 128, 32)):  # K = 96 and blocks of 32: fp32 paths on bf16 CPUs
    q = fourbit.quantize_4bit(torch.randn(n, k), "nf4", bs, False)
    wb = q.dequantize(torch.bfloat16).double()
    for m in (1, 2, 9):
        x, g = torch.randint(-3, 4, (m, k)).bfloat16(), torch.randint(-3, 4, (m, n)).bfloat16()
        y, gx = linear_4bit(x, q), linear_4bit_t(g, q)
        assert torch.equal(y, (x.double() @ wb.t()).to(y.dtype)), (n, k, bs, m)
        if g_w_folds(m, q):
            torch.testing.assert_close(gx, g_w_reference(g, q).bfloat16(), rtol=8e-3, atol=1e-6)
        else:
            assert torch.equal(gx, (g.double() @ wb).to(gx.dtype)), (n, k, bs, m)
print("ok")
"""


def test_bf16_activations_multiply_dequantized_bf16_weights_here():
    """The forced-path check (quantize, dequantize, the products, bf16 exactness) on this CPU's own path."""
    done = subprocess.run([sys.executable, "-c", _PATH_CHECK.format(path=native.cpu_path(), tests=TESTS)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512", "avx512-bf16"])
def test_every_cpu_path(path):
    """The portable path, AVX2, the AVX-512 one without BF16/VBMI and, on a CPU with AMX, the vdpbf16ps one, forced
    on this CPU (in a fresh process: the choice is made once per process)."""
    order = ["scalar", "avx2", "avx512", "avx512-bf16", "avx512-amx"]
    if path == native.cpu_path():
        pytest.skip("the default path here, which the other tests run")
    if order.index(path) > order.index(native.cpu_path()):
        pytest.skip(f"this CPU has no {path}")
    env = {**os.environ, "FOURBIT_CPU_PATH": path}
    done = subprocess.run([sys.executable, "-c", _PATH_CHECK.format(path=path, tests=TESTS)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_zero_gradient_rows_are_skipped_correctly():
    q = fourbit.quantize_4bit(torch.randn(64, 128))
    g = torch.zeros(4, 64)
    g[2, 5] = 1.0
    torch.testing.assert_close(linear_4bit_t(g, q), g @ q.dequantize(torch.float32))


def test_non_finite_named():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    w[2, 10] = float("nan")
    with use_kernels("native"), pytest.raises(ValueError, match="flat index 138"):
        fourbit.quantize_4bit(w)


def test_pooled_allocator_reuses_freed_large_tensors():
    big = 1 << 20  # 4 MiB of fp32: pooled; 256 floats: left to c10's allocator
    assert native.pool_stats()["installed"] == 0
    with native.pooled_allocator(16 << 20) as pooled:
        assert pooled and native.pool_stats()["installed"] == 1
        with native.pooled_allocator(1 << 20) as inner:  # nested: the outer pool stays in force
            assert inner
        assert native.pool_stats()["installed"] == 1
        a = torch.full((big,), 3.0)
        ptr, before = a.data_ptr(), native.pool_stats()
        assert before["live"] >= a.nbytes
        del a
        assert native.pool_stats()["cached"] >= big * 4
        b = torch.empty(big - 100)  # same size class: the freed mapping comes back, no new one
        assert b.data_ptr() == ptr and native.pool_stats()["hits"] == before["hits"] + 1
        live = native.pool_stats()["live"]
        small = torch.ones(256)
        assert native.pool_stats()["live"] == live
        x, w = torch.randn(64, 4096), torch.randn(4096, 512)
        inside = x @ w
        too_big = torch.empty(8 << 20)  # 32 MiB > the cap: unmapped when freed, not cached
        del too_big
        assert native.pool_stats()["cached"] <= 16 << 20
        kept = torch.arange(big, dtype=torch.float32)  # outlives the block
        onednn = torch.randn(1024, 1024).to_mkldnn()  # ideep frees through whichever allocator is current then
    assert native.pool_stats()["installed"] == 0 and native.pool_stats()["cached"] == 0
    assert torch.equal(inside, x @ w) and float(small.sum()) == 256 and float(kept[-1]) == big - 1
    del b, kept, onednn  # freed through the pool after it was uninstalled: still cached, within the default cap
    assert 0 < native.pool_stats()["cached"] <= 64 << 20


def test_dequantize_outputs_reuse_freed_pages():
    w = torch.randn(1024, 1024)
    q = fourbit.quantize_4bit(w, "nf4", 64, True)
    first = native.dequantize(q, torch.float32)
    expected, ptr = first.clone(), first.data_ptr()
    del first
    hits = native.pool_stats()["hits"]
    again = native.dequantize(q, torch.float32)  # the pool's, pooled installed or not
    assert again.data_ptr() == ptr and native.pool_stats()["hits"] == hits + 1
    assert torch.equal(again, expected) and torch.equal(expected, torch_kernels.dequantize(q, torch.float32))


@pytest.mark.skipif(not native.decode_attention_ok(), reason="decode attention needs AVX-512")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 3, 3, 64, 100), (1, 4, 1, 128, 17), (2, 2, 4, 64, 1), (3, 1, 8, 128, 250)])
def test_decode_attention_matches_float64_sdpa(dtype, shape):
    """One query per row, keys and values a view into a longer cache, with and without a padding mask: as close
    to float64 attention as torch's own sdpa on the same inputs."""
    b, kv, g, d, t = shape
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(b, kv, g, d, generator=gen).to(dtype)
    cache_k, cache_v = (torch.randn(b, kv, t + 30, d, generator=gen).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :t], cache_v[:, :, :t]
    mask = torch.zeros(b, 1, 1, t, dtype=dtype)
    mask[0, ..., : t // 2] = float("-inf")
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              attn_mask=None if m is None else m.double(), scale=d**-0.5)  # fmt: skip
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=d**-0.5)
        got = native.decode_attention(q, k, v, m, d**-0.5)
        assert got.dtype == dtype and got.shape == q.shape
        bound = 1.5 * (sdpa.double() - want).abs().max().item() + (1e-6 if dtype == torch.float32 else 1e-3)
        assert (got.double() - want).abs().max().item() <= bound
    with pytest.raises(RuntimeError, match="head_dim 64 or 128"):
        native.decode_attention(q[..., :32], k[..., :32], v[..., :32], None, 1.0)


def test_tiled_bf16_gradient_sums_tiles_in_fp32():
    """g @ W over several tiles of W (M > FUSED_MAX_ROWS) with bf16 g: each tile's product is rounded to bf16 once and
    the tiles are summed in fp32 (error 1.4x one bf16 matmul over the whole W here; a bf16 running sum, rounded once
    per tile, gave 2.1x)."""
    from fourbit.quant.matmul import _row_tiles

    torch.manual_seed(0)
    n, k = 8192, 4096
    q = fourbit.quantize_4bit(torch.randn(n, k, dtype=torch.bfloat16), "nf4", 64, True)
    assert len(_row_tiles(q)) == 8
    g = torch.randn(FUSED_MAX_ROWS + 8, n).bfloat16()
    wb = q.dequantize(torch.bfloat16)
    exact = g.double() @ wb.double()

    def error(y):
        return ((y.double() - exact).norm() / exact.norm()).item()

    assert error(linear_4bit_t(g, q)) < 1.6 * error(g @ wb)
