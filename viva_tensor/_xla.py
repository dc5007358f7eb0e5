"""What the compiler says about a program (private): XLA's memory and cost analyses, in one place.

Memory is measured, not computed from a formula: :func:`compiled_memory` compiles a function for
arrays or ``jax.ShapeDtypeStruct`` s (nothing runs, nothing is allocated) and returns XLA's
``memory_analysis()``; :func:`cost` returns its ``cost_analysis()`` (FLOPs, bytes accessed) as a dict.
``viva_tensor.memory`` re-exports :class:`CompiledMemory` and :func:`compiled_memory`; ``hardware`` and
``flash_attention`` use them from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax

from viva_tensor._pytree import pytree_dataclass

__all__ = ["CompiledMemory", "compiled_memory", "memory_of", "compile", "cost", "flops"]


@pytree_dataclass
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


def compile(f: Callable[..., Any], *args: Any, static_argnums=(), **kwargs: Any) -> Any:  # noqa: A001
    """``jax.jit(f).lower(*args, **kwargs).compile()`` (``f`` may already be jitted)."""
    jitted = f if hasattr(f, "lower") else jax.jit(f, static_argnums=static_argnums)
    return jitted.lower(*args, **kwargs).compile()


def memory_of(compiled: Any) -> CompiledMemory:
    """The :class:`CompiledMemory` of an already compiled function (``jax.stages.Compiled``)."""
    analysis = compiled.memory_analysis()
    return CompiledMemory(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        generated_code_bytes=int(analysis.generated_code_size_in_bytes),
    )


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
        >>> from viva_tensor._xla import compiled_memory
        >>> x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
        >>> compiled_memory(lambda a: a + 1, x).output_bytes
        4194304
    """
    return memory_of(compile(f, *args, static_argnums=static_argnums, **kwargs))


def cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled function as a plain dict (``{}`` where the backend gives none).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from viva_tensor import _xla
        >>> c = _xla.compile(lambda a: a @ a, jax.ShapeDtypeStruct((64, 64), jnp.float32))
        >>> _xla.cost(c)["flops"] >= 2 * 64**3
        True
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def flops(compiled: Any) -> float:
    """The FLOPs XLA counts for a compiled function (0.0 where it counts none)."""
    return float(cost(compiled).get("flops", 0.0))
