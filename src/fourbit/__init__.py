"""fourbit: QLoRA fine-tuning from the bits to the command line."""

from fourbit.quant import QuantizedTensor, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "dequantize_4bit", "load", "quantize_4bit"]


def __getattr__(name: str):
    # `load` pulls in transformers (seconds to import): only when asked for
    if name == "load":
        from fourbit.models.loader import load

        return load
    raise AttributeError(f"module 'fourbit' has no attribute {name!r}")
