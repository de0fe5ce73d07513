"""``prune``: masks applied to weights at their entry into the program.

A pruned weight is ``w * mask`` where the parameter enters the program (after earlier passes'
markers), inside a marker region named ``maas_prune``, so every use — tied weights, scan-stacked
layers, opaque regions — sees the same zeros, later passes still see the parameter, and
``fake_quant`` after ``prune`` quantizes the pruned weight (zeros stay exactly zero: the
quantizers map 0 to 0).

**Where masks are computed, and what it costs.** A Program holds no parameter values, so
``prune(sparsity=...)``, ``prune("nm", ...)`` and ``prune("block", ...)`` compute their masks
*in the graph*, from the weights the program is called with: a rate or N:M mask sorts every
selected weight on every call (measured 170–280x slower than dense on a 512-1024-1024-512 MLP
on CPU). That is what fine-tuning needs when the weights change between calls, and nothing else
does. For inference, compute the masks once from the concrete parameters and bake them in as
constants — the program then does one ``select`` per weight and no sort:

* ``prune(sparsity=0.5).bake(params)`` — the same masks as the in-graph pass, computed once
  when the pass runs (``Prune.masks_for(program, params)`` returns them);
* ``prune(masks=compute_masks(program, params, method=...))`` — data-driven masks (global
  magnitude, SNIP, Wanda).

Training with changing masks goes through the optax wrapper
(:func:`maas_jax.passes.prune.optax_wrapper.sparsify`), which keeps masks in the optimizer
state instead of the graph.

**Which axes.** Per-layer rates, N:M groups and Wanda rows follow how the program *uses* each
weight (``maas_jax.consumers``): a scan-stacked ``(L, ...)`` weight gets one mask per layer,
N:M groups run along the contracted (input) axis of each layer whether the layer computes
``h @ w``, ``w @ h`` or ``h @ w.T``, and Wanda compares the weights of one output channel of
one layer.

**Which parameters.** By default only weights: trainable floating parameters a dot_general or
convolution consumes (``maas_jax.ParamInfo.is_weight``). ``where=`` narrows that set; a bias,
norm scale is pruned only when selected explicitly, with ``maas_jax.Path(regex)`` or a
callable.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from maas_jax.passes._weights import freeze_where, select_weights
from maas_jax.passes.prune import masks as mk
from maas_jax.passes.prune._axes import weight_axes

from maas_jax import ParamRef, PassRecord, Program, Rewrite, UnusedRuleWarning, rewrite
from maas_jax.extend import (
    CONTRACTION_PRIMITIVES,
    SideOutput,
    contraction_sites,
    emit,
    flatten_leaves,
    is_floating,
    param_infos,
    rewrite_with_side_outputs,
)

METHODS = ("magnitude", "random", "nm", "block", "masks")


class Masks:
    """Explicit keep-masks by parameter path (hashable by identity, so passes stay hashable)."""

    def __init__(self, masks: Mapping[str, Any], how: str = "explicit"):
        self.masks = {k: np.asarray(v, bool) for k, v in masks.items()}
        self.how = how

    def __repr__(self) -> str:
        return f"<{len(self.masks)} {self.how} masks>"

    def sparsity(self) -> float:
        total = sum(m.size for m in self.masks.values())
        return float(sum((~m).sum() for m in self.masks.values()) / max(total, 1))


class _Baked:
    """Concrete parameters a baked pass computes its masks from (compared by identity)."""

    def __init__(self, params: Any):
        self.params = params

    def __repr__(self) -> str:
        return "<params>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prune:
    """The pass :func:`prune` returns."""

    method: str = "magnitude"
    sparsity: float | None = None
    threshold: float | None = None
    n: int | None = None
    m: int | None = None
    block: tuple[int, int] | None = None
    seed: int = 0
    masks: Masks | None = None
    where: Any = None
    allow_opaque: bool = False
    baked: _Baked | None = None
    name = "prune"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"prune: method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ValueError(
                f"prune: sparsity must be in [0, 1), got {self.sparsity!r} (1.0 would remove "
                "every weight)"
            )
        need = {
            "magnitude": self.sparsity is not None or self.threshold is not None,
            "random": self.sparsity is not None,
            "nm": self.n is not None and self.m is not None,
            "block": self.block is not None and self.sparsity is not None,
            "masks": self.masks is not None,
        }[self.method]
        if not need:
            raise ValueError(
                f"prune: method {self.method!r} needs "
                + {
                    "magnitude": "sparsity= or threshold=",
                    "random": "sparsity=",
                    "nm": "n= and m= (n weights KEPT in every group of m)",
                    "block": "block=(rows, cols) and sparsity=",
                    "masks": "masks= (see compute_masks)",
                }[self.method]
            )
        if self.method == "nm" and (self.n < 1 or self.n > self.m):
            raise ValueError(
                f"prune: N:M needs 1 <= n <= m (n is KEPT per m), got n={self.n}, m={self.m}"
            )
        object.__setattr__(self, "where", freeze_where(self.where))

    def __repr__(self) -> str:
        fields = [f"method={self.method!r}"]
        for k in ("sparsity", "threshold", "n", "m", "block", "masks", "where"):
            v = getattr(self, k)
            if v is not None:
                fields.append(f"{k}={v!r}")
        if self.baked is not None:
            fields.append("baked")
        return f"prune({', '.join(fields)})"

    # -- baking ---------------------------------------------------------------------------
    def bake(self, params: Any) -> Prune:
        """This pass with its masks computed once from ``params`` and stored as constants.

        The in-graph masks of ``prune(sparsity=...)``, ``"nm"`` and ``"block"`` sort every
        weight on every call of the program; the baked pass computes exactly the same masks
        once, when it runs on a program, and the program only selects. Use it for inference
        (and before ``convert``); keep the unbaked pass for experiments where the weights
        change between calls.

        ``params`` must have the parameter tree the program was traced with.

        >>> import jax.numpy as jnp
        >>> import maas_jax
        >>> from maas_jax import passes
        >>> params = {"w": jnp.array([[0.1, -2.0], [3.0, 0.2]])}
        >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], params, jnp.ones((1, 2)))
        >>> baked = passes.prune(sparsity=0.5).bake(params)(prog)
        >>> baked(params, jnp.ones((1, 2))).tolist()
        [[3.0, -2.0]]
        >>> "sort" in maas_jax.primitive_counts(baked)
        False
        """
        if self.method == "masks":
            return self
        return dataclasses.replace(self, baked=_Baked(params))

    def masks_for(self, program: Program, params: Any) -> Masks:
        """The keep-masks this pass would apply to ``program`` called with ``params``.

        Computed once, on the host's default device, with the same functions the in-graph
        pass runs (so ``prune(...).bake(params)`` and ``prune(...)`` agree exactly).
        """
        if self.method == "masks":
            return self.masks
        return self._masks_for(program, params, *self._select(program))

    def _masks_for(self, program: Program, params: Any, sel: Any, todo: list[str]) -> Masks:
        values = _param_values(program, params, todo, what=f"{self!r}.masks_for")
        fns = {p: self._keep_fn(p, sel.infos[p]) for p in todo}
        keep = jax.jit(lambda ws: {p: fns[p](w) for p, w in ws.items()})(values)
        return Masks({p: np.asarray(k) for p, k in keep.items()}, f"baked {self.method}")

    # -- the pass -------------------------------------------------------------------------
    def __call__(self, program: Program) -> Program:
        sel, todo = self._select(program)
        if not todo:
            return program
        notes: tuple[str, ...] = ()
        if self.method == "masks":
            entry = {path: self._fixed_fn(path, sel.infos[path], self.masks) for path in todo}
        elif self.baked is not None:
            fixed = self._masks_for(program, self.baked.params, sel, todo)
            entry = {path: self._fixed_fn(path, sel.infos[path], fixed) for path in todo}
        else:
            entry = {path: self._mask_fn(path, sel.infos[path]) for path in todo}
            if self.method in ("nm", "block", "random") or self.sparsity is not None:
                notes = (
                    "masks are computed in the graph at every call (a sort per weight); "
                    "use prune(...).bake(params) for inference",
                )
        new = rewrite(program, Rewrite(self.name, entry=entry))
        record = PassRecord(self.name, repr(self), tuple(todo), notes)
        return program.with_record(record, jaxpr=new)

    def _select(self, program: Program) -> tuple[Any, list[str]]:
        """Selected paths still to do; by default weights only (``where=`` narrows them)."""
        where = self.where
        explicit = self.method == "masks" and where is None
        if explicit:  # masks given by path are an explicit choice of parameters
            where = tuple(f"^{p}$" for p in self.masks.masks)
        sel, todo = select_weights(
            program, where, pass_name=self.name, allow_opaque=self.allow_opaque, config=repr(self)
        )
        if not explicit:
            todo = narrow_to_weights(sel, todo, self.name)
        return sel, todo

    def _fixed_fn(self, path: str, info: Any, masks: Masks) -> Any:
        if path not in masks.masks:
            raise ValueError(f"prune: no mask given for selected parameter {path!r}")
        keep = masks.masks[path]
        if keep.shape != tuple(info.shape):
            raise ValueError(
                f"prune: mask for {path!r} has shape {keep.shape}, the parameter {tuple(info.shape)}"
            )
        return lambda w: jnp.where(keep, w, jnp.zeros((), w.dtype))

    def _mask_fn(self, path: str, info: Any) -> Any:
        """``w -> w * mask`` for one parameter, the mask computed in the graph."""
        keep_fn = self._keep_fn(path, info)
        return lambda w: jnp.where(keep_fn(w), w, jnp.zeros((), w.dtype))

    def _keep_fn(self, path: str, info: Any) -> Any:
        """``w -> keep-mask`` for one parameter: one mask per scan-stacked layer."""
        axes = weight_axes(info)
        stacked = axes.stacked
        group = None
        if self.method == "nm":
            group = axes.require(path, f"prune: N:M ({self.n}:{self.m})").group
            if info.shape[group] % self.m:
                raise ValueError(
                    f"prune: N:M groups of m={self.m} along axis {group} (the contracted axis) "
                    f"do not divide {path!r} of shape {tuple(info.shape)}"
                )
        if self.method == "block" and any(
            info.shape[a] % b for a, b in zip((-2, -1), self.block, strict=True)
        ):
            raise ValueError(
                f"prune: blocks {self.block} do not tile the last two axes of {path!r} "
                f"(shape {tuple(info.shape)})"
            )
        if self.method == "block" and len(info.shape) - stacked < 2:
            raise ValueError(
                f"prune: blocks need 2-D layers, but each layer of {path!r} (shape "
                f"{tuple(info.shape)}, {stacked} scan axes) is {len(info.shape) - stacked}-D"
            )
        # crc32, not hash(): str hashes change between processes, and masks must not.
        base_key = jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(path.encode()))

        def layer_keep(w: Any, key: Any) -> Any:
            if self.method == "magnitude":
                return mk.magnitude_mask(w, sparsity=self.sparsity, threshold=self.threshold)
            if self.method == "random":
                return mk.random_mask(key, w.shape, self.sparsity)
            if self.method == "nm":
                return mk.nm_mask(w, self.n, self.m, group - stacked)  # axis within a layer
            return mk.block_mask(w, self.block, self.sparsity)

        if not stacked:
            return lambda w: layer_keep(w, base_key)

        def per_layer(w: Any) -> Any:
            # scan-stacked layers: each layer gets its own mask (its own rate, its own key).
            lead = w.shape[:stacked]
            flat = w.reshape(-1, *w.shape[stacked:])
            keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.arange(flat.shape[0]))
            return jax.vmap(layer_keep)(flat, keys).reshape(*lead, *w.shape[stacked:])

        return per_layer


def narrow_to_weights(sel: Any, todo: list[str], pass_name: str) -> list[str]:
    """Drop what a path regex matched beyond the candidates: a regex narrows, never widens.

    ``where=r"layers"`` also matches ``layers/bias``; pruning a bias or a norm scale is almost
    never meant (and N:M on a bias cannot work), so a ``str``/``re.Pattern`` rule only keeps
    *candidates*: weights a dot_general/convolution consumes and tables a lookup reads (the
    core's selection rule). :class:`maas_jax.Path`, :class:`maas_jax.Op` and callables are
    explicit choices and are kept. ``maas_jax.select`` applies the same rule; repeating it here
    keeps prune's own selections right whatever selector reaches it.
    """

    def kept(path: str) -> bool:
        rule = sel.rules[sel.chosen[path]]
        return not isinstance(rule, str | re.Pattern) or _is_candidate(sel.infos[path])

    out = [p for p in todo if kept(p)]
    dropped = [p for p in todo if p not in out]
    if dropped and not out:
        warnings.warn(
            f"{pass_name}: where={sel.rules if len(sel.rules) > 1 else sel.rules[0]!r} matched "
            f"only parameters that are not weights ({', '.join(dropped[:8])}"
            f"{', ...' if len(dropped) > 8 else ''}): a path regex leaves biases and scales "
            "alone. Select them explicitly with maas_jax.Path(regex) to prune them anyway.",
            UnusedRuleWarning,
            stacklevel=4,
        )
    return out


def _is_candidate(info: Any) -> bool:
    """A weight of a contraction, or a table a lookup (``gather``) reads."""
    table = (
        info.role.trainable
        and is_floating(info.dtype)
        and any(u.primitive == "gather" and u.operand == 0 for u in info.uses)
    )
    return info.is_weight or table


def _param_values(program: Program, params: Any, paths: Iterable[str], *, what: str) -> dict:
    """``{path: value}`` of ``params`` for ``paths``, checked against the program's roles."""
    leaves = {leaf.path: leaf.value for leaf in flatten_leaves(params)}
    out = {}
    for p in paths:
        if p not in leaves:
            shown = ", ".join(list(leaves)[:8]) + (", ..." if len(leaves) > 8 else "")
            raise ValueError(
                f"{what}: params has no leaf {p!r}; pass the parameter tree the program was "
                f"traced with (its leaves: {shown})"
            )
        role = program.role(p)
        if tuple(np.shape(leaves[p])) != tuple(role.shape):
            raise ValueError(
                f"{what}: params[{p!r}] has shape {tuple(np.shape(leaves[p]))}, but the "
                f"program was traced with {tuple(role.shape)}"
            )
        out[p] = jnp.asarray(leaves[p])
    return out


def _input_axis(info: Any) -> int:
    """The weight axis a contraction sums over (N:M groups run along it), else the last."""
    group = weight_axes(info).group
    return len(info.shape) - 1 if group is None else group


def prune(
    method: str = "magnitude",
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    n: int | None = None,
    m: int | None = None,
    block: tuple[int, int] | None = None,
    seed: int = 0,
    masks: Masks | None = None,
    where: Any = None,
    allow_opaque: bool = False,
) -> Prune:
    """Mask the selected weights at their entry into the program.

    Cost: ``sparsity=``, ``"nm"``, ``"block"`` and ``"random"`` masks are computed in the
    graph, from the weights passed at each call — a rate or N:M mask sorts every weight on
    every call (two orders of magnitude slower than the dense model). For inference, bake the
    masks from the concrete parameters: ``prune(sparsity=0.5).bake(params)`` (same masks,
    computed once) or ``prune(masks=compute_masks(...))``. ``threshold=`` and ``masks=``
    masks cost one compare/select per weight.

    Args:
      method: ``"magnitude"`` (``sparsity=`` per layer, or ``threshold=``: keep ``|w| > t``),
        ``"random"`` (``sparsity=``, ``seed=``), ``"nm"`` (``n=`` weights KEPT in every group
        of ``m`` along the contracted axis of each layer: 2:4 keeps 2 of 4), ``"block"``
        (``block=(r, c)``, ``sparsity=``), or ``"masks"`` (``masks=`` from
        :func:`compute_masks`: global magnitude, SNIP, Wanda). Scan-stacked weights get one
        mask per layer.
      where: which weights (default: every matmul/conv weight). A path regex only narrows
        the default (``where=r"layers"`` leaves ``layers/bias`` alone); select other
        parameters explicitly with ``maas_jax.Path(regex)`` or a callable.

    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> w = jnp.array([[0.1, -2.0], [3.0, 0.2]])
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((1, 2)))
    >>> passes.prune(sparsity=0.5)(prog)({"w": w}, jnp.ones((1, 2))).tolist()
    [[3.0, -2.0]]
    """
    if method == "magnitude" and masks is not None:
        method = "masks"
    return Prune(
        method=method,
        sparsity=sparsity,
        threshold=threshold,
        n=n,
        m=m,
        block=block,
        seed=seed,
        masks=masks,
        where=where,
        allow_opaque=allow_opaque,
    )


# ---- masks that need all weights or data ------------------------------------------------


def compute_masks(
    program: Program,
    params: Any,
    *,
    method: str,
    sparsity: float,
    where: Any = None,
    batches: Iterable[Any] | None = None,
    loss: Any = None,
) -> Masks:
    """Keep-masks from parameter values and, for SNIP/Wanda, data.

    * ``"magnitude"``: per weight — per layer for a scan-stacked weight, as ``prune`` does —
      the ``sparsity`` fraction of smallest ``|w|``.
    * ``"global_magnitude"``: one threshold over all selected weights together (all layers of
      a stacked weight compete with everything else).
    * ``"snip"``: saliency ``|w * dL/dw|`` summed over ``batches``, global threshold; ``loss``
      maps the program's outputs (and the batch) to a scalar: ``loss(outputs, batch)``.
    * ``"wanda"``: ``|w| * ||x||`` with ``||x||`` the norm, over the calibration ``batches``,
      of the activation each weight entry multiplies (for a stacked weight: that layer's
      input). Each output channel of each layer prunes ``sparsity`` of its weights (the
      comparison group spans the contracted axes: inputs, and the window of a convolution).

    A path regex ``where=`` narrows the default selection (weights); ``maas_jax.Path(regex)``
    opts in other floating parameters (only the magnitude methods can rank them).
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"compute_masks: sparsity must be in [0, 1), got {sparsity!r}")
    sel, todo = select_weights(
        program, where, pass_name="compute_masks", allow_opaque=False, config=""
    )
    paths = narrow_to_weights(sel, list(sel.paths), "compute_masks")
    values = _values_by_path(program, params)
    weights = {p: values[p] for p in paths}
    if method == "magnitude":  # layer-wise rate, computed once instead of in every call
        rate = Prune(sparsity=sparsity)
        fns = {p: rate._keep_fn(p, sel.infos[p]) for p in weights}
        keep = jax.jit(lambda ws: {p: fns[p](w) for p, w in ws.items()})(weights)
        return Masks({p: np.asarray(k) for p, k in keep.items()}, "magnitude")
    if method == "global_magnitude":
        return Masks(mk.global_magnitude_masks(weights, sparsity), "global magnitude")
    if method == "snip":
        if batches is None or loss is None:
            raise ValueError("compute_masks(method='snip') needs batches= and loss=")
        # The gradient of the loss over all batches (summed), then |w * g| (SNIP).
        total = {p: jnp.zeros_like(w) for p, w in weights.items()}
        for batch in batches:
            inputs = batch if isinstance(batch, tuple) else (batch,)
            grads = jax.grad(lambda prm, i=inputs, b=batch: loss(program(prm, *i), b))(params)
            g = _values_by_path(program, grads)
            total = {p: total[p] + g[p] for p in total}
        scores = {p: mk.snip_scores(weights[p], total[p]) for p in total}
        return Masks(mk.global_magnitude_masks(scores, sparsity), "SNIP")
    if method == "wanda":
        if batches is None:
            raise ValueError("compute_masks(method='wanda') needs batches=")
        axes = {
            p: weight_axes(sel.infos[p]).require(p, "compute_masks(method='wanda')") for p in paths
        }
        norms = input_norms(program, params, batches, paths)
        out = {}
        for p, w in weights.items():
            scores = jnp.abs(jnp.asarray(w, jnp.float32)) * norms[p]
            out[p] = np.asarray(prune_rows(scores, axes[p].contracted, sparsity))
        return Masks(out, "Wanda")
    raise ValueError(
        "compute_masks: method must be 'magnitude', 'global_magnitude', 'snip' or 'wanda', "
        f"got {method!r}"
    )


def _values_by_path(program: Program, tree: Any) -> dict[str, Any]:
    leaves = jax.tree.leaves(tree)
    return {r.path: v for r, v in zip(program.params, leaves, strict=False)}


def prune_rows(scores: Any, compare_axes: Iterable[int], sparsity: float) -> Any:
    """Keep-mask pruning ``sparsity`` of every row; a row spans ``compare_axes``.

    Every index of the other axes (layer, output channel) is its own comparison group: exactly
    ``round(sparsity * row_size)`` of its entries with the lowest score are pruned (ties: the
    lower flat index within the row first). Wanda's rows are one output channel of one layer.

    >>> prune_rows(jnp.array([[1.0, 4.0], [3.0, 2.0]]), (0,), 0.5).tolist()
    [[False, True], [True, False]]
    """
    scores = jnp.asarray(scores)
    compare = sorted({a % scores.ndim for a in compare_axes})
    keep_axes = [a for a in range(scores.ndim) if a not in compare]
    moved = jnp.transpose(scores, (*keep_axes, *compare))
    row = int(np.prod([scores.shape[a] for a in compare]))
    flat = moved.reshape(-1, row)
    keep = mk.prune_lowest([flat], mk._prune_count(sparsity, row)).reshape(moved.shape)
    return jnp.transpose(keep, np.argsort((*keep_axes, *compare)))


_WANDA_KEY = "maas_wanda_inputs"


def input_norms(
    program: Program, params: Any, batches: Iterable[Any], paths: Iterable[str]
) -> dict[str, Any]:
    """For every entry of every weight in ``paths``, ``||x||_2`` of the activations it multiplies.

    Returns ``{path: float32 array shaped like the weight}``: entry ``w[l, i, o]`` of a
    scan-stacked ``h @ w[l]`` weight gets the norm of input feature ``i`` of *layer l* over all
    tokens of all ``batches``; a convolution kernel entry gets the norm of the input pixels it
    meets (the im2col column). Wanda needs the per-layer norms, and side outputs leaving a
    ``scan`` merge over its iterations, so they come from a gradient instead: every
    contraction ``B(x, w)`` reading a selected weight adds ``sum(B(stop_gradient(x)**2, w))``
    to one scalar side output; its gradient with respect to ``w`` is, entry by entry, the sum of
    the ``x**2`` that entry meets — through scan slicing, views and tied uses alike.

    The program must be reverse-differentiable (no weight inside a ``while_loop``). The
    gradient has the weight's dtype, so a bfloat16 weight gets bfloat16-rounded statistics.
    """
    paths = set(paths)
    emitters = {
        id(s.eqn)
        for s in contraction_sites(program)
        if any(t is not None and t.path in paths for t in s.in_tags[:2])
    }

    def rule(site: Any, invals: list[Any]) -> list[Any] | None:
        if site.primitive not in ("dot_general", "conv_general_dilated"):
            return None
        for k, t in enumerate(site.in_tags[:2]):
            if t is None or t.path not in paths:
                continue
            x = lax.stop_gradient(invals[1 - k]).astype(jnp.float32)
            w = invals[k].astype(jnp.float32)
            ops = (x * x, w) if k == 1 else (w, x * x)
            p = site.eqn.params
            if site.primitive == "dot_general":
                y = lax.dot_general(
                    *ops,
                    p["dimension_numbers"],
                    precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32,
                )
            else:
                y = lax.conv_general_dilated(
                    *ops,
                    window_strides=p["window_strides"],
                    padding=p["padding"],
                    lhs_dilation=p["lhs_dilation"],
                    rhs_dilation=p["rhs_dilation"],
                    dimension_numbers=p["dimension_numbers"],
                    feature_group_count=p["feature_group_count"],
                    batch_group_count=p["batch_group_count"],
                    precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32,
                )
            emit(_WANDA_KEY, jnp.sum(y))
        return None

    spec = Rewrite(
        "wanda",
        rule=rule,
        rule_primitives=frozenset(CONTRACTION_PRIMITIVES),
        side_outputs={_WANDA_KEY: SideOutput((), jnp.float32, "sum", 0.0)},
        side_key=lambda eqn: _WANDA_KEY if id(eqn) in emitters else None,
    )
    closed, _ = rewrite_with_side_outputs(program, spec)
    fn = jax.extend.core.jaxpr_as_fun(closed)
    index = [i for i, r in enumerate(program.roles) if isinstance(r, ParamRef) and r.path in paths]
    order = [program.roles[i].path for i in index]

    def probe(selected: list[Any], flat: list[Any]) -> Any:
        flat = list(flat)
        for i, v in zip(index, selected, strict=True):
            flat[i] = v
        return fn(*flat)[-1]

    grad = jax.jit(jax.grad(probe))
    total = [jnp.zeros(program.roles[i].shape, jnp.float32) for i in index]
    for batch in batches:
        inputs = batch if isinstance(batch, tuple) else (batch,)
        flat = program._check_args(params, inputs)
        g = grad([flat[i] for i in index], flat)
        total = [t + gi.astype(jnp.float32) for t, gi in zip(total, g, strict=True)]
    return {p: jnp.sqrt(jnp.maximum(t, 0.0)) for p, t in zip(order, total, strict=True)}


def activation_norms(
    program: Program, params: Any, batches: Iterable[Any], paths: Iterable[str]
) -> dict[str, Any]:
    """||x||_2 per input feature of the activation each selected weight multiplies.

    The statistics are side outputs of the program (sums of squares, merged over batches and
    over the uses of a weight — for a scan-stacked weight, over its layers), so this runs under
    jit and on sharded batches.
    """
    paths = set(paths)
    infos = {i.path: i for i in param_infos(program)}
    side = {}
    for p in paths:
        in_axis = _input_axis(infos[p])
        side[p] = SideOutput((infos[p].shape[in_axis],), jnp.float32, "sum", 0.0)

    def rule(site: Any, invals: list[Any]) -> list[Any] | None:
        if site.primitive != "dot_general":
            return None
        for k, t in enumerate(site.in_tags[:2]):
            if t is not None and t.path in paths:
                (lc, rc), _ = site.eqn.params["dimension_numbers"]
                x = invals[1 - k].astype(jnp.float32)
                contract = (lc if k == 1 else rc)[0]
                axes = tuple(a for a in range(x.ndim) if a != contract)
                emit(t.path, jnp.sum(x * x, axis=axes))
        return None

    # Which contraction emits which weight's statistics, so they leave scan/cond/jit bodies.
    key_of: dict[int, str] = {}
    for s in contraction_sites(program):
        for t in s.in_tags[:2]:
            if t is not None and t.path in paths:
                key_of.setdefault(id(s.eqn), t.path)

    def side_key(eqn: Any) -> Any:
        return key_of.get(id(eqn))

    spec = Rewrite(
        "wanda",
        rule=rule,
        rule_primitives=frozenset(CONTRACTION_PRIMITIVES),
        side_outputs=side,
        side_key=side_key,
    )
    closed, keys = rewrite_with_side_outputs(program, spec)
    fn = jax.jit(jax.extend.core.jaxpr_as_fun(closed))
    total = {k: 0.0 for k in keys}
    for batch in batches:
        inputs = batch if isinstance(batch, tuple) else (batch,)
        outs = fn(*program._check_args(params, inputs))
        for k, v in zip(keys, outs[len(outs) - len(keys) :], strict=True):
            total[k] = total[k] + v
    return {k: jnp.sqrt(v) for k, v in total.items()}


__all__ = ["Masks", "Prune", "activation_norms", "compute_masks", "prune"]
