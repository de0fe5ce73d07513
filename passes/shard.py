"""``shard``: a sharding plan from rule tables, applied at the jit boundary and in the graph.

Two-level rules, as in Flax/MaxText/T5X: a parameter path regex names each dimension with a
*logical* axis (``("embed", "mlp")``), and ``logical_rules`` map logical axes to mesh axes by a
priority list — a logical axis may appear several times; the first mesh axis that divides the
dimension and is not used yet by that parameter wins, so MaxText/T5X tables work as they are.
Logical axes the model declares (``nn.with_logical_partitioning``, NNX ``sharding``) are used
when no path rule matches; presets fill the rest:

* ``"dp"`` — parameters replicated, batches split over ``data``;
* ``"fsdp"`` — each parameter split along its largest dimension the ``fsdp`` (or ``data``) axis
  divides;
* ``"tp"`` — Megatron tensor parallelism over ``model``: the producer of an MLP's hidden units is
  split by columns, its consumer by rows (found by following the units through the graph, the
  analysis structured pruning uses), declared ``mlp``/``heads``/``vocab`` axes go to ``model``;
  parameters with no such axis (a row-parallel layer's bias, norms) stay replicated;
* ``"fsdp_tp"`` — both; parameters without a usable tensor-parallel axis (none found, or one the
  ``model`` axis does not divide) are split over ``model`` along another dimension, and an axis
  that finds no free dimension it divides shares one with the other axis
  (``P(("data", "model"))``), so every parameter's bytes are divided by the whole mesh unless
  no dimension is divisible. Tensor parallelism proper needs the hidden units visible: run
  ``shard`` before ``fake_quant`` (its entry transforms hide them) and use hidden sizes the
  ``model`` axis divides; otherwise ``model`` only splits parameters FSDP-style, and the plan
  warns.

The axis names are ``data_axis=``/``model_axis=`` (default ``"data"``/``"model"``; a mesh axis
named ``fsdp`` takes FSDP). A preset whose axes the mesh lacks raises :class:`ShardingError`.
Where jax would silently replicate (an axis that does not divide the dimension) the plan says
so loudly: explicit specs raise, logical and preset fallbacks warn (:class:`ShardingWarning`,
one per plan, naming each parameter, its shape, the axis and its size); so do rules that match
nothing (:class:`UnusedShardingRuleWarning`). The pass stores the plan in
``program.meta["sharding"]`` (a :class:`maas_jax.runtime.ShardingPlan`); activation rules
insert ``with_sharding_constraint`` at matching equations (inside scan bodies too).

Running the program with its plan is not a pass: :func:`maas_jax.runtime.sharded_jit`,
``place``, ``sharded_init``, ``make_train_step`` and the compiled ``plan_report`` live in
:mod:`maas_jax.runtime` and are re-exported here and from ``maas_jax.passes``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maas_jax import (
    ParamRef,
    PassRecord,
    Program,
    Rewrite,
    UnusedRuleWarning,
    rewrite,
)
from maas_jax.extend import bind_eqn, param_infos

# What runs a program under its plan, and the plan type itself, live in the core
# (``maas_jax.runtime``); they stay importable from here.
from maas_jax.runtime import (
    ShardingError,
    ShardingPlan,
    format_bytes,
    format_report,
    in_shardings,
    make_train_step,
    place,
    plan_report,
    sharded_init,
    sharded_jit,
    state_shardings,
)

DEFAULT_LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("embed", "fsdp"),
    ("embed", None),
    ("layers", None),
)
PRESETS = ("dp", "fsdp", "tp", "fsdp_tp")


class ShardingWarning(UserWarning):
    """A plan splits less than asked: no candidate mesh axis divides a dimension, or a preset
    found nothing to split the way it promises (no tensor-parallel dimension)."""


class UnusedShardingRuleWarning(ShardingWarning, UnusedRuleWarning):
    """A ``rules=`` or ``activations=`` entry of :func:`shard` matched nothing."""


@dataclasses.dataclass(frozen=True, eq=False)
class Shard:
    """The pass :func:`shard` returns."""

    mesh: Any
    preset: str | None = None
    rules: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    logical_rules: tuple[tuple[str, str | None], ...] = DEFAULT_LOGICAL_RULES
    activations: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    batch_axis: str | None = "data"
    data_axis: str = "data"
    model_axis: str = "model"
    name = "shard"

    def __repr__(self) -> str:
        shape = dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
        axes = ""
        if (self.data_axis, self.model_axis) != ("data", "model"):
            axes = f", data_axis={self.data_axis!r}, model_axis={self.model_axis!r}"
        return f"shard(mesh={shape}, preset={self.preset!r}, rules={len(self.rules)}{axes})"

    @property
    def fsdp_axis(self) -> str:
        """The mesh axis FSDP splits parameters over: ``fsdp`` if the mesh has one, else
        ``data_axis``."""
        return "fsdp" if "fsdp" in self.mesh.axis_names else self.data_axis

    def __call__(self, program: Program) -> Program:
        plan = make_plan(program, self)
        wsc_sites = [(re.compile(rx), spec) for rx, spec in self.activations]
        mesh = self.mesh
        used: set[int] = set()
        seen: dict[str, None] = {}  # name stacks of the contractions, for the unused warning

        def constrain(site: Any, invals: list[Any]) -> list[Any] | None:
            seen.setdefault(site.name_stack)
            for k, (rx, spec) in enumerate(wsc_sites):
                if rx.search(site.name_stack):
                    used.add(k)
                    outs = bind_eqn(site.eqn, invals)
                    resolved = resolve_spec(
                        spec, outs[0].shape, self, f"activation {site.name_stack}"
                    )
                    outs[0] = jax.lax.with_sharding_constraint(
                        outs[0], NamedSharding(mesh, resolved)
                    )
                    return outs
            return None

        entry = {
            path: (lambda w, s=spec: jax.lax.with_sharding_constraint(w, NamedSharding(mesh, s)))
            for path, spec in plan.param_specs.items()
            if any(a is not None for a in spec)
        }
        prims = frozenset({"dot_general", "conv_general_dilated"}) if wsc_sites else frozenset()
        new = rewrite(
            program,
            Rewrite(
                self.name,
                entry=entry,
                rule=constrain if wsc_sites else None,
                rule_primitives=prims,
            ),
        )
        unused = [rx for k, (rx, _) in enumerate(self.activations) if k not in used]
        if unused:
            listed = list(seen)
            stacks = ", ".join(map(repr, listed[:8])) + (", ..." if len(listed) > 8 else "")
            warnings.warn(
                f"shard: activation rule(s) {', '.join(map(repr, unused))} matched no "
                f"dot_general/conv_general_dilated of {program.name!r} (or only ones an earlier "
                f"rule took), so nothing is constrained for them. The regex is searched in the "
                f"equation's name stack; the name stacks are: {stacks or '(no contraction)'}",
                UnusedShardingRuleWarning,
                stacklevel=2,
            )
        meta = dict(program.meta)
        meta["sharding"] = plan
        record = PassRecord(self.name, repr(self), tuple(entry), plan.notes)
        return program.with_record(record, jaxpr=new, meta=meta)


def _axes_text(mesh: Any) -> str:
    return ", ".join(f"{n!r} (size {s})" for n, s in _axis_sizes(mesh).items())


def shard(
    mesh: Any,
    *,
    preset: str | None = None,
    rules: Sequence[tuple[str, Sequence[Any]]] = (),
    logical_rules: Sequence[tuple[str, str | None]] = DEFAULT_LOGICAL_RULES,
    activations: Sequence[tuple[str, Sequence[Any]]] = (),
    batch_axis: str | None = "data",
    data_axis: str = "data",
    model_axis: str = "model",
) -> Shard:
    """A sharding plan for ``mesh``; see the module docstring for the rule semantics.

    Args:
      mesh: a ``jax.sharding.Mesh`` (build it with Auto axis types, e.g. ``MeshSpec.build``).
      preset: ``"dp"``, ``"fsdp"``, ``"tp"`` or ``"fsdp_tp"`` for parameters no rule names.
      rules: ``(path regex, (logical or mesh axis per dim, ...))``, first match wins.
      logical_rules: ``(logical axis, mesh axis or None)`` priority list (Flax semantics). Every
        mesh axis a table you pass names must exist in ``mesh`` (``None`` replicates); the
        default table maps ``data``/``model`` to ``data_axis``/``model_axis`` and skips axes the
        mesh lacks.
      activations: ``(name-stack regex, spec)``: constrain the output of matching dots/convs;
        a rule that matches none warns (:class:`UnusedShardingRuleWarning`).
      batch_axis: mesh axis that splits the leading dimension of every input (None: replicate).
        The default follows ``data_axis`` and is dropped when the mesh lacks it.
      data_axis: the mesh axis the presets split batches (``dp``) and parameters (``fsdp``;
        a mesh axis named ``fsdp`` takes precedence) over.
      model_axis: the mesh axis of tensor parallelism (``tp``, ``fsdp_tp``).

    Raises:
      ShardingError: an unknown preset, a preset or logical rule naming an axis the mesh lacks.

    >>> import jax, jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 8))}, jnp.ones((2, 4)))
    >>> out = passes.shard(mesh, rules=[("w", (None, "model"))], batch_axis=None)(prog)
    >>> out.meta["sharding"].param_specs["w"]
    P(None, 'model')
    >>> mesh2 = jax.make_mesh((1, 1), ("dp", "mp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    >>> fsdp = passes.shard(mesh2, preset="fsdp", data_axis="dp")(prog)
    >>> fsdp.meta["sharding"].param_specs["w"]
    P(None, 'dp')
    """
    if preset is not None and preset not in PRESETS:
        raise ShardingError(f"shard: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    names = tuple(mesh.axis_names)
    if batch_axis == "data":
        batch_axis = data_axis
    if batch_axis is not None and batch_axis not in names:
        if batch_axis != data_axis:
            raise ShardingError(
                f"shard: batch_axis={batch_axis!r} is not an axis of the mesh (its axes: "
                f"{_axes_text(mesh)}); pass one of them, or batch_axis=None to replicate inputs"
            )
        batch_axis = None  # the default, on a mesh without a data axis: inputs replicated
    _check_preset_axes(mesh, preset, data_axis, model_axis, batch_axis)
    logical = tuple((lg, m) for lg, m in logical_rules)
    if logical == DEFAULT_LOGICAL_RULES:
        # The generic default table: rename data/model, skip (map to None) what the mesh lacks.
        rename = {"data": data_axis, "model": model_axis}
        logical = tuple((lg, rename.get(m, m) if m is not None else None) for lg, m in logical)
        logical = tuple((lg, m if m in names else None) for lg, m in logical)
    else:
        for lg, m in logical:
            if m is not None and m not in names:
                raise ShardingError(
                    f"shard: logical rule ({lg!r}, {m!r}) maps to mesh axis {m!r}, which the mesh "
                    f"does not have (its axes: {_axes_text(mesh)}). Map {lg!r} to one of "
                    f"{names} or to None to keep it replicated, e.g. logical_rules=[({lg!r}, "
                    f"{names[-1]!r}), ...]"
                )
    for rx, _ in (*rules, *activations):
        try:
            re.compile(rx)
        except re.error as e:
            raise ShardingError(f"shard: {rx!r} is not a valid regular expression ({e})") from None
    return Shard(
        mesh,
        preset,
        tuple((rx, tuple(s)) for rx, s in rules),
        logical,
        tuple((rx, tuple(s)) for rx, s in activations),
        batch_axis,
        data_axis=data_axis,
        model_axis=model_axis,
    )


def _check_preset_axes(
    mesh: Any, preset: str | None, data_axis: str, model_axis: str, batch_axis: str | None
) -> None:
    """A preset whose mesh axes are absent would shard nothing: say which argument to pass."""
    names = tuple(mesh.axis_names)
    missing: list[tuple[str, str, str]] = []  # (argument, value, what the preset does with it)
    if preset == "dp" and batch_axis is None and data_axis not in names:
        missing.append(("data_axis", data_axis, "splits batches over"))
    if preset in ("fsdp", "fsdp_tp") and "fsdp" not in names and data_axis not in names:
        missing.append(("data_axis", data_axis, "splits parameters (FSDP) over"))
    if preset in ("tp", "fsdp_tp") and model_axis not in names:
        missing.append(("model_axis", model_axis, "splits parameters (tensor parallel) over"))
    if not missing:
        return
    free = [n for n in names if n not in (data_axis, model_axis)]
    pool = free or list(names)
    # the data axis is usually the mesh's first, the model axis its last
    guess = {"data_axis": pool[0], "model_axis": pool[-1]}
    hint = ", ".join(f"{arg}={guess[arg]!r}" for arg in dict.fromkeys(a for a, _, _ in missing))
    what = " and ".join(f"it {does} mesh axis {val!r} ({arg}=)" for arg, val, does in missing)
    raise ShardingError(
        f"shard(preset={preset!r}): {what}, which the mesh does not have (its axes: "
        f"{_axes_text(mesh)}), so the preset would shard nothing there. Pass the mesh's axis "
        f"names, e.g. shard(mesh, preset={preset!r}, {hint})"
        + (", or use a mesh with both axes (size 1 is fine)" if preset == "fsdp_tp" else "")
    )


# ---- planning ---------------------------------------------------------------------------


def _axis_sizes(mesh: Any) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))


def _entry_axes(entry: Any) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def resolve_spec(spec: Sequence[Any], shape: Sequence[int], cfg: Shard, what: str) -> P:
    """Logical/mesh names per dimension -> a PartitionSpec; explicit names must divide."""
    sizes = _axis_sizes(cfg.mesh)
    if len(spec) > len(shape):
        raise ShardingError(f"shard: {what} has {len(shape)} dims, the rule names {len(spec)}")
    used: set[str] = set()
    out: list[Any] = []
    for dim, name in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if name is None:
            out.append(None)
            continue
        if name in sizes:  # a mesh axis, named directly: must divide, must not repeat
            if name in used:
                raise ShardingError(f"shard: {what} uses mesh axis {name!r} twice in one spec")
            if dim % sizes[name]:
                raise ShardingError(
                    f"shard: {what}: dimension of size {dim} is not divisible by mesh axis "
                    f"{name!r} (size {sizes[name]}); jax would silently replicate it"
                )
            used.add(name)
            out.append(name)
            continue
        candidates = [m for logical, m in cfg.logical_rules if logical == name]
        if not candidates and name not in {lg for lg, _ in cfg.logical_rules}:
            raise ShardingError(
                f"shard: {what} names {name!r}, which is neither a mesh axis "
                f"{tuple(sizes)} nor a logical axis of the rules "
                f"{sorted({lg for lg, _ in cfg.logical_rules})}"
            )
        chosen = None
        for m in candidates:
            if m is None:
                break
            if m in sizes and m not in used and dim % sizes[m] == 0:
                chosen = m
                break
        if chosen is None and candidates and candidates[0] is not None and candidates[0] in sizes:
            if dim % sizes[candidates[0]]:
                warnings.warn(
                    f"shard: {what}: logical axis {name!r} (size {dim}) is not divisible by "
                    f"{candidates[0]!r} (size {sizes[candidates[0]]}); it stays replicated",
                    ShardingWarning,
                    stacklevel=4,
                )
        if chosen is not None:
            used.add(chosen)
        out.append(chosen)
    return P(*out)


def make_plan(program: Program, cfg: Shard) -> ShardingPlan:
    sizes = _axis_sizes(cfg.mesh)
    model = cfg.model_axis
    notes: list[str] = []
    problems: list[str] = []
    compiled = [(re.compile(rx), spec) for rx, spec in cfg.rules]
    used_rules: set[int] = set()
    tp_reasons: list[str] = []
    tp_on = cfg.preset in ("tp", "fsdp_tp") and model in sizes
    tp_axes = _tp_axes(program, tp_reasons) if tp_on else {}
    specs: dict[str, P] = {}
    tp_found = bool(tp_axes)  # or a rule / declared logical axis names the model axis
    for info in param_infos(program):
        role = info.role
        spec = None
        declared = False
        for k, (rx, s) in enumerate(compiled):
            if rx.search(info.path):
                used_rules.add(k)
                spec = resolve_spec(s, role.shape, cfg, f"parameter {info.path!r}")
                break
        if spec is None and role.logical_axes is not None and cfg.preset in (None, "tp", "fsdp_tp"):
            # Declared logical axes: all of them without a preset; the tensor-parallel ones
            # (mapped to the model axis) under the tp presets.
            names = tuple(
                a if a in {lg for lg, _ in cfg.logical_rules} else None for a in role.logical_axes
            )
            spec = resolve_spec(names, role.shape, cfg, f"parameter {info.path!r}")
            declared = True
            if cfg.preset is not None:
                spec = P(*(a if a == model else None for a in spec))
        if spec is not None and any(model in _entry_axes(e) for e in spec):
            tp_found = True
        if spec is None or (
            cfg.preset in ("fsdp", "tp", "fsdp_tp")
            and (model not in tuple(spec) or (declared and cfg.preset == "fsdp_tp"))
        ):
            spec = _preset_spec(info, role, cfg, sizes, tp_axes, spec, problems)
        specs[info.path] = spec
        if all(a is None for a in spec) and role.shape and cfg.preset not in (None, "dp"):
            notes.append(f"{info.path} {tuple(role.shape)} stays replicated")
    unused = [rx for k, (rx, _) in enumerate(cfg.rules) if k not in used_rules]
    if unused:
        paths = [i.path for i in param_infos(program)]
        warnings.warn(
            f"shard: rule(s) {', '.join(map(repr, unused))} matched no parameter of "
            f"{program.name!r} (or only parameters an earlier rule took). Parameters: "
            f"{', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}",
            UnusedShardingRuleWarning,
            stacklevel=3,
        )
    shapes = {r.path: tuple(r.shape) for r in program.params}
    sharded_any = any(any(a is not None for a in s) for p, s in specs.items() if shapes.get(p))
    if cfg.preset in ("fsdp", "tp", "fsdp_tp"):
        no_tp = tp_on and not tp_found and any(len(r.shape) >= 2 for r in program.params)
        reasons = tp_reasons if no_tp else None
        notes.extend(_warn_preset(program, cfg, sizes, reasons, sharded_any, problems))
    inputs = {}
    for r in program.roles:
        if isinstance(r, ParamRef):
            continue
        b = cfg.batch_axis
        if b is not None and r.shape and r.shape[0] % sizes[b] == 0:
            inputs[r.path] = P(b)
        else:
            if b is not None and r.shape:
                notes.append(f"input {r.path} {r.shape}: batch not divisible by {b!r}, replicated")
            inputs[r.path] = P()
    return ShardingPlan(cfg.mesh, specs, inputs, tuple(notes))


def _warn_preset(
    program: Program,
    cfg: Shard,
    sizes: dict[str, int],
    tp_reasons: list[str] | None,
    sharded_any: bool,
    problems: list[str],
) -> list[str]:
    """One ShardingWarning for everything a preset could not split as it promises; returns the
    same facts as plan notes. ``tp_reasons`` is not None when no tensor-parallel axis exists."""
    parts = []
    if tp_reasons is not None:
        why = "; ".join(tp_reasons[-3:]) or "no kernel produces hidden units another consumes"
        earlier = [r.name for r in program.history if r.name != "shard"]
        if earlier:
            why += (
                f"; {', '.join(earlier)} ran before shard: run shard first, transforms at the "
                "weights' entry hide how the hidden units flow"
            )
        parts.append(
            f"found no tensor-parallel (Megatron column/row) dimension in {program.name!r} "
            f"({why}), so "
            + (
                f"mesh axis {cfg.model_axis!r} only splits parameters FSDP-style (gathered "
                "before use)."
                if cfg.preset == "fsdp_tp"
                else "it splits nothing that way."
            )
        )
    if not sharded_any:
        parts.append(f"Every parameter of {program.name!r} stays replicated.")
    notes = list(parts) + problems
    if problems:
        parts.append(
            f"{len(problems)} parameter(s) are split less than the preset asks, because the mesh "
            "axis divides none of the dimensions it could take (jax would silently replicate "
            "them):\n  " + "\n  ".join(problems)
        )
    if parts:
        fix = "give explicit rules=[(path regex, spec), ...] or logical axes."
        if problems:
            fix = (
                "make those dimensions multiples of the axis size, use a smaller mesh axis, or "
                + fix
            )
        warnings.warn(
            f"shard(preset={cfg.preset!r}) on mesh {sizes}: " + "\n".join(parts) + "\nFix: " + fix,
            ShardingWarning,
            stacklevel=4,
        )
    return notes


def _preset_spec(
    info: Any, role: Any, cfg: Shard, sizes: dict, tp_axes: dict, base: Any, problems: list
) -> P:
    shape = tuple(role.shape)
    ndim = len(shape)
    if cfg.preset == "dp" or base is None:
        out: list[Any] = [None] * ndim
    else:
        out = list(base) + [None] * (ndim - len(base))
    if cfg.preset in (None, "dp") or not ndim:
        return P(*out)
    model, fsdp = cfg.model_axis, cfg.fsdp_axis
    why: list[str] = []

    def has(axis: str) -> bool:
        return any(axis in _entry_axes(e) for e in out)

    if cfg.preset in ("tp", "fsdp_tp") and not has(model):
        axis = tp_axes.get(info.path)
        if axis is not None and out[axis] is None:
            if shape[axis] % sizes[model] == 0:
                out[axis] = model
            else:
                why.append(
                    f"its tensor-parallel dim {axis} (size {shape[axis]}) is not divisible by "
                    f"mesh axis {model!r} (size {sizes[model]})"
                )
    place = []
    if cfg.preset in ("fsdp", "fsdp_tp") and not has(fsdp):
        place.append(fsdp)
    if cfg.preset == "fsdp_tp" and not has(model):
        place.append(model)
    if place:
        out = _place(out, shape, place, sizes)
        for a in place:
            if not has(a):
                why.append(
                    f"mesh axis {a!r} (size {sizes[a]}) divides no free dimension and cannot "
                    "share a split one"
                )
    spec = P(*out)
    if why:
        problems.append(f"{info.path} {shape}: {'; '.join(why)} -> {spec}")
    return spec


def _place(out: list[Any], shape: tuple[int, ...], axes: list[str], sizes: dict) -> list[Any]:
    """Put ``axes`` on the largest free dimensions they divide; an axis that finds none joins a
    dimension already split (``("model", "data")``) if the product divides it. Both orders are
    tried; the one dividing the parameter by more devices wins (ties: fewer shared dimensions,
    then ``axes`` order)."""
    best, best_key = list(out), (0, 0)
    for order in (axes, axes[::-1]) if len(axes) > 1 else (axes,):
        o = list(out)
        for a in order:
            free = [d for d in range(len(shape)) if o[d] is None and shape[d] % sizes[a] == 0]
            if free:
                o[max(free, key=lambda d: shape[d])] = a
        for a in order:
            if any(a in _entry_axes(e) for e in o):
                continue
            for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
                held = _entry_axes(o[d])
                n = int(np.prod([sizes[h] for h in held])) * sizes[a]
                if held and shape[d] % n == 0:
                    o[d] = (*held, a)
                    break
        n = int(np.prod([sizes[a] for a in axes if any(a in _entry_axes(e) for e in o)]))
        key = (n, -sum(isinstance(e, tuple) for e in o))
        if key > best_key:
            best, best_key = o, key
    return best


def _tp_axes(program: Program, reasons: list[str] | None = None) -> dict[str, int]:
    """Megatron column/row axes: producers of hidden units by columns, consumers by rows.

    Why a candidate producer was given up goes to ``reasons``."""
    reasons = [] if reasons is None else reasons
    from maas_jax.passes.prune.structured import StructuredPruningError, _follow, _producer_axis

    candidates = {}
    for info in param_infos(program):
        if info.is_weight:
            axis = _producer_axis(info)
            if axis is not None:
                candidates[info.path] = axis
    while candidates:
        try:
            slices = _follow(program, candidates)
            break
        except StructuredPruningError as e:
            reasons.append(str(e).split("\n")[0])
            if getattr(e, "producer", None) is None:
                return {}
            candidates.pop(e.producer)
    else:
        return {}
    out = {}
    for path, entries in slices.items():
        # a kernel that is both (a column-parallel producer and a row-parallel consumer) keeps
        # its producer axis; the other one then all-reduces
        producer_axes = [a for a, g in entries if g == path]
        out[path] = producer_axes[0] if producer_axes else entries[0][0]
    return out


__all__ = [
    "DEFAULT_LOGICAL_RULES",
    "PRESETS",
    "Shard",
    "ShardingError",
    "ShardingPlan",
    "ShardingWarning",
    "UnusedShardingRuleWarning",
    "format_bytes",
    "format_report",
    "in_shardings",
    "make_plan",
    "make_train_step",
    "state_shardings",
    "plan_report",
    "place",
    "resolve_spec",
    "shard",
    "sharded_init",
    "sharded_jit",
]
