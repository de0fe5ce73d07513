"""Pruning masks and saliency scores: pure, jittable functions of arrays.

Every mask is a boolean array shaped like the weight, ``True`` where the weight is **kept**
and ``False`` where it is pruned. Applying one is ``jnp.where(mask, w, 0)``.

Contract shared by every function here:

* **Exact counts.** Selecting by a sparsity prunes exactly ``round(sparsity * count)`` entries
  (``count`` is the number of weights, blocks or row entries the function ranks; ``round`` is
  Python's round-half-to-even), so the achieved sparsity is exact up to that rounding and no
  threshold ties can make it drift.
* **Deterministic ties.** Entries are ranked by a stable sort on their score; among equal scores
  the entry with the **lower flat index is pruned first**.
* **Jittable.** A Python-number ``sparsity`` gives a static count. A traced ``sparsity`` (from a
  schedule evaluated at a traced step) is also accepted: the count is then computed on device,
  in float32, and clipped to ``[0, count]``; it cannot be validated.
* **Sparsity must be in [0, 1).** ``1.0`` (prune everything) and negative values raise
  ``ValueError``; ``0.99`` is fine. Note that on a tiny tensor ``round(0.99 * 10) == 10``
  still prunes every entry: exactness wins over keeping a survivor.

Scores (:func:`channel_scores`, :func:`snip_scores`, :func:`wanda_scores`) are float32 and
larger means more important.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = Any

__all__ = [
    "block_mask",
    "channel_scores",
    "global_magnitude_masks",
    "magnitude_mask",
    "nm_mask",
    "random_mask",
    "snip_scores",
    "sparsity_of",
    "wanda_mask",
    "wanda_scores",
]


# ---- validation and counting -----------------------------------------------------------


def _concrete(x: Any) -> float | None:
    """``float(x)`` for a concrete scalar, ``None`` for a traced one."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_sparsity(sparsity: Any, what: str = "sparsity") -> float | None:
    """Validate a sparsity; return it as a float, or ``None`` when it is traced.

    Raises:
        ValueError: a concrete value outside ``[0, 1)`` (or not finite).

    Example:
        >>> check_sparsity(0.99)
        0.99
        >>> check_sparsity(1.0)
        Traceback (most recent call last):
        ...
        ValueError: sparsity must be in [0, 1), got 1.0 (1.0 would prune every weight)
    """
    if np.ndim(sparsity) != 0:
        raise ValueError(f"{what} must be a scalar, got shape {np.shape(sparsity)}")
    value = _concrete(sparsity)
    if value is None:
        return None
    if not (0.0 <= value < 1.0):  # also rejects NaN
        hint = " (1.0 would prune every weight)" if value >= 1.0 else ""
        raise ValueError(f"{what} must be in [0, 1), got {value!r}{hint}")
    return value


def _prune_count(sparsity: Any, count: int) -> Any:
    """How many of ``count`` entries to prune: a Python int, or an int32 tracer."""
    value = check_sparsity(sparsity)
    if value is not None:
        return round(value * count)
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * count)
    return jnp.clip(k, 0, count).astype(jnp.int32)


def _axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not isinstance(axis, int | np.integer) or not -ndim <= axis < ndim:
        raise ValueError(f"{what}={axis!r} is out of range for an array with {ndim} dimensions")
    return int(axis) % ndim


# ---- the ranking kernel ----------------------------------------------------------------


def prune_lowest(keys: Sequence[Array], k: Any) -> Array:
    """Keep-mask pruning the ``k`` lowest entries of every row (last axis).

    Entries are ordered lexicographically by ``keys`` (first key most significant), then by
    index along the last axis; the first ``k`` of each row are pruned. ``k`` may be a Python int,
    a traced scalar, or an integer array broadcastable to the rows (shape ``keys[0].shape[:-1]``).

    Example:
        >>> prune_lowest([jnp.array([3.0, 1.0, 1.0, 2.0])], 2).tolist()
        [True, False, False, True]
    """
    shape = keys[0].shape
    iota = lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    order = lax.sort((*keys, iota), dimension=len(shape) - 1, num_keys=len(keys), is_stable=True)[
        -1
    ]
    # ``order`` is a permutation per row; sorting it back yields each entry's rank.
    ranks = lax.sort((order, iota), dimension=len(shape) - 1, num_keys=1)[1]
    k = jnp.asarray(k, jnp.int32)
    return ranks >= k[..., None] if k.ndim else ranks >= k


def _magnitude(w: Array) -> Array:
    return jnp.abs(jnp.asarray(w))


# ---- unstructured ----------------------------------------------------------------------


def magnitude_mask(w: Array, *, sparsity: Any = None, threshold: Any = None) -> Array:
    """Keep-mask of ``w`` by magnitude, layer-wise.

    Args:
        w: The weight.
        sparsity: Fraction to prune, in ``[0, 1)``: exactly ``round(sparsity * w.size)`` entries
            with the smallest ``|w|`` are pruned (ties: lower flat index pruned first).
        threshold: Keep ``|w| > threshold`` (an entry equal to the threshold is pruned).

    Exactly one of ``sparsity`` and ``threshold`` must be given.

    Returns:
        A bool array shaped like ``w``, True = kept.

    Example:
        >>> w = jnp.array([[0.1, -2.0], [0.5, -0.05]])
        >>> magnitude_mask(w, sparsity=0.5).tolist()
        [[False, True], [True, False]]
        >>> magnitude_mask(w, threshold=0.3).tolist()
        [[False, True], [True, False]]
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError(
            "magnitude_mask needs exactly one of sparsity= and threshold=, got "
            f"sparsity={sparsity!r}, threshold={threshold!r}"
        )
    mag = _magnitude(w)
    if threshold is not None:
        return mag > threshold
    k = _prune_count(sparsity, mag.size)
    return prune_lowest([mag.reshape(-1)], k).reshape(mag.shape)


def global_magnitude_masks(weights: Mapping[str, Array] | Any, sparsity: Any) -> Any:
    """Keep-masks with one magnitude threshold across all ``weights`` together.

    Exactly ``round(sparsity * total)`` entries are pruned over all weights (``total`` = number
    of entries of all weights), the smallest ``|w|`` first, compared in a common floating dtype.
    Ties are broken by position in the concatenation of the weights in jax's leaf order (for a
    dict: sorted keys), then flat index.

    Args:
        weights: A dict ``{name: array}`` (or any pytree of arrays).
        sparsity: Overall fraction to prune, in ``[0, 1)``.

    Returns:
        The same structure with a bool keep-mask per weight.

    Example:
        >>> masks = global_magnitude_masks({"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.1, 3.0])}, 0.5)
        >>> {k: v.tolist() for k, v in masks.items()}
        {'a': [False, True], 'b': [False, True]}
    """
    leaves, treedef = jax.tree.flatten(weights)
    if not leaves:
        return weights
    mags = [_magnitude(x) for x in leaves]
    dtype = jnp.result_type(*[m.dtype for m in mags])
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    flat = jnp.concatenate([m.reshape(-1).astype(dtype) for m in mags])
    keep = prune_lowest([flat], _prune_count(sparsity, flat.size))
    out, start = [], 0
    for m in mags:
        out.append(keep[start : start + m.size].reshape(m.shape))
        start += m.size
    return jax.tree.unflatten(treedef, out)


def random_mask(key: Array, shape: Sequence[int], sparsity: Any) -> Array:
    """Random keep-mask pruning exactly ``round(sparsity * size)`` entries.

    Args:
        key: A ``jax.random`` key.
        shape: Shape of the mask.
        sparsity: Fraction to prune, in ``[0, 1)``.

    Example:
        >>> mask = random_mask(jax.random.key(0), (4, 5), 0.3)
        >>> int((~mask).sum())
        6
    """
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    k = _prune_count(sparsity, size)
    perm = jax.random.permutation(key, size)
    return (perm >= k).reshape(shape)


# ---- N:M -------------------------------------------------------------------------------


def _check_nm(n: Any, m: Any) -> tuple[int, int]:
    for name, v in (("n", n), ("m", m)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool):
            raise ValueError(f"N:M sparsity needs integer n and m, got {name}={v!r}")
    n, m = int(n), int(m)
    if n < 1:
        raise ValueError(
            f"N:M sparsity needs n >= 1 (n is the number of entries KEPT per group), got n={n}"
        )
    if n > m:
        raise ValueError(
            f"N:M sparsity needs n <= m, got n={n}, m={m}: n is the number of entries KEPT in "
            f"every group of m (jaxpruner / NVIDIA convention; TF-MOT's (2, 4) counts zeros)"
        )
    return n, m


def nm_keep(keys: Sequence[Array], n: int, m: int, axis: int) -> Array:
    """Keep the ``n`` highest entries (by lexicographic ``keys``) of every group of ``m``.

    The building block of :func:`nm_mask`, for callers ranking by more than one key. Arguments
    are validated by :func:`nm_mask`'s rules.

    Example:
        >>> nm_keep([jnp.array([4.0, 1.0, 3.0, 2.0])], 2, 4, axis=0).tolist()
        [True, False, True, False]
    """
    n, m = _check_nm(n, m)
    shape = keys[0].shape
    if not shape:
        raise ValueError("N:M sparsity needs an array with at least one dimension, got a scalar")
    ax = _axis(axis, len(shape))
    size = shape[ax]
    if size % m:
        raise ValueError(
            f"N:M sparsity: m={m} must divide the size {size} of axis {axis} of a weight of "
            f"shape {tuple(shape)}"
        )
    moved = [jnp.moveaxis(kk, ax, -1) for kk in keys]
    mshape = moved[0].shape
    grouped = [kk.reshape(*mshape[:-1], size // m, m) for kk in moved]
    keep = prune_lowest(grouped, m - n).reshape(mshape)
    return jnp.moveaxis(keep, -1, ax)


def nm_mask(w: Array, n: int, m: int, axis: int = -1) -> Array:
    """N:M keep-mask: keep the ``n`` largest ``|w|`` in every group of ``m`` consecutive entries.

    .. warning::
        **N is the number of entries KEPT per group of M**, as in jaxpruner and NVIDIA ModelOpt.
        TF-MOT's ``(2, 4)`` means *2 zeros* per 4 — identical for 2:4 (50%), but TF-MOT's
        ``(1, 4)`` is our ``nm_mask(w, 3, 4)``. The sparsity is ``1 - n / m``.

    Groups are consecutive entries along ``axis``; for NVIDIA sparse tensor cores that is the
    contraction axis (the input axis, ``-2``, of a Flax ``Dense``/``Conv`` kernel). Ties: the
    lower index within the group is pruned first.

    Args:
        w: The weight.
        n: Entries kept per group, ``1 <= n <= m``.
        m: Group size; must divide ``w.shape[axis]``.
        axis: The axis along which groups are formed.

    Raises:
        ValueError: ``n > m``, ``n < 1``, non-integer ``n``/``m``, or ``m`` not dividing the axis.

    Example:
        >>> w = jnp.array([[1.0, -4.0, 2.0, 3.0], [0.5, 0.1, -0.2, 0.3]])
        >>> nm_mask(w, 2, 4, axis=-1).astype(int).tolist()
        [[0, 1, 0, 1], [1, 0, 0, 1]]
    """
    return nm_keep([_magnitude(w)], n, m, axis)


# ---- blocks and channels ---------------------------------------------------------------


def block_mask(
    w: Array, block: tuple[int, int], sparsity: Any, axes: tuple[int, int] = (-2, -1)
) -> Array:
    """Keep-mask pruning whole ``block``-shaped tiles with the smallest L2 norm.

    The two ``axes`` are tiled by ``block = (rows, cols)``; any other axis is a batch of
    independent tilings, and all tiles of the tensor compete together: exactly
    ``round(sparsity * n_blocks)`` tiles are pruned (ties: lower tile index, row-major over
    (other axes, block row, block column), pruned first).

    Args:
        w: The weight, at least 2-D.
        block: Tile shape along ``axes``; each must divide the matching dimension.
        sparsity: Fraction of tiles to prune, in ``[0, 1)``.
        axes: The two axes being tiled.

    Raises:
        ValueError: bad axes, a block that does not divide, or a bad sparsity.

    Example:
        >>> w = jnp.array([[1.0, 1.0, 0.1, 0.1], [1.0, 1.0, 0.1, 0.1]])
        >>> block_mask(w, (2, 2), 0.5).astype(int).tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0]]
    """
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"block_mask needs an array with >= 2 dimensions, got shape {w.shape}")
    if len(axes) != 2 or len(block) != 2:
        raise ValueError(f"block_mask needs two axes and a 2-D block, got {axes=}, {block=}")
    a0, a1 = (_axis(a, w.ndim, "axes") for a in axes)
    if a0 == a1:
        raise ValueError(f"block_mask needs two distinct axes, got {axes}")
    br, bc = (int(b) for b in block)
    d0, d1 = w.shape[a0], w.shape[a1]
    if br < 1 or bc < 1 or d0 % br or d1 % bc:
        raise ValueError(
            f"block {tuple(block)} must tile axes {tuple(axes)} of a weight of shape {w.shape}: "
            f"{br} must divide {d0} and {bc} must divide {d1}"
        )
    x = jnp.moveaxis(w, (a0, a1), (-2, -1))
    lead = x.shape[:-2]
    tiles = x.reshape(*lead, d0 // br, br, d1 // bc, bc).astype(jnp.float32)
    norms2 = jnp.sum(tiles * tiles, axis=(-3, -1))  # same order as the L2 norm
    k = _prune_count(sparsity, norms2.size)
    keep_tiles = prune_lowest([norms2.reshape(-1)], k).reshape(norms2.shape)
    keep = jnp.broadcast_to(keep_tiles[..., :, None, :, None], tiles.shape).reshape(x.shape)
    return jnp.moveaxis(keep, (-2, -1), (a0, a1))


def channel_scores(w: Array, axis: int) -> Array:
    """L2 norm of every slice of ``w`` along ``axis`` (one score per channel), float32.

    Example:
        >>> channel_scores(jnp.array([[3.0, 0.0], [4.0, 1.0]]), axis=1).tolist()
        [5.0, 1.0]
    """
    w = jnp.asarray(w)
    ax = _axis(axis, w.ndim)
    others = tuple(i for i in range(w.ndim) if i != ax)
    x = w.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=others))


def snip_scores(w: Array, grad: Array) -> Array:
    """SNIP connection saliency ``|w * grad|`` (float32).

    Example:
        >>> snip_scores(jnp.array([2.0, -1.0]), jnp.array([0.5, 3.0])).tolist()
        [1.0, 3.0]
    """
    w, grad = jnp.asarray(w), jnp.asarray(grad)
    if w.shape != grad.shape:
        raise ValueError(f"snip_scores: w has shape {w.shape} but grad has shape {grad.shape}")
    return jnp.abs(w.astype(jnp.float32) * grad.astype(jnp.float32))


def wanda_scores(w: Array, act_norm: Array, in_axis: int) -> Array:
    """Wanda saliency ``|w| * ||x||_2``, the input-feature norm broadcast along ``in_axis``.

    Args:
        w: The weight.
        act_norm: L2 norm of each input feature over the calibration tokens, shape
            ``(w.shape[in_axis],)``.
        in_axis: The input (contraction) axis of ``w`` (``-2`` for a Flax kernel).

    Example:
        >>> wanda_scores(jnp.array([[1.0, -2.0], [3.0, 1.0]]), jnp.array([2.0, 0.5]), 0).tolist()
        [[2.0, 4.0], [1.5, 0.5]]
    """
    w = jnp.asarray(w)
    ax = _axis(in_axis, w.ndim, "in_axis")
    act_norm = jnp.asarray(act_norm)
    if act_norm.shape != (w.shape[ax],):
        raise ValueError(
            f"wanda_scores: act_norm must have shape ({w.shape[ax]},) (axis {in_axis} of the "
            f"weight of shape {w.shape}), got {act_norm.shape}"
        )
    shape = [1] * w.ndim
    shape[ax] = -1
    return jnp.abs(w.astype(jnp.float32)) * act_norm.astype(jnp.float32).reshape(shape)


def wanda_mask(w: Array, act_norm: Array, in_axis: int, out_axis: int, sparsity: Any) -> Array:
    """Wanda keep-mask: prune ``sparsity`` of every output row by :func:`wanda_scores`.

    Wanda compares weights within each output (each slice of ``w`` at a fixed index of
    ``out_axis``; for a conv kernel that slice spans the spatial and input axes). Exactly
    ``round(sparsity * row_size)`` entries are pruned per output (ties: lower flat index within
    the row pruned first).

    Example:
        >>> w = jnp.array([[1.0, -2.0], [3.0, 1.0]])  # Flax layout: (in, out)
        >>> wanda_mask(w, jnp.array([2.0, 0.5]), in_axis=0, out_axis=1, sparsity=0.5).tolist()
        [[True, True], [False, False]]
    """
    scores = wanda_scores(w, act_norm, in_axis)
    ia, oa = _axis(in_axis, scores.ndim, "in_axis"), _axis(out_axis, scores.ndim, "out_axis")
    if ia == oa:
        raise ValueError(f"wanda_mask needs distinct in_axis and out_axis, got {in_axis}")
    rows = jnp.moveaxis(scores, oa, 0)
    flat = rows.reshape(rows.shape[0], -1)
    keep = prune_lowest([flat], _prune_count(sparsity, flat.shape[1]))
    return jnp.moveaxis(keep.reshape(rows.shape), 0, oa)


# ---- measuring -------------------------------------------------------------------------


def sparsity_of(mask_or_w: Array) -> float:
    """Fraction of ``False`` entries of a mask, or of zero entries of a weight (host-side).

    ``-0.0`` counts as zero, ``NaN`` does not. Returns 0.0 for an empty array. Not jittable: it
    returns a Python float.

    Example:
        >>> sparsity_of(jnp.array([True, False, False, True]))
        0.5
        >>> sparsity_of(jnp.array([0.0, -0.0, 1.0, 2.0]))
        0.5
    """
    a = np.asarray(mask_or_w)
    if a.size == 0:
        return 0.0
    return (a.size - int(np.count_nonzero(a))) / a.size
