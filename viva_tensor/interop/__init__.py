"""Other tools' checkpoint files, read and written bit-exactly.

- :mod:`viva_tensor.interop.gguf`: GGUF (llama.cpp), with the GGML block formats of :mod:`viva_tensor.compression`
  and :mod:`viva_tensor.ggml` as records.
"""

from viva_tensor.interop import gguf

__all__ = ["gguf"]
