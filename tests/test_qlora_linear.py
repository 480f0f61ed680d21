"""The QLoRA linear layer: outputs and gradients against float64 and against PEFT on bitsandbytes' Linear4bit."""

import math
import warnings

import pytest
import torch
from torch import nn

from fourbit.nn import QLoRALinear
from fourbit.quant import native, use_kernels

KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no native"))]


@pytest.fixture(params=KERNELS)
def kernels(request):
    with use_kernels(request.param):
        yield request.param


def make_layer(out_f=96, in_f=128, bias=True, compute_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    return linear, QLoRALinear.from_linear(linear, compute_dtype=compute_dtype)


def reference(layer: QLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b + sum_i w_i s_i B_i A_i x, in float64, from the layer's own dequantized weight."""
    w = layer.dense_weight(dtype=torch.float64)
    y = x.double() @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    for name, weight in layer.active.items():
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        y = y + weight * layer.lora_settings[name].scaling * (x.double() @ a.t() @ b.t())
    return y


def randomize_b(layer, name, seed=1):
    with torch.no_grad():
        layer.lora_B[name].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))


def test_adapter_starts_as_a_no_op(kernels):
    linear, layer = make_layer()
    x = torch.randn(5, 128)
    base = layer(x)
    layer.add_adapter("a", r=8, alpha=16)
    assert torch.equal(layer(x), base)
    assert layer.lora_A["a"].weight.abs().max() <= 1 / math.sqrt(128) + 1e-6  # Kaiming-uniform(a=sqrt(5))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_float64(kernels, use_rslora):
    _, layer = make_layer()
    layer.add_adapter("a", r=8, alpha=16, use_rslora=use_rslora)
    randomize_b(layer, "a")
    assert layer.lora_settings["a"].scaling == (16 / math.sqrt(8) if use_rslora else 2.0)
    for m in (1, 7, 40):
        x = torch.randn(m, 128)
        torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_several_adapters_and_weights(kernels):
    _, layer = make_layer()
    for i, name in enumerate("abc"):
        layer.add_adapter(name, r=4 + i, alpha=8)
        randomize_b(layer, name, seed=i)
    x = torch.randn(3, 2, 128)
    for spec in (["a", "b"], {"a": 0.3, "c": -1.5}, "b", None):
        layer.set_active(spec)
        torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        layer.set_active("zzz")


def test_bf16_compute(kernels):
    _, layer = make_layer(compute_dtype=torch.bfloat16)
    layer.add_adapter("a", r=8, alpha=16)
    randomize_b(layer, "a")
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = reference(layer, x)
    assert (y.double() - ref).abs().max() / ref.abs().max() < 2e-2


@pytest.mark.parametrize("m", [1, 5, 33])
def test_gradients_match_float64(kernels, m):
    _, layer = make_layer()
    layer.add_adapter("a", r=8, alpha=16, dropout=0.0)
    randomize_b(layer, "a")
    x = torch.randn(m, 128, requires_grad=True)
    g = torch.randn(m, 96)
    layer(x).backward(g)
    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_A["a"].weight.detach().double().requires_grad_()
    b64 = layer.lora_B["a"].weight.detach().double().requires_grad_()
    w64 = layer.dense_weight(dtype=torch.float64)
    y64 = x64 @ w64.t() + layer.bias.double() + 2.0 * (x64 @ a64.t() @ b64.t())
    y64.backward(g.double())
    for got, want in ((x.grad, x64.grad), (layer.lora_A["a"].weight.grad, a64.grad),
                      (layer.lora_B["a"].weight.grad, b64.grad)):  # fmt: skip
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for buf in (layer.weight_packed, layer.weight_absmax, layer.weight_nested_absmax):
        assert buf.grad is None and not buf.requires_grad
    assert not layer.bias.requires_grad


def test_no_input_grad_skips_backward_product(kernels):
    _, layer = make_layer()
    layer.add_adapter("a", r=4, alpha=8)
    x = torch.randn(4, 128)  # no grad wanted for x: only the adapter's parameters get gradients
    layer(x).sum().backward()
    assert layer.lora_B["a"].weight.grad is not None


def test_matches_peft_on_bitsandbytes_linear4bit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    bnb_linear = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                                   quant_type="nf4", quant_storage=torch.uint8)  # fmt: skip
    bnb_linear.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True, blocksize=64)  # fmt: skip
    bnb_linear.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    bnb_linear._quantize_if_needed = None
    holder = nn.Sequential()
    holder.add_module("proj", bnb_linear)
    holder = holder.to("cpu")  # quantizes the Params4bit
    layer = QLoRALinear.from_linear(linear, compute_dtype=torch.float32)
    # the same bytes, compared before any bitsandbytes forward (a CPU forward in eval mode repacks its weight)
    assert torch.equal(layer.weight_packed, bnb_linear.weight.data.reshape(-1))
    assert torch.equal(layer.weight_absmax, bnb_linear.weight.quant_state.absmax)

    peft_model = get_peft_model(holder, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    peft_model.train()
    layer.add_adapter("default", r=8, alpha=16)
    with torch.no_grad():
        peft_lin = peft_model.base_model.model.proj
        layer.lora_A["default"].weight.copy_(peft_lin.lora_A["default"].weight)
        peft_lin.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_B["default"].weight.copy_(peft_lin.lora_B["default"].weight)
    x = torch.randn(6, 128)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = layer(xa), peft_model(xb)
    # bitsandbytes rounds its dequantized weight to the stored dtype (fp32 here) before the matmul, as we do
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, peft_lin.lora_A["default"].weight.grad,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, peft_lin.lora_B["default"].weight.grad,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def _tensors_kept_by_graph(root) -> list[torch.Tensor]:
    """Every tensor an autograd graph holds: saved tensors of each node, and what custom functions keep on ctx."""
    seen, stack, kept = set(), [root], []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                value = getattr(fn, attr, None)
                kept += [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor)]
        for value in getattr(fn, "saved_tensors", ()) or ():
            if isinstance(value, torch.Tensor):
                kept.append(value)
        q = getattr(fn, "q", None)  # our Linear4bitFunction keeps a reference to the 4-bit weight
        if q is not None:
            kept += [t for t in (q.packed, q.absmax, q.nested_absmax) if t is not None]
        stack += [f for f, _ in fn.next_functions]
    return kept


def test_no_dense_weight_survives_forward(kernels):
    out_f, in_f = 173, 256  # a distinctive size: out*in appears nowhere else
    _, layer = make_layer(out_f, in_f)
    layer.add_adapter("a", r=4, alpha=8)
    x = torch.randn(32, in_f, requires_grad=True)  # large enough for the tiled (dequantize-then-matmul) path
    y = layer(x)
    kept = _tensors_kept_by_graph(y.grad_fn)
    kept += list(layer.parameters()) + list(layer.buffers())
    assert kept, "the walk found nothing: it would prove nothing"
    dense = out_f * in_f
    assert not [t for t in kept if t.numel() == dense], "a dense copy of W is kept alive"
    assert max(t.numel() for t in kept if t.dtype == torch.uint8) == (dense + 1) // 2  # only the packed codes


def test_from_linear_round_trip(kernels):
    linear, layer = make_layer()
    w = layer.dense_weight()
    assert w.dtype == torch.float32 and w.shape == linear.weight.shape
    assert (w - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()  # NF4: half the widest code gap
    back = layer.to_linear()
    x = torch.randn(4, 128)
    torch.testing.assert_close(back(x), layer(x), rtol=1e-5, atol=1e-5)
    layer.add_adapter("a", r=4, alpha=8)
    randomize_b(layer, "a")
    merged = layer.dense_weight(merge_adapters=True, dtype=torch.float64)
    delta = layer.lora_B["a"].weight.double() @ layer.lora_A["a"].weight.double() * 2.0
    torch.testing.assert_close(merged, layer.dense_weight(dtype=torch.float64) + delta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.to_linear(merge_adapters=True)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_adapter_added_in_eval_mode_does_not_drop(kernels):
    _, layer = make_layer()
    layer.eval()
    layer.add_adapter("a", r=4, alpha=8, dropout=0.5)
    randomize_b(layer, "a")
    x = torch.randn(8, 128)
    assert torch.equal(layer(x), layer(x))  # deterministic: dropout is off in eval mode
    layer.train()
    assert not torch.equal(layer(x), layer(x))
