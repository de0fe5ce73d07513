"""Quantized values inside the rewrite engine, and contractions over them.

A :class:`QArray` is what a quantized weight *is* while the engine re-traces a program: the
integer (or fp8) values, their scale and zero point, and — in fake-quant programs — the float
original, from which the straight-through estimator takes gradients. It flows through view
ops (transpose, dtype casts) and scan slicing like the weight it stands for; a contraction that
meets it runs on the integers (``s8 x s8 -> s32``) and rescales; anything else receives the
dequantized float (``__maas_materialize__``).

Fake-quant and converted programs differ only in where the QArray comes from (quantized at the
entry from the float weight, or read from stored integers); everything downstream is the same
code, which is why their forwards agree bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from maas_jax.passes.quantize.numerics import (
    QParams,
    QuantSpec,
    compute_qparams,
    dequantize,
    make_spec,
    quantize,
)

from maas_jax.extend import bind_with_params, is_floating, reshape_groups

MARKER = "maas_fake_quant"
STE_NAME = "maas_ste"
STE_IDENTITY_NAME = "maas_ste_identity"


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QArray:
    """Quantized values ``q`` with ``scale`` (and ``zero_point``); ``orig`` is the float source."""

    q: Any
    scale: Any
    zero_point: Any
    orig: Any
    spec: QuantSpec
    dtype: Any
    path: str

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (self.q, self.scale, self.zero_point, self.orig), (self.spec, self.dtype, self.path)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> QArray:
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point)

    def dequantized(self) -> Any:
        return dequantize(self.q, self.qparams, self.spec, self.dtype)

    def __maas_materialize__(self) -> Any:
        dq = self.dequantized()
        return dq if self.orig is None else ste_identity(self.orig, dq)

    # -- views (the engine calls __maas_view__ for view ops; see maas_jax/README.md) --------
    #
    # A view of a quantized weight is a quantized weight: the integers go through the view, and
    # so does the scale, kept compact (size 1 along the axes it is shared over). The spec's
    # axis numbers are those of the *result*. Where a view cannot keep the scale compact (a
    # reshape mixing shared and per-channel axes), the method returns None and the engine
    # dequantizes first: still correct, and fake_quant warns where a contraction then loses its
    # integer path.

    def __maas_view__(self, eqn: Any, operands: list[Any]) -> QArray | None:
        name = eqn.primitive.name
        if name == "transpose":
            return self.transpose(tuple(eqn.params["permutation"]))
        if name == "convert_element_type":
            new = eqn.params["new_dtype"]
            return self.astype(new) if is_floating(new) else None
        if name in ("copy", "copy_p", "pvary"):
            return self.map_leaves(lambda x: _bind(eqn, x, operands))
        if name in ("sharding_constraint", "mesh_cast", "reshard"):
            # Place the integers (and the float source) like the weight; the compact scale is
            # tiny and stays where jax puts it.
            return self._with_values(eqn, operands, self.scale, self.zero_point, self.spec)
        if name in ("reshape", "squeeze"):
            if eqn.params.get("dimensions") is not None and name == "reshape":
                return None
            return self._reshaped(eqn, operands, tuple(eqn.outvars[0].aval.shape))
        if name == "broadcast_in_dim":
            return self._broadcast(eqn, operands)
        if name == "slice":
            return self._slice(eqn, operands)
        if name == "dynamic_slice":
            return self._dynamic_slice(eqn, operands)
        if name == "gather":
            return self.gather(eqn, operands)
        return None

    def _with_values(self, eqn: Any, operands: list[Any], scale: Any, zp: Any, spec: Any) -> QArray:
        q = _bind(eqn, self.q, operands)
        orig = None if self.orig is None else _bind(eqn, self.orig, operands)
        return QArray(q, scale, zp, orig, spec, self.dtype, self.path)

    def _spec(self, reduce_axes: Any, tile: Any = None) -> QuantSpec:
        return dataclasses.replace(self.spec, reduce_axes=tuple(sorted(reduce_axes)), tile=tile)

    def _map_scales(self, fn: Any) -> tuple[Any, Any]:
        zp = None if self.zero_point is None else fn(self.zero_point)
        return fn(self.scale), zp

    def transpose(self, perm: tuple[int, ...]) -> QArray | None:
        inv = {old: new for new, old in enumerate(perm)}
        axes = tuple(inv[a] for a in self.spec.reduce_axes)
        tile = None
        scale_perm = perm
        if self.spec.tile is not None:
            t, size = self.spec.tile
            # Scales live in the tiled layout (axis t split into groups, within-group).
            work = lambda a: a + (a > t)  # noqa: E731
            scale_perm = []
            for a in perm:
                scale_perm.extend([work(a), work(a) + 1] if a == t else [work(a)])
            tile = (inv[t], size)
        t_ = lambda x, p: None if x is None else jnp.transpose(x, p)  # noqa: E731
        return QArray(
            t_(self.q, perm),
            t_(self.scale, tuple(scale_perm)),
            t_(self.zero_point, tuple(scale_perm)),
            t_(self.orig, perm),
            self._spec(axes, tile),
            self.dtype,
            self.path,
        )

    def _reshaped(self, eqn: Any, operands: list[Any], out_shape: tuple[int, ...]) -> QArray | None:
        in_shape = self.shape
        reduce = set(self.spec.reduce_axes)
        compact: list[int] = [1] * len(out_shape)
        new_reduce: set[int] = set()
        tile = None
        for gi, gj in reshape_groups(in_shape, out_shape):
            real = [i for i in gi if in_shape[i] != 1]
            shared = [i in reduce for i in real]
            if any(shared) and not all(shared):
                return None  # a group mixing shared and per-channel axes
            if self.spec.tile is not None and self.spec.tile[0] in gi:
                real_out = [j for j in gj if out_shape[j] != 1]
                if real != [self.spec.tile[0]] or len(real_out) != 1:
                    return None  # tiles survive only a reshape that keeps their axis whole
                tile = (real_out[0], self.spec.tile[1])
            for j in gj:
                if all(shared) or out_shape[j] == 1:
                    new_reduce.add(j)
                else:
                    compact[j] = out_shape[j]
        if tile is not None:
            t, size = tile
            work = [*compact[:t], out_shape[t] // size, 1, *compact[t + 1 :]]
        else:
            work = compact
        if int(np.prod(work)) != self.scale.size:
            return None
        scale, zp = self._map_scales(lambda x: x.reshape(work))
        return self._with_values(eqn, operands, scale, zp, self._spec(new_reduce, tile))

    def _broadcast(self, eqn: Any, operands: list[Any]) -> QArray | None:
        if self.spec.tile is not None:
            return None
        shape = tuple(eqn.params["shape"])
        bd = tuple(eqn.params["broadcast_dimensions"])
        reduce = set(self.spec.reduce_axes)
        compact = [1] * len(shape)
        for i, j in enumerate(bd):
            if i not in reduce and self.shape[i] == shape[j]:
                compact[j] = shape[j]
        new_reduce = {j for j in range(len(shape)) if compact[j] == 1}
        # Each scale axis is 1 or the full size, so it broadcasts straight into place.
        scale, zp = self._map_scales(lambda x: jax.lax.broadcast_in_dim(x, tuple(compact), bd))
        return self._with_values(eqn, operands, scale, zp, self._spec(new_reduce))

    def _slice(self, eqn: Any, operands: list[Any]) -> QArray | None:
        p = eqn.params
        starts, limits = list(p["start_indices"]), list(p["limit_indices"])
        strides = list(p["strides"] or [1] * len(starts))
        s_start, s_limit, s_strides = [], [], []
        for a, n in enumerate(self.scale_shape()):
            if self.spec.tile is not None and a == self.spec.tile[0]:
                size = self.spec.tile[1]
                if strides[a] != 1 or starts[a] % size or limits[a] % size:
                    return None
                s_start += [starts[a] // size, 0]
                s_limit += [limits[a] // size, 1]
                s_strides += [1, 1]
            elif n == 1:
                s_start.append(0)
                s_limit.append(1)
                s_strides.append(1)
            else:
                s_start.append(starts[a])
                s_limit.append(limits[a])
                s_strides.append(strides[a])
        scale, zp = self._map_scales(lambda x: jax.lax.slice(x, s_start, s_limit, s_strides))
        return self._with_values(eqn, operands, scale, zp, self.spec)

    def _dynamic_slice(self, eqn: Any, operands: list[Any]) -> QArray | None:
        sizes = tuple(eqn.params["slice_sizes"])
        starts, s_sizes = [], []
        zero = jnp.zeros((), jnp.int32)
        for a, n in enumerate(self.scale_shape()):
            if self.spec.tile is not None and a == self.spec.tile[0]:
                if sizes[a] != self.shape[a]:
                    return None
                starts += [zero, zero]
                s_sizes += [self.shape[a] // self.spec.tile[1], 1]
            elif n == 1:
                starts.append(zero)
                s_sizes.append(1)
            else:
                starts.append(operands[a])
                s_sizes.append(sizes[a])
        scale, zp = self._map_scales(lambda x: jax.lax.dynamic_slice(x, starts, s_sizes))
        return self._with_values(eqn, operands, scale, zp, self.spec)

    def gather(self, eqn: Any, operands: list[Any]) -> QArray | None:
        """Gather rows of the integers and of their scales (an embedding lookup stays int8)."""
        if self.spec.tile is not None:
            return None
        p = eqn.params
        dn = p["dimension_numbers"]
        reduce = set(self.spec.reduce_axes)
        indexed = set(dn.start_index_map) | set(getattr(dn, "operand_batching_dims", ()))
        if any(a in reduce and self.shape[a] != 1 for a in indexed):
            return None  # the scale is shared along an indexed axis: no row to pick
        sizes = list(p["slice_sizes"])
        for a in reduce:
            if sizes[a] not in (1, self.shape[a]):
                return None
            sizes[a] = 1
        params = {**p, "slice_sizes": tuple(sizes)}
        # Out-of-bounds fills: the float source and scale take jax's (NaN), so a dropped row
        # dequantizes to NaN as the float model's does; integers take their dtype's default.
        (q,) = bind_with_params(eqn.primitive, {**p, "fill_value": None}, [self.q, *operands])
        orig = None
        if self.orig is not None:
            (orig,) = bind_with_params(eqn.primitive, p, [self.orig, *operands])

        def g(x: Any) -> Any:
            return bind_with_params(eqn.primitive, params, [x, *operands])[0]

        scale, zp = self._map_scales(g)
        dropped = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
        kept = [a for a in range(len(self.shape)) if a not in dropped]
        new_reduce = {dn.offset_dims[k] for k, a in enumerate(kept) if a in reduce}
        new_reduce |= {j for j, n in enumerate(scale.shape) if n == 1}
        return QArray(q, scale, zp, orig, self._spec(new_reduce), self.dtype, self.path)

    def scale_shape(self) -> tuple[int, ...]:
        """The scale's shape in the value's own axes (a tiled axis reports its group count)."""
        if self.spec.tile is None:
            return tuple(self.scale.shape)
        t, _ = self.spec.tile
        s = tuple(self.scale.shape)
        return s[:t] + (s[t],) + s[t + 2 :]

    # -- scan slicing (the engine calls these for stacked ``xs``) ---------------------------

    def __maas_scan_prepare__(self) -> QArray | None:
        """Every leaf with the leading (layer) axis at full length, so scan can slice it."""
        if self.spec.tile is not None and self.spec.tile[0] == 0:
            return None
        n = self.shape[0]

        def full(x: Any) -> Any:
            return x if x.shape[0] == n else jnp.broadcast_to(x, (n, *x.shape[1:]))

        scale, zp = self._map_scales(full)
        return QArray(self.q, scale, zp, self.orig, self.spec, self.dtype, self.path)

    def __maas_scan_slice__(self) -> QArray:
        """After scan sliced the leaves: axis numbers of one layer (the leading axis is gone)."""
        axes = {a - 1 for a in self.spec.reduce_axes if a > 0}
        tile = None if self.spec.tile is None else (self.spec.tile[0] - 1, self.spec.tile[1])
        return dataclasses.replace(self, spec=self._spec(axes, tile))

    # -- shard_map (the engine asks for one partition spec per leaf) --------------------------

    def __maas_shard_specs__(self, spec: Any) -> QArray:
        """The per-leaf partition specs for a QArray passed into shard_map with ``spec``."""
        from jax.sharding import PartitionSpec

        entries = tuple(spec) + (None,) * (len(self.shape) - len(tuple(spec)))
        scale_entries = []
        for a, n in enumerate(self.scale_shape()):
            e = None if n == 1 else entries[a]
            if self.spec.tile is not None and a == self.spec.tile[0]:
                scale_entries += [e, None]
            else:
                scale_entries.append(e)
        sp = PartitionSpec(*scale_entries)
        return QArray(
            spec,
            sp,
            None if self.zero_point is None else sp,
            None if self.orig is None else spec,
            self.spec,
            self.dtype,
            self.path,
        )

    def astype(self, dtype: Any) -> QArray:
        orig = None if self.orig is None else self.orig.astype(dtype)
        return dataclasses.replace(self, orig=orig, dtype=dtype)

    def map_leaves(self, fn: Any) -> QArray:
        f = lambda x: None if x is None else fn(x)  # noqa: E731
        return dataclasses.replace(
            self, q=f(self.q), scale=f(self.scale), zero_point=f(self.zero_point), orig=f(self.orig)
        )


def _bind(eqn: Any, x: Any, operands: list[Any]) -> Any:
    return bind_with_params(eqn.primitive, eqn.params, [x, *operands])[0]


# ---- straight-through estimators ------------------------------------------------------


def _named(fn: Any, name: str) -> Any:
    fn.__name__ = fn.__qualname__ = name
    return fn


@jax.custom_jvp
def ste_identity(orig: Any, quantized: Any) -> Any:
    """``quantized`` forward; the gradient flows to ``orig`` as if quantization were identity."""
    return quantized


_named(ste_identity.fun, STE_IDENTITY_NAME)
ste_identity.__name__ = STE_IDENTITY_NAME


@ste_identity.defjvp
def _ste_identity_jvp(primals: Any, tangents: Any) -> Any:
    _, quantized = primals
    d_orig, _ = tangents
    return quantized, d_orig.astype(quantized.dtype)


def ste_contraction(eqn: Any, exact: Any, lhs_dq: Any, rhs_dq: Any, lhs: Any, rhs: Any) -> Any:
    """``exact`` forward; tangents of the float contraction over the dequantized operands.

    The forward is the integer computation (what the converted model runs); the derivative is
    that of ``eqn`` applied to fake-quantized operands, linear in the tangents of the float
    originals ``lhs``/``rhs`` — so ``jax.grad`` and ``jax.jvp`` both work (QAT).
    """

    @jax.custom_jvp
    def ste(exact: Any, lhs_dq: Any, rhs_dq: Any, lhs: Any, rhs: Any) -> Any:
        return exact

    def jvp(primals: Any, tangents: Any) -> Any:
        exact, lhs_dq, rhs_dq, _, _ = primals
        _, _, _, d_lhs, d_rhs = tangents
        (t1,) = bind_with_params(eqn.primitive, eqn.params, [d_lhs, rhs_dq])
        (t2,) = bind_with_params(eqn.primitive, eqn.params, [lhs_dq, d_rhs])
        return exact, (t1 + t2).astype(exact.dtype)

    _named(ste.fun, STE_NAME)
    ste.defjvp(jvp)
    return ste(exact, lhs_dq, rhs_dq, lhs, rhs)


# ---- contractions -----------------------------------------------------------------------


def quantize_dynamic(x: Any, fmt: Any, axes: tuple[int, ...], symmetric: bool) -> QArray:
    """Quantize an activation with scales over ``axes`` computed from the value itself."""
    spec = make_spec(fmt, axes, x.ndim, symmetric=symmetric)
    qp = compute_qparams(x, spec)
    q = quantize(x, qp, spec)
    return QArray(q, qp.scale, qp.zero_point, x, spec, x.dtype, "<activation>")


def quantize_static(x: Any, fmt: Any, absmax: float) -> QArray:
    """Quantize an activation with one calibrated per-tensor range (a constant scale)."""
    spec = make_spec(fmt, tuple(range(x.ndim)), x.ndim, symmetric=True)
    qp = compute_qparams(x, spec, absmax=jnp.full((1,) * x.ndim, absmax, jnp.float32))
    q = quantize(x, qp, spec)
    return QArray(q, qp.scale, qp.zero_point, x, spec, x.dtype, "<activation>")


def int_path_ok(*qs: QArray) -> bool:
    """Whether an integer contraction is exact for these operands (else: emulate in float)."""
    return all(not q.spec.fmt.is_float and q.spec.tile is None for q in qs)


def scales_shared_over_contraction(eqn: Any, lhs: QArray, rhs: QArray) -> bool:
    """Whether each operand's scale is constant along the axes the contraction sums over.

    Only then can the integer accumulator be rescaled once per output element. A weight
    quantized per channel for one use and consumed along another axis elsewhere fails this
    (fake_quant then emulates the contraction in float rather than compute a wrong answer).
    """
    lhs_axes, rhs_axes = contraction_operands_axes(eqn)
    if eqn.primitive.name == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        lhs_axes = tuple(dn.lhs_spec[1:])  # features and window: summed for each output
        rhs_axes = tuple(dn.rhs_spec[1:])
    return all(lhs.scale.shape[a] == 1 for a in lhs_axes) and all(
        rhs.scale.shape[a] == 1 for a in rhs_axes
    )


def contraction_operands_axes(eqn: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Axes a per-row scale must be shared over, for the lhs and rhs of a dot/conv."""
    p = eqn.params
    if eqn.primitive.name == "dot_general":
        (lc, rc), _ = p["dimension_numbers"]
        return tuple(lc), tuple(rc)
    dn = p["dimension_numbers"]
    lhs_nd = len(dn.lhs_spec)
    # conv: activations per example (everything but the batch axis); weights per out-feature.
    lhs_axes = tuple(a for a in range(lhs_nd) if a != dn.lhs_spec[0])
    rhs_axes = tuple(a for a in range(len(dn.rhs_spec)) if a != dn.rhs_spec[0])
    return lhs_axes, rhs_axes


def _scale_to_out(eqn: Any, scale: Any, side: int, out_ndim: int) -> Any:
    """Lay a keepdims scale of operand ``side`` (0 lhs, 1 rhs) out in the output's dims."""
    p = eqn.params
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        contract, batch = (lc, lb) if side == 0 else (rc, rb)
        nd = scale.ndim
        free = [a for a in range(nd) if a not in contract and a not in batch]
        s = jnp.transpose(scale, (*batch, *free, *contract))
        s = s.reshape(s.shape[: len(batch) + len(free)])  # contracted axes have size 1
        lhs_nd = len(eqn.invars[0].aval.shape)
        rhs_nd = len(eqn.invars[1].aval.shape)
        n_lhs_free = lhs_nd - len(lc) - len(lb)
        n_rhs_free = rhs_nd - len(rc) - len(rb)
        if side == 0:
            return s.reshape(s.shape + (1,) * n_rhs_free)
        nb = len(batch)
        return s.reshape(s.shape[:nb] + (1,) * n_lhs_free + s.shape[nb:])
    dn = p["dimension_numbers"]
    src_axis = dn.lhs_spec[0] if side == 0 else dn.rhs_spec[0]
    dst_axis = dn.out_spec[0] if side == 0 else dn.out_spec[1]
    vec = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
    if vec.ndim == 0:
        return vec
    shape = [1] * out_ndim
    shape[dst_axis] = scale.shape[src_axis]
    return vec.reshape(shape)


def _centered(q: QArray) -> Any:
    """Integer values minus the zero point, as int32 (asymmetric) or the int8 values."""
    if q.zero_point is None:
        return q.q
    return q.q.astype(jnp.int32) - q.zero_point.astype(jnp.int32)


def int_contraction(eqn: Any, lhs: QArray, rhs: QArray) -> Any:
    """The contraction on integers with int32 accumulation, rescaled to the output dtype."""
    out_dtype = eqn.outvars[0].aval.dtype
    params = {**eqn.params, "preferred_element_type": jnp.int32}
    if "precision" in params:
        params["precision"] = None
    (acc,) = bind_with_params(eqn.primitive, params, [_centered(lhs), _centered(rhs)])
    out_ndim = acc.ndim
    y = acc.astype(jnp.float32)
    y = y * _scale_to_out(eqn, lhs.scale, 0, out_ndim)
    y = y * _scale_to_out(eqn, rhs.scale, 1, out_ndim)
    return y.astype(out_dtype)


def float_contraction(eqn: Any, lhs: Any, rhs: Any) -> Any:
    (y,) = bind_with_params(eqn.primitive, eqn.params, [lhs, rhs])
    return y


def quantize_weight_at_entry(w: Any, spec: QuantSpec, path: str, marker: Any) -> QArray:
    """The entry transform: quantize ``w`` inside the marker region, keep the float for STE."""
    q, scale, zero_point = marker(w)
    return QArray(q, scale, zero_point, w, spec, w.dtype, path)


def make_marker(spec: QuantSpec) -> Any:
    """A jitted function named :data:`MARKER` computing ``(q, scale, zero_point)`` from a weight."""

    def fn(w: Any) -> tuple[Any, Any, Any]:
        qp = compute_qparams(w, spec)
        return quantize(w, qp, spec), qp.scale, qp.zero_point

    return jax.jit(_named(fn, MARKER))


__all__ = [
    "MARKER",
    "QArray",
    "STE_IDENTITY_NAME",
    "STE_NAME",
    "contraction_operands_axes",
    "float_contraction",
    "int_contraction",
    "int_path_ok",
    "make_marker",
    "quantize_dynamic",
    "quantize_weight_at_entry",
    "ste_contraction",
    "ste_identity",
]
