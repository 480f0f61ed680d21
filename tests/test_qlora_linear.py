"""The QLoRA linear layer: outputs and gradients against float64 and against PEFT on bitsandbytes' Linear4bit, what
the autograd graph keeps alive, per-row adapter routing, and the dense round trip."""

import contextlib
import dataclasses
import gc
import math
import warnings

import pytest
import torch
from torch import nn

from fourbit.nn import QLoRALinear, adapter_routing, qlora_layers
from fourbit.nn import qlora_linear as qlora_module
from fourbit.quant import QuantizedTensor, matmul, native, use_kernels

KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no native"))]
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(params=KERNELS)
def kernels(request):
    with use_kernels(request.param):
        yield request.param


def make_layer(out_f=96, in_f=128, bias=True, compute_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    return linear, QLoRALinear.from_linear(linear, compute_dtype=compute_dtype)


def reference(layer: QLoRALinear, x: torch.Tensor, w_dtype=torch.float32) -> torch.Tensor:
    """y = x W^T + b + sum_i w_i s_i B_i A_i x in float64, from the layer's own dequantized weight (decoded in
    `w_dtype`, as the layer decodes it into its compute dtype)."""
    w = layer.dense_weight(dtype=w_dtype).double()
    x64 = x.double()
    y = x64 @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    for name, weight in layer.adapter_weights.items():
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        y = y + weight * layer.scaling(name) * (x64 @ a.t() @ b.t())
    return y


def randomize_b(layer, name, seed=1):
    with torch.no_grad():
        layer.lora_B[name].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))


def lora_grads(layer):
    return {f"{part}.{name}": getattr(layer, part)[name].weight.grad
            for part in ("lora_A", "lora_B") for name in layer.adapters}  # fmt: skip


# --- 1. forward ---------------------------------------------------------------------------------------------------


def test_adapter_starts_as_a_no_op(kernels):
    linear, layer = make_layer()
    x = torch.randn(5, 128)
    base = layer(x)
    dense = x @ layer.dense_weight().t() + linear.bias
    torch.testing.assert_close(base, dense, rtol=1e-6, atol=1e-6)
    layer.add_adapter("a", r=8, alpha=16)
    assert torch.equal(layer(x), base)
    assert layer.lora_A["a"].weight.abs().max() <= 1 / math.sqrt(128) + 1e-6  # Kaiming-uniform(a=sqrt(5))
    assert layer.lora_A["a"].weight.abs().max() > 0.9 / math.sqrt(128)  # ...and not something narrower
    assert layer.lora_A["a"].weight.dtype == layer.lora_B["a"].weight.dtype == torch.float32
    assert not layer.lora_B["a"].weight.any()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_float64(kernels, use_rslora):
    _, layer = make_layer()
    layer.add_adapter("a", r=8, alpha=16, use_rslora=use_rslora)
    randomize_b(layer, "a")
    assert layer.scaling("a") == (16 / math.sqrt(8) if use_rslora else 2.0)
    for shape in ((1, 128), (7, 128), (40, 128), (2, 3, 128)):  # fused (few rows) and tiled paths, 3-D input
        x = torch.randn(shape)
        y = layer(x)
        assert y.shape == (*shape[:-1], 96) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), reference(layer, x), **TIGHT)


def test_several_adapters_and_weights(kernels):
    _, layer = make_layer()
    for i, name in enumerate("abc"):
        layer.add_adapter(name, r=4 + i, alpha=8, use_rslora=name == "c")
        randomize_b(layer, name, seed=i)
    assert layer.active_adapters == ["a", "b", "c"]  # a new adapter joins the active set
    x = torch.randn(3, 2, 128)
    for spec in (["a", "b"], {"a": 0.3, "c": -1.5}, "b", None):
        layer.set_active(spec)
        torch.testing.assert_close(layer(x).double(), reference(layer, x), **TIGHT)
    layer.set_active({"a": 0.7, "b": 0.3})
    assert layer.active_adapters == ["a", "b"] and layer.adapter_weights == {"a": 0.7, "b": 0.3}
    a_alone, b_alone, base = (layer(x, adapter_ids=[n] * 3) for n in ("a", "b", None))
    # weights summing to 1: the weighted mean of the two adapted outputs, and the base plus the weighted deltas
    torch.testing.assert_close(layer(x), 0.7 * a_alone + 0.3 * b_alone, **TIGHT)
    torch.testing.assert_close(layer(x), base + 0.7 * (a_alone - base) + 0.3 * (b_alone - base), **TIGHT)
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        layer.set_active("zzz")
    layer.delete_adapter("a")
    assert layer.adapters == ["b", "c"] and layer.active_adapters == ["b"]
    assert set(layer.state_dict()) == {"bias", "lora_A.b.weight", "lora_B.b.weight", "lora_A.c.weight",
                                       "lora_B.c.weight"}  # fmt: skip  (PEFT's in-memory key names)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("b")
    with pytest.raises(ValueError, match="no '.'"):
        layer.add_adapter("x.y")
    rep = repr(layer)
    assert "nf4+dq/64" in rep and "b(r=5, alpha=8, active)" in rep and "c(r=6, alpha=8, rslora)" in rep


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_compute(kernels, compute_dtype):
    _, layer = make_layer(compute_dtype=compute_dtype)
    layer.add_adapter("a", r=8, alpha=16)
    randomize_b(layer, "a")
    for x_dtype in (compute_dtype, torch.float32):
        x = torch.randn(6, 128).to(compute_dtype).to(x_dtype)
        y = layer(x)
        assert y.dtype == x_dtype  # the output keeps the input's dtype
        # against float64 on W decoded into the compute dtype: only roundings of the sums remain
        ref = reference(layer, x, w_dtype=compute_dtype)
        torch.testing.assert_close(y.double(), ref, rtol=0.0, atol=2e-2 * ref.abs().max().item())
    # and against the exact fp32 weights it differs only by that rounding of W and of the sums
    ref32 = reference(layer, x)
    assert (y.double() - ref32).abs().max() < 3e-2 * ref32.abs().max()


# --- 2. gradients -------------------------------------------------------------------------------------------------


def test_bf16_compute_trains_fp32_adapters_through_bf16_products(kernels):
    """With bf16 compute the adapter products run in bf16 (fp32 accumulation) while the weights and their gradients
    stay fp32: their gradients are fp32 and match float64 to bf16's precision."""
    _, layer = make_layer(compute_dtype=torch.bfloat16)
    layer.add_adapter("a", r=8, alpha=16)
    randomize_b(layer, "a")
    x = torch.randn(40, 128).to(torch.bfloat16)
    g = torch.randn(40, 96)
    layer(x).float().backward(g)
    a64 = layer.lora_A["a"].weight.detach().double().requires_grad_()
    b64 = layer.lora_B["a"].weight.detach().double().requires_grad_()
    (2.0 * (x.double() @ a64.t() @ b64.t())).backward(g.double())
    for part, want in (("lora_A", a64.grad), ("lora_B", b64.grad)):
        got = getattr(layer, part)["a"].weight.grad
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() < 2e-2 * want.abs().max()


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
        torch.testing.assert_close(got.double(), want, **TIGHT)
    for buf in (layer.weight_packed, layer.weight_absmax, layer.weight_nested_absmax):
        assert buf.grad is None and not buf.requires_grad
    assert not layer.bias.requires_grad and layer.bias.grad is None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.a.weight", "lora_B.a.weight"]


def test_no_input_grad_skips_backward_product(kernels, monkeypatch):
    calls = []

    def counting_linear_4bit_t(g, q):  # the real product, counted
        calls.append(g.shape)
        return matmul.linear_4bit_t(g, q)

    monkeypatch.setattr(qlora_module, "linear_4bit_t", counting_linear_4bit_t)
    _, layer = make_layer()
    layer.add_adapter("a", r=4, alpha=8)
    # no grad wanted for x: only the adapter's weights get one, and the 4-bit product has no backward at all (x is
    # its one differentiable input, so autograd leaves it out of the graph; needs_input_grad guards the rest)
    layer(torch.randn(4, 128)).sum().backward()
    assert layer.lora_B["a"].weight.grad is not None and calls == []
    layer(torch.randn(4, 128, requires_grad=True)).sum().backward()
    assert calls == [torch.Size([4, 96])]


# --- 3. against PEFT on bitsandbytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_on_bitsandbytes_linear4bit(use_rslora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    bnb_linear = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                                   quant_type="nf4", quant_storage=torch.uint8)  # fmt: skip
    bnb_linear.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True, blocksize=64)  # fmt: skip
    bnb_linear.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    holder = nn.Sequential()
    holder.add_module("proj", bnb_linear)
    holder = holder.to("cpu")  # quantizes the Params4bit
    layer = QLoRALinear.from_linear(linear, compute_dtype=torch.float32)
    # the same bytes, compared before any bitsandbytes forward (a CPU forward in eval mode repacks its weight)
    state = bnb_linear.weight.quant_state
    assert torch.equal(layer.weight_packed, bnb_linear.weight.data.reshape(-1))
    assert torch.equal(layer.weight_absmax, state.absmax)
    assert torch.equal(layer.weight_nested_absmax, state.state2.absmax)
    assert layer.weight_4bit.nested_offset == float(state.offset)

    holder.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: PEFT then uses its bnb Linear4bit layer
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], use_rslora=use_rslora)
    peft_model = get_peft_model(holder, config)
    peft_model.train()
    peft_lin = peft_model.base_model.model.proj
    assert isinstance(peft_lin, PeftLinear4bit)
    layer.add_adapter("default", r=8, alpha=16, use_rslora=use_rslora)
    assert layer.scaling("default") == peft_lin.scaling["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(peft_lin.lora_A["default"].weight)
        peft_lin.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_B["default"].weight.copy_(peft_lin.lora_B["default"].weight)
    x = torch.randn(2, 3, 128)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = layer(xa), peft_model(xb)
    # bitsandbytes rounds its dequantized weight to the stored dtype (fp32 here) before the matmul, as we do
    torch.testing.assert_close(ours, theirs, **TIGHT)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TIGHT)
    for part in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(layer, part)["default"].weight.grad,
                                   getattr(peft_lin, part)["default"].weight.grad, **TIGHT)  # fmt: skip


# --- 4. memory ----------------------------------------------------------------------------------------------------


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, QuantizedTensor) or dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors_in(getattr(value, f.name))]
    return []


_NOT_STATE = ("next_functions", "metadata", "saved_variables")  # graph links, hook dicts, a deprecated alias


def _kept_by_graph(root) -> list[torch.Tensor]:
    """Every tensor an autograd graph reaches from `root`: each node's `_saved_*` tensors, and any tensor a custom
    function keeps on its ctx (saved_tensors or a plain attribute)."""
    seen, stack, kept = set(), [root], []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        for attr in dir(fn):
            if attr.startswith("_saved_") or (not attr.startswith("_") and attr not in _NOT_STATE):
                with contextlib.suppress(RuntimeError, AttributeError):
                    kept += _tensors_in(getattr(fn, attr))
        stack += [f for f, _ in fn.next_functions]
    return kept


def _kept_after_forward(module: nn.Module, forward):
    """(output, every tensor the module and the output's graph keep alive): parameters and buffers, what autograd
    packed for backward (saved_tensors_hooks sees every save, custom functions included), and the graph walk."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    kept = packed + _kept_by_graph(y.grad_fn) + list(module.parameters()) + list(module.buffers())
    return y, kept


@pytest.mark.parametrize("m", [4, 32])  # fused kernel (native) and dequantize-a-tile-then-matmul
def test_no_dense_weight_survives_forward(kernels, m):
    out_f, in_f = 173, 256  # a distinctive size: out*in is no other tensor's numel here
    dense = out_f * in_f
    layer = make_layer(out_f, in_f)[1]  # the source nn.Linear is dropped: it would be a dense W kept alive
    layer.add_adapter("a", r=4, alpha=8)
    randomize_b(layer, "a")
    x = torch.randn(m, in_f, requires_grad=True)
    y, kept = _kept_after_forward(layer, lambda: layer(x))
    assert len(kept) > 5, "the walk found almost nothing: it would prove nothing"
    assert not [t for t in kept if t.numel() == dense], "a dense copy of W is kept alive"
    assert max(t.numel() for t in kept if t.dtype == torch.uint8) == (dense + 1) // 2  # the packed codes
    base_node = y.grad_fn
    while type(base_node).__name__ != "Linear4bitFunctionBackward":  # down the chain of in-place adds
        base_node = base_node.next_functions[0][0]
    assert base_node.saved_tensors == ()  # the 4-bit product saves no activation
    # nothing else reachable from Python holds one either (bar matmul's one shared, reused decode buffer)
    scratch = {b.untyped_storage().data_ptr() for b in matmul.tile_buffers().values()}
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.numel() == dense
                 and o.untyped_storage().data_ptr() not in scratch]  # fmt: skip
    assert alive == []
    y.sum().backward()
    assert x.grad is not None and layer.lora_A["a"].weight.grad is not None

    # the same detector does see a dense weight where one is saved: a plain dense linear keeps W for x's gradient
    w = layer.dense_weight()
    _, control = _kept_after_forward(layer, lambda: torch.nn.functional.linear(x, w))
    assert any(t.numel() == dense for t in control)


# --- 5. per-row routing -------------------------------------------------------------------------------------------


def _two_adapter_layer():
    _, layer = make_layer()
    for i, name in enumerate(["a", "b", "unused"]):
        layer.add_adapter(name, r=4 + i, alpha=8, use_rslora=name == "b")
        randomize_b(layer, name, seed=10 + i)
    return layer


@pytest.mark.parametrize("seq", [3, 9])  # 12 or 36 rows in the batched base product: fused or tiled
def test_per_row_routing_equals_rows_alone(kernels, seq):
    layer = _two_adapter_layer()
    plan = ["a", "b", None, "a"]
    x = torch.randn(4, seq, 128)
    g = torch.randn(4, seq, 96)
    xr = x.clone().requires_grad_()
    together = layer(xr, adapter_ids=plan)
    together.backward(g)
    routed_grads = {k: v.clone() for k, v in lora_grads(layer).items() if v is not None}
    assert set(routed_grads) == {"lora_A.a", "lora_B.a", "lora_A.b", "lora_B.b"}  # not "unused"
    layer.zero_grad(set_to_none=True)

    alone_x_grads = []
    for row, name in enumerate(plan):
        layer.set_active(name)
        xi = x[row : row + 1].clone().requires_grad_()
        alone = layer(xi)
        torch.testing.assert_close(together[row : row + 1], alone, **TIGHT)
        alone.backward(g[row : row + 1])  # adapter grads add up over the rows, as in the batch
        alone_x_grads.append(xi.grad)
    torch.testing.assert_close(xr.grad, torch.cat(alone_x_grads), **TIGHT)
    for key, grad in routed_grads.items():
        torch.testing.assert_close(grad, lora_grads(layer)[key], **TIGHT)

    # the same plan as ids into layer.adapters, and a whole batch on one adapter
    ids = torch.tensor([0, 1, -1, 0])
    torch.testing.assert_close(layer(x, adapter_ids=ids), together.detach(), rtol=0, atol=0)
    layer.set_active("b")
    torch.testing.assert_close(layer(x, adapter_ids=["b"] * 4), layer(x), rtol=0, atol=0)


def test_routing_through_a_model(kernels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 32))
    for i in (0, 2):
        model[i] = QLoRALinear.from_linear(model[i])
        model[i].add_adapter("a", r=4, alpha=8)
        randomize_b(model[i], "a", seed=i)
    model[2].add_adapter("b", r=4, alpha=8)  # "b" targets only the second layer: rows asking for it keep the base
    randomize_b(model[2], "b", seed=5)
    x = torch.randn(5, 64)
    plan = [None, "b", "a", "b", "a"]
    with adapter_routing(model, plan) as routing:
        assert [layer.routing for layer in qlora_layers(model).values()] == [routing, routing]
        together = model(x)
    assert all(layer.routing is None for layer in qlora_layers(model).values())
    for row, name in enumerate(plan):
        for layer in qlora_layers(model).values():
            layer.set_active([name] if name in layer.adapters else None)
        torch.testing.assert_close(together[row : row + 1], model(x[row : row + 1]), **TIGHT)
    with adapter_routing(model, torch.tensor([-1, 0, 1, 0, 1]), names=["b", "a"]):  # the same plan, as ids
        torch.testing.assert_close(model(x), together, **TIGHT)

    with pytest.raises(KeyError, match="'c'"):
        with adapter_routing(model, ["a", "c"]):
            pass
    with pytest.raises(ValueError, match="batch of 3 rows"):
        with adapter_routing(model, ["a", None, "b"]):
            model(x)
    assert all(layer.routing is None for layer in qlora_layers(model).values())  # cleared after an error too


# --- 6. dense round trip, state ------------------------------------------------------------------------------------


def test_from_linear_round_trip(kernels):
    linear, layer = make_layer()
    w = layer.dense_weight()
    assert w.dtype == torch.float32 and w.shape == linear.weight.shape
    assert (w - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()  # NF4: half the widest code gap
    back = layer.to_linear()
    x = torch.randn(4, 128)
    torch.testing.assert_close(back(x), layer(x), **TIGHT)
    assert torch.equal(back.bias, linear.bias)
    layer.add_adapter("a", r=4, alpha=8)
    layer.add_adapter("b", r=2, alpha=8, use_rslora=True, activate=False)
    randomize_b(layer, "a")
    randomize_b(layer, "b", seed=2)
    base64 = layer.dense_weight(dtype=torch.float64)
    delta = {n: layer.lora_B[n].weight.double() @ layer.lora_A[n].weight.double() * layer.scaling(n) for n in "ab"}
    merged = layer.dense_weight(merge_adapters=True, dtype=torch.float64)  # the active ones: "a"
    torch.testing.assert_close(merged, base64 + delta["a"], rtol=1e-6, atol=1e-6)
    named = layer.dense_weight(merge_adapters=["a", "b"], dtype=torch.float64)
    torch.testing.assert_close(named, base64 + delta["a"] + delta["b"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.to_linear(merge_adapters=True)(x), layer(x), **TIGHT)
    assert layer.to_linear(dtype=torch.bfloat16).weight.dtype == torch.bfloat16
    nobias = QLoRALinear.from_linear(nn.Linear(128, 96, bias=False))
    assert nobias.bias is None and nobias.to_linear().bias is None


def test_casting_the_module_leaves_the_4bit_weight_alone(kernels):
    for double_quant in (True, False):
        torch.manual_seed(0)
        layer = QLoRALinear.from_linear(nn.Linear(128, 96), double_quant=double_quant)
        layer.add_adapter("a", r=4, alpha=8)
        randomize_b(layer, "a")
        x = torch.randn(3, 128)
        before = layer(x)
        scales = layer.weight_4bit.block_scales().clone()
        layer.to(torch.bfloat16)  # what `model.to(torch.bfloat16)` does to every submodule
        assert layer.weight_4bit.block_scales().dtype == torch.float32
        assert torch.equal(layer.weight_4bit.block_scales(), scales)
        assert layer.bias.dtype == layer.lora_A["a"].weight.dtype == torch.bfloat16
        assert (layer(x) - before).abs().max() < 2e-2 * before.abs().max()  # only the bf16 bias/adapters differ
        layer.float().to("cpu")
        assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.device.type == "cpu"


def test_state_dict_round_trip(kernels):
    _, layer = make_layer()
    layer.add_adapter("a", r=4, alpha=8)
    randomize_b(layer, "a")
    _, fresh = make_layer()
    fresh.add_adapter("a", r=4, alpha=8)
    fresh.load_state_dict(layer.state_dict())  # strict: the same keys, the 4-bit buffers are not among them
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


def test_adapter_added_in_eval_mode_does_not_drop(kernels):
    _, layer = make_layer()
    layer.eval()
    layer.add_adapter("a", r=4, alpha=8, dropout=0.5)
    randomize_b(layer, "a")
    x = torch.randn(8, 128)
    assert torch.equal(layer(x), layer(x))  # deterministic: dropout is off in eval mode
    layer.train()
    assert not torch.equal(layer(x), layer(x))
