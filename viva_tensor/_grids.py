"""Per-block grids of the quantized formats, as GPTQ needs them (private).

GPTQ (:mod:`viva_tensor.gptq`) quantizes a weight ``(out, in)`` one input column at a time and feeds
each column's rounding error into the columns not yet quantized. For that it asks a format four things,
registered here by format name (:func:`register_grid`; no ``isinstance`` chain):

- ``resolve(group_size, options, shape)``: the length of a group along ``in`` (the block that shares one
  scale) and the format options of the record, after checking them;
- ``tensor(w)``: what the format derives from the whole weight once (NVFP4's float32 tensor scale, a
  per-tensor INT8 scale), or ``None``;
- ``params(wg, tensor)``: a group's scales from its current (error-updated) weights ``wg (out, group)``,
  a pytree of ``(out, ...)`` arrays, computed with the format's own arithmetic;
- ``snap(x, params, tensor)``: one column ``x (out,)`` onto that grid: ``(codes int32, values float32)``,
  where ``values`` are exactly what the record decodes to;
- ``record(codes, params, tensor, shape, dtype, layout)``: the format's ordinary record, built from the
  codes ``(out, in)`` and the scales of every group stacked ``(n_groups, out, ...)``; built exactly,
  not by re-quantizing the snapped weights (which would not give the same codes in general);
- optionally ``finish(record, layout)``: a last step run outside the sweep's compiled program, with the
  format's own jitted function (NF4's double quantization, whose float32 mean must be summed in the
  same order as ``nf4.double_quantize`` sums it).

Each entry mirrors one format function (named in its comment) so that, when GPTQ changes no weight (an
identity Hessian), the record is bit-identical to ``quant.quantize(w, fmt)``; ``tests/test_gptq.py``
checks that for every format. The arithmetic is the format modules' own private helpers, imported here
and nowhere else in GPTQ: when a format's arithmetic moves, this file is the one to follow it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor import awq, blackwell, compression, ggml, nf4
from viva_tensor._formats import packing
from viva_tensor.errors import ConfigError, FormatError

__all__ = ["Grid", "Layout", "GRIDS", "register_grid", "grid_of"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a weight is cut for a format: ``group`` columns share one scale; ``options`` go to the record."""

    group: int
    options: dict


@dataclasses.dataclass(frozen=True)
class Grid:
    """What GPTQ asks of a format (see the module docstring)."""

    name: str
    resolve: Callable[[Any, dict, tuple], Layout]
    params: Callable[[jax.Array, Any], Any]
    snap: Callable[[jax.Array, Any, Any], tuple[jax.Array, jax.Array]]
    record: Callable[..., Any]
    tensor: Callable[[jax.Array, Layout], Any] = lambda w, layout: None
    finish: Callable[[Any, Layout], Any] | None = None


GRIDS: dict[str, Grid] = {}


def register_grid(name: str, **parts: Any) -> None:
    """Register the GPTQ grid of format ``name`` (the parts of :class:`Grid`)."""
    GRIDS[name] = Grid(name, **parts)


def grid_of(fmt: Any) -> Grid:
    """The registered grid of a format name.

    Raises:
        FormatError: ``fmt`` has no grid (not a format name, or a format GPTQ cannot use).
    """
    if isinstance(fmt, str) and fmt in GRIDS:
        return GRIDS[fmt]
    raise FormatError(
        argument="fmt",
        expected=f"a format with a per-block grid: one of {sorted(GRIDS)}",
        got=repr(fmt),
        hint="awq_int4 carries activation scales of its own and 2:4 sparsity has no grid.",
    )


# ----------------------------------------------------------------------------------------- shared


def _no_options(name: str, options: dict) -> None:
    if options:
        raise FormatError(
            argument="format_options",
            expected=f"options that GPTQ can pass to format '{name}'",
            got=", ".join(sorted(options)),
            hint="group_size sets the block of the formats whose block is an option.",
        )


def _fixed_group(name: str, block: int) -> Callable[[Any, dict, tuple], Layout]:
    """A format whose blocks have a fixed length along the last axis (``in``)."""

    def resolve(group_size: Any, options: dict, shape: tuple) -> Layout:
        _no_options(name, options)
        if group_size is not None and group_size != block:
            raise ConfigError(
                argument="group_size", expected=f"None or {block} ({name}'s block)", got=group_size
            )
        return Layout(block, {})

    return resolve


def _check_divides(group: int, shape: tuple, name: str) -> None:
    """Blocks over the flattened tensor are groups of one row only when ``group`` divides ``in``."""
    if shape[1] % group:
        raise ConfigError(
            argument="group_size",
            expected=f"a block that divides in={shape[1]} ({name} cuts blocks from the flattened weight)",
            got=group,
            hint="a block would straddle two rows; pick a divisor of the input dim.",
        )


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(argument=name, expected="a positive integer", got=value)
    return int(value)


def _pack_low_first(codes: jax.Array) -> jax.Array:
    """``(..., n)`` codes 0..15 (``n`` even) to bytes, the even index in the low nibble."""
    pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _by_row(params: jax.Array) -> jax.Array:
    """Scales stacked ``(n_groups, out)`` to the row-major block order ``(out * n_groups,)``."""
    return jnp.swapaxes(params, 0, 1).reshape(-1)


def _blocks_of(codes: jax.Array, block: int) -> jax.Array:
    """Codes ``(out, in)`` as the blocks of the flattened weight ``(out * in / block, block)``."""
    return codes.reshape(-1, block)


# ------------------------------------------------------------ int4_group (awq.quantize_group / _quant_core)


def _int4_resolve(group_size: Any, options: dict, shape: tuple) -> Layout:
    group = options.pop("group_size", None) if group_size is None else group_size
    _no_options("int4_group", options)
    group = 128 if group is None else _positive("group_size", group)
    return Layout(min(group, shape[1]), {"group_size": group})


def _int4_params(wg: jax.Array, tensor: Any) -> dict:
    # zero-padded columns change neither max(max, 0) nor min(min, 0)
    finite = jnp.all(jnp.isfinite(wg), axis=-1)
    hi = jnp.maximum(jnp.max(wg, axis=-1), 0.0)
    lo = jnp.minimum(jnp.min(wg, axis=-1), 0.0)
    scale = awq._div(jnp.maximum(hi - lo, jnp.float32(awq._MIN_RANGE)), jnp.float32(awq._MAX_CODE))
    scale = jnp.where(finite, scale.astype(jnp.float16), jnp.float16(jnp.nan))
    zero = jnp.where(finite, jnp.clip(-jnp.round(awq._div(lo, scale.astype(jnp.float32))), 0, awq._MAX_CODE), 0.0)
    return {"scale": scale, "zero": zero, "finite": finite}


def _int4_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    s32 = p["scale"].astype(jnp.float32)
    code = jnp.clip(jnp.round(awq._div(x, s32)) + p["zero"], 0, awq._MAX_CODE)
    code = jnp.where(p["finite"], code, 0.0)
    return code.astype(jnp.int32), (code - p["zero"]) * s32


def _int4_record(codes, p, tensor, shape, dtype, layout):
    zeros = jnp.swapaxes(p["zero"], 0, 1).astype(jnp.uint8)
    return awq.GroupInt4Tensor(
        awq._pack(codes.astype(jnp.uint8)),
        jnp.swapaxes(p["scale"], 0, 1),
        awq._pack(zeros),
        shape=shape,
        dtype=dtype,
        group_size=layout.options["group_size"],
    )


register_grid("int4_group", resolve=_int4_resolve, params=_int4_params, snap=_int4_snap, record=_int4_record)


# ------------------------------------------------------------------------ q4_0 (compression._q4_0_core)


def _q4_0_params(wg: jax.Array, tensor: Any) -> dict:
    finite = jnp.all(jnp.isfinite(wg), axis=-1)
    amax = jnp.max(jnp.abs(wg), axis=-1, keepdims=True)
    position = jax.lax.broadcasted_iota(jnp.int32, wg.shape, 1)
    first_pos = jnp.min(jnp.where(wg == amax, position, wg.shape[1]), axis=-1)
    first_neg = jnp.min(jnp.where(wg == -amax, position, wg.shape[1]), axis=-1)
    amax = amax[:, 0]
    vmax = jnp.where(amax > 0, jnp.where(first_pos <= first_neg, amax, -amax), jnp.float32(0))
    return {"d": vmax / jnp.float32(-8), "finite": finite}  # exact: a power of two


def _q4_0_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    code = compression._count_thresholds(x * compression._reciprocal(p["d"]), compression._Q4_0_THRESHOLDS)
    code = jnp.where(p["finite"], code, 8)
    d16 = jnp.where(p["finite"], p["d"], jnp.float32(jnp.nan)).astype(jnp.float16).astype(jnp.float32)
    return code, (code - 8).astype(jnp.float32) * d16


def _q4_0_record(codes, p, tensor, shape, dtype, layout):
    finite = _by_row(p["finite"])[:, None]
    d = compression._nan_where_not(finite, _by_row(p["d"])[:, None])
    return compression.Q4_0Tensor(packing.pack_halves(_blocks_of(codes, 32)), d, shape=shape, dtype=dtype)


def _ggml_resolve(name: str) -> Callable[[Any, dict, tuple], Layout]:
    fixed = _fixed_group(name, compression.GGML_BLOCK_SIZE)

    def resolve(group_size: Any, options: dict, shape: tuple) -> Layout:
        layout = fixed(group_size, options, shape)
        _check_divides(layout.group, shape, name)
        return layout

    return resolve


register_grid("q4_0", resolve=_ggml_resolve("q4_0"), params=_q4_0_params, snap=_q4_0_snap, record=_q4_0_record)


# ------------------------------------------------------------------------ q4_1 (compression._q4_1_core)


def _q4_1_params(wg: jax.Array, tensor: Any) -> dict:
    finite = jnp.all(jnp.isfinite(wg), axis=-1)
    vmin, vmax = jnp.min(wg, axis=-1), jnp.max(wg, axis=-1)
    return {"d": compression._div_exact(vmax - vmin, 15), "min": vmin, "finite": finite}


def _q4_1_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    code = compression._count_thresholds((x - p["min"]) * compression._reciprocal(p["d"]), compression._Q4_1_THRESHOLDS)
    code = jnp.where(p["finite"], code, 0)
    nan = jnp.float32(jnp.nan)
    d16 = jnp.where(p["finite"], p["d"], nan).astype(jnp.float16).astype(jnp.float32)
    m16 = jnp.where(p["finite"], p["min"], nan).astype(jnp.float16).astype(jnp.float32)
    return code, code.astype(jnp.float32) * d16 + m16


def _q4_1_record(codes, p, tensor, shape, dtype, layout):
    finite = _by_row(p["finite"])
    d = compression._nan_where_not(finite[:, None], _by_row(p["d"])[:, None])
    m = jnp.where(finite, _by_row(p["min"]), jnp.float32(jnp.nan)).astype(jnp.float16)
    return compression.Q4_1Tensor(packing.pack_halves(_blocks_of(codes, 32)), d, m, shape=shape, dtype=dtype)


register_grid("q4_1", resolve=_ggml_resolve("q4_1"), params=_q4_1_params, snap=_q4_1_snap, record=_q4_1_record)


# ------------------------------------------------------------------------ q8_0 (compression._q8_0_core)


def _absmax127_params(wg: jax.Array, tensor: Any) -> dict:
    finite = jnp.all(jnp.isfinite(wg), axis=-1)
    return {"d": compression._div_exact(jnp.max(jnp.abs(wg), axis=-1), 127), "finite": finite}


def _roundf127(x: jax.Array, p: dict) -> jax.Array:
    code = jnp.clip(compression._roundf(x * compression._reciprocal(p["d"])), -127, 127)
    return jnp.where(p["finite"], code, 0.0).astype(jnp.int32)


def _q8_0_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    code = _roundf127(x, p)
    d16 = jnp.where(p["finite"], p["d"], jnp.float32(jnp.nan)).astype(jnp.float16).astype(jnp.float32)
    return code, code.astype(jnp.float32) * d16


def _q8_0_record(codes, p, tensor, shape, dtype, layout):
    d = compression._nan_where_not(_by_row(p["finite"])[:, None], _by_row(p["d"])[:, None])
    return compression.Q8_0Tensor(_blocks_of(codes, 32).astype(jnp.int8), d, shape=shape, dtype=dtype)


register_grid(
    "q8_0", resolve=_ggml_resolve("q8_0"), params=_absmax127_params, snap=_q8_0_snap, record=_q8_0_record
)


# ------------------------------------------------------------- q5_0, q5_1 (ggml._q5_0_ref / _q5_1_ref)
# A code below 0 or above 31 never arises in round to nearest; GPTQ's updated weights can leave the block's
# range, so the codes are clipped to [0, 31] (the values at the grid's ends).


def _q5_0_params(wg: jax.Array, tensor: Any) -> dict:
    finite = ggml._finite(wg)
    _, vmax = ggml._first_of_largest(wg)
    d = vmax / jnp.float32(-16)  # exact: a power of two
    inv = jnp.where(d != 0, ggml._div(jnp.float32(1), d), jnp.float32(0))
    return {"d": d, "inv": inv, "finite": finite}


def _q5_0_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    code = jnp.clip(jnp.trunc(ggml._mul(x, p["inv"]) + jnp.float32(16.5)), 0, 31).astype(jnp.int32)
    code = jnp.where(p["finite"], code, 0)
    d16 = ggml._nan_d(p["finite"], p["d"]).astype(jnp.float32)
    return code, (code - 16).astype(jnp.float32) * d16


def _q5_0_record(codes, p, tensor, shape, dtype, layout):
    qh, qs = ggml._pack_5bit_32(_blocks_of(codes, 32))
    return ggml.Q5_0Tensor(ggml._nan_d(_by_row(p["finite"]), _by_row(p["d"])), qh, qs, shape=shape, dtype=dtype)


def _q5_1_params(wg: jax.Array, tensor: Any) -> dict:
    finite = ggml._finite(wg)
    vmin, vmax = jnp.min(wg, axis=-1), jnp.max(wg, axis=-1)
    d = ggml._div(vmax - vmin, jnp.float32(31))
    inv = jnp.where(d != 0, ggml._div(jnp.float32(1), d), jnp.float32(0))
    return {"d": d, "inv": inv, "min": vmin, "finite": finite}


def _q5_1_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    code = jnp.clip(jnp.trunc(ggml._mul(x - p["min"], p["inv"]) + jnp.float32(0.5)), 0, 31).astype(jnp.int32)
    code = jnp.where(p["finite"], code, 0)
    d16 = ggml._nan_d(p["finite"], p["d"]).astype(jnp.float32)
    m16 = ggml._f16(jnp.where(p["finite"], p["min"], jnp.float32(jnp.nan))).astype(jnp.float32)
    return code, code.astype(jnp.float32) * d16 + m16


def _q5_1_record(codes, p, tensor, shape, dtype, layout):
    finite = _by_row(p["finite"])
    m = ggml._f16(jnp.where(finite, _by_row(p["min"]), jnp.float32(jnp.nan)))
    qh, qs = ggml._pack_5bit_32(_blocks_of(codes, 32))
    return ggml.Q5_1Tensor(ggml._nan_d(finite, _by_row(p["d"])), m, qh, qs, shape=shape, dtype=dtype)


register_grid("q5_0", resolve=_ggml_resolve("q5_0"), params=_q5_0_params, snap=_q5_0_snap, record=_q5_0_record)
register_grid("q5_1", resolve=_ggml_resolve("q5_1"), params=_q5_1_params, snap=_q5_1_snap, record=_q5_1_record)


# ------------------------------------------------------------- int8 (compression.quantize_int8 / _int8_codes)
# Per tensor (the default): one scale from the whole weight, fixed before the sweep. axis=0: a scale per
# output row (GPTQ's per-channel quantizer, one group spanning the row). block_size=b: groups of b.


def _int8_resolve(group_size: Any, options: dict, shape: tuple) -> Layout:
    axis, block = options.pop("axis", None), options.pop("block_size", None)
    _no_options("int8", options)
    if group_size is not None:
        if block is not None and block != group_size:
            raise ConfigError(argument="group_size", expected=f"None or block_size={block}", got=group_size)
        block = group_size
    if axis is not None and block is not None:
        raise ConfigError(argument="axis", expected="None when a block (group_size) is given", got=axis)
    if axis is not None and axis not in (0, -2):
        raise ConfigError(
            argument="axis",
            expected="0 (a scale per output row) or None (per tensor)",
            got=axis,
            hint="GPTQ sweeps the input columns; a scale per input column would be re-made at every column.",
        )
    if block is not None:
        block = _positive("group_size", block)
        _check_divides(block, shape, "int8")
        return Layout(block, {"block_size": block})
    return Layout(shape[1], {"axis": None if axis is None else 0})


def _int8_tensor(w: jax.Array, layout: Layout) -> Any:
    if layout.options.get("axis", 0) is None and "block_size" not in layout.options:
        return compression.quantize_int8(w).scales.reshape(())  # one scale, from the public quantizer
    return None


def _int8_params(wg: jax.Array, tensor: Any) -> dict:
    if tensor is not None:
        scale = jnp.broadcast_to(tensor, wg.shape[:1])
        return {"d": scale, "finite": ~jnp.isnan(scale)}
    return _absmax127_params(wg, tensor)


def _int8_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    code = _roundf127(x, p)
    return code, code.astype(jnp.float32) * jnp.where(p["finite"], p["d"], jnp.float32(jnp.nan))


def _int8_record(codes, p, tensor, shape, dtype, layout):
    nan = jnp.float32(jnp.nan)
    codes = codes.astype(jnp.int8)
    if "block_size" in layout.options:
        b = layout.options["block_size"]
        scales = jnp.where(_by_row(p["finite"]), _by_row(p["d"]), nan)[:, None]
        return compression.Int8Tensor(_blocks_of(codes, b), scales, shape=shape, dtype=dtype, block_size=b)
    if layout.options["axis"] is None:
        return compression.Int8Tensor(codes, tensor.reshape(1, 1), shape=shape, dtype=dtype)
    scales = jnp.where(p["finite"][0], p["d"][0], nan)[:, None]
    return compression.Int8Tensor(codes, scales, shape=shape, dtype=dtype, axis=0)


register_grid(
    "int8", resolve=_int8_resolve, tensor=_int8_tensor, params=_int8_params, snap=_int8_snap, record=_int8_record
)


# -------------------------------------------------------------- nf4, nf4_dq (nf4._nf4_core / double_quantize)
# nf4_dq: the codes are chosen with the exact float32 absmax, as double_quantize does; the absmax values are
# double-quantized once the sweep is over (GPTQ's error feedback does not see that second rounding).


def _nf4_resolve(name: str) -> Callable[[Any, dict, tuple], Layout]:
    def resolve(group_size: Any, options: dict, shape: tuple) -> Layout:
        block = options.pop("block_size", None)
        nested = options.pop("nested_block_size", None) if name == "nf4_dq" else None
        _no_options(name, options)
        if group_size is not None:
            if block is not None and block != group_size:
                raise ConfigError(argument="group_size", expected=f"None or block_size={block}", got=group_size)
            block = group_size
        block = nf4._check_block("group_size", 64 if block is None else block, even=True)
        _check_divides(block, shape, name)
        opts = {"block_size": block}
        if name == "nf4_dq":
            nested = 256 if nested is None else nested
            opts["nested_block_size"] = nf4._check_block("nested_block_size", nested, even=False)
        return Layout(block, opts)

    return resolve


def _nf4_params(wg: jax.Array, tensor: Any) -> dict:
    absmax = jnp.max(jnp.abs(wg), axis=-1)
    return {"absmax": jnp.where(jnp.any(jnp.isnan(wg), axis=-1), jnp.float32(jnp.nan), absmax)}


def _nf4_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    code = nf4._nf4_codes(x * nf4._safe_reciprocal(p["absmax"])).astype(jnp.int32)
    return code, jnp.asarray(nf4.NF4_LEVELS)[code] * p["absmax"]


def _nf4_record(codes, p, tensor, shape, dtype, layout):
    packed = packing.pack_pairs(codes.reshape(-1).astype(jnp.uint8), first="high")
    block = layout.options["block_size"]
    return nf4.NF4Tensor(packed, _by_row(p["absmax"]), shape=shape, dtype=dtype, block_size=block)


def _nf4_dq_finish(q: nf4.NF4Tensor, layout: Layout) -> nf4.NF4DQTensor:
    nested = layout.options["nested_block_size"]
    absmax_codes, nested_absmax, offset = nf4._double_core(q.absmax, nested, nf4.torch_default_threads())
    return nf4.NF4DQTensor(q.codes, absmax_codes, nested_absmax, offset, shape=q.shape, dtype=q.dtype, **layout.options)


register_grid("nf4", resolve=_nf4_resolve("nf4"), params=_nf4_params, snap=_nf4_snap, record=_nf4_record)
register_grid(
    "nf4_dq",
    resolve=_nf4_resolve("nf4_dq"),
    params=_nf4_params,
    snap=_nf4_snap,
    record=_nf4_record,
    finish=_nf4_dq_finish,
)


# ----------------------------------------------------------------------- nvfp4 (blackwell._nvfp4_core)
# The float32 tensor scale comes from the whole weight once (the public quantizer's own), before the sweep.


def _e2m1_code(scaled: jax.Array) -> jax.Array:
    """E2M1 code (round to nearest even, saturating; sign bit = the float's) as int32, as _pack_e2m1."""
    return jax.lax.bitcast_convert_type(scaled.astype(jnp.float4_e2m1fn), jnp.uint4).astype(jnp.int32)


def _e2m1_value(code: jax.Array) -> jax.Array:
    return jnp.asarray(blackwell.E2M1_VALUES)[code]


def _nvfp4_tensor(w: jax.Array, layout: Layout) -> Any:
    return blackwell.quantize_nvfp4(w).tensor_scale


def _nvfp4_params(wg: jax.Array, tensor_scale: Any) -> dict:
    ok = blackwell._block_ok(wg)
    block_amax = jnp.where(ok, jnp.max(jnp.abs(wg), axis=-1), 0)
    six_g = jnp.float32(6.0) * tensor_scale
    s = jnp.where(six_g > 0, block_amax / jnp.where(six_g > 0, six_g, 1), 0)
    s = jnp.minimum(jnp.where(s == 0, jnp.float32(1), s), jnp.float32(blackwell._E4M3_MAX))
    return {"scale": jnp.where(ok, s, jnp.float32(jnp.nan)).astype(jnp.float8_e4m3fn)}


def _nvfp4_snap(x: jax.Array, p: dict, tensor_scale: Any) -> tuple[jax.Array, jax.Array]:
    factor = blackwell._e4m3_to_float32(p["scale"]) * tensor_scale
    code = _e2m1_code(x / jnp.where(factor > 0, factor, jnp.float32(jnp.inf)))
    return code, _e2m1_value(code) * factor


def _nvfp4_record(codes, p, tensor_scale, shape, dtype, layout):
    codes = jnp.pad(codes, ((0, 0), (0, -shape[1] % blackwell.NVFP4_BLOCK)))
    return blackwell.NVFP4Tensor(
        _pack_low_first(codes), jnp.swapaxes(p["scale"], 0, 1), tensor_scale, shape=shape, dtype=dtype
    )


register_grid(
    "nvfp4",
    resolve=_fixed_group("nvfp4", blackwell.NVFP4_BLOCK),
    tensor=_nvfp4_tensor,
    params=_nvfp4_params,
    snap=_nvfp4_snap,
    record=_nvfp4_record,
)


# ----------------------------------------------------------------------- mxfp4 (blackwell._mxfp4_core)


def _mxfp4_params(wg: jax.Array, tensor: Any) -> dict:
    ok = blackwell._block_ok(wg)
    amax = jnp.where(ok, jnp.max(jnp.abs(wg), axis=-1), 0)
    biased = jnp.maximum((jax.lax.bitcast_convert_type(amax, jnp.uint32) >> 23).astype(jnp.int32) - 2, 0)
    return {"biased": biased, "ok": ok}


def _mxfp4_snap(x: jax.Array, p: dict, tensor: Any) -> tuple[jax.Array, jax.Array]:
    code = _e2m1_code(x * blackwell._pow2(127 - p["biased"]))
    e = p["biased"] - 127
    half = e // 2  # two normal factors, as blackwell._block_scales
    scale = jnp.where(p["ok"], blackwell._pow2(half) * blackwell._pow2(e - half), jnp.float32(jnp.nan))
    return code, _e2m1_value(code) * scale


def _mxfp4_record(codes, p, tensor, shape, dtype, layout):
    codes = jnp.pad(codes, ((0, 0), (0, -shape[1] % blackwell.MXFP4_BLOCK)))
    scales = jnp.swapaxes(jnp.where(p["ok"], p["biased"], 255), 0, 1).astype(jnp.uint8)
    return blackwell.MXFP4Tensor(_pack_low_first(codes), scales, shape=shape, dtype=dtype)


register_grid(
    "mxfp4",
    resolve=_fixed_group("mxfp4", blackwell.MXFP4_BLOCK),
    params=_mxfp4_params,
    snap=_mxfp4_snap,
    record=_mxfp4_record,
)
