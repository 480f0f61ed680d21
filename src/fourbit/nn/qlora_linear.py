"""The QLoRA linear layer: a frozen 4-bit weight, any number of named LoRA adapters, and the one autograd function
that multiplies by a 4-bit weight.

    y = x W^T + b + sum over active adapters i of  w_i * s_i * B_i A_i dropout(x)      s_i = alpha/r (or alpha/sqrt(r))

W is never kept dense: forward multiplies through `fourbit.quant.matmul.linear_4bit`, backward multiplies the
gradient by W decoded again (`linear_4bit_t`); the autograd function saves no tensor at all. Adapters are ordinary
fp32 parameters (as PEFT keeps them), so autograd handles their gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fourbit.quant import QuantizedTensor, quantize_4bit
from fourbit.quant.matmul import linear_4bit, linear_4bit_t


class Linear4bitFunction(torch.autograd.Function):
    """x @ W.T for a 4-bit W; the gradient to x is g @ W with W decoded again. W gets no gradient."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
        ctx.q = q  # a reference to the frozen 4-bit weight, not a saved activation
        return linear_4bit(x2d, q)  # 2-D in, a fresh (non-view) tensor out, so callers may add to it in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = linear_4bit_t(grad, ctx.q) if ctx.needs_input_grad[0] else None
        return grad_x, None


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class QLoRALinear(nn.Module):
    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype=torch.float32):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"a linear weight is 2-D, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        # The 4-bit tensors are non-persistent buffers: `.to(device)` moves them, state_dict() leaves them out (the
        # checkpoint formats in fourbit.models write them explicitly).
        self.register_buffer("weight_packed", weight.packed, persistent=False)
        self.register_buffer("weight_absmax", weight.absmax, persistent=False)
        self.register_buffer("weight_nested_absmax", weight.nested_absmax, persistent=False)
        self._meta = (weight.shape, weight.dtype, weight.quant_type, weight.blocksize, weight.nested_offset)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_settings: dict[str, LoraSettings] = {}
        self.active: dict[str, float] = {}  # adapter name -> weight in the sum
        self.routing: tuple[torch.Tensor, list[str]] | None = None  # per-row adapters, see adapter_routing

    @property
    def weight_4bit(self) -> QuantizedTensor:
        shape, dtype, quant_type, blocksize, offset = self._meta
        return QuantizedTensor(self.weight_packed, self.weight_absmax, shape, dtype, quant_type, blocksize,
                               self.weight_nested_absmax, offset)  # fmt: skip

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> QLoRALinear:
        q = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, bias, compute_dtype or linear.weight.dtype)

    # --- adapters -----------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                    use_rslora: bool = False, activate: bool = True) -> None:  # fmt: skip
        """A new LoRA adapter: A Kaiming-uniform (as nn.Linear and PEFT), B zero, so the output starts unchanged."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        device = self.weight_packed.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)  # an adapter added to a model in eval mode must not drop
        self.lora_settings[name] = LoraSettings(r, alpha, dropout, use_rslora)
        if activate:
            self.active[name] = 1.0

    def delete_adapter(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.lora_settings[name]
        self.active.pop(name, None)

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def set_active(self, adapters: str | list[str] | dict[str, float] | None) -> None:
        """Which adapters apply: one name, several (summed), {name: weight} (a weighted combination), or None."""
        if adapters is None:
            spec = {}
        elif isinstance(adapters, str):
            spec = {adapters: 1.0}
        elif isinstance(adapters, dict):
            spec = {k: float(v) for k, v in adapters.items()}
        else:
            spec = dict.fromkeys(adapters, 1.0)
        unknown = [n for n in spec if n not in self.lora_A]
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r} (have: {', '.join(self.adapters) or 'none'})")
        self.active = spec

    # --- compute --------------------------------------------------------------------------------------------------

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """B A dropout(x), unscaled: the caller folds the scale into its one add."""
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(self.lora_dropout[name](x.to(a.weight.dtype))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x.to(self.compute_dtype)
        y = Linear4bitFunction.apply(x_c.reshape(-1, self.in_features), self.weight_4bit)
        y = y.view(*x.shape[:-1], self.out_features)
        # In-place adds on y (its backward does not need it): one fresh tensor per layer and adapter, not three;
        # on CPUs the allocator's churn shows up in peak memory as much as in time.
        if self.bias is not None:
            y = y.add_(self.bias)
        if self.routing is not None:
            ids, names = self.routing
            for k in torch.unique(ids).tolist():
                if k < 0:
                    continue
                rows = (ids == k).nonzero().squeeze(1)  # rows of the batch that asked for adapter k, together
                delta = self._lora(names[k], x_c.index_select(0, rows)).to(y.dtype)
                y = y.index_add_(0, rows, delta, alpha=self.lora_settings[names[k]].scaling)
        else:
            for name, weight in self.active.items():
                y = y.add_(self._lora(name, x_c).to(y.dtype), alpha=weight * self.lora_settings[name].scaling)
        return y.to(x.dtype)

    def dense_weight(self, merge_adapters: bool | list[str] = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W dequantized, plus the scaled B @ A of the active adapters (True) or of the named ones (computed in fp32).
        This is the one dense copy of W, made on request (merging, export), never during training."""
        w = self.weight_4bit.dequantize(torch.float32)
        if merge_adapters:
            spec = self.active if merge_adapters is True else dict.fromkeys(merge_adapters, 1.0)
            for name, weight in spec.items():
                delta = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()
                w = w + delta * (self.lora_settings[name].scaling * weight)
        return w.to(dtype or self._meta[1])

    def to_linear(self, merge_adapters: bool | list[str] = False, dtype: torch.dtype | None = None) -> nn.Linear:
        w = self.dense_weight(merge_adapters, dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        q = self.weight_4bit
        dq = "+dq" if q.double_quant else ""
        adapters = ", ".join(f"{n}(r={self.lora_A[n].out_features})" for n in self.adapters) or "none"
        return (f"in={self.in_features}, out={self.out_features}, {q.quant_type}{dq}/{q.blocksize}, "
                f"compute={str(self.compute_dtype).removeprefix('torch.')}, adapters={adapters}")  # fmt: skip


# --- model-level helpers ------------------------------------------------------------------------------------------


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def set_active_adapters(model: nn.Module, adapters: str | list[str] | dict[str, float] | None) -> None:
    """Switch the adapters every QLoRA layer of `model` applies (None: the bare 4-bit base). No reload, no copy."""
    if isinstance(adapters, str) and "," in adapters:
        adapters = [a.strip() for a in adapters.split(",")]
    for layer in qlora_layers(model).values():
        wanted = adapters
        if isinstance(adapters, str):
            wanted = [adapters] if adapters in layer.lora_A else []  # an adapter may target only some layers
        elif adapters is not None:
            known = {n for n in adapters if n in layer.lora_A}
            wanted = {n: w for n, w in adapters.items() if n in known} if isinstance(adapters, dict) else list(known)
        layer.set_active(wanted)


@contextlib.contextmanager
def adapter_routing(model: nn.Module, adapter_per_row: list[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter `adapter_per_row[i]` (None: the base alone). Rows asking
    for the same adapter are computed together; one batch can serve requests for different adapters."""
    names = sorted({n for n in adapter_per_row if n is not None})
    layers = qlora_layers(model).values()
    device = next(iter(layers)).weight_packed.device if layers else "cpu"
    ids = torch.tensor([-1 if n is None else names.index(n) for n in adapter_per_row], device=device)
    for layer in layers:
        missing = [n for n in names if n not in layer.lora_A]
        layer_ids = ids.clone()
        for n in missing:  # this layer is not targeted by that adapter: those rows use the base here
            layer_ids[ids == names.index(n)] = -1
        layer.routing = (layer_ids, names)
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None
