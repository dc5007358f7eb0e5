"""A short tour of viva_tensor: a few jitted operations and one caught error.

Run it with ``viva-tensor tour`` (or ``python -m viva_tensor tour``; without a sub-command the command
runs the report); the example in :func:`main` shows its output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from viva_tensor import tensor as T
from viva_tensor.errors import TensorError

__all__ = ["main"]


def _show(label: str, value) -> None:
    print(f"  {label:<34} {value}")


def main() -> None:
    """Print a few jitted operations and a caught error; takes well under a second or two.

    Returns:
        None; the tour goes to standard output.

    Example:
        >>> main()  # doctest: +ELLIPSIS
        viva_tensor tour (jax ..., backend ...)
          matmul(a, transpose(a))            [[14.0, 32.0], [32.0, 77.0]]
        ...
        error caught at trace time: argument 'b': expected shape (2, 3) (the shape of 'a'), got (3, 2)...
    """
    print(f"viva_tensor tour (jax {jax.__version__}, backend {jax.default_backend()})")
    a = T.matrix(2, 3, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    w = T.xavier_init(jax.random.key(0), 3, 2)  # shape (2, 3): fan_out x fan_in

    matmul = jax.jit(lambda x, y: T.matmul(x, T.transpose(y)))
    _show("matmul(a, transpose(a))", T.to_list2d(matmul(a, a)))
    _show("matmul(a, transpose(w)).shape", T.shape(matmul(a, w)))

    reduce = jax.jit(lambda x: (T.sum_axis(x, 0), T.mean(x), T.argmax(x)))
    col_sums, avg, arg = reduce(a)
    _show("sum_axis(a, 0)", T.to_list(col_sums))
    _show("mean(a), argmax(a)", (float(avg), int(arg)))

    bias = T.vector([10.0, 20.0, 30.0])
    _show("add_broadcast(a, [10, 20, 30])", T.to_list2d(jax.jit(T.add_broadcast)(a, bias)))

    half = jax.jit(lambda x: T.sum(x))(a.astype(jnp.bfloat16))
    _show("sum(a in bfloat16)", f"{float(half)} ({half.dtype}, accumulated in float32)")

    try:
        jax.jit(T.add)(a, T.zeros((3, 2)))
    except TensorError as e:
        print(f"error caught at trace time: {e}")


if __name__ == "__main__":  # pragma: no cover
    main()
