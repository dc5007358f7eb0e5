"""Streaming (private to ``viva_tensor.memory``): a stack of layers run through a device budget.

Each layer's weights come from host memory, NumPy arrays or safetensors files, one layer at a time,
the next one prefetched while the current computes.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np

from viva_tensor.errors import ConfigError
from viva_tensor.memory._tiers import _is_handle, place, tree_nbytes

__all__ = ["StreamStats", "stream"]


@flax.struct.dataclass
class StreamStats:
    """What :func:`stream` held on the device, in bytes.

    Attributes:
        budget_bytes: the budget it was given.
        layer_bytes: each layer's weight bytes.
        peak_resident_bytes: the most weight bytes on the device at once (the ledger of copies alive).
        peak_live_device_bytes: the most bytes of arrays in the device memory kind that the run created
            and that were alive at once (weights and activations), read from ``jax.live_arrays()``
            right after each layer finished, when both its weights and the next layer's are there.
        prefetched: how many layers were copied while the previous one computed.
    """

    budget_bytes: int = flax.struct.field(pytree_node=False)
    layer_bytes: tuple[int, ...] = flax.struct.field(pytree_node=False)
    peak_resident_bytes: int = flax.struct.field(pytree_node=False)
    peak_live_device_bytes: int = flax.struct.field(pytree_node=False)
    prefetched: int = flax.struct.field(pytree_node=False)


def _device_live_bytes(exclude: set[int]) -> int:
    total = 0
    for a in jax.live_arrays():
        if id(a) not in exclude and not a.is_deleted() and (a.sharding.memory_kind or "device") == "device":
            total += a.nbytes
    return total


def _free(copy: Any, source: Any) -> None:
    """Deletes the device copies that :func:`stream` made (never a caller's own array)."""
    copies = jax.tree_util.tree_leaves(copy)
    sources = jax.tree_util.tree_leaves(source, is_leaf=_is_handle)
    for c, s in zip(copies, sources, strict=False):
        if c is not s:
            c.delete()


def stream(layer_fn: Callable[[Any, Any], Any], layers: Sequence[Any], x: Any, *, budget_bytes: int,
           device: jax.Device | None = None, prefetch: bool = True,
           return_stats: bool = False) -> Any:
    """Runs ``x`` through a stack of layers whose weights live off the device, one layer at a time.

    Each layer's weights (on host memory, in NumPy arrays or in safetensors files) are copied to the
    device, used by ``layer_fn`` (jitted once for all layers of the same structure) and deleted once
    the layer has run. While a layer computes, the next one is already being copied (``device_put`` is
    asynchronous, file reads run in a worker thread) whenever both fit the budget; otherwise the copy
    waits. The device never holds more than ``budget_bytes`` of weights, and the output is the one the
    same ``layer_fn`` gives with every layer on the device.

    Args:
        layer_fn: ``layer_fn(params, x) -> x``, the same function for every layer.
        layers: the layers' parameter trees, first to last.
        x: the input (a pytree of device arrays).
        budget_bytes: the most weight bytes the device may hold; each layer must fit alone.
        device: the device to run on (default: the first).
        prefetch: copy the next layer while the current computes (when both fit).
        return_stats: also return a :class:`StreamStats`.

    Returns:
        The output of the last layer, or ``(output, StreamStats)``.

    Raises:
        ConfigError: a budget that is not positive, or a layer larger than the budget.

    Example:
        >>> import jax.numpy as jnp
        >>> layers = [place({"w": jnp.eye(4) * (i + 1)}, "pinned_host") for i in range(3)]
        >>> y, stats = stream(lambda p, x: x @ p["w"], layers, jnp.ones((1, 4)), budget_bytes=128,
        ...                   return_stats=True)
        >>> y.tolist(), stats.peak_resident_bytes
        ([[6.0, 6.0, 6.0, 6.0]], 128)
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes <= 0:
        raise ConfigError(argument="budget_bytes", expected="a positive number of bytes", got=budget_bytes)
    layers = list(layers)
    sizes = [tree_nbytes(layer) for layer in layers]
    for i, size in enumerate(sizes):
        if size > budget_bytes:
            raise ConfigError(argument="budget_bytes", expected=f"at least layer {i}'s {size} bytes",
                              got=budget_bytes, hint="split the layer, or quantize it.")
    device = device or jax.devices()[0]
    fn = layer_fn if hasattr(layer_fn, "lower") else jax.jit(layer_fn)
    before = {id(a) for a in jax.live_arrays()}
    resident = peak = live_peak = prefetched = 0
    pending: dict[int, concurrent.futures.Future] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        def fetch(i):
            nonlocal resident
            resident += sizes[i]
            pending[i] = pool.submit(place, layers[i], "device", device=device)

        if layers:
            fetch(0)
        for i in range(len(layers)):
            weights = pending.pop(i).result()
            nxt = i + 1
            if prefetch and nxt < len(layers) and resident + sizes[nxt] <= budget_bytes:
                fetch(nxt)
                prefetched += 1
            peak = max(peak, resident)
            x = jax.block_until_ready(fn(weights, x))
            live_peak = max(live_peak, _device_live_bytes(before))
            _free(weights, layers[i])
            del weights
            resident -= sizes[i]
            if nxt < len(layers) and nxt not in pending:
                fetch(nxt)
    if not return_stats:
        return x
    return x, StreamStats(int(budget_bytes), tuple(sizes), peak, live_peak, prefetched)

