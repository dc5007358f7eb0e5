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
- quant: ``quant`` (by name, the quantized matmul, trees, checkpoints), ``gptq`` (GPTQ into any grid format);
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

from viva_tensor import axis, errors, memory, tensor
from viva_tensor import metrics, compression, ggml, nf4, blackwell, awq, sparsity, quant, gptq
from viva_tensor import flash_attention, ring_attention, named, sharding, pool, hardware, interop, nn
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

_MODULES = [
    "axis", "errors", "tensor", "named", "sharding", "pool",
    "metrics", "compression", "ggml", "nf4", "blackwell", "awq", "sparsity", "quant", "gptq",
    "flash_attention", "ring_attention", "memory", "hardware", "interop", "nn",
]
# The Gleam names that shadow Python builtins stay reachable as vt.sum, vt.max ... but are left out of
# __all__, so that `from viva_tensor import *` never hides the builtins.
_SHADOWING = {"sum", "max", "min", "map", "slice"}

__all__ = [*_MODULES, "__version__", *(n for n in tensor.__all__ if n not in _SHADOWING)]
