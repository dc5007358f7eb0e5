"""viva_tensor: a functional array library for JAX.

Pure functions over immutable ``jax.Array`` s: quantization that really packs bits, blockwise flash
attention with O(n) memory, named axes and sharding by name.

Example:
    >>> import viva_tensor as vt
    >>> vt.errors.TensorError.__mro__[1] is ValueError
    True
"""

from viva_tensor import axis, errors, memory

__version__ = "0.1.0"

__all__ = ["axis", "errors", "memory", "__version__"]
