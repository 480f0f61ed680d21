"""quantize_4bit / dequantize_4bit against bitsandbytes, byte for byte, on both kernel paths."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fourbit
from fourbit.quant import codes, native, use_kernels

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnb_f

KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no native"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=KERNELS)
def kernels(request):
    with use_kernels(request.param):
        yield request.param


def assert_same_as_bnb(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> None:
    packed, state = bnb_f.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    q = fourbit.quantize_4bit(w, quant_type, blocksize, double_quant)
    assert torch.equal(q.packed, packed.reshape(-1)), "packed codes differ"
    assert q.absmax.dtype == state.absmax.dtype
    assert torch.equal(q.absmax, state.absmax), "block maxima differ"
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert q.nested_offset == float(state.offset)
    ours, theirs = q.dequantize(), bnb_f.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == w.dtype
    assert ours.shape == w.shape
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1)), "values differ"


@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (576, 576), (3, 100), (7, 9), (1, 63), (5,), (1536, 576), (2, 3, 70)])
def test_random_matches_bnb(kernels, shape, dtype, double_quant, quant_type):
    torch.manual_seed(sum(shape))
    assert_same_as_bnb(torch.randn(shape, dtype=dtype), quant_type, 64, double_quant)


@pytest.mark.parametrize("blocksize", codes.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
def test_every_blocksize_matches_bnb(kernels, blocksize, quant_type):
    torch.manual_seed(blocksize)
    for n in (blocksize * 3, blocksize * 2 + 7, 5000):
        assert_same_as_bnb(torch.randn(n) * 0.02, quant_type, blocksize, double_quant=True)


def _tie_block(quant_type: str, absmax: float) -> torch.Tensor:
    # Every midpoint between two codes, times a power-of-two absmax, so the scaled value lands exactly on it.
    midpoints, _ = codes.rounding_table(quant_type)
    ties = torch.cat([midpoints, torch.nextafter(midpoints, torch.tensor(2.0)), -midpoints])
    block = torch.cat([torch.tensor([1.0]), ties])
    return torch.nn.functional.pad(block, (0, 64 - block.numel())) * absmax


@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_adversarial_matches_bnb(kernels, quant_type, double_quant):
    blocks = [
        _tie_block(quant_type, 1.0),
        _tie_block(quant_type, 0.25),
        torch.zeros(64),  # all-zero block
        -torch.zeros(64),
        torch.full((64,), 3e38),  # huge but finite
        torch.linspace(-1, 1, 64) * 3e38,
        torch.linspace(-1e-30, 1e-30, 64),  # tiny
        torch.full((64,), 1e-40),  # denormal, below the 1e-38 clamp
        torch.full((64,), 0.5),  # constant block
        torch.randn(64) * 1e4,
        torch.randn(37),  # partial last block
    ]
    w = torch.cat(blocks)
    if double_quant:  # the mean of maxima near fp32's limit overflows: bitsandbytes silently decodes NaN
        with pytest.raises(ValueError, match="overflow fp32 in double quantization"):
            fourbit.quantize_4bit(w, quant_type, 64, double_quant)
        w = torch.cat(blocks[:4] + blocks[6:])
    assert_same_as_bnb(w, quant_type, 64, double_quant)
    # in 16-bit too, wherever the values are representable
    assert_same_as_bnb(torch.cat(blocks[:4] + blocks[8:]).bfloat16(), quant_type, 64, double_quant)


def test_constant_tensor_double_quant_matches_bnb(kernels):
    # all block maxima equal: the centred maxima are all zero, so the nested max is zero
    assert_same_as_bnb(torch.full((256, 64), 0.3), "nf4", 64, double_quant=True)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    scale=st.sampled_from([1e-6, 0.02, 1.0, 1e3]),
    blocksize=st.sampled_from(codes.BLOCKSIZES),
    quant_type=st.sampled_from(codes.QUANT_TYPES),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_bnb(n, scale, blocksize, quant_type, double_quant, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * scale
    for choice in ["torch"] + (["native"] if native.available() else []):
        with use_kernels(choice):
            assert_same_as_bnb(w, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_an_error(kernels, bad):
    w = torch.randn(10, 64)
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf .*index 197"):
        fourbit.quantize_4bit(w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="quant_type"):
        fourbit.quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        fourbit.quantize_4bit(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        fourbit.quantize_4bit(torch.ones(64, dtype=torch.int32))


def test_dequantize_to_other_dtype_is_one_rounding(kernels):
    w = torch.randn(300, 70, dtype=torch.bfloat16)
    q = fourbit.quantize_4bit(w)
    exact = fourbit.dequantize_4bit(q, torch.float32)
    assert torch.equal(fourbit.dequantize_4bit(q, torch.float16), exact.half())
    assert torch.equal(q.dequantize(), exact.bfloat16())


@pytest.mark.parametrize("double_quant, bits", [(False, 4.5), (True, 4.127)])
def test_storage_accounting(double_quant, bits):
    # The QLoRA paper: 32-bit scales per 64 weights add 0.5 bit; double quantization makes it 8/64 + 32/(64*256).
    w = torch.randn(4096, 1024, dtype=torch.bfloat16)
    q = fourbit.quantize_4bit(w, double_quant=double_quant)
    held = q.packed.untyped_storage().nbytes() + q.absmax.untyped_storage().nbytes()
    if double_quant:
        held += q.nested_absmax.untyped_storage().nbytes() + 4  # + the fp32 offset
        assert q.absmax.dtype == torch.uint8
    assert held == q.nbytes
    assert q.bits_per_param == pytest.approx(bits, abs=5e-4)
    assert q.nbytes < w.numel() * w.element_size() * bits / 16 * 1.001


def test_nf4_table_is_bnb_table():
    assert codes.code_table("nf4").tolist() == bnb_f.get_4bit_type("nf4", device="cpu").tolist()
    assert torch.equal(codes.code_table("fp4"), bnb_f.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(codes.dynamic_map(), bnb_f.create_dynamic_map())


def test_error_is_small():
    # NF4 on normal weights: mean abs error about 0.07 of the block max (sanity check on scale handling)
    w = torch.randn(256, 256)
    err = (fourbit.quantize_4bit(w).dequantize() - w).abs().mean() / w.abs().max()
    assert err < 0.03
    assert math.isfinite(float(err))
