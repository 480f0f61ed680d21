"""The 4-bit format: code tables, quantize/dequantize (with double quantization), the quantized-tensor object."""

from fourbit.quant.api import dequantize_4bit, quantize_4bit, use_kernels
from fourbit.quant.tensor import QuantizedTensor

__all__ = ["QuantizedTensor", "dequantize_4bit", "quantize_4bit", "use_kernels"]
