"""The QLoRA linear layer and its autograd function."""

from fourbit.nn.qlora_linear import (
    AdapterRouting,
    Linear4bitFunction,
    LoraSettings,
    QLoRALinear,
    adapter_routing,
    qlora_layers,
    set_active_adapters,
)

__all__ = [
    "AdapterRouting",
    "Linear4bitFunction",
    "LoraSettings",
    "QLoRALinear",
    "adapter_routing",
    "qlora_layers",
    "set_active_adapters",
]
