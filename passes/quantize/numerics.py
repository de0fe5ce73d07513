"""Quantization numerics: formats, scales, quantize/dequantize, fake-quant and int4 packing.

Everything here is a pure function of arrays: jittable, vmappable, and differentiable where that
means something (see :func:`fake_quant`). The passes decide *what* to quantize; this module
decides *how*, and the tests pin it bit for bit against an independent numpy reference.

Numerics contract:

* Scale and zero-point math is float32 whatever the input dtype (bf16 inputs are fine).
* ``x / scale`` is an IEEE division. XLA rewrites ``a / broadcast(b)`` into
  ``a * broadcast(1 / b)``, which is one ulp off for ~5% of inputs and so flips
  round-half-to-even decisions; :func:`_div` hides the broadcast from that rewrite.
* Rounding is round-half-to-even, for the integer codes and for the fp8 casts alike.
* A scale that is zero or subnormal (all-zero group, or absmax below ~1.5e-36) is replaced by
  1.0: backends flush subnormals to zero, so it would otherwise divide by zero. Zeros stay
  exactly zero.
* Non-finite values poison their group, loudly: a group (the values sharing one scale) that
  holds a NaN or an inf gets a NaN scale (and, asymmetric, a NaN zero point). Every dequantized
  value of the group is then NaN, and so is every integer-contraction output that is rescaled by
  it (a whole output channel for a per-channel weight scale, a whole row for a per-token
  activation scale): quantization never turns a non-finite input into a finite wrong answer.
  The integer codes of such a group are unspecified (XLA casts NaN to 0). With a *given*
  (calibrated) ``absmax`` the scale does not look at ``x``, so a NaN in ``x`` is not detected.
  Where values are concrete, passes raise instead (``convert_params``, ``calibrate``), using
  :func:`check_finite`.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_F32 = jnp.float32
_TINY = float(jnp.finfo(jnp.float32).tiny)  # smallest normal float32
_SUPPORTED = "int2..int8, fp8_e4m3, fp8_e5m2"


# ---- formats ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QFormat:
    """A quantized number format. Get one with :func:`get_format`.

    Attributes:
        name: ``"int2"`` .. ``"int8"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
        bits: Bits per value.
        is_float: True for the fp8 formats.
        storage_dtype: ``jnp.int8`` for every integer format (int4 and narrower are packed
            separately, see :func:`pack_int4`); ``jnp.float8_e4m3fn`` / ``jnp.float8_e5m2``.
        qmax: Symmetric integer range is ``[-qmax, qmax]`` with ``qmax = 2**(bits-1) - 1``
            (narrow: zero sits in the middle); for fp8 the largest finite value.

    Example:
        >>> fmt = get_format("int4")
        >>> fmt.qmax, fmt.asym_qmin, fmt.asym_qmax
        (7.0, -8.0, 7.0)
    """

    name: str
    bits: int
    is_float: bool
    storage_dtype: Any = dataclasses.field(repr=False)
    qmax: float

    @property
    def asym_qmin(self) -> float:
        """Lowest asymmetric code, ``-2**(bits-1)`` (integer formats only)."""
        self._require_int()
        return float(-(2 ** (self.bits - 1)))

    @property
    def asym_qmax(self) -> float:
        """Highest asymmetric code, ``2**(bits-1) - 1`` (integer formats only)."""
        self._require_int()
        return float(2 ** (self.bits - 1) - 1)

    def _require_int(self) -> None:
        if self.is_float:
            raise ValueError(f"{self.name} has no asymmetric range: it has no zero point")


def _int_format(bits: int) -> QFormat:
    return QFormat(f"int{bits}", bits, False, jnp.int8, float(2 ** (bits - 1) - 1))


def _fp8_format(name: str, dtype: Any) -> QFormat:
    return QFormat(name, 8, True, dtype, float(jnp.finfo(dtype).max))


_FORMATS = {f"int{b}": _int_format(b) for b in range(2, 9)} | {
    "fp8_e4m3": _fp8_format("fp8_e4m3", jnp.float8_e4m3fn),
    "fp8_e5m2": _fp8_format("fp8_e5m2", jnp.float8_e5m2),
}
_ALIASES = {"e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2"}


def get_format(fmt: str | int | QFormat) -> QFormat:
    """The :class:`QFormat` named by ``fmt``.

    Args:
        fmt: A QFormat (returned as is), a bit width ``2..8`` (integer format), or a name:
            ``"int2"`` .. ``"int8"``, ``"fp8_e4m3"`` / ``"e4m3"``, ``"fp8_e5m2"`` / ``"e5m2"``.

    Returns:
        The format; equal names give the same object.

    Raises:
        ValueError: Bit width outside 2..8, or an unknown name.
        TypeError: ``fmt`` is neither a string, an int nor a QFormat.

    Example:
        >>> get_format(8).name, get_format("e4m3").qmax
        ('int8', 448.0)
    """
    if isinstance(fmt, QFormat):
        return fmt
    if isinstance(fmt, bool) or not isinstance(fmt, int | str):
        raise TypeError(
            f"quantization format must be a name, a bit width or a QFormat, got {fmt!r}"
        )
    if isinstance(fmt, int):
        bits = fmt
    else:
        name = _ALIASES.get(fmt.strip().lower(), fmt.strip().lower())
        if name in _FORMATS:
            return _FORMATS[name]
        m = re.fullmatch(r"int(\d+)", name)
        if m is None:
            raise ValueError(f"unknown quantization format {fmt!r}; supported: {_SUPPORTED}")
        bits = int(m.group(1))
    if not 2 <= bits <= 8:
        raise ValueError(
            f"quantization bits must be between 2 and 8, got {bits} (supported: {_SUPPORTED})"
        )
    return _FORMATS[f"int{bits}"]


# ---- specs -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one array: the format and which axes share a scale.

    Build with :func:`make_spec`, which normalizes negative axes. Frozen and hashable, so it
    can be a static argument of :func:`jax.jit`.

    Attributes:
        fmt: The format (a name or bit width is converted with :func:`get_format`).
        reduce_axes: Axes one scale is shared over, non-negative and sorted: the contracting
            axes of a weight for per-channel scales, the feature axis of an activation for
            per-token scales, every axis for a per-tensor scale.
        symmetric: Symmetric (``[-qmax, qmax]``, no zero point) or asymmetric (integer formats
            only: full ``[asym_qmin, asym_qmax]`` range with a zero point).
        tile: ``(axis, tile_size)`` for sub-channel scales: ``axis`` (one of ``reduce_axes``)
            is split into ``(n_groups, tile_size)`` and each group of ``tile_size`` gets its
            own scale.

    Example:
        >>> QuantSpec("int8", (0,)).fmt.name
        'int8'
    """

    fmt: QFormat
    reduce_axes: tuple[int, ...]
    symmetric: bool = True
    tile: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        fmt = get_format(self.fmt)
        raw = (self.reduce_axes,) if isinstance(self.reduce_axes, int) else self.reduce_axes
        axes = tuple(sorted({operator.index(a) for a in raw}))
        if axes and axes[0] < 0:
            raise ValueError(
                f"reduce_axes must be non-negative, got {tuple(raw)}; "
                "use make_spec(..., ndim) to normalize negative axes"
            )
        if not self.symmetric and fmt.is_float:
            raise ValueError(
                f"asymmetric quantization needs an integer format; {fmt.name} has no zero point "
                "(use symmetric=True, or an int format)"
            )
        tile = self.tile
        if tile is not None:
            axis, size = (operator.index(t) for t in tile)
            if size < 1:
                raise ValueError(f"tile_size must be >= 1, got {size}")
            if axis not in axes:
                raise ValueError(
                    f"tile axis {axis} is not one of reduce_axes {axes}: a tile splits a "
                    "reduced axis into groups that each get their own scale"
                )
            tile = (axis, size)
        object.__setattr__(self, "fmt", fmt)
        object.__setattr__(self, "reduce_axes", axes)
        object.__setattr__(self, "symmetric", bool(self.symmetric))
        object.__setattr__(self, "tile", tile)


def _normalize_axis(axis: int, ndim: int) -> int:
    axis = operator.index(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def make_spec(
    fmt: str | int | QFormat,
    reduce_axes: int | Sequence[int] | None,
    ndim: int,
    *,
    symmetric: bool = True,
    tile: tuple[int, int] | None = None,
) -> QuantSpec:
    """A validated :class:`QuantSpec` for arrays of rank ``ndim``.

    Args:
        fmt: Format, as accepted by :func:`get_format`.
        reduce_axes: Axes sharing one scale (negative axes allowed); ``None`` means all axes
            (per-tensor).
        ndim: Rank of the arrays the spec will quantize.
        symmetric: See :class:`QuantSpec`.
        tile: ``(axis, tile_size)`` sub-channel groups; ``axis`` may be negative and must be
            one of ``reduce_axes``. Divisibility is checked against the shape in
            :func:`compute_qparams`.

    Returns:
        The spec, with axes normalized and sorted.

    Raises:
        ValueError: An axis out of range, asymmetric fp8, or a tile axis that is not reduced.

    Example:
        >>> make_spec("int4", -1, 3, tile=(-1, 32)).reduce_axes
        (2,)
    """
    if reduce_axes is None:
        reduce_axes = range(ndim)
    elif isinstance(reduce_axes, int):
        reduce_axes = (reduce_axes,)
    axes = tuple(_normalize_axis(a, ndim) for a in reduce_axes)
    if tile is not None:
        tile = (_normalize_axis(tile[0], ndim), tile[1])
    return QuantSpec(get_format(fmt), axes, symmetric, tile)


# ---- scales ----------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["scale", "zero_point"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class QParams:
    """Quantization parameters of one array (a jax pytree).

    Attributes:
        scale: float32, ``x.shape`` with the reduce axes kept as size 1. With a tile the shape
            is the tiled one: the tile axis split into ``(n_groups, 1)``.
        zero_point: float32 integer values of the same shape (asymmetric only), else None.

    Example:
        >>> qp = compute_qparams(jnp.ones((4, 3)), make_spec("int8", 0, 2))
        >>> qp.scale.shape, qp.zero_point
        ((1, 3), None)
    """

    scale: jax.Array
    zero_point: jax.Array | None = None


def _geometry(shape: tuple[int, ...], spec: QuantSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The working shape (tile axis split into groups) and the reduce axes within it."""
    shape = tuple(shape)
    if spec.reduce_axes and spec.reduce_axes[-1] >= len(shape):
        raise ValueError(
            f"reduce axis {spec.reduce_axes[-1]} is out of range for an array of shape {shape}"
        )
    if spec.tile is None:
        return shape, spec.reduce_axes
    axis, size = spec.tile
    if shape[axis] % size:
        raise ValueError(f"tile_size {size} does not divide axis {axis} of size {shape[axis]}")
    work = shape[:axis] + (shape[axis] // size, size) + shape[axis + 1 :]
    # Axes after the split shift by one; the tile axis itself becomes the within-group axis.
    return work, tuple(a + (a >= axis) for a in spec.reduce_axes)


def _div(num: Any, den: Any) -> jax.Array:
    """IEEE float32 ``num / den`` with broadcasting.

    XLA's simplifier turns ``a / broadcast(b)`` into ``a * broadcast(1 / b)``. With the
    broadcast divisor behind an optimization barrier the pattern no longer matches; the barrier
    is dropped after optimization, so the division still fuses and nothing is materialized.

    The divisor is also made to depend on ``num`` (``where(isnan(num), num, den)``: the same
    quotient, NaN for a NaN ``num`` either way). Without that, a program traced at one batch
    and ``vmap``-ed to a bigger one (an exported artifact's buckets) divides by a divisor
    that is not batched: vmap broadcasts it *outside* the barrier, the rewrite matches again,
    and the scale of a row differs in the last bit between batch sizes — enough to flip a
    rounding of a quantized activation, so a served row would depend on its bucket.
    """
    num, den = jnp.asarray(num, _F32), jnp.asarray(den, _F32)
    shape = jnp.broadcast_shapes(num.shape, den.shape)
    num = jnp.broadcast_to(num, shape)
    den = jnp.where(jnp.isnan(num), num, jnp.broadcast_to(den, shape))
    return num / lax.optimization_barrier(den)


def _safe_scale(scale: jax.Array) -> jax.Array:
    # A NaN/inf in the group (absmax or range NaN or inf) gives a NaN scale, so the group and
    # the outputs rescaled by it are NaN rather than silently finite. (The old `scale >= tiny`
    # guard mapped NaN to 1.0, and an inf scale made finite values code 0.)
    scale = jnp.where(jnp.isfinite(scale), scale, jnp.float32(jnp.nan))
    # Zero (all-zero group) or subnormal (flushed to zero by XLA) would divide by zero.
    # NaN < tiny is False: a NaN scale stays NaN.
    return jnp.where(scale < _TINY, jnp.float32(1.0), scale)


def compute_qparams(
    x: Any,
    spec: QuantSpec,
    *,
    absmax: Any = None,
    minmax: tuple[Any, Any] | None = None,
) -> QParams:
    """Scale (and zero point) for quantizing ``x`` with ``spec``.

    Symmetric (int and fp8): ``scale = absmax / qmax`` with ``absmax = max|x|`` over the
    reduce axes. Asymmetric: with ``lo = min(min x, 0)`` and ``hi = max(max x, 0)`` (so 0.0 is
    in range and maps to the zero point exactly), ``scale = (hi - lo) / (asym_qmax - asym_qmin)``
    and ``zero_point = clip(round(asym_qmin - lo / scale), asym_qmin, asym_qmax)``. A scale
    that would be zero or subnormal is 1.0; a group holding a NaN or an inf gets a NaN scale
    (see the module docstring). All math is float32.

    Args:
        x: The array (any float dtype).
        spec: How to quantize it.
        absmax: Precomputed absmax (e.g. from calibration) broadcastable to the scale shape;
            symmetric only. Values beyond it are clipped by :func:`quantize`.
        minmax: Precomputed ``(lo, hi)``, broadcastable to the scale shape; asymmetric only.

    Returns:
        The :class:`QParams`.

    Raises:
        ValueError: The spec does not fit ``x.shape`` (axis out of range, tile that does not
            divide its axis), or statistics for the wrong kind of spec.

    Example:
        >>> spec = make_spec("int8", None, 1)
        >>> compute_qparams(jnp.array([0.5, -1.27, 1.27]), spec).scale.tolist()
        [0.009999999776482582]
    """
    x = jnp.asarray(x)
    work, axes = _geometry(x.shape, spec)
    scale_shape = tuple(1 if i in axes else d for i, d in enumerate(work))
    xw = x.astype(_F32).reshape(work)

    def given(v: Any) -> jax.Array:
        return jnp.broadcast_to(jnp.asarray(v, _F32), scale_shape)

    fmt = spec.fmt
    if spec.symmetric:
        if minmax is not None:
            raise ValueError("minmax is for asymmetric specs; pass absmax= for a symmetric spec")
        if absmax is None:
            amax = jnp.max(jnp.abs(xw), axis=axes, keepdims=True)
        else:
            amax = given(absmax)
        return QParams(_safe_scale(_div(amax, fmt.qmax)), None)

    if absmax is not None:
        raise ValueError(
            "absmax is for symmetric specs; pass minmax=(lo, hi) for an asymmetric spec"
        )
    if minmax is None:
        lo = jnp.min(xw, axis=axes, keepdims=True)
        hi = jnp.max(xw, axis=axes, keepdims=True)
    else:
        lo, hi = given(minmax[0]), given(minmax[1])
    # Widen the range to include 0.0 so that zero (padding, ReLU outputs) is exact.
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = _safe_scale(_div(hi - lo, fmt.asym_qmax - fmt.asym_qmin))
    zp = lax.round(fmt.asym_qmin - _div(lo, scale), lax.RoundingMethod.TO_NEAREST_EVEN)
    return QParams(scale, jnp.clip(zp, fmt.asym_qmin, fmt.asym_qmax))


def check_finite(
    where: str, what: str, value: Any, error: type[Exception] = ValueError, *, hint: str = ""
) -> None:
    """Raise ``error`` if the concrete array ``value`` holds a NaN or an inf.

    Traced values (under ``jit``) cannot be checked and are skipped: there the NaN scale of
    :func:`compute_qparams` makes the result NaN instead. Non-float arrays are always finite.

    Args:
        where: The pass or function, first in the message (``"convert_params"``).
        what: What ``value`` is, e.g. ``"parameter 'params/Dense_0/kernel'"``.
        value: The array.
        error: The exception type to raise.
        hint: Appended to the message (how to fix it).

    Raises:
        error: ``value`` has a NaN or an inf; the message counts them and gives the first index.

    Example:
        >>> check_finite("demo", "parameter 'w'", jnp.array([1.0, jnp.inf]))
        Traceback (most recent call last):
        ...
        ValueError: demo: parameter 'w' has non-finite values: 0 NaN and 1 inf among 2 (first at index (1,)).
    """  # noqa: E501
    try:
        v = np.asarray(value)
    except jax.errors.TracerArrayConversionError:
        return
    if not jnp.issubdtype(v.dtype, jnp.floating):
        return
    v = v.astype(np.float32)
    bad = ~np.isfinite(v)
    if not bad.any():
        return
    n_nan = int(np.isnan(v).sum())
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise error(
        f"{where}: {what} has non-finite values: {n_nan} NaN and {int(bad.sum()) - n_nan} inf "
        f"among {v.size} (first at index {first}).{hint}"
    )


# ---- quantize / dequantize -------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _round_ste(v: jax.Array, dtype: Any) -> jax.Array:
    """Round float32 ``v`` to the nearest (ties to even) integer, or fp8 value of ``dtype``.

    The gradient passes straight through: rounding's own is zero almost everywhere, and a
    plain fp8 cast would round the cotangent to fp8 as well.
    """
    if dtype is None:
        return lax.round(v, lax.RoundingMethod.TO_NEAREST_EVEN)
    return v.astype(dtype).astype(_F32)


@_round_ste.defjvp
def _round_ste_jvp(dtype: Any, primals: tuple, tangents: tuple) -> tuple:
    return _round_ste(primals[0], dtype), tangents[0]


def _clip(v: jax.Array, lo: float, hi: float) -> jax.Array:
    # Same values as jnp.clip, but the gradient is 1 on [lo, hi] inclusive: jnp.clip's max/min
    # split it 0.5/0.5 at the bounds, and the absmax element always lands on a bound.
    return jnp.where(v < lo, lo, jnp.where(v > hi, hi, v))


def _codes(xw: jax.Array, qp: QParams, spec: QuantSpec) -> jax.Array:
    """Quantized values of float32 ``xw`` (working shape), as float32."""
    fmt = spec.fmt
    v = _div(xw, qp.scale)
    if fmt.is_float:
        # The clip keeps out-of-range values finite (e4m3fn has no inf: it would become NaN).
        return _round_ste(_clip(v, -fmt.qmax, fmt.qmax), fmt.storage_dtype)
    v = _round_ste(v, None)
    if spec.symmetric:
        return _clip(v, -fmt.qmax, fmt.qmax)
    return _clip(v + qp.zero_point, fmt.asym_qmin, fmt.asym_qmax)


def _dequant(codes: jax.Array, qp: QParams) -> jax.Array:
    v = codes.astype(_F32)
    if qp.zero_point is not None:
        v = v - qp.zero_point
    return v * qp.scale


def quantize(x: Any, qp: QParams, spec: QuantSpec) -> jax.Array:
    """Quantize ``x`` to ``spec.fmt.storage_dtype``.

    Integers: ``clip(round_half_even(x / scale) [+ zero_point], lo, hi)`` with ``[lo, hi]`` the
    symmetric ``[-qmax, qmax]`` or asymmetric ``[asym_qmin, asym_qmax]`` range. fp8:
    ``clip(x / scale, -qmax, qmax)`` cast to fp8 (round to nearest even).

    Args:
        x: The array (any float dtype).
        qp: Its parameters, from :func:`compute_qparams`.
        spec: The spec ``qp`` was computed with.

    Returns:
        ``int8`` (integer formats; int4 and narrower still one value a byte) or fp8 values,
        with ``x``'s shape.

    Example:
        >>> spec = make_spec("int8", None, 1)
        >>> x = jnp.array([0.5, -1.27, 1.27])
        >>> quantize(x, compute_qparams(x, spec), spec).tolist()
        [50, -127, 127]
    """
    x = jnp.asarray(x)
    work, _ = _geometry(x.shape, spec)
    codes = _codes(x.astype(_F32).reshape(work), qp, spec)
    return codes.astype(spec.fmt.storage_dtype).reshape(x.shape)  # exact: codes are in range


def dequantize(q: Any, qp: QParams, spec: QuantSpec, dtype: Any = jnp.float32) -> jax.Array:
    """``(q - zero_point) * scale`` in float32, then cast to ``dtype``.

    Args:
        q: Quantized values from :func:`quantize` (shape of the original array).
        qp: Their parameters.
        spec: The spec they were quantized with.
        dtype: Output dtype.

    Returns:
        The dequantized array, ``q``'s shape.

    Example:
        >>> spec = make_spec("int8", None, 1)
        >>> qp = QParams(jnp.array([0.5]), jnp.array([-3.0]))
        >>> dequantize(jnp.array([-3, 1], jnp.int8), qp, spec).tolist()
        [0.0, 2.0]
    """
    q = jnp.asarray(q)
    work, _ = _geometry(q.shape, spec)
    return _dequant(q.reshape(work), qp).reshape(q.shape).astype(dtype)


def fake_quant(
    x: Any,
    spec: QuantSpec,
    *,
    absmax: Any = None,
    minmax: tuple[Any, Any] | None = None,
) -> jax.Array:
    """``dequantize(quantize(x))`` with parameters from :func:`compute_qparams`, in ``x.dtype``.

    Bit-identical to the quantize/dequantize round trip. Gradients: rounding is a
    straight-through estimator and the clip is not, so ``d fake_quant / dx`` is 1 inside the
    representable range and 0 where values are clipped (plus, when the statistics come from
    ``x`` itself, the path through the scale). The fp8 cast passes gradients through as well.

    Args:
        x: A float array (bf16 and float32 both compute in float32).
        spec: How to quantize it.
        absmax: See :func:`compute_qparams`.
        minmax: See :func:`compute_qparams`.

    Returns:
        The fake-quantized array, ``x``'s shape and dtype.

    Example:
        >>> x = jnp.array([[0.5, -1.5], [0.2, 2.0]])  # int2: codes -1, 0, 1 per column
        >>> fake_quant(x, make_spec("int2", 0, 2)).tolist()
        [[0.5, -2.0], [0.0, 2.0]]
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"fake_quant needs a floating-point array, got {x.dtype}")
    qp = compute_qparams(x, spec, absmax=absmax, minmax=minmax)
    work, _ = _geometry(x.shape, spec)
    codes = _codes(x.astype(_F32).reshape(work), qp, spec)
    return _dequant(codes, qp).reshape(x.shape).astype(x.dtype)


# ---- int4 packing ----------------------------------------------------------------------


def _check_int4_range(q: jax.Array) -> None:
    try:
        values = np.asarray(q)
    except jax.errors.TracerArrayConversionError:
        return  # traced (jit, vmap): values unknown here, out-of-range ones are masked to 4 bits
    if values.size and (values.min() < -8 or values.max() > 7):
        raise ValueError(
            f"pack_int4 needs values in [-8, 7], got values in [{values.min()}, {values.max()}]"
        )


def pack_int4(q: Any, axis: int = -1) -> jax.Array:
    """Pack int4 values two per byte along ``axis``.

    Element ``2i`` goes to the low nibble and ``2i + 1`` to the high nibble of byte ``i``. An
    odd-sized axis is padded with one zero; :func:`unpack_int4` trims it given the size.

    Args:
        q: Integer values in ``[-8, 7]`` (any integer dtype, typically int8 from
            :func:`quantize`). Concrete inputs are checked; under ``jit`` values outside the
            range are silently masked to their low 4 bits.
        axis: The axis to pack along.

    Returns:
        ``uint8`` array with ``ceil(n / 2)`` entries along ``axis``.

    Raises:
        ValueError: A concrete value outside ``[-8, 7]``, or ``axis`` out of range.
        TypeError: ``q`` is not an integer array.

    Example:
        >>> pack_int4(jnp.array([1, -2, 7], jnp.int8)).tolist()
        [225, 7]
    """
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise TypeError(f"pack_int4 needs an integer array, got {q.dtype}")
    axis = _normalize_axis(axis, q.ndim)
    _check_int4_range(q)
    q = q.astype(jnp.int8)
    if q.shape[axis] % 2:
        pad = [(0, 0)] * q.ndim
        pad[axis] = (0, 1)
        q = jnp.pad(q, pad)
    nibbles = lax.bitcast_convert_type(q, jnp.uint8) & 0x0F  # two's complement low 4 bits
    low = lax.slice_in_dim(nibbles, 0, None, 2, axis)
    high = lax.slice_in_dim(nibbles, 1, None, 2, axis)
    return low | (high << 4)


def unpack_int4(packed: Any, size: int, axis: int = -1) -> jax.Array:
    """Inverse of :func:`pack_int4`: sign-extended ``int8`` values, padding trimmed.

    Args:
        packed: ``uint8`` array from :func:`pack_int4`.
        size: The original length of ``axis`` (``ceil(size / 2)`` must match ``packed``).
        axis: The axis that was packed.

    Returns:
        ``int8`` values in ``[-8, 7]`` with ``size`` entries along ``axis``.

    Raises:
        ValueError: ``size`` does not match the packed length, or ``axis`` out of range.
        TypeError: ``packed`` is not ``uint8``.

    Example:
        >>> unpack_int4(jnp.array([225, 7], jnp.uint8), 3).tolist()
        [1, -2, 7]
    """
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack_int4 needs a uint8 array, got {packed.dtype}")
    axis = _normalize_axis(axis, packed.ndim)
    n = packed.shape[axis]
    if size < 0 or (size + 1) // 2 != n:
        raise ValueError(
            f"unpack_int4: size {size} needs {max(size + 1, 0) // 2} packed bytes along axis "
            f"{axis}, got {n}"
        )
    s = lax.bitcast_convert_type(packed, jnp.int8)
    low = (s << 4) >> 4  # arithmetic shift sign-extends the low nibble
    high = s >> 4
    both = jnp.stack([low, high], axis=axis + 1)  # (..., n, 2, ...): interleaves 2i, 2i+1
    flat = both.reshape(packed.shape[:axis] + (2 * n,) + packed.shape[axis + 1 :])
    return lax.slice_in_dim(flat, 0, size, axis=axis)


__all__ = [
    "QFormat",
    "QParams",
    "QuantSpec",
    "check_finite",
    "compute_qparams",
    "dequantize",
    "fake_quant",
    "get_format",
    "make_spec",
    "pack_int4",
    "quantize",
    "unpack_int4",
]
