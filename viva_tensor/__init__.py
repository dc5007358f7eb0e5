"""viva_tensor: a functional array library for JAX.

Pure functions over immutable ``jax.Array`` s: quantization that really packs bits, blockwise flash
attention with O(n) memory, named axes and sharding by name.

The parts, lowest first (each imports only its own part and the ones below; ``tests/test_layers.py``
checks it):

- core: ``errors``, ``axis``, ``tensor`` (the Gleam core functions), and the private ``_xla`` (compiled
  memory and cost), ``_paths`` (the one dotted tree-path convention), ``_safetensors`` (the one checkpoint
  reader/writer), ``_benchmarking`` (the one timer);
- formats: ``compression`` (INT8, GGML Q4_0/Q4_1/Q8_0), ``ggml`` (Q5_0/Q5_1 and the K-quants), ``nf4``,
  ``blackwell`` (NVFP4, MXFP4), ``awq``, ``sparsity``, ``metrics``, on the private toolkit ``_formats``;
- quant: ``quant`` (by name, the quantized matmul, trees, checkpoints), ``gptq`` (GPTQ into any grid format),
  ``rotation`` (randomized Hadamard rotations of a layer's inputs, for 4-bit weights);
- attention and named axes: ``flash_attention``, ``named``, ``sharding``; parallel: ``ring_attention``, ``pool``;
- memory: ``memory`` (tiers, offloading, streaming, rematerialisation), ``hardware``;
- interop: ``interop`` (GGUF, bitsandbytes, GPTQ, AWQ, compressed-tensors files);
- models: ``nn`` (Flax NNX modules), ``models`` (MiniLM);
- face: ``cli`` (the ``viva-tensor`` command).

Example:
    >>> import viva_tensor as vt
    >>> vt.errors.TensorError.__mro__[1] is ValueError
    True
"""

from viva_tensor import (
    awq,
    axis,
    blackwell,
    compression,
    errors,
    flash_attention,
    ggml,
    gptq,
    hardware,
    interop,
    memory,
    metrics,
    named,
    nf4,
    nn,
    pool,
    quant,
    ring_attention,
    rotation,
    sharding,
    sparsity,
    tensor,
)
from viva_tensor.tensor import (  # noqa: A004 - the Gleam names (sum, max, min, map, slice) on purpose
    add,
    add_broadcast,
    add_scalar,
    argmax,
    argmin,
    broadcast_shape,
    broadcast_to,
    can_broadcast,
    clamp,
    clone,
    cols,
    concat,
    concat_axis,
    dim,
    div,
    dot,
    expand_dims,
    fill,
    flatten,
    from_list,
    from_list2d,
    get,
    get2d,
    get_col,
    get_row,
    he_init,
    map,
    map_indexed,
    matmul,
    matmul_vec,
    matrix,
    max,
    mean,
    mean_axis,
    min,
    mul,
    mul_broadcast,
    negate,
    norm,
    normalize,
    ones,
    outer,
    product,
    random_normal,
    random_uniform,
    rank,
    reshape,
    rows,
    scale,
    shape,
    size,
    slice,
    squeeze,
    squeeze_axis,
    stack,
    std,
    sub,
    sum,
    sum_axis,
    take_first,
    take_last,
    to_list,
    to_list2d,
    transpose,
    unsqueeze,
    variance,
    vector,
    xavier_init,
    zeros,
)

__version__ = "0.1.0"

_MODULES = [
    "axis", "errors", "tensor", "named", "sharding", "pool",
    "metrics", "compression", "ggml", "nf4", "blackwell", "awq", "sparsity", "quant", "gptq",
    "rotation", "flash_attention", "ring_attention", "memory", "hardware", "interop", "nn",
]
# The Gleam names that shadow Python builtins stay reachable as vt.sum, vt.max ... but are left out of
# __all__, so that `from viva_tensor import *` never hides the builtins.
_SHADOWING = {"sum", "max", "min", "map", "slice"}

__all__ = [*_MODULES, "__version__", *(n for n in tensor.__all__ if n not in _SHADOWING)]
