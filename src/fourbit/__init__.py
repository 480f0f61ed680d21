"""fourbit: QLoRA fine-tuning from the bits to the command line."""

from fourbit.quant import QuantizedTensor, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "dequantize_4bit", "quantize_4bit"]
