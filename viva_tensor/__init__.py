"""viva_tensor: a functional array library for JAX.

Pure functions over immutable ``jax.Array`` s: quantization that really packs bits, blockwise flash
attention with O(n) memory, named axes and sharding by name.

Example:
    >>> import viva_tensor as vt
    >>> vt.errors.TensorError.__mro__[1] is ValueError
    True
"""

from viva_tensor import axis, errors, memory, tensor
from viva_tensor.tensor import (  # noqa: A004 - the Gleam names (sum, max, min, map, slice) on purpose
    zeros,
    ones,
    fill,
    from_list,
    from_list2d,
    vector,
    matrix,
    random_uniform,
    random_normal,
    xavier_init,
    he_init,
    shape,
    size,
    rank,
    dim,
    rows,
    cols,
    get,
    get2d,
    get_row,
    get_col,
    to_list,
    to_list2d,
    clone,
    add,
    sub,
    mul,
    div,
    scale,
    add_scalar,
    negate,
    map,
    map_indexed,
    sum,
    product,
    mean,
    max,
    min,
    argmax,
    argmin,
    variance,
    std,
    sum_axis,
    mean_axis,
    dot,
    matmul_vec,
    matmul,
    transpose,
    outer,
    reshape,
    flatten,
    concat,
    concat_axis,
    stack,
    slice,
    take_first,
    take_last,
    squeeze,
    squeeze_axis,
    unsqueeze,
    expand_dims,
    norm,
    normalize,
    clamp,
    can_broadcast,
    broadcast_shape,
    broadcast_to,
    add_broadcast,
    mul_broadcast,
)

__version__ = "0.1.0"

__all__ = ["axis", "errors", "memory", "tensor", "__version__", *tensor.__all__]
