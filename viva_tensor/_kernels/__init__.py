"""Compiled CPU kernels for quantized matmuls, registered with XLA through ``jax.ffi`` (private).

One generic kernel covers every format: a weight value is ``lut[code] * scale[block]`` (+ ``offset[block]``) for
4-bit codes with a 16-entry float32 table (NF4 levels, E2M1 values, signed or unsigned int4), or
``code * scale[block]`` (+ offset) for int8 codes, with a float32 scale per block of the packed axis (a block as
long as the axis is a scale per row). :func:`qmatmul` computes ``y = x @ w.T`` for a weight stored ``(N, K)``
(``weight_layout="nk"``, the checkpoint layout, packed and blocked along K) or ``y = x @ w`` for a weight stored
``(K, N)`` (``"kn"``, packed and blocked along N), without ever materialising the float32 weight.

Nibble layouts (``layout=``): ``"low_first"`` (pairs, first value in the low nibble: E2M1 / NVFP4 / MXFP4,
int4_group, AWQ), ``"high_first"`` (pairs, first value in the high nibble: NF4, bitsandbytes), ``"ggml"`` (byte j of
each 32-value block holds value j low and value j + 16 high: Q4_0, Q4_1) and ``"int8"`` (one signed byte per value).

Paths: on CPU with the compiled library, an XLA custom call (no host round trip, one compile per shape), run on
XLA's own intra-op thread pool (the rows or column strips split into up to 4 chunks per thread, claimed as the
threads come free: a thread slowed by another process on its core takes fewer; the result does not depend on the
thread count, bit for bit; the fused kernel for ``(K, N)`` weights keeps one range per thread, whose rows of codes
it reads in longer runs). Small batches, the fused kernel ``vt_qmatmul``: each 32-value group is decoded once
in registers (on AVX-512 a 16-entry ``vpermps`` table lookup) and used by up to 4 rows of x, 2 rows of the weight at
a time, N split over the threads (from 5 rows of x on, ``(N, K)`` weights are decoded once per call into blocks
of 8-16 KiB that every row of x then reads from L1: the same sums, bit for bit); for ``(K, N)`` weights, 8 rows
of the weight are decoded per pass into accumulators over a strip of columns that stays in L1 (used by 4 rows of x
at a time).
From ``GEMM_BATCH_NK`` (16) rows of x for ``(N, K)`` weights and ``GEMM_BATCH_KN`` (16) for ``(K, N)`` weights, the
same custom call runs a blocked GEMM whose packing step is the decode: x is packed once per call into strips, and
each 32-value group of the weight is decoded once per call (per group of up to about 300 rows of x) into a block
that the inner kernel (14 x 32 float32 FMA tiles; 16 x 16 for ``(K, N)`` weights below 28 rows) reads from L1; no
float32 copy of the weight exists, in XLA's buffers or the kernel's (whose scratch is the packed x plus under 1 MiB
per thread). Every output of the GEMM is one chain of FMAs over K
in a fixed order, so a row of y does not depend on the other rows of x there either. Builds without AVX-512 have no
GEMM and take panels instead from ``PANEL_BATCH`` (32) rows: ``vt_decode`` decodes ``PANEL_BYTES`` (8 MiB;
1/8 of a smaller weight) of the weight at a time to float32 and XLA's own GEMM contracts each panel (a
``lax.scan``; the only weight-sized temporary is one panel). On an AVX2 + FMA CPU (``-march=native`` without
AVX-512: AMD Zen 2/3, Intel before Skylake-SP) the fused kernel, the panel decode and the W8A8 sums run with 8-lane
vectors: a 4-bit group's 16-entry table is looked up by ``vpshufb`` one byte plane at a time, and the same
decode order, blocking and bit-for-bit guarantees hold (a row of y does not depend on the batch or the threads).
Without AVX2 (the portable build) the kernels are plain loops.
W8A8 (``quant.dot_general(..., activation_quant="int8")``): :func:`quantize_rows` rounds the activations per row to
int8 and :func:`qmatmul_int8` (``vt_qmatmul_i8``) sums ``(x + 128) * w - 128 * w`` in int32 with AVX-512 VNNI
``vpdpbusd`` (a scale per block of the weight): below 16 rows of x, 64 bytes at a time in tiles of 4 weight rows x 4
rows of x; from 16 rows on, in GEMM form (32 weight rows repacked in 4-byte columns, each 4 bytes of x broadcast
against them, int32 sums over each block, no horizontal sums). Without VNNI, on AVX2: ``|w|`` times x with w's sign
by ``vpmaddubsw`` (never saturating: x is in [-127, 127]) and ``vpmaddwd``, 4 rows of x per weight row.
Elsewhere (GPU, TPU, no compiler at install time, ``VIVA_TENSOR_KERNELS=0``, or a packed axis that is not a
multiple of 32) the pure-JAX reference :func:`qmatmul_reference` (decode, then ``lax.dot_general`` on the weight's
own axes, never a transposed copy). The kernel sums in a different order from the reference: results agree to
float32 rounding of the sum, not bit for bit; a row of y does not depend on the other rows of x within one path
(below the GEMM's batch, and from it on: the two paths sum in different orders). ``jax.grad`` works: the
activations' cotangent runs the kernel on the other contraction of the same planes; the scales', offsets' and
table's come from the pure-JAX reference.

Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from viva_tensor import _kernels
    >>> lut = jnp.arange(16, dtype=jnp.float32) - 8          # signed int4, like q4_0
    >>> codes = jnp.full((2, 16), 0x9A, jnp.uint8)             # (N=2, K=32) as low-first pairs: 10, 9, 10, 9 ...
    >>> scales = jnp.ones((2, 1), jnp.float32)                 # one block of 32 per row
    >>> y = _kernels.qmatmul(jnp.ones((1, 32)), codes, lut, scales, layout="low_first", block_size=32)
    >>> y.tolist()                                              # 16 * (2 + 1)
    [[48.0, 48.0]]
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viva_tensor.errors import ConfigError, DTypeError, InvalidShape, ShapeMismatch

__all__ = ["available", "gemm_batch", "qmatmul", "qmatmul_reference", "decode", "decode_reference", "float_planes",
           "LAYOUTS", "WEIGHT_LAYOUTS", "SCALE_KINDS", "OFFSET_KINDS",
           "library_path", "threads", "quantize_rows", "qmatmul_int8", "qmatmul_int8_reference"]

LAYOUTS = {"low_first": 0, "high_first": 1, "ggml": 2, "int8": 3}
WEIGHT_LAYOUTS = ("nk", "kn")
_LIB = Path(__file__).resolve().parent / "lib" / "libvt_kernels.so"
_state: dict[str, Any] = {}


def library_path() -> Path:
    """Where the compiled library lives (it may be missing)."""
    return _LIB


def threads() -> int:
    """Threads the kernel splits N over: ``VIVA_TENSOR_KERNEL_THREADS``, else the CPUs this process may use."""
    env = os.environ.get("VIVA_TENSOR_KERNEL_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _missing_instructions() -> set[str]:
    """Instruction sets the library was compiled for that this CPU lacks (empty: safe to load)."""
    from viva_tensor._kernels import build

    sidecar = _LIB.parent / build.CPU_FILE
    try:
        wanted = set(sidecar.read_text().split())
    except OSError:
        return set()
    have = build.cpu_flags()
    return wanted - have if have else set()


def _load() -> bool:
    if "ok" in _state:
        return _state["ok"]
    ok = False
    if os.environ.get("VIVA_TENSOR_KERNELS", "1") != "0" and _LIB.exists():
        missing = _missing_instructions()
        if missing:
            _state["error"] = f"built with -march=native for a CPU with {sorted(missing)[:6]}: rebuild it here"
            _state["ok"] = False
            return False
        try:
            lib = ctypes.cdll.LoadLibrary(str(_LIB))
            jax.ffi.register_ffi_target("vt_qmatmul", jax.ffi.pycapsule(lib.VtQMatmul), platform="cpu")
            jax.ffi.register_ffi_target("vt_decode", jax.ffi.pycapsule(lib.VtDecode), platform="cpu")
            jax.ffi.register_ffi_target("vt_qmatmul_i8", jax.ffi.pycapsule(lib.VtQMatmulI8), platform="cpu")
            _state["vnni"] = bool(lib.vt_kernels_vnni())
            _state["simd"] = int(lib.vt_kernels_simd())
            ok = True
        except Exception as e:  # noqa: BLE001  (a stale or foreign library: fall back to pure JAX)
            _state["error"] = repr(e)
    _state["ok"] = ok
    return ok


def available() -> bool:
    """True when the compiled CPU kernels are loaded (False: every call takes the pure-JAX path).

    ``VIVA_TENSOR_KERNELS=0`` in the environment (read once, at the first call) forces False.

    Example:
        >>> from viva_tensor import _kernels
        >>> isinstance(_kernels.available(), bool)
        True
    """
    return _load()


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------


def _check(x, codes, lut, scales, offsets, layout, block_size, weight_layout, scale_table=None):
    if layout not in LAYOUTS:
        raise ConfigError(argument="layout", expected=f"one of {sorted(LAYOUTS)}", got=layout)
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ConfigError(argument="weight_layout", expected="'nk' (weight (N, K)) or 'kn' (weight (K, N))",
                          got=weight_layout)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(argument="x", expected="a floating dtype (float32, bfloat16, float16)", got=str(x.dtype))
    if x.ndim < 1:
        raise InvalidShape(argument="x", expected="at least one axis (..., K)", got=x.shape)
    want_code = jnp.int8 if layout == "int8" else jnp.uint8
    if codes.dtype != want_code or codes.ndim != 2:
        raise DTypeError(argument="codes", expected=f"a 2-D {jnp.dtype(want_code).name} array",
                         got=f"{codes.dtype}{codes.shape}")
    if lut.shape != (16,) and layout != "int8":
        raise InvalidShape(argument="lut", expected="shape (16,)", got=lut.shape)
    rows, per_row = codes.shape
    packed = per_row if layout == "int8" else 2 * per_row
    if not isinstance(block_size, int) or block_size <= 0 or packed % block_size:
        raise ConfigError(argument="block_size", expected=f"a positive int dividing the packed axis {packed}",
                          got=block_size)
    if scales.shape != (rows, packed // block_size):
        raise ShapeMismatch(argument="scales", expected=(rows, packed // block_size), got=scales.shape,
                            hint="one scale per block of the packed axis")
    _scale_kind(scales, scale_table)
    if _offset_kind(offsets) == 3:
        want = (rows, (packed // block_size + 1) // 2)
        if offsets.shape != want:
            raise ShapeMismatch(argument="offsets", expected=want, got=offsets.shape, hint="packed zero-point pairs")
    elif offsets is not None and offsets.shape != scales.shape:
        raise ShapeMismatch(argument="offsets", expected=scales.shape, got=offsets.shape)
    k = rows if weight_layout == "kn" else packed
    n = packed if weight_layout == "kn" else rows
    if x.shape[-1] != k:
        raise ShapeMismatch(argument="x", expected=f"(..., {k}) (the weight's contracted axis)", got=x.shape)
    return n, k, packed


def _kernel_fits(packed: int, block_size: int, layout: str) -> bool:
    """The compiled kernel's own limits; anything else takes the pure-JAX path."""
    return packed % 32 == 0 and (block_size % 32 == 0 or (block_size == 16 and layout != "ggml"))


#: How the kernel reads the scales, by dtype (uint8 and float8_e4m3fn: one byte per block through ``scale_table``,
#: indexed by the byte's bits).
SCALE_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2, "uint8": 3, "float8_e4m3fn": 3}
#: How it reads the offsets, by dtype (uint8: packed 4-bit zero points, first block low; offset = -zero * scale).
OFFSET_KINDS = {"float32": 1, "float16": 2, "uint8": 3}


def _scale_kind(scales, scale_table) -> int:
    kind = SCALE_KINDS.get(jnp.dtype(scales.dtype).name)
    if kind is None:
        raise DTypeError(argument="scales", expected="float32, float16, bfloat16, or uint8 / float8_e4m3fn with a "
                         "scale_table",
                         got=str(scales.dtype))
    if kind == 3 and (scale_table is None or tuple(scale_table.shape) != (256,)):
        raise InvalidShape(argument="scale_table", expected="a (256,) float32 table for uint8 scales",
                           got=None if scale_table is None else scale_table.shape)
    return kind


def _offset_kind(offsets) -> int:
    if offsets is None:
        return 0
    kind = OFFSET_KINDS.get(jnp.dtype(offsets.dtype).name)
    if kind is None:
        raise DTypeError(argument="offsets", expected="float32, float16, or uint8 packed zero points",
                         got=str(offsets.dtype))
    return kind


#: The (scale kind, offset kind) pairs the compiled kernel reads directly (0: no offsets); any other pair is
#: widened to float32 first (:func:`float_planes`).
KERNEL_KINDS = frozenset({(0, 0), (0, 1), (1, 0), (1, 2), (1, 3), (3, 0)})


def _kernel_planes(scales, offsets, table):
    """The planes as the compiled kernel reads them: as stored when it knows the pair, else widened to float32."""
    if (_scale_kind(scales, table), _offset_kind(offsets)) in KERNEL_KINDS:
        return scales, offsets, table if _byte_scales(scales) else None
    s, o = float_planes(scales, offsets, table)
    return s, o, None


def _byte_scales(scales) -> bool:
    return SCALE_KINDS.get(jnp.dtype(scales.dtype).name) == 3


def _bits(a: jax.Array) -> jax.Array:
    """A one-byte array as its uint8 bits."""
    return a if jnp.dtype(a.dtype) == jnp.uint8 else jax.lax.bitcast_convert_type(a, jnp.uint8)


def float_planes(scales, offsets=None, scale_table=None) -> tuple[jax.Array, jax.Array | None]:
    """The float32 scales and offsets the kernel reads from the stored ones (the pure-JAX paths use these).

    Float scales are widened exactly; one-byte scales (uint8, float8_e4m3fn) index ``scale_table`` by their bits;
    uint8 offsets are packed 4-bit zero points (two blocks per byte, the first in the low nibble) giving
    ``-zero * scale``.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import _kernels
        >>> s, o = _kernels.float_planes(jnp.array([[2.0, 4.0]], jnp.float16), jnp.array([[0x31]], jnp.uint8))
        >>> s.tolist(), o.tolist()
        ([[2.0, 4.0]], [[-2.0, -12.0]])
    """
    if _byte_scales(scales):
        s = jnp.asarray(scale_table, jnp.float32)[_bits(scales).astype(jnp.int32)]
    else:
        s = scales.astype(jnp.float32)
    if offsets is None:
        return s, None
    if jnp.dtype(offsets.dtype) == jnp.uint8:
        nb = s.shape[-1]
        z = jnp.stack([offsets & 0xF, offsets >> 4], axis=-1).reshape(*offsets.shape[:-1], -1)[..., :nb]
        return s, -z.astype(jnp.float32) * s
    return s, offsets.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# pure-JAX reference (the path on GPU/TPU)
# ----------------------------------------------------------------------------------------------------------------


def decode_reference(codes, lut, scales, offsets=None, *, layout: str, block_size: int,
                     scale_table=None) -> jax.Array:
    """Decodes the planes to float32 ``(rows, packed)`` in natural order, in pure JAX.

    ``lut[code] * scale`` (+ ``offset``), per block of the packed axis (scales and offsets as
    :func:`float_planes` reads them). The kernel adds the offset with an FMA; for
    the formats' planes the product is exact (Q4_1, int4_group), so both give the same bits.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import _kernels
        >>> w = _kernels.decode_reference(jnp.array([[0x21] * 16], jnp.uint8), jnp.arange(16.0),
        ...                               jnp.ones((1, 1)), layout="high_first", block_size=32)
        >>> w[0, :4].tolist()
        [2.0, 1.0, 2.0, 1.0]
    """
    rows = codes.shape[0]
    if layout == "int8":
        values = codes.astype(jnp.float32)
    else:
        lo, hi = (codes & 0x0F).astype(jnp.int32), (codes >> 4).astype(jnp.int32)
        if layout == "low_first":
            idx = jnp.stack([lo, hi], axis=-1).reshape(rows, -1)
        elif layout == "high_first":
            idx = jnp.stack([hi, lo], axis=-1).reshape(rows, -1)
        else:  # ggml halves, per 32-value block
            g = codes.reshape(rows, -1, 16)
            idx = jnp.concatenate([g & 0x0F, g >> 4], axis=-1).reshape(rows, -1).astype(jnp.int32)
        values = jnp.asarray(lut, jnp.float32)[idx]
    packed = values.shape[1]
    v = values.reshape(rows, packed // block_size, block_size)
    s, o = float_planes(scales, offsets, scale_table)
    out = v * s[..., None]
    if o is not None:  # XLA:CPU fuses this into an FMA under jit, as the kernel computes it
        out = out + o[..., None]
    return out.reshape(rows, packed)


def qmatmul_reference(x, codes, lut, scales, offsets=None, *, layout: str, block_size: int,
                      weight_layout: str = "nk", scale_table=None) -> jax.Array:
    """Pure-JAX :func:`qmatmul`: decode to float32, then a dot on the weight's own axes (no transposed copy)."""
    w = decode_reference(codes, lut, scales, offsets, layout=layout, block_size=block_size, scale_table=scale_table)
    xf = x.astype(jnp.float32)
    contract = 1 if weight_layout == "nk" else 0
    y = jax.lax.dot_general(xf, w, (((xf.ndim - 1,), (contract,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# the kernel path
# ----------------------------------------------------------------------------------------------------------------


#: From this many activation rows on, the kernel's blocked GEMM (AVX-512 builds) for ``(N, K)`` weights, and for
#: ``(K, N)`` weights. Measured at 4096 x 4096, q4_0, one process per path, wall time over float32's: ``(N, K)``
#: batch 8 fused 0.74-0.78 / GEMM 0.82-0.99, batch 16 fused 1.06-1.12 / GEMM 0.67-0.76, batch 64 panels 1.23-1.29 /
#: GEMM 0.98-1.03, batch 256 panels 1.04-1.12 / GEMM 1.00-1.03; ``(K, N)`` batch 16 fused 0.67-0.69 / GEMM
#: 0.77-0.85, batch 32 panels 1.18-1.22 / GEMM 0.84-0.92 (an Intel Xeon). On an AMD Zen 5 (2026-12-02) the fused
#: ``(K, N)`` kernel at batch 16 took 1.36-1.82 of float32 (every format), the GEMM with x in strips of 14 rows (14 + 2
#: at batch 16) 1.08-1.25 and the GEMM's small-batch form (below 28 rows: strips of 16 rows, the accumulators y
#: transposed) 0.70-0.97: so from 16 rows for both layouts. The Intel machine was not available to measure the
#: small-batch form against its fused 0.67-0.69. ``VIVA_TENSOR_GEMM=0`` turns the GEMM off (panels then).
GEMM_BATCH_NK = 16
GEMM_BATCH_KN = 16
#: Builds without AVX-512: from this many activation rows on, the weight is decoded in panels (vt_decode) and each
#: panel goes to XLA's GEMM; below it the fused kernel decodes each 32-value group once per 4 rows of x.
PANEL_BATCH = int(os.environ.get("VIVA_TENSOR_PANEL_BATCH", "32"))
#: Bytes of float32 per decoded panel at most (the only weight-sized temporary: 8 MiB, 1/8 of a 4096 x 4096
#: float32; a smaller weight takes panels of 1/8 of its float32 bytes). Measured at 4096², batch 256: panels of
#: 64 rows made XLA's GEMM 1.46x slower than one GEMM on the whole float32 weight, 256 rows 1.17x, 512 rows 1.14x.
PANEL_BYTES = 8 << 20
#: A panel is also at most this fraction of the weight's float32 bytes (so the temporaries stay below a quarter).
PANEL_FRACTION = 8


def _kinds(scales, offsets) -> dict:
    """The kernel's attributes for how it reads the scales and offsets (offsets of shape (0,): none)."""
    return dict(scale_kind=np.int64(SCALE_KINDS[jnp.dtype(scales.dtype).name]),
                offset_kind=np.int64(0 if offsets.shape[0] == 0 else OFFSET_KINDS[jnp.dtype(offsets.dtype).name]))


def gemm_batch(weight_layout: str) -> int:
    """Rows of x from which :func:`qmatmul` runs the kernel's blocked GEMM (0: this build has none, or
    ``VIVA_TENSOR_GEMM=0``).

    Example:
        >>> from viva_tensor import _kernels
        >>> _kernels.gemm_batch("nk") in (0, _kernels.GEMM_BATCH_NK)
        True
    """
    if not available() or _state.get("simd") != 512 or os.environ.get("VIVA_TENSOR_GEMM", "1") == "0":
        return 0
    return GEMM_BATCH_KN if weight_layout == "kn" else GEMM_BATCH_NK


def _ffi_qmatmul(x2, codes, lut, scales, offsets, table, *, layout, block_size, kn, n, gemm_min=0):
    call = jax.ffi.ffi_call("vt_qmatmul", jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))
    return call(x2, codes, lut, scales, offsets, table, layout=np.int64(LAYOUTS[layout]), block=np.int64(block_size),
                kn=np.int64(kn), threads=np.int64(threads()), gemm_min=np.int64(gemm_min), **_kinds(scales, offsets))


def _ffi_decode(codes, lut, scales, offsets, table, *, layout, block_size, packed):
    call = jax.ffi.ffi_call("vt_decode", jax.ShapeDtypeStruct((codes.shape[0], packed), jnp.float32),
                            vmap_method="sequential")
    return call(codes, lut, scales, offsets, table, layout=np.int64(LAYOUTS[layout]), block=np.int64(block_size),
                threads=np.int64(threads()), **_kinds(scales, offsets))


def _panel_stream(x2, codes, lut, scales, offsets, table, *, layout, block_size, kn, n):
    """Large batches: decode P rows of the stored weight at a time and contract each panel with XLA's dot."""
    rows = codes.shape[0]
    packed = n if kn else x2.shape[1]
    budget = min(PANEL_BYTES, max(4 * packed, rows * packed * 4 // PANEL_FRACTION))
    p = int(max(1, min(rows, budget // (4 * packed))))
    full = rows // p
    has_off = offsets.shape[0] != 0

    def panel(c, s, o, xs):
        w = _ffi_decode(c, lut, s, o, table, layout=layout, block_size=block_size, packed=packed)
        dims = (((1,), (0,)) if kn else ((1,), (1,)), ((), ()))
        return jax.lax.dot_general(xs, w, dims, precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)

    def split(a):
        return a[: full * p].reshape(full, p, *a.shape[1:]), a[full * p:]

    (c_main, c_rest), (s_main, s_rest) = split(codes), split(scales)
    o_main, o_rest = split(offsets) if has_off else ((None,), None)
    empty = jnp.zeros((0,), jnp.float32)
    no_off = jnp.zeros((full, 0), jnp.float32)
    if kn:  # panels of K: y accumulates x[:, panel] @ w[panel, :]
        xs_main = jnp.moveaxis(x2[:, : full * p].reshape(x2.shape[0], full, p), 1, 0)

        def body(y, t):
            c, s, o, xs = t
            return y + panel(c, s, o if has_off else empty, xs), None

        y, _ = jax.lax.scan(body, jnp.zeros((x2.shape[0], n), jnp.float32),
                            (c_main, s_main, o_main if has_off else no_off, xs_main))
        if rows % p:
            y = y + panel(c_rest, s_rest, o_rest if has_off else empty, x2[:, full * p:])
        return y

    def body(carry, t):  # panels of N: each gives its own columns of y
        c, s, o = t
        return carry, panel(c, s, o if has_off else empty, x2)

    _, ys = jax.lax.scan(body, None, (c_main, s_main, o_main if has_off else no_off))
    y = jnp.moveaxis(ys, 0, 1).reshape(x2.shape[0], full * p)
    if rows % p:
        y = jnp.concatenate([y, panel(c_rest, s_rest, o_rest if has_off else empty, x2)], axis=1)
    return y


def _kernel_call(x2, codes, lut, scales, offsets, table, *, layout, block_size, kn, n):
    gemm_min = gemm_batch("kn" if kn else "nk")
    if not gemm_min and x2.shape[0] >= PANEL_BATCH:
        return _panel_stream(x2, codes, lut, scales, offsets, table, layout=layout, block_size=block_size, kn=kn, n=n)
    return _ffi_qmatmul(x2, codes, lut, scales, offsets, table, layout=layout, block_size=block_size, kn=kn, n=n,
                        gemm_min=gemm_min)


@functools.cache
def _batched_kernel(layout: str, block_size: int, kn: int, n: int):
    """The custom call as a function with a vmap rule: a batch of activations folds into the rows of x."""

    @jax.custom_batching.custom_vmap
    def f(x2, codes, lut, scales, offsets, table):
        return _kernel_call(x2, codes, lut, scales, offsets, table, layout=layout, block_size=block_size, kn=kn, n=n)

    @f.def_vmap
    def rule(axis_size, in_batched, x2, codes, lut, scales, offsets, table):
        xb, *wb = in_batched
        if not any(wb):
            if not xb:
                return f(x2, codes, lut, scales, offsets, table), False
            v, b, k = x2.shape
            return f(x2.reshape(v * b, k), codes, lut, scales, offsets, table).reshape(v, b, n), True
        args = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                for a, batched in zip((x2, codes, lut, scales, offsets, table), in_batched, strict=True)]
        return jax.lax.map(lambda t: f(*t), tuple(args)), True

    return f


def qmatmul(x: jax.Array, codes: jax.Array, lut: jax.Array | None, scales: jax.Array,
            offsets: jax.Array | None = None, *, layout: str, block_size: int,
            weight_layout: str = "nk", scale_table: jax.Array | None = None) -> jax.Array:
    """Matmul of activations by a quantized weight, decoded inside the kernel (never a float32 weight in memory).

    Args:
        x: activations ``(..., K)``, float32, bfloat16 or float16 (summed in float32).
        codes: the packed weight: ``uint8 (rows, packed / 2)`` for the 4-bit layouts, ``int8 (rows, packed)`` for
            ``"int8"``; ``rows, packed`` are ``N, K`` for ``weight_layout="nk"`` and ``K, N`` for ``"kn"``.
        lut: float32 ``(16,)``: the value of each 4-bit code (ignored for ``"int8"``; pass None).
        scales: ``(rows, packed / block_size)``: float32, float16 or bfloat16 (read as stored, widened exactly), or
            one byte per block (uint8 or float8_e4m3fn) read through ``scale_table`` by its bits (E4M3, E8M0).
        offsets: optional, added after the scale: float32 or float16 like ``scales`` (Q4_1's min), or uint8
            ``(rows, ceil(blocks / 2))`` packed 4-bit zero points, the first block in the low nibble, giving
            ``-zero * scale`` (int4_group, AWQ).
        layout: ``"low_first"``, ``"high_first"``, ``"ggml"`` or ``"int8"`` (see the module docstring).
        block_size: values per scale along the packed axis (``packed`` for one scale per row).
        weight_layout: ``"nk"``: ``y[..., n] = sum_k x[..., k] w[n, k]``; ``"kn"``: ``sum_k x[..., k] w[k, n]``.
        scale_table: float32 ``(256,)``, the value of each scale byte (uint8 scales only).

    Returns:
        ``(..., N)`` in ``x``'s dtype.

    Raises:
        ConfigError, DTypeError, ShapeMismatch, InvalidShape: a bad argument, named.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import _kernels
        >>> codes = jnp.ones((3, 64), jnp.int8)                      # int8 weight (N=3, K=64), scale per row
        >>> y = _kernels.qmatmul(jnp.ones((64,)), codes, None, jnp.full((3, 1), 0.5), layout="int8", block_size=64)
        >>> y.tolist()
        [32.0, 32.0, 32.0]
    """
    x = jnp.asarray(x)
    lut = jnp.zeros((16,), jnp.float32) if lut is None else jnp.asarray(lut, jnp.float32)
    scales = jnp.asarray(scales)
    offsets = None if offsets is None else jnp.asarray(offsets)
    table = None if scale_table is None else jnp.asarray(scale_table, jnp.float32)
    n, k, packed = _check(x, codes, lut, scales, offsets, layout, block_size, weight_layout, table)
    if not _byte_scales(scales):
        table = None
    if not available() or not _kernel_fits(packed, block_size, layout):
        return qmatmul_reference(x, codes, lut, scales, offsets, layout=layout, block_size=block_size,
                                 weight_layout=weight_layout, scale_table=table)
    scales, offsets, table = _kernel_planes(scales, offsets, table)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)
    off = jnp.zeros((0,), jnp.float32) if offsets is None else offsets
    table = jnp.zeros((0,), jnp.float32) if table is None else table
    y = _differentiable(layout, block_size, weight_layout, n, k, offsets is not None)(x2, codes, lut, scales, off,
                                                                                       table)
    return y.reshape(*lead, n).astype(x.dtype)


def _forward(x2, codes, lut, scales, off, table, *, layout, block_size, weight_layout, n, has_off):
    kern = _batched_kernel(layout, block_size, int(weight_layout == "kn"), n)

    def other(x2, codes, lut, scales, off, table):
        return qmatmul_reference(x2, codes, lut, scales, off if has_off else None, layout=layout,
                                 block_size=block_size, weight_layout=weight_layout,
                                 scale_table=table if table.shape[0] else None)

    return jax.lax.platform_dependent(x2, codes, lut, scales, off, table, cpu=kern, default=other)


@functools.cache
def _differentiable(layout: str, block_size: int, weight_layout: str, n: int, k: int, has_off: bool):
    """The kernel with a VJP: the activations' cotangent is the kernel on the other contraction of the same planes
    (``y = x @ w.T`` gives ``x_bar = y_bar @ w``); the planes' float cotangents come from the pure-JAX reference
    (XLA drops them when nothing uses them); the codes have none."""
    other_layout = "kn" if weight_layout == "nk" else "nk"
    fwd_kw = dict(layout=layout, block_size=block_size, weight_layout=weight_layout, n=n, has_off=has_off)
    bwd_kw = dict(layout=layout, block_size=block_size, weight_layout=other_layout, n=k, has_off=has_off)

    @jax.custom_vjp
    def f(x2, codes, lut, scales, off, table):
        return _forward(x2, codes, lut, scales, off, table, **fwd_kw)

    def f_fwd(x2, codes, lut, scales, off, table):
        return f(x2, codes, lut, scales, off, table), (x2, codes, lut, scales, off, table)

    def f_bwd(res, y_bar):
        x2, codes, lut, scales, off, table = res
        x_bar = _forward(y_bar, codes, lut, scales, off, table, **bwd_kw)
        planes = [lut, scales, off, table]
        floating = [i for i, a in enumerate(planes) if jnp.issubdtype(a.dtype, jnp.floating)]

        def ref(*floats):
            a = list(planes)
            for i, v in zip(floating, floats, strict=True):
                a[i] = v
            return qmatmul_reference(x2, codes, a[0], a[1], a[2] if has_off else None, layout=layout,
                                     block_size=block_size, weight_layout=weight_layout,
                                     scale_table=a[3] if a[3].shape[0] else None)

        _, vjp = jax.vjp(ref, *(planes[i] for i in floating))
        bars: list = [None] * 4
        for i, v in zip(floating, vjp(y_bar), strict=True):
            bars[i] = v
        return x_bar, None, *bars

    f.defvjp(f_fwd, f_bwd)
    return f


def decode(codes, lut, scales, offsets=None, *, layout: str, block_size: int, scale_table=None) -> jax.Array:
    """Decodes the planes to a float32 ``(rows, packed)`` array with the kernel (pure JAX where unavailable).

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import _kernels
        >>> _kernels.decode(jnp.full((1, 32), -3, jnp.int8), None, jnp.full((1, 1), 2.0),
        ...                 layout="int8", block_size=32)[0, :3].tolist()
        [-6.0, -6.0, -6.0]
    """
    lut = jnp.zeros((16,), jnp.float32) if lut is None else jnp.asarray(lut, jnp.float32)
    rows, per_row = codes.shape
    packed = per_row if layout == "int8" else 2 * per_row
    scales = jnp.asarray(scales)
    offsets = None if offsets is None else jnp.asarray(offsets)
    table = None if scale_table is None or not _byte_scales(scales) else jnp.asarray(scale_table, jnp.float32)
    _scale_kind(scales, table)
    _offset_kind(offsets)
    if not available() or not _kernel_fits(packed, block_size, layout) or jax.default_backend() != "cpu":
        return decode_reference(codes, lut, scales, offsets, layout=layout, block_size=block_size, scale_table=table)
    scales, offsets, table = _kernel_planes(scales, offsets, table)
    off = jnp.zeros((0,), jnp.float32) if offsets is None else offsets
    table = jnp.zeros((0,), jnp.float32) if table is None else table
    return _ffi_decode(codes, lut, scales, off, table, layout=layout, block_size=block_size, packed=packed)


# ----------------------------------------------------------------------------------------------------------------
# W8A8: int8 activations (a scale per row) times an int8 weight (N, K) with a scale per block of K
# ----------------------------------------------------------------------------------------------------------------


def _exact_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` correctly rounded (XLA:CPU turns a division by a broadcast or a constant into a rounded reciprocal)."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row (per-token) absmax int8: ``x ~ codes * scale``, the scale over the last axis.

    ``scale = max|x| / 127`` (float32, correctly rounded; 1 for an all-zero row), ``codes = round(x / scale)``
    (half to even) in ``[-127, 127]``. A row holding NaN or an infinity gets codes 0: the caller poisons its output.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import _kernels
        >>> q, s = _kernels.quantize_rows(jnp.array([[1.0, -2.0, 0.5]]))
        >>> q.tolist(), s.tolist()
        ([[64, -127, 32]], [[0.015748031437397003]])
    """
    xf = jnp.asarray(x).astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    finite = jnp.isfinite(amax) & (amax > 0)
    scale = jnp.where(finite, _exact_div(amax, jnp.float32(127.0)), jnp.float32(1.0))
    codes = jnp.clip(jnp.round(_exact_div(xf, scale)), -127, 127)
    codes = jnp.where(jnp.isfinite(codes), codes, jnp.float32(0.0)).astype(jnp.int8)
    return codes, scale


def qmatmul_int8_reference(xq: jax.Array, xs: jax.Array, codes: jax.Array, scales: jax.Array, *,
                           block_size: int) -> jax.Array:
    """Pure-JAX :func:`qmatmul_int8`: int8 x int8 -> int32 dots per block of K, then the float32 scales.

    The int32 partial sums are ``(blocks, B, rows)``; the weight is taken in chunks of rows that keep them near 4 MiB.
    """
    b, k = xq.shape
    n = codes.shape[0]
    nb = k // block_size
    xb = xq.reshape(b, nb, block_size)
    scales = jnp.asarray(scales).astype(jnp.float32)  # float16 as a record stores them: widened exactly

    def part(c, s):  # c (rows, K) int8, s (rows, nb)
        isum = jax.lax.dot_general(xb, c.reshape(-1, nb, block_size), (((2,), (2,)), ((1,), (1,))),
                                   preferred_element_type=jnp.int32)  # (nb, B, rows)
        return jnp.einsum("jbr,rj->br", isum.astype(jnp.float32), s, precision=jax.lax.Precision.HIGHEST)

    rows = max(1, (1 << 20) // max(1, nb * b))
    rows = next((r for r in range(min(rows, n), 0, -1) if n % r == 0), n)
    if rows >= n:
        y = part(codes, scales)
    else:
        ys = jax.lax.map(lambda t: part(*t), (codes.reshape(n // rows, rows, k), scales.reshape(n // rows, rows, nb)))
        y = jnp.moveaxis(ys, 0, 1).reshape(b, n)
    return y * xs.reshape(b, 1)


def qmatmul_int8(xq: jax.Array, xs: jax.Array, codes: jax.Array, scales: jax.Array, *, block_size: int) -> jax.Array:
    """W8A8 matmul: ``y[b, n] = xs[b] * sum_blk scales[n, blk] * sum_{k in blk} xq[b, k] codes[n, k]``, int32 sums.

    On CPU with the library, ``vt_qmatmul_i8`` (AVX-512 VNNI ``vpdpbusd`` where the CPU has it, scalar int32 loops
    otherwise); elsewhere :func:`qmatmul_int8_reference`. No gradient (the activations are rounded).

    Args:
        xq: int8 activations ``(B, K)`` (from :func:`quantize_rows`).
        xs: float32 ``(B, 1)`` or ``(B,)``: their per-row scales.
        codes: int8 weight ``(N, K)``.
        scales: float32 ``(N, K / block_size)``.
        block_size: a multiple of 32 dividing K (K itself for one scale per row).

    Returns:
        float32 ``(B, N)``.

    Raises:
        DTypeError, ShapeMismatch, ConfigError: a bad argument, named.

    Example:
        >>> import jax.numpy as jnp
        >>> from viva_tensor import _kernels
        >>> y = _kernels.qmatmul_int8(jnp.ones((1, 64), jnp.int8), jnp.full((1,), 0.5), jnp.full((3, 64), 2, jnp.int8),
        ...                           jnp.ones((3, 1)), block_size=64)
        >>> y.tolist()
        [[64.0, 64.0, 64.0]]
    """
    for name, a in (("xq", xq), ("codes", codes)):
        if a.dtype != jnp.int8 or a.ndim != 2:
            raise DTypeError(argument=name, expected="a 2-D int8 array", got=f"{a.dtype}{a.shape}")
    b, k = xq.shape
    n = codes.shape[0]
    if codes.shape[1] != k:
        raise ShapeMismatch(argument="codes", expected=f"({n}, {k}) (K of xq)", got=codes.shape)
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 32 or k % block_size:
        raise ConfigError(argument="block_size", expected=f"a multiple of 32 dividing K={k}", got=block_size)
    if scales.shape != (n, k // block_size):
        raise ShapeMismatch(argument="scales", expected=(n, k // block_size), got=scales.shape)
    xs = jnp.asarray(xs, jnp.float32).reshape(b)
    scales = jnp.asarray(scales, jnp.float32)
    if not available():
        return qmatmul_int8_reference(xq, xs, codes, scales, block_size=block_size)

    def kern(xq, xs, codes, scales):
        call = jax.ffi.ffi_call("vt_qmatmul_i8", jax.ShapeDtypeStruct((b, n), jnp.float32), vmap_method="sequential")
        return call(xq, xs, codes, scales, block=np.int64(block_size), threads=np.int64(threads()))

    def other(xq, xs, codes, scales):
        return qmatmul_int8_reference(xq, xs, codes, scales, block_size=block_size)

    return jax.lax.platform_dependent(xq, xs, codes, scales, cpu=kern, default=other)
