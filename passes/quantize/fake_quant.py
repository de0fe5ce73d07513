"""``fake_quant``: quantize weights at their entry and activations at their consumers.

When ``shard`` ran before it, scales never span a sharded axis (they are tiled per shard), so
quantization adds no collective.

Weights are quantized once, where the parameter enters the program (so tied and scan-stacked
weights and every use see the same integers), with scale axes derived from how the weight is
consumed: per-channel means one scale per output channel, shared over the axes every
contraction consuming the weight contracts (read from the dimension numbers, mapped back
through transposes, casts and scan slicing). Activations feeding a contraction with a quantized
weight are quantized there: per token (dynamic) over the contracted axes.

The forward of a contraction with integer operands runs on the integers (``s8 x s8 -> s32``,
then one rescale), which is what :func:`convert` keeps; the backward is a straight-through
estimator (gradients of the float contraction at the fake-quantized operands), so QAT trains
with optax and the QAT forward equals the PTQ/converted forward bit for bit.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from maas_jax.passes.quantize import qarray as qa
from maas_jax.passes.quantize.numerics import QuantSpec, get_format, make_spec

from maas_jax import PassRecord, Program, Rewrite, SelectionError, UnusedRuleWarning, rewrite
from maas_jax.extend import (
    CONTRACTION_PRIMITIVES,
    ParamInfo,
    SideOutput,
    contraction_sites,
    emit,
    map_dims_to_param_axes,
    param_infos,
    predicate,
    rewrite_with_side_outputs,
)

CALIBRATIONS = ("minmax", "moving_average", "percentile", "mse", "kl")
HIST_BINS = 2048


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
    """How to quantize the parameters ``where`` selects (first matching rule wins).

    Args:
      where: path regex, ``maas_jax.Op``, callable ``(path, info) -> bool``, tuple of these, or
        None for every floating weight consumed by a dot_general / convolution.
      weight: weight format: ``"int2"``..``"int8"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``.
      act: activation format for contractions with these weights, or None (weight-only).
      granularity: ``"per_channel"`` (default) or ``"per_tensor"``.
      tile_size: sub-channel groups of this size along the contracted axis.
      symmetric: absmax scales (True) or min/max with a zero point (False), for weights.
      act_symmetric: the same for activations.
      act_mode: ``"dynamic"`` (scales from each activation, per token) or ``"static"`` (one
        per-tensor scale per contraction, from :func:`calibrate`).
      calibration: how :func:`calibrate` picks a static range: ``"minmax"``,
        ``"moving_average"``, ``"percentile"``, ``"mse"`` or ``"kl"``.
      percentile: the percentile of |activation| for ``calibration="percentile"``.
      channel_axes: the parameter axes that keep their own scales (all others share one);
        overrides ``granularity``. Default: read from how the weight is consumed (output
        channels of contractions, rows of table lookups, layers of stacks).
    """

    where: Any = None
    weight: str = "int8"
    act: str | None = None
    granularity: str = "per_channel"
    tile_size: int | None = None
    symmetric: bool = True
    act_symmetric: bool = True
    act_mode: str = "dynamic"
    calibration: str = "minmax"
    percentile: float = 99.99
    channel_axes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.channel_axes is not None:
            axes = (self.channel_axes,) if isinstance(self.channel_axes, int) else self.channel_axes
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
                raise TypeError(
                    f"fake_quant: channel_axes must be an int or a tuple of ints, got "
                    f"{self.channel_axes!r}"
                )
            object.__setattr__(self, "channel_axes", tuple(axes))
        if self.act_mode not in ("dynamic", "static"):
            raise ValueError(
                f"fake_quant: act_mode must be 'dynamic' or 'static', got {self.act_mode!r}"
            )
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"fake_quant: calibration must be one of {', '.join(CALIBRATIONS)}, got "
                f"{self.calibration!r}"
            )
        if not 0 < self.percentile <= 100:
            raise ValueError(f"fake_quant: percentile must be in (0, 100], got {self.percentile}")
        if self.act_mode == "static" and (self.act is None or not self.act_symmetric):
            raise ValueError(
                "fake_quant: act_mode='static' needs a symmetric activation format (act='int8', "
                "act_symmetric=True)"
            )
        for what, fmt in (("weight", self.weight), ("act", self.act)):
            if fmt is None and what == "act":
                continue
            try:
                get_format(fmt)
            except ValueError as e:
                raise ValueError(f"fake_quant: {what}={fmt!r}: {e}") from None
        if self.granularity not in ("per_channel", "per_tensor"):
            raise ValueError(
                f"fake_quant: granularity must be 'per_channel' or 'per_tensor', got "
                f"{self.granularity!r}"
            )
        if self.tile_size is not None and (
            not isinstance(self.tile_size, int) or self.tile_size < 1
        ):
            raise ValueError(
                f"fake_quant: tile_size must be a positive int, got {self.tile_size!r}"
            )
        for fmt, sym, what in (
            (self.weight, self.symmetric, "weight"),
            (self.act, self.act_symmetric, "act"),
        ):
            if fmt is not None and not sym and get_format(fmt).is_float:
                raise ValueError(
                    f"fake_quant: asymmetric {what} quantization needs an integer format; "
                    f"{fmt!r} has no zero point. Use symmetric=True or an int format."
                )
        if isinstance(self.where, list):
            object.__setattr__(self, "where", tuple(self.where))
        if self.where is not None:
            predicate(self.where, what="fake_quant(where=...)")


@dataclasses.dataclass(frozen=True)
class FakeQuant:
    """The pass :func:`fake_quant` returns.

    ``act_scales`` holds calibrated static activation ranges (``(site, absmax)`` pairs, site =
    index of the contraction in :func:`maas_jax.contraction_sites` order); :func:`calibrate`
    fills it.
    """

    rules: tuple[QuantRule, ...]
    inline_custom: bool = False
    act_scales: tuple[tuple[int, float], ...] | None = None
    dynamic_sites: tuple[int, ...] = ()  # static sites calibration never saw: per-tensor dynamic
    name = "fake_quant"

    def __repr__(self) -> str:
        extra = ", inline_custom=True" if self.inline_custom else ""
        if self.act_scales is not None:
            extra += f", act_scales=<{len(self.act_scales)} calibrated sites>"
        return f"fake_quant(rules={self.rules!r}{extra})"

    def __call__(self, program: Program) -> Program:
        plan = plan_quantization(program, self.rules, config=repr(self))
        if not plan:
            return program
        ctx = _RuleContext(plan, program, dict(self.act_scales or ()), observe=None)
        ctx.dynamic_sites = set(self.dynamic_sites)
        new = rewrite(program, self._rewrite_spec(plan, ctx))
        notes = tuple(
            f"{p}: {s.fmt.name} reduce_axes={s.reduce_axes}" for p, (s, _) in plan.items()
        )
        record = PassRecord(self.name, repr(self), tuple(plan), notes)
        meta = dict(program.meta)
        meta["fake_quant"] = {**meta.get("fake_quant", {}), **{p: s for p, (s, _) in plan.items()}}
        meta["fake_quant_pass"] = self
        meta["fake_quant_base"] = program.meta.get("fake_quant_base", program)
        meta["uncalibrated_sites"] = tuple(sorted(ctx.uncalibrated))
        return program.with_record(record, jaxpr=new, meta=meta)

    def _rewrite_spec(self, plan: Any, ctx: _RuleContext, **extra: Any) -> Rewrite:
        markers = {path: qa.make_marker(spec) for path, (spec, _) in plan.items()}
        entry = {
            path: (
                lambda w, path=path: qa.quantize_weight_at_entry(
                    w, plan[path][0], path, markers[path]
                )
            )
            for path in plan
        }
        return Rewrite(
            self.name,
            entry=entry,
            entry_marked=False,  # make_marker names its own region
            rule=make_rule(ctx),
            rule_primitives=frozenset(CONTRACTION_PRIMITIVES | {"gather"}),
            wants=lambda eqn: eqn.primitive.name in CONTRACTION_PRIMITIVES,
            inline_custom=self.inline_custom,
            **extra,
        )

    def observer(self, program: Program, observe: str, ranges: dict[int, float] | None = None):
        """The program's jaxpr returning, after its outputs, activation statistics per static
        site: ``observe="absmax"`` (max |x|) or ``"hist"`` (counts of |x| in HIST_BINS bins over
        ``[0, ranges[site]]``). Returns ``(closed_jaxpr, keys)``."""
        plan = plan_quantization(program, self.rules, config=repr(self), warn=False)
        ctx = _RuleContext(plan, program, {}, observe=observe, ranges=ranges or {})
        sites = ctx.static_sites()
        if observe == "absmax":
            side = {(k, "absmax"): SideOutput((), jnp.float32, "max", 0.0) for k in sites}
        else:
            side = {(k, "hist"): SideOutput((HIST_BINS,), jnp.float32, "sum", 0.0) for k in sites}
        key_of = {id(e): k for e, k in ctx.site_eqns()}
        spec = self._rewrite_spec(
            plan,
            ctx,
            side_outputs=side,
            side_key=lambda e: (key_of[id(e)], observe) if id(e) in key_of else None,
        )
        return rewrite_with_side_outputs(program, spec)


def fake_quant(
    weight: str = "int8",
    act: str | None = None,
    *,
    where: Any = None,
    granularity: str = "per_channel",
    tile_size: int | None = None,
    symmetric: bool = True,
    act_symmetric: bool = True,
    act_mode: str = "dynamic",
    calibration: str = "minmax",
    percentile: float = 99.99,
    rules: Any = None,
    inline_custom: bool = False,
) -> FakeQuant:
    """Fake-quantize weights (at entry) and activations (at contractions).

    Either give one rule through the keyword arguments (see :class:`QuantRule`), or a list of
    ``rules=[QuantRule(...), ...]`` tried in order (first match wins; rules that select nothing
    raise an ``UnusedRuleWarning``). Contractions inside custom_jvp/custom_vjp regions see the
    dequantized weight (an ``OpaqueRegionWarning`` says so) unless ``inline_custom=True``.

    >>> import jax, jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> w = jnp.array([[0.5, -1.0], [0.25, 2.0]])
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((1, 2)))
    >>> w8a8 = passes.fake_quant("int8", act="int8")(prog)
    >>> w8a8({"w": w}, jnp.ones((1, 2))).round(3).tolist()
    [[0.75, 1.0]]
    """
    if rules is None:
        rules = (
            QuantRule(
                where=where,
                weight=weight,
                act=act,
                granularity=granularity,
                tile_size=tile_size,
                symmetric=symmetric,
                act_symmetric=act_symmetric,
                act_mode=act_mode,
                calibration=calibration,
                percentile=percentile,
            ),
        )
    rules = tuple(rules)
    if not rules or not all(isinstance(r, QuantRule) for r in rules):
        raise TypeError("fake_quant(rules=...) takes a non-empty list of QuantRule")
    return FakeQuant(rules, inline_custom)


# ---- planning: which parameters, which axes -------------------------------------------


def plan_quantization(
    program: Program, rules: tuple[QuantRule, ...], *, config: str, warn: bool = True
) -> dict[str, tuple[QuantSpec, QuantRule]]:
    """For every selected parameter: its quantization spec (axes from its consumers) and rule."""
    infos = param_infos(program)
    preds = [
        (lambda info: info.is_weight)
        if r.where is None
        else predicate(r.where, what="fake_quant(where=...)")
        for r in rules
    ]
    done = {p for rec in program.history if rec.name == "fake_quant" for p in rec.touched}
    plan: dict[str, tuple[QuantSpec, QuantRule]] = {}
    used = set()
    for info in infos:
        already = info.path in done  # its uses now read integers: the default predicate fails
        for k, pred in enumerate(preds):
            if pred(info) or (already and rules[k].where is None):
                used.add(k)
                if not already:
                    spec = _spec_for(info, rules[k], k, program.meta.get("sharding"))
                    plan[info.path] = (spec, rules[k])
                break
    unused = [k for k in range(len(rules)) if k not in used]
    if unused and warn:
        warnings.warn(
            f"fake_quant: rule(s) {', '.join(f'{k} ({rules[k].where!r})' for k in unused)} "
            f"matched no parameter of {program.name!r}",
            UnusedRuleWarning,
            stacklevel=3,
        )
    return plan


def _spec_for(info: ParamInfo, rule: QuantRule, k: int, sharding: Any = None) -> QuantSpec:
    path, ndim = info.path, len(info.shape)
    if not jnp.issubdtype(info.dtype, jnp.floating):
        raise TypeError(
            f"fake_quant: rule {k} selects {path!r}, which is {info.dtype}; only floating "
            "parameters can be quantized. Narrow `where=`."
        )
    opaque = [u for u in info.uses if u.opaque]
    if opaque:
        raise SelectionError(
            f"fake_quant: {path!r} flows into `{opaque[0].primitive}` at {opaque[0].source}, "
            "whose body maas_jax cannot see into; exclude it with `where=`."
        )
    reduce_axes, contract = _reduce_axes(info, rule)
    tile = None
    if rule.tile_size is not None:
        axes = sorted(contract) if contract else list(reduce_axes)
        if len(axes) != 1 and rule.granularity != "per_tensor":
            # Several contracted axes (convolution kernels): tile the largest one.
            axes = [max(axes, key=lambda a: info.shape[a])]
        axis = axes[-1]
        if info.shape[axis] % rule.tile_size:
            raise ValueError(
                f"fake_quant: rule {k} tile_size {rule.tile_size} does not divide axis {axis} "
                f"(size {info.shape[axis]}) of {path!r} (shape {tuple(info.shape)})"
            )
        tile = (axis, rule.tile_size)
    if tile is None and sharding is not None:
        tile = _shard_tile(info, reduce_axes, sharding)
    return make_spec(rule.weight, reduce_axes, ndim, symmetric=rule.symmetric, tile=tile)


class GranularityWarning(UserWarning):
    """A weight could not be quantized at the granularity its rule asked for."""


def _reduce_axes(info: ParamInfo, rule: QuantRule) -> tuple[tuple[int, ...], set[int]]:
    """The axes one scale is shared over, and the contracted axes, from the weight's uses.

    * Every use sees some of the parameter's axes: those a scan slices away or an index
      (``W[i]``) drops are *layer* axes and always keep their own scales (per layer).
    * per_channel: share over the axes any contraction sums over (mapped back through
      reshapes, transposes, slices), and over the row axes of a table lookup's slices (an
      embedding is quantized per row).
    * per_tensor: share over every axis a use sees (one scale per layer of a stack).
    * ``channel_axes`` overrides both: those axes keep their scales, all others share.
    """
    path, ndim = info.path, len(info.shape)
    seen: set[int] = set()
    contract: set[int] = set()
    exact = True
    for use in info.uses:
        if use.shape:
            axes, ok = map_dims_to_param_axes(range(len(use.shape)), use.views)
            seen |= axes
            exact &= ok
        if use.primitive in CONTRACTION_PRIMITIVES:
            axes, ok = map_dims_to_param_axes(use.contracted_dims or (), use.views)
            contract |= axes
            exact &= ok
        elif use.primitive == "gather" and use.operand == 0:
            d = dict(use.dims)
            indexed = set(d["start_index_map"]) | set(d["operand_batching_dims"])
            rows, ok = map_dims_to_param_axes(sorted(indexed), use.views)
            within, ok2 = map_dims_to_param_axes(range(len(use.shape)), use.views)
            contract |= within - rows
            exact &= ok and ok2
    stacked = max((u.sliced for u in info.uses), default=0)  # scan layer axes
    seen = seen or set(range(stacked, ndim))
    if rule.channel_axes is not None:
        keep = {a % ndim for a in rule.channel_axes} if ndim else set()
        return tuple(a for a in range(ndim) if a not in keep), contract
    if rule.granularity == "per_tensor":
        return tuple(sorted(seen)), contract
    if not exact or not contract:
        why = (
            "a view on its way to a contraction could not be mapped back to its axes"
            if not exact
            else "no contraction or table lookup consumes it"
        )
        warnings.warn(
            f"fake_quant: {path!r} (shape {tuple(info.shape)}) is quantized per tensor, not per "
            f"channel: {why}. Give QuantRule(channel_axes=...) to choose the axes that keep "
            "their own scales.",
            GranularityWarning,
            stacklevel=4,
        )
        return tuple(sorted(seen)), contract
    return tuple(sorted(contract)), contract


def _shard_tile(info: ParamInfo, reduce_axes: tuple[int, ...], sharding: Any) -> Any:
    """Scales that stay inside shard boundaries (no collective) when ``shard`` ran first.

    A per-channel scale reduces over the contracted axes; if the sharding plan splits one of
    them across devices, computing the scale would need an all-reduce every step. Sub-channel
    tiles of one shard's size keep each scale local to its device.
    """
    spec = tuple(sharding.param_specs.get(info.path, ()))
    sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape, strict=True))
    for axis in reduce_axes:
        entry = spec[axis] if axis < len(spec) else None
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        n = int(np.prod([sizes[a] for a in names])) if names else 1
        if n > 1 and info.shape[axis] % n == 0:
            return (axis, info.shape[axis] // n)
    return None


# ---- the per-equation rule --------------------------------------------------------------


class _RuleContext:
    """What the contraction rule needs: rules by weight, static sites, calibrated scales."""

    def __init__(
        self,
        plan: Any,
        program: Program,
        act_scales: dict[int, float],
        observe: str | None,
        ranges: dict[int, float] | None = None,
    ):
        self.rules_by_path = {p: rule for p, (_, rule) in plan.items()}
        self.act_scales = act_scales
        self.observe = observe
        self.ranges = ranges or {}
        self.uncalibrated: set[int] = set()
        self.dynamic_sites: set[int] = set()
        self.warned: set[int] = set()
        self._sites = contraction_sites(program)
        self.site_of: dict[int, int] = {}
        for k, site in enumerate(self._sites):
            self.site_of.setdefault(id(site.eqn), k)

    def site_eqns(self) -> list[tuple[Any, int]]:
        return [(s.eqn, k) for k, s in enumerate(self._sites) if k in self.static_sites()]

    def static_sites(self) -> list[int]:
        """Contractions with a quantized weight whose rule asks for static activations."""
        out = []
        for k, site in enumerate(self._sites):
            if self.site_of[id(site.eqn)] != k:
                continue
            paths = [t.path for t in site.in_tags[:2] if t is not None]
            rules = [self.rules_by_path[p] for p in paths if p in self.rules_by_path]
            if rules and rules[0].act_mode == "static":
                out.append(k)
        return out


def make_rule(ctx: _RuleContext) -> Any:
    def rule(site: Any, invals: list[Any]) -> list[Any] | None:
        eqn = site.eqn
        if eqn.primitive.name == "gather":
            # A table lookup: gather the integers and their per-row scales; the rows are
            # dequantized where they are used, the table is never dequantized whole.
            if invals and isinstance(invals[0], qa.QArray):
                out = invals[0].gather(eqn, list(invals[1:]))
                return None if out is None else [out]
            return None
        quantized = [isinstance(v, qa.QArray) for v in invals[:2]]
        if not any(quantized):
            _warn_if_dequantized(ctx, site)
            return None
        weight = invals[0] if quantized[0] else invals[1]
        qrule = ctx.rules_by_path[weight.path]
        with jax.named_scope(qa.MARKER):
            return [_contraction(eqn, invals[0], invals[1], qrule, ctx)]

    return rule


class DequantizedWeightWarning(UserWarning):
    """A quantized weight reached a contraction as a dequantized float (no integer path)."""


def _warn_if_dequantized(ctx: _RuleContext, site: Any) -> None:
    """Say so when a quantized weight with an activation format lost its integer contraction.

    That happens when a view could not carry the quantized value (a reshape mixing shared and
    per-channel axes, a non-tile-aligned slice of a tiled weight): the contraction still sees
    the quantized weight's values, but in float, and its activations stay float.
    """
    for t in site.in_tags[:2]:
        rule = None if t is None else ctx.rules_by_path.get(t.path)
        if rule is None or rule.act is None or id(site.eqn) in ctx.warned:
            continue
        ctx.warned.add(id(site.eqn))
        views = "/".join(v for v, _ in t.views) or "no view"
        warnings.warn(
            f"fake_quant: {t.path!r} reaches `{site.primitive}` at {site.source} (name stack "
            f"{site.name_stack or '<root>'!r}) as a dequantized float (through {views}), so "
            f"this contraction runs in float and its activations are not quantized to "
            f"{rule.act}. Quantize with granularity='per_tensor' or without tiles to keep the "
            "integer path.",
            DequantizedWeightWarning,
            stacklevel=2,
        )


def _contraction(eqn: Any, lhs: Any, rhs: Any, qrule: QuantRule, ctx: _RuleContext) -> Any:
    lhs_axes, rhs_axes = qa.contraction_operands_axes(eqn)
    if qrule.act is None:
        # Weight-only: the contraction runs in float on the dequantized weight.
        return qa.float_contraction(eqn, _mat(lhs), _mat(rhs))
    fmt = get_format(qrule.act)
    site = ctx.site_of.get(id(eqn))
    if qrule.act_mode == "static" and site is not None and ctx.observe is not None:
        act = lhs if not isinstance(lhs, qa.QArray) else rhs
        _observe(ctx, site, act)
    static = qrule.act_mode == "static" and site in ctx.act_scales
    if (
        qrule.act_mode == "static"
        and not static
        and ctx.observe is None
        and site is not None
        and site not in ctx.dynamic_sites
    ):
        ctx.uncalibrated.add(site)

    def quant_act(x: Any, axes: tuple[int, ...]) -> Any:
        if static:
            return qa.quantize_static(x, fmt, ctx.act_scales[site])
        if qrule.act_mode == "static":  # not calibrated yet: per-tensor from the value
            return qa.quantize_dynamic(x, fmt, tuple(range(x.ndim)), True)
        return qa.quantize_dynamic(x, fmt, axes, qrule.act_symmetric)

    if not isinstance(lhs, qa.QArray):
        lhs = quant_act(lhs, lhs_axes)
    if not isinstance(rhs, qa.QArray):
        rhs = quant_act(rhs, rhs_axes)
    lhs_dq, rhs_dq = lhs.dequantized(), rhs.dequantized()
    if qa.int_path_ok(lhs, rhs) and qa.scales_shared_over_contraction(eqn, lhs, rhs):
        exact = qa.int_contraction(eqn, lhs, rhs)
    else:  # fp8 or sub-channel tiles: emulate on the dequantized values
        exact = qa.float_contraction(eqn, lhs_dq, rhs_dq)
    if lhs.orig is None and rhs.orig is None:
        return exact
    lhs_f = lhs.orig if lhs.orig is not None else lhs_dq
    rhs_f = rhs.orig if rhs.orig is not None else rhs_dq
    return qa.ste_contraction(eqn, exact, lhs_dq, rhs_dq, lhs_f, rhs_f)


def _observe(ctx: _RuleContext, site: int, act: Any) -> None:
    a = jnp.abs(act.astype(jnp.float32))
    if ctx.observe == "absmax":
        emit((site, "absmax"), jnp.max(a))
        return
    hi = max(float(ctx.ranges.get(site, 0.0)), 1e-30)
    idx = jnp.clip(jnp.floor(a / hi * HIST_BINS), 0, HIST_BINS - 1).astype(jnp.int32)
    counts = jnp.zeros((HIST_BINS,), jnp.float32).at[idx.reshape(-1)].add(1.0)
    emit((site, "hist"), counts)


def _mat(x: Any) -> Any:
    return x.__maas_materialize__() if isinstance(x, qa.QArray) else x
