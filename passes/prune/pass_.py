"""``prune``: masks applied to weights at their entry into the program.

A pruned weight is ``w * mask`` where the parameter enters the program (after earlier passes'
markers), inside a marker region named ``maas_prune``, so every use — tied weights, scan-stacked
layers, opaque regions — sees the same zeros, later passes still see the parameter, and
``fake_quant`` after ``prune`` quantizes the pruned weight (zeros stay exactly zero: the
quantizers map 0 to 0).

Masks that are functions of the weight itself (magnitude by threshold or by rate, N:M, blocks,
random with a fixed seed) are computed in the graph — handy for experiments and QAT, where the
weights change, but a rate mask sorts the weight on every call. For inference, compute masks
once with :func:`compute_masks` (layer-wise or global magnitude, SNIP, Wanda) and bake them in
as constants: ``prune(masks=compute_masks(program, params, ...))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from maas_jax.passes._weights import freeze_where, select_weights
from maas_jax.passes.prune import masks as mk

from maas_jax import PassRecord, Program, Rewrite, rewrite
from maas_jax._compat import CONTRACTION_PRIMITIVES
from maas_jax._interpreter import SideOutput, emit, rewrite_with_side_outputs
from maas_jax._select import param_infos

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
        return f"prune({', '.join(fields)})"

    def __call__(self, program: Program) -> Program:
        where = self.where
        if self.method == "masks" and where is None:
            where = tuple(f"^{p}$" for p in self.masks.masks)
        sel, todo = select_weights(
            program, where, pass_name=self.name, allow_opaque=self.allow_opaque, config=repr(self)
        )
        if not todo:
            return program
        entry = {path: self._mask_fn(path, sel.infos[path]) for path in todo}
        new = rewrite(program, Rewrite(self.name, entry=entry))
        record = PassRecord(self.name, repr(self), tuple(todo), ())
        return program.with_record(record, jaxpr=new)

    def _mask_fn(self, path: str, info: Any) -> Any:
        """``w -> w * mask`` for one parameter."""
        if self.method == "masks":
            if path not in self.masks.masks:
                raise ValueError(f"prune: no mask given for selected parameter {path!r}")
            keep = self.masks.masks[path]
            if keep.shape != tuple(info.shape):
                raise ValueError(
                    f"prune: mask for {path!r} has shape {keep.shape}, the parameter {tuple(info.shape)}"
                )
            return lambda w: jnp.where(keep, w, jnp.zeros((), w.dtype))
        axis = _input_axis(info)
        stacked = max((u.sliced for u in info.uses), default=0)
        if self.method == "nm" and info.shape[axis] % self.m:
            raise ValueError(
                f"prune: N:M groups of m={self.m} along axis {axis} (the contracted axis) do not "
                f"divide {path!r} of shape {tuple(info.shape)}"
            )
        if self.method == "block" and any(
            info.shape[a] % b for a, b in zip((-2, -1), self.block, strict=True)
        ):
            raise ValueError(
                f"prune: blocks {self.block} do not tile the last two axes of {path!r} "
                f"(shape {tuple(info.shape)})"
            )

        def mask_of(w: Any) -> Any:
            if self.method == "magnitude":
                return mk.magnitude_mask(w, sparsity=self.sparsity, threshold=self.threshold)
            if self.method == "random":
                key = jax.random.fold_in(jax.random.key(self.seed), hash(path) % (2**31))
                return mk.random_mask(key, w.shape, self.sparsity)
            if self.method == "nm":
                return mk.nm_mask(w, self.n, self.m, axis)
            return mk.block_mask(w, self.block, self.sparsity)

        def per_layer(w: Any) -> Any:
            # scan-stacked layers: each layer gets its own mask (rate per layer).
            f = mask_of
            for _ in range(stacked):
                f = jax.vmap(f)
            return f(w)

        return lambda w: jnp.where(per_layer(w), w, jnp.zeros((), w.dtype))


def _input_axis(info: Any) -> int:
    """The weight axis a contraction sums over (N:M groups run along it), else the last."""
    from maas_jax._provenance import map_dims_to_param

    for use in info.uses:
        dims = dict(use.dims)
        if use.primitive == "dot_general":
            mapped = map_dims_to_param(dims["contracting"][use.operand], use.views)
            if mapped and mapped[0] is not None:
                return mapped[0]
        if use.primitive == "conv_general_dilated" and use.operand == 1:
            return dims["rhs_spec"][1]
    return len(info.shape) - 1


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

    Args:
      method: ``"magnitude"`` (``sparsity=`` per layer, or ``threshold=``: keep ``|w| > t``),
        ``"random"`` (``sparsity=``, ``seed=``), ``"nm"`` (``n=`` weights KEPT in every group
        of ``m`` along the contracted axis: 2:4 keeps 2 of 4), ``"block"`` (``block=(r, c)``,
        ``sparsity=``), or ``"masks"`` (``masks=`` from :func:`compute_masks`: global
        magnitude, SNIP, Wanda).
      where: which weights (default: every matmul/conv weight).

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

    * ``"magnitude"``: per weight, the ``sparsity`` fraction of smallest ``|w|``.
    * ``"global_magnitude"``: one threshold over all selected weights together.
    * ``"snip"``: saliency ``|w * dL/dw|`` summed over ``batches``, global threshold; ``loss``
      maps the program's outputs (and the batch) to a scalar: ``loss(outputs, batch)``.
    * ``"wanda"``: ``|w| * ||x||`` with ``||x||`` the norm of the activation feeding each weight
      over ``batches`` (collected as functional side outputs of the program); each output
      row prunes ``sparsity`` of its weights.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"compute_masks: sparsity must be in [0, 1), got {sparsity!r}")
    sel, todo = select_weights(
        program, where, pass_name="compute_masks", allow_opaque=False, config=""
    )
    values = _values_by_path(program, params)
    weights = {p: values[p] for p in sel.paths}
    if method == "magnitude":  # layer-wise rate, computed once instead of in every call
        return Masks(
            {p: np.asarray(mk.magnitude_mask(w, sparsity=sparsity)) for p, w in weights.items()},
            "magnitude",
        )
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
        norms = activation_norms(program, params, batches, sel.paths)
        out = {}
        for p, w in weights.items():
            in_axis, out_axis = _wanda_axes(sel.infos[p])
            out[p] = mk.wanda_mask(w, norms[p], in_axis, out_axis, sparsity)
        return Masks(out, "Wanda")
    raise ValueError(
        "compute_masks: method must be 'magnitude', 'global_magnitude', 'snip' or 'wanda', "
        f"got {method!r}"
    )


def _values_by_path(program: Program, tree: Any) -> dict[str, Any]:
    leaves = jax.tree.leaves(tree)
    return {r.path: v for r, v in zip(program.params, leaves, strict=False)}


def _wanda_axes(info: Any) -> tuple[int, int]:
    in_axis = _input_axis(info)
    out_axis = next(a for a in range(len(info.shape)) if a != in_axis)
    return in_axis, out_axis


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
    from maas_jax._provenance import contraction_sites

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
