"""Memory, measured: what XLA's compiler says a jitted function needs.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import memory
    >>> m = memory.compiled_memory(lambda x: (x @ x.T).sum(), jnp.ones((256, 64)))
    >>> m.argument_bytes
    65536
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax

__all__ = ["CompiledMemory", "compiled_memory"]


@flax.struct.dataclass
class CompiledMemory:
    """XLA's memory analysis of one compiled function, in bytes.

    Attributes:
        argument_bytes: the inputs.
        output_bytes: the outputs.
        temp_bytes: temporaries live at the peak (what an O(n) algorithm keeps small).
        alias_bytes: bytes shared between inputs and outputs (donation).
        generated_code_bytes: the compiled program itself.
    """

    argument_bytes: int = flax.struct.field(pytree_node=False)
    output_bytes: int = flax.struct.field(pytree_node=False)
    temp_bytes: int = flax.struct.field(pytree_node=False)
    alias_bytes: int = flax.struct.field(pytree_node=False)
    generated_code_bytes: int = flax.struct.field(pytree_node=False)

    @property
    def total_bytes(self) -> int:
        """Arguments + outputs + temporaries - aliased bytes: the peak a call needs."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def compiled_memory(f: Callable[..., Any], *args: Any, static_argnums=(), **kwargs: Any) -> CompiledMemory:
    """Compile ``f`` for ``args`` (arrays or ``jax.ShapeDtypeStruct``) and return XLA's memory analysis.

    Nothing runs and nothing is allocated: ``ShapeDtypeStruct`` inputs let you ask about sizes that
    would not fit in memory.

    Args:
        f: any function ``jax.jit`` accepts (already jitted or not).
        *args: its positional arguments, arrays or ``jax.ShapeDtypeStruct``.
        static_argnums: passed to ``jax.jit`` when ``f`` is not jitted yet.
        **kwargs: keyword arguments for ``f``.

    Returns:
        A :class:`CompiledMemory`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
        >>> compiled_memory(lambda a: a + 1, x).output_bytes
        4194304
    """
    jitted = f if hasattr(f, "lower") else jax.jit(f, static_argnums=static_argnums)
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return CompiledMemory(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        generated_code_bytes=int(analysis.generated_code_size_in_bytes),
    )
