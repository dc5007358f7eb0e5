"""Real models written with viva_tensor: :mod:`viva_tensor.models.minilm` (a BERT sentence encoder).

Example:
    >>> from viva_tensor.models import minilm
    >>> minilm.MiniLMConfig().hidden_size
    384
"""

from viva_tensor.models import minilm

__all__ = ["minilm"]
