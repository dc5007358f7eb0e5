"""Sharding by axis name: rules from logical axis names to device-mesh axes.

Rules use the format of Flax's ``logical_axis_rules``: a sequence of ``(axis name, mesh axes)`` pairs,
where mesh axes is a mesh-axis name, a tuple of them, or ``None`` (replicated). For each axis of an
array the rules are read in order and the first rule for that name whose mesh axes are still free in
this array wins (a mesh axis shards at most one axis of an array); a name no rule mentions is
replicated.

The mesh is the ``mesh=`` argument, or the one set by ``jax.set_mesh``. Both axis types of
``jax.make_mesh`` work: on ``Auto`` axes, :func:`shard` inside ``jit`` is a sharding constraint; on
``Explicit`` axes it is a ``jax.reshard``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from viva_tensor import named, sharding
    >>> rules = [("batch", "data"), ("embed", "model")]
    >>> t = named.zeros({"batch": 8, "seq": 4, "embed": 16})
    >>> sharding.spec(t, rules)
    P('data', None, 'model')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from viva_tensor import named as _named
from viva_tensor._formats.registry import is_quantized
from viva_tensor._paths import path_str
from viva_tensor.errors import ShardingError

__all__ = [
    "Rules",
    "validate_rules",
    "spec",
    "named_sharding",
    "record_specs",
    "shard",
    "place",
    "shard_map",
    "param_specs",
    "shard_params",
]

Rules = Sequence[tuple[str, Any]]
"""``(axis name, mesh axis | tuple of mesh axes | None)`` pairs, Flax ``logical_axis_rules`` format."""

_POLICIES = ("error", "replicate")


def _mesh_axes(value: Any, argument: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ShardingError(argument=argument, expected="a mesh axis name, a tuple of them, or None", got=repr(value))


def validate_rules(rules: Rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Check ``rules`` and return them normalised to ``((name, (mesh axes ...)), ...)``.

    Args:
        rules: ``(axis name, mesh axes)`` pairs.

    Returns:
        A tuple of ``(name, tuple of mesh axes)``; ``()`` stands for replicated.

    Raises:
        ShardingError: for an entry that is not a pair of a name and mesh axes.

    Example:
        >>> validate_rules([("batch", "data"), ("embed", ("x", "y")), ("seq", None)])
        (('batch', ('data',)), ('embed', ('x', 'y')), ('seq', ()))
    """
    if isinstance(rules, (str, bytes, Mapping)) or not hasattr(rules, "__iter__"):
        raise ShardingError(argument="rules", expected="a sequence of (axis name, mesh axes) pairs",
                            got=type(rules).__name__, hint="write rules as [('batch', 'data'), ...].")
    out = []
    for r in rules:
        if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
            raise ShardingError(argument="rules", expected="(axis name, mesh axes) pairs", got=repr(r))
        out.append((r[0], _mesh_axes(r[1], "rules")))
    return tuple(out)


def _current_mesh(mesh: Any, *, concrete: bool = False):
    if mesh is not None:
        return mesh
    m = jax.sharding.get_mesh() if concrete else jax.sharding.get_abstract_mesh()
    if m is None or m.empty:
        raise ShardingError(argument="mesh", expected="a mesh (the mesh= argument or jax.set_mesh)", got="none",
                            hint="pass mesh=jax.make_mesh(...) or use `with jax.set_mesh(mesh):`.")
    return m


def _names_and_shape(t: Any) -> tuple[tuple, tuple | None]:
    if isinstance(t, _named.NamedTensor):
        if is_quantized(t.data):
            return tuple(t.names), tuple(t.data.shape)
        return _named.axis_names(t), tuple(t.data.shape)
    if isinstance(t, (tuple, list)) and all(n is None or isinstance(n, str) for n in t):
        return tuple(t), None
    raise ShardingError(argument="t", expected="a NamedTensor or a tuple of axis names", got=type(t).__name__)


def _spec_entries(names: tuple, shape: tuple | None, rules: Rules, mesh: Any, on_indivisible: str) -> list:
    if on_indivisible not in _POLICIES:
        raise ShardingError(argument="on_indivisible", expected=f"one of {_POLICIES}", got=repr(on_indivisible))
    rules = validate_rules(rules)
    sizes = dict(mesh.shape) if mesh is not None else None
    used: set = set()
    entries: list = []
    for i, name in enumerate(names):
        chosen: tuple = ()
        if name is not None:
            for rname, axes in rules:
                if rname != name:
                    continue
                if sizes is not None:
                    for a in axes:
                        if a not in sizes:
                            raise ShardingError(argument="rules",
                                                expected=f"mesh axes among {tuple(sizes)}",
                                                got=f"{a!r} (rule for axis {name!r})")
                if any(a in used for a in axes):
                    continue  # that mesh axis already shards another axis of this array
                chosen = axes
                break
        if chosen and sizes is not None and shape is not None:
            m = math.prod(sizes[a] for a in chosen)
            if shape[i] % m:
                if on_indivisible == "error":
                    raise ShardingError(
                        argument="t",
                        expected=f"axis {name!r} of a size divisible by {m} (mesh axes {chosen})",
                        got=f"size {shape[i]}",
                        hint="pad the axis, change the rules, or pass on_indivisible='replicate'.")
                chosen = ()
        used.update(chosen)
        entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return entries


def spec(t: Any, rules: Rules, *, mesh: Any = None, on_indivisible: str = "error") -> P:
    """The ``PartitionSpec`` that ``rules`` give to a named tensor (or a tuple of axis names).

    Args:
        t: a :class:`~viva_tensor.named.NamedTensor`, or a tuple of axis names (then sizes are not
            checked).
        rules: ``(axis name, mesh axes)`` pairs, Flax ``logical_axis_rules`` format.
        mesh: a mesh whose axis names and sizes are checked; default the one of ``jax.set_mesh``, if
            any (else nothing is checked against a mesh).
        on_indivisible: ``"error"`` (default) or ``"replicate"`` when an axis size does not divide by
            the product of its mesh axes' sizes.

    Returns:
        A ``PartitionSpec`` with one entry per axis (``None`` for replicated axes).

    Raises:
        ShardingError: for malformed rules, a mesh axis the mesh lacks, or an indivisible size.

    Example:
        >>> spec(("batch", "seq", None), [("batch", ("data", "fsdp")), ("seq", "data")])
        P(('data', 'fsdp'), None, None)
    """
    names, shape = _names_and_shape(t)
    if mesh is None:
        m = jax.sharding.get_abstract_mesh()
        mesh = None if m.empty else m
    return P(*_spec_entries(names, shape, rules, mesh, on_indivisible))


def named_sharding(t: Any, rules: Rules, mesh: Any = None, *, on_indivisible: str = "error") -> NamedSharding:
    """``NamedSharding(mesh, spec(t, rules))``.

    Args:
        t: a NamedTensor or a tuple of axis names.
        rules: ``(axis name, mesh axes)`` pairs.
        mesh: the mesh (default: the one of ``jax.set_mesh``).
        on_indivisible: ``"error"`` or ``"replicate"``.

    Returns:
        A ``jax.sharding.NamedSharding``.

    Raises:
        ShardingError: as :func:`spec`, or when no mesh is given or set.

    Example:
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> named_sharding(("batch", None), [("batch", "data")], mesh).spec
        P('data', None)
    """
    mesh = _current_mesh(mesh, concrete=True)
    names, shape = _names_and_shape(t)
    return NamedSharding(mesh, P(*_spec_entries(names, shape, rules, mesh, on_indivisible)))


# ---------------------------------------------------------------------------- quantized records


def _factors(record: Any) -> set:
    """Values per buffer entry that a record's layout can have: 1, 2 (two codes per byte), its blocks."""
    f = {1, 2}
    bs = getattr(record, "block_size", None)
    if isinstance(bs, int) and bs > 0:
        f.add(bs)
        f.add(bs // 2) if bs % 2 == 0 else None  # bytes of packed codes per block
        nb = getattr(record, "nested_block_size", None)
        if isinstance(nb, int) and nb > 0:
            f.add(bs * nb)
    return f


def _leaf_spec(leaf_shape: tuple, shape: tuple, entries: list, msize: Callable, factors: set,
               on_indivisible: str, what: str) -> P:
    """Spec of one buffer of a quantized record from the spec of the tensor it encodes.

    A buffer laid out like the tensor (same leading dims) follows the tensor's spec dim by dim: a dim
    equal to the tensor's takes its mesh axes; a dim that is the tensor's divided by a known block or
    packing factor (no padding) takes them when each shard holds whole blocks; size-1 dims (per-tensor
    or per-channel scales) are replicated. A flat buffer (blocks of the flattened tensor, row-major)
    follows the tensor's first axis when only that axis is sharded and nothing is padded.
    """
    r = len(shape)

    def fail(detail):
        if on_indivisible == "error":
            raise ShardingError(argument="record", expected=f"{what} with blocks that do not straddle shards",
                                got=f"buffer of shape {leaf_shape} for tensor shape {shape} sharded {P(*entries)} "
                                    f"({detail})",
                                hint="shard along another axis, or pass on_indivisible='replicate'.")
        return None

    def blocked(s, S, e):
        if e is None or (s == 1 and S != 1):
            return None
        if s == S:
            return e
        if s and S % s == 0 and S // s in factors and s % msize(e) == 0:
            return e  # S/s values per entry and no padding: shards hold whole blocks
        return fail(f"{S} values in {s} entries over {msize(e)} shards")

    nd = len(leaf_shape)
    if nd == 0 or all(d == 1 for d in leaf_shape):
        return P()
    shaped = nd in (r, r + 1) and all(leaf_shape[i] in (shape[i], 1) for i in range(r - 1))
    if shaped and nd == r:
        return P(*[blocked(s, S, e) for s, S, e in zip(leaf_shape, shape, entries, strict=False)])
    if shaped:
        # (..., blocks along the last axis, values or bytes of a block)
        out = [blocked(s, S, e) for s, S, e in zip(leaf_shape[: r - 1], shape[: r - 1], entries[: r - 1], strict=False)]
        return P(*out, blocked(leaf_shape[r - 1], shape[r - 1], entries[r - 1]), None)
    if nd in (1, 2) and r >= 1:
        if all(e is None for e in entries):
            return P(*([None] * nd))
        total = math.prod(shape)
        m = msize(entries[0]) if entries[0] is not None else 1
        if (all(e is None for e in entries[1:]) and shape[0] % m == 0 and leaf_shape[0] % m == 0
                and total % leaf_shape[0] == 0 and total // leaf_shape[0] in factors):
            return P(entries[0], *([None] * (nd - 1)))
        fail("a flat list of blocks follows only the first axis, unpadded")
        return P(*([None] * nd))
    fail("an unknown layout")
    return P(*([None] * nd))


def record_specs(record: Any, names: Sequence, rules: Rules, *, mesh: Any = None,
                 on_indivisible: str = "error") -> Any:
    """Specs for a quantized record's buffers, consistent with the tensor it encodes.

    The tensor of shape ``record.shape`` with axis ``names`` gets its spec from ``rules``; each
    buffer (codes, scales, mins ...) is then split along the same mesh axes wherever its block layout
    lets each device hold exactly the blocks of its part of the tensor (see the module notes).

    Args:
        record: a quantized record (``viva_tensor._formats.record.QuantizedArray``).
        names: one axis name per dim of the encoded tensor.
        rules: ``(axis name, mesh axes)`` pairs.
        mesh: the mesh (default: the one of ``jax.set_mesh``).
        on_indivisible: ``"error"`` or ``"replicate"`` (a buffer whose blocks would straddle shards is
            replicated).

    Returns:
        A pytree of the record's structure with a ``PartitionSpec`` for each buffer.

    Raises:
        ShardingError: for an indivisible size or blocks that would straddle shards.

    Example:
        >>> import flax.struct, jax.numpy as jnp
        >>> from viva_tensor._formats.record import QuantizedArray
        >>> @flax.struct.dataclass
        ... class Q(QuantizedArray):
        ...     codes: jax.Array
        ...     scales: jax.Array
        ...     shape: tuple = flax.struct.field(pytree_node=False)
        ...     dtype: str = flax.struct.field(pytree_node=False, default="float32")
        ...     block_size: int = flax.struct.field(pytree_node=False, default=32)
        >>> q = Q(jnp.zeros((8, 32), jnp.uint8), jnp.zeros((8, 2)), (8, 64))  # 64 values -> 32 bytes, 2 blocks
        >>> mesh = jax.make_mesh((1,), ("m",))
        >>> s = record_specs(q, ("out", "in"), [("in", "m")], mesh=mesh)
        >>> s.codes, s.scales
        (P(None, 'm'), P(None, 'm'))
    """
    if not is_quantized(record):
        raise ShardingError(argument="record", expected="a quantized record", got=type(record).__name__)
    shape = tuple(record.shape)
    names = tuple(names)
    if len(names) != len(shape):
        raise ShardingError(argument="names", expected=f"{len(shape)} names for a record of shape {shape}",
                            got=names)
    mesh = mesh if mesh is not None else (None if jax.sharding.get_abstract_mesh().empty
                                          else jax.sharding.get_abstract_mesh())
    entries = _spec_entries(names, shape, rules, mesh, on_indivisible)
    sizes = dict(mesh.shape) if mesh is not None else {}

    def msize(e):
        axes = (e,) if isinstance(e, str) else tuple(e)
        return math.prod(sizes.get(a, 1) for a in axes)

    what = type(record).__name__
    factors = _factors(record)
    return jax.tree.map(
        lambda leaf: _leaf_spec(tuple(leaf.shape), shape, entries, msize, factors, on_indivisible, what), record)


# ------------------------------------------------------------------------------------ placing


def _explicit(mesh: Any) -> bool:
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _check_spec(x: Any, s: P, mesh: Any) -> None:
    """A spec that names mesh axes at most once and divides ``x``'s dims: else ShardingError (not JAX's)."""
    sizes = dict(mesh.shape)
    shape = tuple(getattr(x, "shape", ()))
    if len(s) > len(shape):
        raise ShardingError(argument="spec", expected=f"at most {len(shape)} entries (the rank of the array)",
                            got=f"{s} for shape {shape}")
    seen: list = []
    for i, e in enumerate(s):
        if e is P.UNCONSTRAINED:
            continue
        axes = () if e is None else (e,) if isinstance(e, str) else e
        if not isinstance(axes, tuple) or not all(isinstance(a, str) for a in axes):
            raise ShardingError(argument="spec", expected="entries that are None, a mesh axis or a tuple of them",
                                got=repr(e))
        for a in axes:
            if a not in sizes:
                raise ShardingError(argument="spec", expected=f"mesh axes among {tuple(sizes)}", got=repr(a))
            if a in seen:
                raise ShardingError(argument="spec", expected="each mesh axis at most once", got=str(s))
            seen.append(a)
        m = math.prod(sizes[a] for a in axes)
        if shape[i] % m:
            raise ShardingError(argument="spec", expected=f"dim {i} of a size divisible by {m} (mesh axes {axes})",
                                got=f"shape {shape}", hint="pad the array, or shard another dim.")


def _place(x: Any, s: P, mesh: Any, mesh_given: bool) -> Any:
    _check_spec(x, s, mesh)
    if isinstance(x, jax.core.Tracer):
        target = NamedSharding(mesh, s) if mesh_given else s
        if _explicit(mesh):
            return jax.reshard(x, target)
        return jax.lax.with_sharding_constraint(x, target)
    return jax.device_put(x, NamedSharding(mesh, s))


def place(x: Any, spec: P, mesh: Any = None) -> Any:
    """Put one array on the mesh with a ``PartitionSpec``, inside or outside ``jit``.

    Outside ``jit`` the data is moved (``jax.device_put``; no copy when it already lives there); inside
    ``jit`` it is a sharding constraint, or a ``jax.reshard`` on a mesh with ``Explicit`` axes. This is what
    :func:`shard` does for each named tensor, for a plain array and a spec you already have.

    Args:
        x: an array (or a tracer inside ``jit``).
        spec: the ``PartitionSpec``, one entry per dimension of ``x`` (fewer entries replicate the rest).
        mesh: the mesh (default: the one of ``jax.set_mesh``); an ``AbstractMesh`` means the context mesh.

    Returns:
        ``x`` placed (outside ``jit``) or constrained (inside) to ``NamedSharding(mesh, spec)``.

    Raises:
        ShardingError: when no mesh is given or set, ``spec`` is not a ``PartitionSpec``, names an axis the mesh
            lacks (or one twice), has more entries than ``x`` has dims, or does not divide them.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> place(jnp.zeros((4, 2)), P("data", None), mesh).sharding.spec
        P('data', None)
    """
    if not isinstance(spec, P):
        raise ShardingError(argument="spec", expected="a jax.sharding.PartitionSpec", got=type(spec).__name__,
                            hint="P('data', None) shards axis 0 over the mesh axis 'data'.")
    given = mesh is not None and not isinstance(mesh, jax.sharding.AbstractMesh)
    tracing = isinstance(x, jax.core.Tracer)
    m = _current_mesh(mesh if given else None, concrete=not tracing and not given)
    return _place(x, spec, m, given)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, _named.NamedTensor) or is_quantized(x)


def shard(tree: Any, rules: Rules, mesh: Any = None, *, on_indivisible: str = "error") -> Any:
    """Place every NamedTensor of ``tree`` on the mesh by the rules.

    Outside ``jit`` the data is moved (``jax.device_put``); inside ``jit`` it is a sharding constraint,
    or a ``jax.reshard`` on a mesh with ``Explicit`` axes (JAX then wants the mesh context,
    ``jax.set_mesh``, unless the inputs of the ``jit`` already live on the mesh). A NamedTensor whose
    ``data`` is a quantized record has its buffers placed by :func:`record_specs`. Other leaves are returned
    unchanged.

    Args:
        tree: any pytree.
        rules: ``(axis name, mesh axes)`` pairs.
        mesh: the mesh (default: the one of ``jax.set_mesh``).
        on_indivisible: ``"error"`` or ``"replicate"``.

    Returns:
        ``tree`` with its named tensors sharded.

    Raises:
        ShardingError: as :func:`spec`, or when no mesh is given or set.

    Example:
        >>> from viva_tensor import named
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> t = shard(named.zeros({"batch": 4, "embed": 2}), [("batch", "data")], mesh)
        >>> t.data.sharding.spec
        P('data', None)
    """
    mesh_given = mesh is not None
    tracing = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))
    mesh = _current_mesh(mesh, concrete=not tracing and not mesh_given)

    def one(x):
        if not isinstance(x, _named.NamedTensor):
            return x
        if is_quantized(x.data):
            specs = record_specs(x.data, x.names, rules, mesh=mesh, on_indivisible=on_indivisible)
            data = jax.tree.map(lambda leaf, s: _place(leaf, s, mesh, mesh_given), x.data, specs)
            return _named.NamedTensor(data=data, names=x.names)
        s = P(*_spec_entries(_named.axis_names(x), tuple(x.data.shape), rules, mesh, on_indivisible))
        return _named.NamedTensor(data=_place(x.data, s, mesh, mesh_given), names=x.names)

    return jax.tree.map(one, tree, is_leaf=_is_leaf)


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def shard_map(f: Callable, *, rules: Rules, mesh: Any = None, out_names: Any, check_vma: bool = True) -> Callable:
    """``jax.shard_map`` whose specs come from the NamedTensors' names and the rules.

    The returned function takes the same arguments as ``f``; each NamedTensor argument is sharded by
    the rules (other arguments are replicated) and ``f`` sees its local block, names unchanged.
    ``out_names`` gives the names of ``f``'s outputs: a tuple of names for one output, or a pytree
    (tuple, dict ..., the structure of the outputs) of such tuples; an output that is a NamedTensor keeps the
    names ``f`` gave it.

    Args:
        f: a function of NamedTensors (and other pytrees) returning NamedTensors or arrays.
        rules: ``(axis name, mesh axes)`` pairs.
        mesh: the mesh (default: the one of ``jax.set_mesh``).
        out_names: names of the outputs' axes, used to build the out specs.
        check_vma: passed to ``jax.shard_map``.

    Returns:
        A jitted function.

    Raises:
        ShardingError: as :func:`spec`.

    Example:
        >>> from viva_tensor import named
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> rules = [("batch", "data")]
        >>> f = shard_map(lambda t: named.sum_along(t, "embed"), rules=rules, mesh=mesh, out_names=("batch",))
        >>> f(named.ones({"batch": 4, "embed": 3})).data.tolist()
        [3.0, 3.0, 3.0, 3.0]
    """
    out_specs = jax.tree.map(lambda names: spec(tuple(names), rules, mesh=mesh), out_names, is_leaf=_is_names)

    @jax.jit
    def run(*args):
        m = _current_mesh(mesh)
        args = shard(args, rules, mesh)
        in_specs = jax.tree.map(
            lambda x: (P(*_spec_entries(_named.axis_names(x), tuple(x.data.shape), rules, m, "error"))
                       if isinstance(x, _named.NamedTensor) else P()),
            args, is_leaf=lambda x: isinstance(x, _named.NamedTensor))
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)(*args)

    return run


# --------------------------------------------------------------------------------- NNX models


def param_specs(model: Any, rules: Rules, *, mesh: Any = None, names: Mapping[str, Sequence] | None = None,
                on_indivisible: str = "error") -> Any:
    """``PartitionSpec`` s for every variable of a Flax NNX model (or an ``nnx.State``), by the rules.

    A variable's axis names are ``names[path]`` when given, else the logical names it was created with
    (``nnx.with_partitioning(init, ("embed", "mlp"))``, metadata ``out_sharding``); a variable with
    neither is replicated. A variable whose value is a NamedTensor uses its names, and one holding a
    quantized record gets :func:`record_specs`. ``path`` is the library's one spelling of a tree path
    (``viva_tensor._paths.path_str``): the keys joined by dots, list indices as numbers, e.g.
    ``"layers.0.kernel"``; the keys of ``names`` are matched exactly (they are not patterns). Until this
    release paths were joined with ``/`` (``"layers/0/kernel"``): such a key is refused with a hint.

    Args:
        model: an ``nnx.Module`` or an ``nnx.State``.
        rules: ``(axis name, mesh axes)`` pairs.
        mesh: the mesh (default: the one of ``jax.set_mesh``).
        names: optional ``{path: axis names}``.
        on_indivisible: ``"error"`` or ``"replicate"``.

    Returns:
        An ``nnx.State`` of the model's structure with a ``PartitionSpec`` per array.

    Raises:
        ShardingError: as :func:`spec`, or for a ``names`` path that the model lacks.

    Example:
        >>> from flax import nnx
        >>> lin = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
        >>> s = param_specs(lin, [("in", "data")], names={"kernel": ("in", "out")}, mesh=jax.make_mesh((1,), ("data",)))
        >>> s["kernel"].get_value(), s["bias"].get_value()
        (P('data', None), P(None,))
    """
    from flax import nnx

    state = model if isinstance(model, nnx.State) else nnx.state(model)
    names = dict(names or {})
    if mesh is None:
        m = jax.sharding.get_abstract_mesh()
        mesh = None if m.empty else m
    seen = set()

    def one(path, var):
        p = path_str(path)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        logical = names.get(p)
        if logical is not None:
            seen.add(p)
        elif isinstance(var, nnx.Variable):
            logical = var.get_metadata().get("out_sharding")
        if isinstance(value, _named.NamedTensor):
            if is_quantized(value.data):
                s = _named.NamedTensor(
                    data=record_specs(value.data, logical or value.names, rules, mesh=mesh,
                                      on_indivisible=on_indivisible), names=value.names)
            else:
                s = _named.NamedTensor(data=P(*_spec_entries(tuple(logical or _named.axis_names(value)),
                                                             tuple(value.data.shape), rules, mesh, on_indivisible)),
                                       names=value.names)
        elif is_quantized(value):
            s = record_specs(value, logical, rules, mesh=mesh, on_indivisible=on_indivisible) if logical else \
                jax.tree.map(lambda _: P(), value)
        elif logical is None:
            s = P(*([None] * np.ndim(value)))
        else:
            logical = tuple(logical)
            if len(logical) != np.ndim(value):
                raise ShardingError(argument="names", expected=f"{np.ndim(value)} names for variable {p!r}",
                                    got=logical)
            s = P(*_spec_entries(logical, tuple(np.shape(value)), rules, mesh, on_indivisible))
        return var.replace(s) if isinstance(var, nnx.Variable) else s

    out = nnx.map_state(one, state) if hasattr(nnx, "map_state") else _map_state(one, state)
    missing = set(names) - seen
    if missing:
        slashed = [m for m in missing if "/" in m and m.replace("/", ".") in seen | _paths_of(state)]
        hint = (f"paths are dotted now: {slashed[0].replace('/', '.')!r}, not {slashed[0]!r}." if slashed
                else "paths join the keys with dots, e.g. 'layers.0.kernel'.")
        raise ShardingError(argument="names", expected="paths of the model's variables",
                            got=f"unknown paths {sorted(missing)}", hint=hint)
    return out


def _paths_of(state) -> set:
    from flax import nnx

    return {path_str(path) for path, _ in nnx.to_flat_state(state)}


def _map_state(f, state):
    from flax import nnx

    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(path, f(path, v)) for path, v in flat])


def shard_params(model: Any, rules: Rules, *, mesh: Any = None, names: Mapping[str, Sequence] | None = None,
                 on_indivisible: str = "error") -> Any:
    """Shard a Flax NNX model's variables by the rules (see :func:`param_specs`), in place.

    Outside ``jit`` the arrays are moved with ``jax.device_put``; inside, constrained (or resharded on
    ``Explicit`` meshes). Like ``nnx.update``, the model is updated in place; it is also returned.

    Args:
        model: an ``nnx.Module``.
        rules: ``(axis name, mesh axes)`` pairs.
        mesh: the mesh (default: the one of ``jax.set_mesh``).
        names: optional ``{path: axis names}``.
        on_indivisible: ``"error"`` or ``"replicate"``.

    Returns:
        The model.

    Raises:
        ShardingError: as :func:`param_specs`.

    Example:
        >>> from flax import nnx
        >>> lin = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> lin = shard_params(lin, [("out", "data")], names={"kernel": ("in", "out")}, mesh=mesh)
        >>> lin.kernel.get_value().sharding.spec
        P(None, 'data')
    """
    from flax import nnx

    mesh_given = mesh is not None
    state = nnx.state(model)
    tracing = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state))
    m = _current_mesh(mesh, concrete=not tracing and not mesh_given)
    specs = param_specs(state, rules, mesh=m, names=names, on_indivisible=on_indivisible)
    placed = jax.tree.map(lambda x, s: _place(x, s, m, mesh_given), state, specs,
                          is_leaf=lambda x: isinstance(x, P))
    nnx.update(model, placed)
    return model
