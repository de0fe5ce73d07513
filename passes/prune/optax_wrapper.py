"""Pruning during training as one optax wrapper: :func:`sparsify`.

``tx = sparsify(optax.adamw(1e-3), schedule=polynomial_decay(0.0, 0.8, 0, 1000, frequency=100))``
is used exactly like the optimizer it wraps, ``tx.update(grads, state, params)`` included; there
is no second per-step call to forget (jaxpruner needs ``post_gradient_update``, TF-MOT a
callback). The state holds the inner state, the step count and the masks; the updates it returns
make ``optax.apply_updates(params, updates)`` exactly zero wherever a weight is pruned.

At each step ``t`` (the number of earlier updates):

1. the inner transformation computes its update ``u``;
2. if the schedule says masks are recomputed at ``t``, they are derived from the *updated*
   parameters ``where(old_mask, params + u, 0)`` at the scheduled sparsity (or N:M). Previously
   pruned weights rank below every kept weight, so with a non-decreasing sparsity the masks are
   nested: a pruned weight stays pruned. Between update steps the old masks are kept;
3. the returned update is ``where(mask, u, -params)``: ``params + updates`` is ``params + u``
   where kept and exactly ``0`` where pruned, whatever Adam momentum or weight decay would have
   done there.

Example:
    >>> import optax
    >>> from maas_jax.passes.prune.schedules import constant
    >>> params = {"dense": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2), "bias": jnp.ones(2)}}
    >>> tx = sparsify(optax.sgd(0.0), schedule=constant(0.5))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["dense"]["kernel"].tolist()
    [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]
    >>> current_sparsity(state)
    {'dense/kernel': 0.5}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from maas_jax.passes.prune._axes import weight_axes
from maas_jax.passes.prune.masks import _check_nm, _prune_count, nm_keep, prune_lowest, sparsity_of
from maas_jax.passes.prune.pass_ import _is_candidate
from maas_jax.passes.prune.schedules import constant, should_update

from maas_jax import Path
from maas_jax.extend import flatten_leaves, param_infos

__all__ = ["SparsifyState", "current_sparsity", "masks_of", "sparsify"]

_METHODS = ("magnitude", "random", "saliency")
_SCOPES = ("layer", "global")


class SparsifyState(NamedTuple):
    """State of :func:`sparsify`.

    Attributes:
        inner_state: The wrapped transformation's state.
        count: int32 number of updates done so far (the step of the next update).
        masks: A pytree like params: a bool keep-mask for every selected leaf, ``None`` for the
            others.
    """

    inner_state: Any
    count: jax.Array
    masks: Any


Where = (
    str
    | Path
    | Callable[[str, Any], bool]
    | Sequence[str | Path | Callable[[str, Any], bool]]
    | None
)


def _matches(rule: Any, path: str, leaf: Any) -> bool:
    if isinstance(rule, str):
        return re.search(rule, path) is not None
    if isinstance(rule, re.Pattern):
        return rule.search(path) is not None
    if isinstance(rule, Path):
        return re.search(rule.pattern, path) is not None
    if callable(rule):
        return bool(rule(path, leaf))
    raise TypeError(
        f"where= takes a path regex, maas_jax.Path(regex), a callable (path, leaf) -> bool, or "
        f"a list of these; got {rule!r}"
    )


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


# Leaf names that are never weight matrices, whatever their shape (a scan-stacked bias or
# LayerNorm scale is 2-D: ``(layers, features)``).
_NOT_WEIGHT_NAMES = frozenset({"bias", "b", "scale", "offset"})


def _stacked_vector_of(leaf: Any, siblings: Sequence[Any]) -> bool:
    """Whether ``leaf`` looks like the per-layer bias of a sibling kernel.

    A Flax ``Dense`` under ``nn.scan`` stores its kernel as ``(L, in, F)`` and its bias as
    ``(L, F)``: the bias has the kernel's shape with the input axis removed. Each layer's slice
    of such a leaf is a vector, so it is not a weight matrix even though the leaf is 2-D.
    """
    shape = tuple(leaf.value.shape)
    for sib in siblings:
        other = tuple(getattr(sib.value, "shape", ()))
        if sib is leaf or len(other) != len(shape) + 1:
            continue
        if other[: len(shape) - 1] == shape[:-1] and other[-1] == shape[-1]:
            return True
    return False


def _weight_flags(leaves: Sequence[Any], program: Any) -> list[bool]:
    """Which leaves are weight matrices: the default, and all that a path regex can select."""
    if program is not None:
        infos = {i.path: i for i in param_infos(program)}
        flags, missing = [], []
        for lf in leaves:
            info = infos.get(lf.path) or infos.get(f"params/{lf.path}")
            if info is None or tuple(info.shape) != tuple(getattr(lf.value, "shape", ())):
                missing.append(lf.path)
                flags.append(False)
            else:
                flags.append(_is_candidate(info))
        if missing:
            shown = ", ".join(list(infos)[:6]) + (", ..." if len(infos) > 6 else "")
            raise ValueError(
                f"sparsify: program= has no parameter matching the leaves {missing[:6]} of "
                f"params (by path, or by path under 'params/', and shape); its parameters are: "
                f"{shown}. Trace the program with the same parameter tree the optimizer updates."
            )
        return flags
    parents: dict[str, list[Any]] = {}
    for lf in leaves:
        parents.setdefault(lf.path.rpartition("/")[0], []).append(lf)
    out = []
    for lf in leaves:
        name = lf.path.rpartition("/")[2]
        out.append(
            _is_float(lf.value)
            and lf.value.ndim >= 2
            and name not in _NOT_WEIGHT_NAMES
            and not _stacked_vector_of(lf, parents[lf.path.rpartition("/")[0]])
        )
    return out


def _selection(params: Any, where: Where, program: Any = None) -> tuple[list[str], list[bool]]:
    """Path and selected flag of every leaf of ``params``, in jax leaf order.

    A path regex only narrows the weights (:func:`_weight_flags`); ``maas_jax.Path(regex)``
    and callables are explicit choices that may take any floating leaf.
    """
    leaves = flatten_leaves(params)
    if len(leaves) != len(jax.tree.leaves(params)):  # pragma: no cover - defensive
        raise ValueError("sparsify: could not name the leaves of params")
    paths = [leaf.path for leaf in leaves]
    weights = _weight_flags(leaves, program)
    if where is None:
        flags = weights
        skipped: list[str] = []
    else:
        rules = list(where) if isinstance(where, list | tuple) else [where]
        flags, skipped = [], []
        for lf, is_weight in zip(leaves, weights, strict=True):
            hit = False
            for r in rules:
                if not _matches(r, lf.path, lf.value):
                    continue
                if isinstance(r, str | re.Pattern) and not is_weight:
                    skipped.append(lf.path)
                    continue
                hit = True
                break
            flags.append(hit)
        bad = [
            lf.path for lf, f in zip(leaves, flags, strict=True) if f and not _is_float(lf.value)
        ]
        if bad:
            raise ValueError(f"sparsify: where={where!r} selects non-floating leaves {bad}")
    if not any(flags):
        shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        hint = ""
        if skipped:
            hint = (
                f" (a path regex only narrows the weight matrices, and it matches only other "
                f"leaves: {skipped[:6]}; select those explicitly with maas_jax.Path(regex))"
            )
        raise ValueError(
            f"sparsify: where={where!r} selects no parameter to prune{hint}; the paths are: {shown}"
        )
    return paths, flags


def _find_state(state: Any) -> SparsifyState:
    found: list[SparsifyState] = []

    def visit(x: Any) -> None:
        if isinstance(x, SparsifyState):
            found.append(x)
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)
        elif isinstance(x, tuple | list):
            for v in x:
                visit(v)

    visit(state)
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one sparsify() state in the optimizer state, found {len(found)}"
        )
    return found[0]


def masks_of(state: Any) -> Any:
    """The masks pytree (bool keep-masks like params, ``None`` for unselected leaves).

    ``state`` is a :class:`SparsifyState` or any optimizer state containing exactly one (for
    example ``optax.chain(optax.clip(1.0), sparsify(...))``'s).

    Example:
        >>> import optax
        >>> tx = sparsify(optax.sgd(0.1), schedule=0.5)
        >>> masks_of(tx.init({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}))["b"] is None
        True
    """
    return _find_state(state).masks


def current_sparsity(state: Any) -> dict[str, float]:
    """``{path: sparsity}`` of every selected leaf's mask (host-side, Python floats).

    Example:
        >>> import optax
        >>> tx = sparsify(optax.sgd(0.1), schedule=0.5)
        >>> current_sparsity(tx.init({"w": jnp.ones((2, 2))}))
        {'w': 0.0}
    """
    return {leaf.path: sparsity_of(leaf.value) for leaf in flatten_leaves(masks_of(state))}


def sparsify(
    inner: optax.GradientTransformation,
    *,
    schedule: Callable[[Any], Any] | float,
    where: Where = None,
    method: str = "magnitude",
    scope: str = "layer",
    n: int | None = None,
    m: int | None = None,
    frequency: int | None = None,
    nm_axis: int | None = None,
    seed: int = 0,
    program: Any = None,
) -> optax.GradientTransformation:
    """Wrap ``inner`` so that training prunes the selected weights on a schedule.

    Args:
        inner: The optimizer (any ``optax.GradientTransformation``).
        schedule: ``step -> sparsity`` (see ``maas_jax.passes.prune.schedules``), or a number for
            ``constant(number)`` (one-shot at step 0). Its ``should_update(step)`` decides when
            masks are recomputed; a plain callable without it is re-evaluated every step.
        where: Which leaves to prune: a ``/``-joined path regex searched in the leaf path (e.g.
            ``r"kernel$"``; paths look like ``params/Dense_0/kernel``, Flax boxes stripped),
            ``maas_jax.Path(regex)``, a callable ``(path, leaf) -> bool``, or a list of these
            (any match). A plain regex only *narrows* the default weights (below):
            ``where=r"layers"`` does not prune ``layers/bias``. ``Path(regex)`` and callables
            are the explicit opt-in for any floating leaf. Selecting nothing, or a
            non-floating leaf, raises.
            The default weights: with ``program=``, exactly the parameters a dot_general or
            convolution of the program consumes (``maas_jax.ParamInfo.is_weight``, stacked or
            not) and tables a lookup reads. Without it, from the tree alone: floating leaves
            with ``ndim >= 2``, except leaves named ``bias``/``b``/``scale``/``offset`` and
            leaves shaped like a sibling leaf with its input axis removed (the ``(L, F)`` bias
            of an ``(L, in, F)`` kernel under ``nn.scan``): each layer's slice of those is a
            vector, not a matrix.
        method: Saliency used to rank weights: ``"magnitude"`` (``|w|``), ``"random"`` (fixed
            random scores per leaf from ``seed``, so masks are nested) or ``"saliency"``
            (SNIP-style ``|w * grad|``).
        scope: ``"layer"``: every selected leaf reaches the scheduled sparsity exactly;
            ``"global"``: one threshold over all selected leaves together (exact overall).
        n, m: N:M sparsity instead of a sparsity level: keep ``n`` of every ``m`` consecutive
            weights along ``nm_axis`` (**n is the number KEPT**; TF-MOT's (2, 4) counts zeros).
            The schedule then only decides when masks are computed; its value is ignored.
        frequency: Override the schedule's update steps: recompute masks every ``frequency``
            steps between the schedule's ``begin_step`` and ``end_step``.
        nm_axis: Axis of the N:M groups. Default: with ``program=``, each weight's contracted
            (input) axis as the program uses it (``h @ w``, ``w @ h``, ``h @ w.T``, stacked or
            not); without, ``-2``, the input axis of Flax ``Dense``/``Conv`` kernels — the one
            sparse tensor cores need.
        seed: Seed of the ``"random"`` method.
        program: The :class:`maas_jax.Program` of the model being trained (traced with the
            same parameter tree, or with the tree under a top-level ``params`` key). It makes
            the default selection exact, gives the N:M axis, and makes ``scope="layer"`` rank
            each layer of a scan-stacked weight separately (without it, a stacked leaf is
            ranked as one tensor).

    Returns:
        A ``GradientTransformation`` whose state is a :class:`SparsifyState` and whose
        ``update(grads, state, params)`` requires ``params``. It jits, and the masks can be read
        with :func:`masks_of` / :func:`current_sparsity`.

    Raises:
        ValueError: bad ``method``/``scope``/``n``/``m``; at ``init``, a ``where`` selecting
            nothing or an ``m`` not dividing a selected leaf's ``nm_axis``; at ``update``,
            ``params=None``.

    Example:
        >>> import optax
        >>> from maas_jax.passes.prune.schedules import polynomial_decay
        >>> tx = sparsify(optax.adam(1e-2), schedule=polynomial_decay(0.0, 0.75, 0, 10), where=r"w$")
        >>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
        >>> state = tx.init(params)
        >>> step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
        >>> for _ in range(12):
        ...     updates, state = step(params, state)
        ...     params = optax.apply_updates(params, updates)
        >>> current_sparsity(state), int((params["w"] == 0).sum())
        ({'w': 0.75}, 6)
    """
    if method not in _METHODS:
        raise ValueError(f"sparsify: method must be one of {_METHODS}, got {method!r}")
    if scope not in _SCOPES:
        raise ValueError(f"sparsify: scope must be one of {_SCOPES}, got {scope!r}")
    if (n is None) != (m is None):
        raise ValueError(f"sparsify: N:M sparsity needs both n and m, got n={n!r}, m={m!r}")
    use_nm = n is not None
    if use_nm:
        n, m = _check_nm(n, m)
        if scope != "layer":
            raise ValueError(
                "sparsify: N:M sparsity is per group of m weights; scope must be 'layer'"
            )
    if isinstance(schedule, int | float) and not isinstance(schedule, bool):
        schedule = constant(schedule)
    if not callable(schedule):
        raise ValueError(f"sparsify: schedule must be callable or a number, got {schedule!r}")
    if frequency is not None:
        begin = getattr(schedule, "begin_step", 0)
        end = getattr(schedule, "end_step", None)
        should_update(begin, begin, end, frequency)  # validates frequency

        def is_update_step(t: Any) -> Any:
            return should_update(t, begin, end, frequency)

    elif hasattr(schedule, "should_update"):
        is_update_step = schedule.should_update
    else:

        def is_update_step(t: Any) -> Any:
            return jnp.asarray(True)

    def init_fn(params: Any) -> SparsifyState:
        paths, flags = _selection(params, where, program)
        leaves, treedef = jax.tree.flatten(params)
        layout = _layout(paths, flags, program)
        if use_nm:
            for path, leaf, f in zip(paths, leaves, flags, strict=True):
                if f:
                    try:
                        nm_keep([jnp.zeros(leaf.shape, bool)], n, m, layout[path][1])
                    except ValueError as e:
                        raise ValueError(f"sparsify: parameter {path!r}: {e}") from None
        masks = [jnp.ones(x.shape, bool) if f else None for x, f in zip(leaves, flags, strict=True)]
        return SparsifyState(
            inner_state=inner.init(params),
            count=jnp.zeros([], jnp.int32),
            masks=jax.tree.unflatten(treedef, masks),
        )

    def scores(i: int, w: Any, g: Any) -> Any:
        if method == "magnitude":
            return jnp.abs(w)
        if method == "saliency":
            return jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32))
        key = jax.random.fold_in(jax.random.key(seed), i)
        return jax.random.uniform(key, w.shape, jnp.float32)

    def _layout(paths: list[str], flags: list[bool], prog: Any) -> dict[str, tuple[int, int]]:
        """path -> (leading scan axes ranked per layer, N:M axis) of every selected leaf."""
        infos = {i.path: i for i in param_infos(prog)} if prog is not None else {}
        out = {}
        for path, f in zip(paths, flags, strict=True):
            if not f:
                continue
            info = infos.get(path) or infos.get(f"params/{path}")
            axes = weight_axes(info) if info is not None and info.is_weight else None
            stacked = axes.stacked if axes is not None else 0
            if nm_axis is not None:
                axis = nm_axis
            elif axes is not None and axes.group is not None:
                axis = axes.group
            else:
                axis = -2
            out[path] = (stacked, axis)
        return out

    def layer_rate(o: Any, s: Any, stacked: int, sparsity: Any) -> Any:
        rows = int(np.prod(s.shape[:stacked])) if stacked else 1
        o2, s2 = o.reshape(rows, -1), s.reshape(rows, -1)
        return prune_lowest([o2, s2], _prune_count(sparsity, s2.shape[1])).reshape(s.shape)

    def new_masks(
        ws: list[Any], gs: list[Any], olds: list[Any], idx: list[int], lay: list, sparsity: Any
    ) -> tuple[Any, ...]:
        ss = [scores(i, w, g) for i, w, g in zip(idx, ws, gs, strict=True)]
        if use_nm:
            return tuple(
                nm_keep([o, s], n, m, ax) for o, s, (_, ax) in zip(olds, ss, lay, strict=True)
            )
        if scope == "layer":
            return tuple(
                layer_rate(o, s, st, sparsity) for o, s, (st, _) in zip(olds, ss, lay, strict=True)
            )
        dtype = jnp.result_type(*[s.dtype for s in ss])
        flat_s = jnp.concatenate([s.reshape(-1).astype(dtype) for s in ss])
        flat_o = jnp.concatenate([o.reshape(-1) for o in olds])
        keep = prune_lowest([flat_o, flat_s], _prune_count(sparsity, flat_s.size))
        out, start = [], 0
        for s in ss:
            out.append(keep[start : start + s.size].reshape(s.shape))
            start += s.size
        return tuple(out)

    def update_fn(updates: Any, state: SparsifyState, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError(
                "sparsify: update() needs the current params, call tx.update(grads, state, params):"
                " masks are computed from params + updates and pruned weights are set to zero"
                " with -params"
            )
        inner_updates, inner_state = inner.update(updates, state.inner_state, params)
        p_leaves, treedef = jax.tree.flatten(params)
        u_leaves = treedef.flatten_up_to(inner_updates)
        g_leaves = treedef.flatten_up_to(updates)
        m_leaves = treedef.flatten_up_to(state.masks)
        idx = [i for i, mk in enumerate(m_leaves) if mk is not None]
        paths = [leaf.path for leaf in flatten_leaves(params)]
        layout = _layout(paths, [mk is not None for mk in m_leaves], program)
        lay = [layout[paths[i]] for i in idx]
        olds = [m_leaves[i] for i in idx]
        # The parameters this step would produce under the current masks.
        ws = [
            jnp.where(m_leaves[i], (p_leaves[i] + u_leaves[i]).astype(p_leaves[i].dtype), 0)
            for i in idx
        ]
        gs = [g_leaves[i] for i in idx]
        count = state.count
        sparsity = 0.0 if use_nm else schedule(count)
        masks = lax.cond(
            jnp.asarray(is_update_step(count), bool),
            lambda: new_masks(ws, gs, olds, idx, lay, sparsity),
            lambda: tuple(olds),
        )
        out_u, out_m = list(u_leaves), list(m_leaves)
        for i, mk in zip(idx, masks, strict=True):
            out_u[i] = jnp.where(mk, u_leaves[i], -p_leaves[i]).astype(u_leaves[i].dtype)
            out_m[i] = mk
        new_state = SparsifyState(
            inner_state=inner_state,
            count=optax.safe_int32_increment(count),
            masks=jax.tree.unflatten(treedef, out_m),
        )
        return jax.tree.unflatten(treedef, out_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)
