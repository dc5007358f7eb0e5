"""The format toolkit (private): what every quantization format module shares.

- :mod:`.registry`: :class:`FormatSpec`, the registry :data:`FORMATS`, :func:`register_format`, by-name
  quantize and dequantize (the public face is :mod:`viva_tensor.quant`).
- :mod:`.record`: the :class:`QuantizedArray` mixin, :func:`batch_dims` and the :func:`record` decorator.
- :mod:`.checks`: the input checks every quantize uses (one dtype policy, one error class per mistake).
- :mod:`.packing`: nibble packing (pairs, GGML halves), the E2M1 / E4M3 tables, decode-plane helpers.

Format modules import only this toolkit and the core; nothing here names a format's internals.
"""

from viva_tensor._formats.record import QuantizedArray, batch_dims, record, static
from viva_tensor._formats.registry import FORMATS, FormatSpec, is_quantized, register_format

__all__ = [
    "QuantizedArray", "batch_dims", "record", "static", "FORMATS", "FormatSpec", "is_quantized", "register_format",
]
