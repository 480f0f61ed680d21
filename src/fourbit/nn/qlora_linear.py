"""The QLoRA linear layer: a frozen 4-bit weight, any number of named LoRA adapters, and the one autograd function
that multiplies by a 4-bit weight.

    y = x W^T + b + sum over active adapters i of  w_i * s_i * B_i A_i dropout_i(x)     s_i = alpha/r (or alpha/sqrt(r))

W is never kept dense: forward multiplies through `fourbit.quant.matmul.linear_4bit`, backward multiplies the
gradient by W decoded again (`linear_4bit_t`); the autograd function saves no tensor at all. Adapters are ordinary
parameters (fp32, as PEFT keeps them), so autograd handles their gradients.

Dtypes:
- x is cast to `compute_dtype`; W is decoded into it tile by tile; the base product and the bias are in it.
- adapters keep fp32 weights (the copy the optimizer updates, as PEFT keeps them) and multiply in `compute_dtype`
  (`adapter_dtype`), with fp32 accumulation: what QLoRA's own recipe (bf16 adapters) and torch.autocast do. PEFT
  multiplies in the weights' dtype (fp32); on a CPU that made the rank-r products, 3-4% of a step's multiply-adds,
  cost half as much time as the 4-bit products. Their gradients reach the fp32 weights through the cast.
- the output has x's dtype, like bitsandbytes' Linear4bit and any transformers layer: hidden states keep their dtype.

Per-row routing (one batch serving several adapters): `forward(x, adapter_ids=...)` for one layer, or
`with adapter_routing(model, ["a", None, "b"]): model(...)` for every QLoRA layer of a model. Rows asking for the
same adapter are gathered and computed together, then added back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fourbit.nn.dropout import LoraDropout
from fourbit.quant import QuantizedTensor, quantize_4bit
from fourbit.quant.matmul import linear_4bit, linear_4bit_t


def adapter_dtype(layer: QLoRALinear) -> torch.dtype:
    """The dtype a layer's adapter products run in: its compute dtype (see the module's notes)."""
    return layer.compute_dtype


class Linear4bitFunction(torch.autograd.Function):
    """x @ W.T for a 4-bit W; the gradient to x is g @ W with W decoded again. W gets no gradient, so nothing of the
    forward is saved: x would only be needed for W's gradient."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
        ctx.q = q  # a reference to the frozen 4-bit weight (the layer holds it anyway), not a saved activation
        return linear_4bit(x2d, q)  # 2-D in, a fresh (non-view) tensor out, so callers may add to it in place

    @staticmethod
    @once_differentiable
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


@dataclass(frozen=True)
class AdapterRouting:
    """Which adapter each row (dim 0) of a batch uses, grouped once for all layers: (adapter name, its row indices).
    Rows using no adapter appear in no group."""

    batch: int
    groups: tuple[tuple[str, torch.Tensor], ...]

    @classmethod
    def from_rows(cls, adapter_per_row: Sequence[str | None] | torch.Tensor, names: Sequence[str] | None = None,
                  device: torch.device | str | None = None) -> AdapterRouting:  # fmt: skip
        """From one adapter name (or None) per row, or from a LongTensor of indices into `names` (-1: none)."""
        if isinstance(adapter_per_row, torch.Tensor):
            if names is None:
                raise ValueError("adapter ids given as a tensor need the adapter names they index")
            ids = adapter_per_row.tolist()
            if adapter_per_row.dim() != 1 or not all(isinstance(i, int) and -1 <= i < len(names) for i in ids):
                raise ValueError(f"adapter ids must be a 1-D integer tensor in [-1, {len(names)}), got {ids}")
            per_row = [None if i < 0 else names[i] for i in ids]
        else:
            per_row = list(adapter_per_row)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(per_row):
            if name is not None:
                rows.setdefault(name, []).append(i)
        groups = tuple((n, torch.tensor(r, dtype=torch.long, device=device)) for n, r in rows.items())
        return cls(len(per_row), groups)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.groups]


_QUANT_BUFFERS = ("weight_packed", "weight_absmax", "weight_nested_absmax")


class QLoRALinear(nn.Module):
    """A frozen 4-bit linear layer with named LoRA adapters; state_dict keys as PEFT's in memory
    (`lora_A.<name>.weight` [r, in], `lora_B.<name>.weight` [out, r], `bias`)."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"a linear weight is 2-D, got shape {tuple(weight.shape)}")
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        # The 4-bit tensors are non-persistent buffers: `.to(device)` moves them (and `_apply` keeps dtype casts off
        # them); state_dict() leaves them out, since the checkpoint formats in fourbit.models write them explicitly.
        self.register_buffer("weight_packed", weight.packed, persistent=False)
        self.register_buffer("weight_absmax", weight.absmax, persistent=False)
        self.register_buffer("weight_nested_absmax", weight.nested_absmax, persistent=False)
        self._meta = (weight.shape, weight.dtype, weight.quant_type, weight.blocksize, weight.nested_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_settings: dict[str, LoraSettings] = {}
        self.active: dict[str, float] = {}  # adapter name -> its weight w_i in the sum
        self.routing: AdapterRouting | None = None  # set by `adapter_routing` for the duration of a forward

    @property
    def weight_4bit(self) -> QuantizedTensor:
        shape, dtype, quant_type, blocksize, offset = self._meta
        return QuantizedTensor(self.weight_packed, self.weight_absmax, shape, dtype, quant_type, blocksize,
                               self.weight_nested_absmax, offset)  # fmt: skip

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` must not cast the fp32 block scales of the 4-bit weight: they go
        # through `fn` as raw bytes, so they follow device moves only. Bias and adapters are cast as usual.
        dtypes = {}
        for name in _QUANT_BUFFERS:
            t = self._buffers.get(name)
            if t is not None and t.is_floating_point():
                dtypes[name] = t.dtype
                self._buffers[name] = t.view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, dtype in dtypes.items():
                self._buffers[name] = self._buffers[name].view(dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> QLoRALinear:  # fmt: skip
        """Quantize `linear.weight` (byte-identical to bitsandbytes); the bias is kept in the compute dtype (default:
        the weight's dtype)."""
        q = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, bias, compute_dtype or linear.weight.dtype)

    # --- adapters -----------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                    use_rslora: bool = False, activate: bool = True) -> None:  # fmt: skip
        """A new LoRA adapter: A Kaiming-uniform (as nn.Linear and PEFT), B zero, so the output starts unchanged.
        Its weights are fp32. It joins the active set with weight 1 unless `activate=False`."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        if not name or "." in name:
            raise ValueError(f"adapter names must be non-empty and contain no '.', got {name!r}")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        device = self.weight_packed.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = LoraDropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)  # an adapter added to a model in eval mode must not drop
        self.lora_settings[name] = LoraSettings(r, alpha, dropout, use_rslora)
        if activate:
            self.active[name] = 1.0

    def delete_adapter(self, name: str) -> None:
        self._check_known([name])
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.lora_settings[name]
        self.active.pop(name, None)

    @property
    def adapters(self) -> list[str]:
        """Every adapter this layer holds, in the order they were added."""
        return list(self.lora_A.keys())

    @property
    def active_adapters(self) -> list[str]:
        return list(self.active)

    @property
    def adapter_weights(self) -> dict[str, float]:
        """{name: w_i} of the active adapters (a copy; change it with `set_active`)."""
        return dict(self.active)

    def scaling(self, name: str) -> float:
        """s = alpha/r, or alpha/sqrt(r) with rsLoRA."""
        self._check_known([name])
        return self.lora_settings[name].scaling

    def set_active(self, adapters: str | Sequence[str] | dict[str, float] | None) -> None:
        """Which adapters apply: one name, several (summed), {name: weight} (a weighted combination), or None."""
        if adapters is None:
            spec = {}
        elif isinstance(adapters, str):
            spec = {adapters: 1.0}
        elif isinstance(adapters, dict):
            spec = {k: float(v) for k, v in adapters.items()}
        else:
            spec = dict.fromkeys(adapters, 1.0)
        self._check_known(spec)
        self.active = spec

    def _check_known(self, names) -> None:
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r} (have: {', '.join(self.adapters) or 'none'})")

    # --- compute --------------------------------------------------------------------------------------------------

    def _lora_down(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A dropout(x), B), both in `adapter_dtype`: the caller multiplies by B, scaled, in its one add."""
        a, b, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        dtype = adapter_dtype(self)
        x = drop(x, dtype) if isinstance(drop, LoraDropout) else drop(x.to(dtype))
        return F.linear(x, a.weight.to(dtype)), b.weight.to(dtype)

    def _add_lora(self, y2d: torch.Tensor, name: str, x2d: torch.Tensor, alpha: float) -> torch.Tensor:
        """y2d += alpha B A dropout(x2d), in place: one multiply-add into y, no product tensor, when the dtypes agree."""
        u, b = self._lora_down(name, x2d)
        if u.dtype == y2d.dtype:
            return y2d.addmm_(u, b.t(), alpha=alpha)
        return y2d.add_(F.linear(u, b), alpha=alpha)  # add_ casts the product in the same pass

    def forward(self, x: torch.Tensor, adapter_ids: Sequence[str | None] | torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype. `adapter_ids` routes rows (dim 0) to adapters: one name or None
        per row, or a LongTensor of indices into `self.adapters` (-1: base only); it overrides the active set and
        any `adapter_routing` in force."""
        routing = self.routing
        if adapter_ids is not None:
            names = self.adapters if isinstance(adapter_ids, torch.Tensor) else None
            routing = AdapterRouting.from_rows(adapter_ids, names, x.device)
            self._check_known(routing.names)
        x_c = x.to(self.compute_dtype)
        x2d = x_c.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x2d.requires_grad:
            y = Linear4bitFunction.apply(x2d, self.weight_4bit)
        else:  # nothing to differentiate (inference, decoding): the product without the autograd Function's toll
            y = linear_4bit(x2d, self.weight_4bit)
        # In-place adds on y (its backward does not need it): one fresh tensor per layer and adapter, not three;
        # on CPUs the allocator's churn shows up in peak memory as much as in time.
        if self.bias is not None:
            y = y.add_(self.bias)
        if routing is None:
            for name, weight in self.active.items():
                y = self._add_lora(y, name, x2d, weight * self.lora_settings[name].scaling)
        y = y.view(*x.shape[:-1], self.out_features)
        if routing is not None:
            if x.dim() < 2 or x.shape[0] != routing.batch:
                raise ValueError(f"adapter routing is for a batch of {routing.batch} rows, "
                                 f"this layer got an input of shape {tuple(x.shape)}")  # fmt: skip
            for name, rows in routing.groups:
                if name not in self.lora_A:
                    continue  # an adapter that does not target this layer: its rows get the base here
                scale = self.lora_settings[name].scaling
                if rows.numel() == routing.batch:  # the whole batch wants this adapter
                    self._add_lora(y.view(-1, self.out_features), name, x2d, scale)
                    continue
                rows = rows.to(x.device)
                u, b = self._lora_down(name, x_c.index_select(0, rows))
                y = y.index_add_(0, rows, F.linear(u, b).to(y.dtype), alpha=scale)
        return y.to(x.dtype)

    # --- dense views (merging, export) ----------------------------------------------------------------------------

    def _merge_spec(self, merge_adapters: bool | Sequence[str]) -> dict[str, float]:
        if merge_adapters is True:
            return dict(self.active)
        if not merge_adapters:
            return {}
        spec = dict.fromkeys(merge_adapters, 1.0)
        self._check_known(spec)
        return spec

    def delta_weight(self, adapters: bool | Sequence[str] = True) -> torch.Tensor:
        """sum_i w_i s_i B_i @ A_i in fp32 [out, in], over the active adapters (True, with their weights) or the
        named ones (weight 1)."""
        w = torch.zeros(self.out_features, self.in_features, device=self.weight_packed.device)
        with torch.no_grad():
            for name, weight in self._merge_spec(adapters).items():
                b, a = self.lora_B[name].weight.float(), self.lora_A[name].weight.float()
                w.addmm_(b, a, alpha=self.lora_settings[name].scaling * weight)
        return w

    def dense_weight(self, merge_adapters: bool | Sequence[str] = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W dequantized, plus `delta_weight` of the active adapters (True) or of the named ones, computed in fp32 and
        returned in `dtype` (default: W's original dtype). The one dense copy of W, made on request (merging,
        export), never during training."""
        w = self.weight_4bit.dequantize(torch.float32)
        if self._merge_spec(merge_adapters):
            w += self.delta_weight(merge_adapters)
        return w.to(dtype or self._meta[1])

    def to_linear(self, merge_adapters: bool | Sequence[str] = False, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with `dense_weight(merge_adapters, dtype)` and the bias."""
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
        adapters = ", ".join(
            f"{n}(r={s.r}, alpha={s.alpha:g}{', rslora' if s.use_rslora else ''}"
            f"{', active' if n in self.active else ''})"
            for n, s in self.lora_settings.items()
        )
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{q.quant_type}{dq}/{q.blocksize}, compute={str(self.compute_dtype).removeprefix('torch.')}, "
                f"adapters=[{adapters}]")  # fmt: skip


# --- model-level helpers ------------------------------------------------------------------------------------------


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def set_active_adapters(model: nn.Module, adapters: str | list[str] | dict[str, float] | None) -> None:
    """Switch the adapters every QLoRA layer of `model` applies (None: the bare 4-bit base). No reload, no copy.
    An adapter that targets only some layers is active in those."""
    if isinstance(adapters, str) and "," in adapters:
        adapters = [a.strip() for a in adapters.split(",")]
    for layer in qlora_layers(model).values():
        wanted = adapters
        if isinstance(adapters, str):
            wanted = [adapters] if adapters in layer.lora_A else []
        elif adapters is not None:
            known = [n for n in adapters if n in layer.lora_A]
            wanted = {n: adapters[n] for n in known} if isinstance(adapters, dict) else known
        layer.set_active(wanted)


@contextlib.contextmanager
def adapter_routing(model: nn.Module, adapter_per_row: Sequence[str | None] | torch.Tensor,
                    names: Sequence[str] | None = None) -> Iterator[AdapterRouting]:  # fmt: skip
    """Inside the block, row i of every batch (dim 0 of every QLoRA layer's input) uses adapter
    `adapter_per_row[i]` (None: the base alone), or `names[ids[i]]` for a LongTensor of ids (-1: none). Rows asking
    for the same adapter are computed together, so one batch can serve requests for different adapters. An adapter
    that does not target a layer leaves its rows on the base there; a name no layer knows is a KeyError.
    Meant for serving; to train through it, call backward inside the block (activation checkpointing recomputes the
    forward then, and outside the block the layers are back on their active adapters)."""
    layers = list(qlora_layers(model).values())
    device = layers[0].weight_packed.device if layers else None
    routing = AdapterRouting.from_rows(adapter_per_row, names, device)
    held = {n for layer in layers for n in layer.adapters}
    unknown = [n for n in routing.names if n not in held]
    if unknown:
        raise KeyError(f"no layer of the model has an adapter named {unknown[0]!r} (have: {', '.join(sorted(held))})")
    for layer in layers:
        layer.routing = routing
    try:
        yield routing
    finally:
        for layer in layers:
            layer.routing = None
