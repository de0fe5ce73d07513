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
from maas_jax.passes.quantize.numerics import (
    QParams,
    QuantSpec,
    compute_qparams,
    dequantize,
    make_spec,
    quantize,
)

from maas_jax import _compat

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

    # -- views --------------------------------------------------------------------
    def transpose(self, perm: tuple[int, ...]) -> QArray | None:
        if self.spec.tile is not None:
            return None  # tiled scales live in a split layout; dequantize instead
        inv = {old: new for new, old in enumerate(perm)}
        spec = dataclasses.replace(
            self.spec, reduce_axes=tuple(sorted(inv[a] for a in self.spec.reduce_axes))
        )
        t = lambda x: None if x is None else jnp.transpose(x, perm)  # noqa: E731
        return QArray(
            t(self.q), t(self.scale), t(self.zero_point), t(self.orig), spec, self.dtype, self.path
        )

    def astype(self, dtype: Any) -> QArray:
        orig = None if self.orig is None else self.orig.astype(dtype)
        return dataclasses.replace(self, orig=orig, dtype=dtype)

    def map_leaves(self, fn: Any) -> QArray:
        f = lambda x: None if x is None else fn(x)  # noqa: E731
        return dataclasses.replace(
            self, q=f(self.q), scale=f(self.scale), zero_point=f(self.zero_point), orig=f(self.orig)
        )


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
        (t1,) = _compat.bind_with_params(eqn.primitive, eqn.params, [d_lhs, rhs_dq])
        (t2,) = _compat.bind_with_params(eqn.primitive, eqn.params, [lhs_dq, d_rhs])
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
    (acc,) = _compat.bind_with_params(eqn.primitive, params, [_centered(lhs), _centered(rhs)])
    out_ndim = acc.ndim
    y = acc.astype(jnp.float32)
    y = y * _scale_to_out(eqn, lhs.scale, 0, out_ndim)
    y = y * _scale_to_out(eqn, rhs.scale, 1, out_ndim)
    return y.astype(out_dtype)


def float_contraction(eqn: Any, lhs: Any, rhs: Any) -> Any:
    (y,) = _compat.bind_with_params(eqn.primitive, eqn.params, [lhs, rhs])
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


def apply_view(eqn: Any, value: QArray) -> QArray | None:
    """A view equation applied to a QArray, or None when it must be dequantized first."""
    name = eqn.primitive.name
    if name == "transpose":
        return value.transpose(tuple(eqn.params["permutation"]))
    if name == "convert_element_type":
        new = eqn.params["new_dtype"]
        return value.astype(new) if _compat.is_floating(new) else None
    if name in ("copy", "copy_p", "pvary"):
        return value.map_leaves(
            lambda x: _compat.bind_with_params(eqn.primitive, eqn.params, [x])[0]
        )
    return None


__all__ = [
    "MARKER",
    "QArray",
    "STE_IDENTITY_NAME",
    "STE_NAME",
    "apply_view",
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
