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
* ``"fsdp_tp"`` — both; parameters without a tensor-parallel axis are split over ``model``
  too, so every parameter's bytes are divided by the whole mesh.

Where jax would silently replicate (an axis that does not divide the dimension) the plan says
so loudly: explicit specs raise, fallbacks are reported. The pass stores the plan in
``program.meta["sharding"]``; :func:`sharded_jit` compiles with those in/out shardings, and
activation rules insert ``with_sharding_constraint`` at matching equations (inside scan bodies
too).
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

from maas_jax import MaasError, ParamRef, PassRecord, Program, Rewrite, rewrite
from maas_jax._compat import bind_eqn
from maas_jax._select import param_infos

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


class ShardingError(MaasError, ValueError):
    """A sharding rule or plan is invalid (unknown axis, axis used twice, indivisible dim)."""


class ShardingWarning(UserWarning):
    """A dimension stays replicated because no candidate mesh axis divides it."""


@dataclasses.dataclass(frozen=True, eq=False)
class ShardingPlan:
    mesh: Any
    param_specs: dict[str, P]
    input_specs: dict[str, P]
    notes: tuple[str, ...]

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def replicated_fraction(self, program: Program) -> float:
        total = rep = 0
        for r in program.params:
            n = int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize
            total += n
            if all(a is None for a in self.param_specs.get(r.path, P())):
                rep += n
        return rep / max(total, 1)

    def bytes_per_device(self, program: Program) -> int:
        sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
        out = 0
        for r in program.params:
            n = int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize
            for entry in self.param_specs.get(r.path, P()):
                for axis in (entry,) if isinstance(entry, str) else (entry or ()):
                    n //= sizes[axis]
            out += n
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Shard:
    """The pass :func:`shard` returns."""

    mesh: Any
    preset: str | None = None
    rules: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    logical_rules: tuple[tuple[str, str | None], ...] = DEFAULT_LOGICAL_RULES
    activations: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    batch_axis: str | None = "data"
    name = "shard"

    def __repr__(self) -> str:
        shape = dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
        return f"shard(mesh={shape}, preset={self.preset!r}, rules={len(self.rules)})"

    def __call__(self, program: Program) -> Program:
        plan = make_plan(program, self)
        wsc_sites = [(re.compile(rx), spec) for rx, spec in self.activations]
        mesh = self.mesh

        def constrain(site: Any, invals: list[Any]) -> list[Any] | None:
            for rx, spec in wsc_sites:
                if rx.search(site.name_stack):
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
        meta = dict(program.meta)
        meta["sharding"] = plan
        record = PassRecord(self.name, repr(self), tuple(entry), plan.notes)
        return program.with_record(record, jaxpr=new, meta=meta)


def shard(
    mesh: Any,
    *,
    preset: str | None = None,
    rules: Sequence[tuple[str, Sequence[Any]]] = (),
    logical_rules: Sequence[tuple[str, str | None]] = DEFAULT_LOGICAL_RULES,
    activations: Sequence[tuple[str, Sequence[Any]]] = (),
    batch_axis: str | None = "data",
) -> Shard:
    """A sharding plan for ``mesh``; see the module docstring for the rule semantics.

    Args:
      mesh: a ``jax.sharding.Mesh`` (build it with Auto axis types, e.g. ``MeshSpec.build``).
      preset: ``"dp"``, ``"fsdp"``, ``"tp"`` or ``"fsdp_tp"`` for parameters no rule names.
      rules: ``(path regex, (logical or mesh axis per dim, ...))``, first match wins.
      logical_rules: ``(logical axis, mesh axis or None)`` priority list (Flax semantics).
      activations: ``(name-stack regex, spec)``: constrain the output of matching dots/convs.
      batch_axis: mesh axis that splits the leading dimension of every input (None: replicate).

    >>> import jax, jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 8))}, jnp.ones((2, 4)))
    >>> out = passes.shard(mesh, rules=[("w", (None, "model"))], batch_axis=None)(prog)
    >>> out.meta["sharding"].param_specs["w"]
    PartitionSpec(None, 'model')
    """
    if preset is not None and preset not in PRESETS:
        raise ShardingError(f"shard: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    for _, mesh_axis in logical_rules:
        if (
            mesh_axis is not None
            and mesh_axis not in mesh.axis_names
            and mesh_axis
            not in (
                "fsdp",
                "model",
                "data",
            )
        ):
            raise ShardingError(
                f"shard: logical rule maps to mesh axis {mesh_axis!r}, which the mesh "
                f"{tuple(mesh.axis_names)} does not have"
            )
    for rx, _ in (*rules, *activations):
        try:
            re.compile(rx)
        except re.error as e:
            raise ShardingError(f"shard: {rx!r} is not a valid regular expression ({e})") from None
    if batch_axis is not None and batch_axis not in mesh.axis_names:
        batch_axis = None
    return Shard(
        mesh,
        preset,
        tuple((rx, tuple(s)) for rx, s in rules),
        tuple(logical_rules),
        tuple((rx, tuple(s)) for rx, s in activations),
        batch_axis,
    )


# ---- planning ---------------------------------------------------------------------------


def _axis_sizes(mesh: Any) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))


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
    notes: list[str] = []
    compiled = [(re.compile(rx), spec) for rx, spec in cfg.rules]
    used_rules: set[int] = set()
    tp_axes = _tp_axes(program) if cfg.preset in ("tp", "fsdp_tp") and "model" in sizes else {}
    specs: dict[str, P] = {}
    for info in param_infos(program):
        role = info.role
        spec = None
        for k, (rx, s) in enumerate(compiled):
            if rx.search(info.path):
                used_rules.add(k)
                spec = resolve_spec(s, role.shape, cfg, f"parameter {info.path!r}")
                break
        if spec is None and role.logical_axes is not None and cfg.preset in (None, "tp", "fsdp_tp"):
            # Declared logical axes: all of them without a preset; the tensor-parallel ones
            # (mapped to "model") under the tp presets.
            names = tuple(
                a if a in {lg for lg, _ in cfg.logical_rules} else None for a in role.logical_axes
            )
            spec = resolve_spec(names, role.shape, cfg, f"parameter {info.path!r}")
            if cfg.preset is not None:
                spec = P(*(a if a == "model" else None for a in spec))
        if spec is None or (cfg.preset in ("fsdp", "tp", "fsdp_tp") and "model" not in tuple(spec)):
            spec = _preset_spec(info, role, cfg, sizes, tp_axes, spec)
        specs[info.path] = spec
        if all(a is None for a in spec) and role.shape and cfg.preset not in (None, "dp"):
            notes.append(f"{info.path} {tuple(role.shape)} stays replicated")
    for k, (rx, _) in enumerate(cfg.rules):
        if k not in used_rules:
            warnings.warn(f"shard: rule {rx!r} matched no parameter", ShardingWarning, stacklevel=3)
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


def _preset_spec(info: Any, role: Any, cfg: Shard, sizes: dict, tp_axes: dict, base: Any) -> P:
    ndim = len(role.shape)
    if cfg.preset == "dp" or base is None:
        out: list[Any] = [None] * ndim
    else:
        out = list(base) + [None] * (ndim - len(base))
    if cfg.preset in ("tp", "fsdp_tp"):
        axis = tp_axes.get(info.path)
        if axis is not None and role.shape[axis] % sizes["model"] == 0:
            out[axis] = "model"
    if cfg.preset in ("fsdp", "fsdp_tp"):
        fsdp = "fsdp" if "fsdp" in sizes else "data" if "data" in sizes else None
        if fsdp is not None and fsdp not in out:
            dims = sorted(
                (d for d in range(ndim) if out[d] is None and role.shape[d] % sizes[fsdp] == 0),
                key=lambda d: -role.shape[d],
            )
            if dims and role.shape[dims[0]] >= sizes[fsdp]:
                out[dims[0]] = fsdp
        if cfg.preset == "fsdp_tp" and "model" in sizes and "model" not in out:
            # No tensor-parallel axis was found for it (attention projections, scan-stacked
            # layers): shard it over "model" too, so every device holds 1/N of its bytes.
            dims = sorted(
                (d for d in range(ndim) if out[d] is None and role.shape[d] % sizes["model"] == 0),
                key=lambda d: -role.shape[d],
            )
            if dims and role.shape[dims[0]] >= sizes["model"]:
                out[dims[0]] = "model"
    return P(*out)


def _tp_axes(program: Program) -> dict[str, int]:
    """Megatron column/row axes: producers of hidden units by columns, consumers by rows."""
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


# ---- compiling with the plan --------------------------------------------------------------


def _plan_of(program: Program) -> ShardingPlan:
    plan = program.meta.get("sharding")
    if plan is None:
        raise ShardingError(
            f"{program.name!r} has no sharding plan: run maas_jax.passes.shard(mesh, ...) first"
        )
    return plan


def in_shardings(program: Program) -> tuple[Any, ...]:
    """Per-argument shardings ``(params_tree, *inputs)`` for ``jax.jit``."""
    plan = _plan_of(program)
    leaves = [
        plan.sharding(plan.param_specs.get(r.path, P()))
        if isinstance(r, ParamRef)
        else plan.sharding(plan.input_specs.get(r.path, P()))
        for r in program.roles
    ]
    params, inputs = jax.tree.unflatten(program.in_tree, leaves)
    return (params, *inputs)


def sharded_jit(program: Program, *, donate_params: bool = False) -> Any:
    """``jax.jit(program)`` with the plan's in/out shardings (and optional donation)."""
    shardings = in_shardings(program)
    return jax.jit(
        program,
        in_shardings=shardings,
        donate_argnums=(0,) if donate_params else (),
    )


def plan_report(program: Program, params: Any, *inputs: Any) -> dict[str, Any]:
    """The plan, compiled: per-device parameter bytes (static and from XLA), FLOPs, collectives.

    ``params``/``inputs`` may be ``jax.ShapeDtypeStruct``s: nothing is run, only compiled.
    Returns a JSON-able dict; ``format_report`` renders it as text.
    """
    import json

    from maas_jax._analysis import compiled_report

    plan = _plan_of(program)
    shardings = in_shardings(program)
    args = (params, *inputs)
    structs = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), args, shardings
    )
    compiled = jax.jit(program, in_shardings=shardings).trace(*structs).lower().compile()
    report = compiled_report(compiled)
    total = sum(int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize for r in program.params)
    report.update(
        {
            "mesh": dict(zip(plan.mesh.axis_names, map(int, plan.mesh.devices.shape), strict=True)),
            "param_bytes_total": total,
            "param_bytes_per_device": plan.bytes_per_device(program),
            "replicated_param_fraction": plan.replicated_fraction(program),
            "param_specs": {k: str(v) for k, v in plan.param_specs.items()},
            "notes": list(plan.notes),
        }
    )
    json.dumps(report)  # must stay JSON-able
    return report


def format_report(report: dict[str, Any], *, max_collectives: int = 12) -> str:
    """``plan_report`` as text."""
    lines = [
        f"mesh {report['mesh']}",
        f"parameters: {report['param_bytes_total'] / 2**20:.1f} MiB total, "
        f"{report['param_bytes_per_device'] / 2**20:.1f} MiB per device, "
        f"{100 * report['replicated_param_fraction']:.1f}% of bytes replicated",
        f"compiled, per device: arguments {report['argument_bytes'] / 2**20:.1f} MiB, temporaries "
        f"{report['temp_bytes'] / 2**20:.1f} MiB, {report['flops'] / 1e9:.2f} GFLOP",
        f"{len(report['collectives'])} collectives, {report['collective_bytes'] / 2**20:.2f} MiB:",
    ]
    for c in report["collectives"][:max_collectives]:
        lines.append(
            f"  {c['kind']:<18} {c['bytes'] / 1024:10.1f} KiB  groups {c['replica_groups'][:40]:<40}"
            f"  {c['op_name'][-60:]}"
        )
    if len(report["collectives"]) > max_collectives:
        lines.append(f"  ... {len(report['collectives']) - max_collectives} more")
    lines += [f"note: {n}" for n in report["notes"][:10]]
    return "\n".join(lines)


def state_shardings(program: Program, state: Any) -> Any:
    """Shardings for optimizer state that follow the parameters (optax ``mu``/``nu``, ...).

    A state leaf whose path ends with a parameter's path and has its shape gets that
    parameter's sharding (suffix matching, as MaxText's anchored rules do); scalars and
    anything else (step counts) are replicated.
    """
    plan = _plan_of(program)
    by_path = {r.path: (r.shape, plan.param_specs.get(r.path, P())) for r in program.params}
    from maas_jax._paths import flatten_leaves

    out = []
    for leaf in flatten_leaves(state):
        spec = P()
        for path, (shape, pspec) in by_path.items():
            if (leaf.path == path or leaf.path.endswith("/" + path)) and tuple(
                np.shape(leaf.value)
            ) == tuple(shape):
                spec = pspec
                break
        out.append(plan.sharding(spec))
    return jax.tree.unflatten(jax.tree.structure(state), out)


def make_train_step(program: Program, tx: Any, loss: Any, *, donate: bool = True) -> Any:
    """One compiled training step of ``program`` (after its passes) under its sharding plan.

    ``loss(outputs, *inputs) -> scalar``. The step is
    ``(params, opt_state, *inputs) -> (params, opt_state, loss)``, compiled as one program with
    parameters, optimizer state (following its parameters) and batches sharded as planned and
    the old parameters/state donated. Fake-quant (STE) and pruning passes in ``program`` train
    as they are: their transforms act on the weights at their entry, the optimizer updates the
    float weights.
    """
    import optax

    shardings = in_shardings(program)
    p_sh, in_sh = shardings[0], shardings[1:]
    abstract = jax.tree.map(
        lambda r: jax.ShapeDtypeStruct(r.shape, r.dtype),
        jax.tree.unflatten(
            jax.tree.structure(p_sh), [r for r in program.roles if isinstance(r, ParamRef)]
        ),
    )
    o_sh = state_shardings(program, jax.eval_shape(tx.init, abstract))

    def step(params: Any, opt_state: Any, *inputs: Any) -> Any:
        value, grads = jax.value_and_grad(lambda p: loss(program(p, *inputs), *inputs))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(
        step,
        in_shardings=(p_sh, o_sh, *in_sh),
        out_shardings=(p_sh, o_sh, None),
        donate_argnums=(0, 1) if donate else (),
    )


def sharded_init(program: Program, init_fn: Any, *args: Any) -> Any:
    """Run ``init_fn(*args)`` (e.g. ``lambda k: model.init(k, x)``) straight into the plan's
    shardings: the initialiser is compiled with those out-shardings, so each device creates only
    its own shards and the full parameters never exist on one device."""
    return jax.jit(init_fn, out_shardings=in_shardings(program)[0])(*args)


def place(program: Program, params: Any) -> Any:
    """Put ``params`` on the mesh with the plan's shardings (device_put per leaf)."""
    return jax.device_put(params, in_shardings(program)[0])


__all__ = [
    "DEFAULT_LOGICAL_RULES",
    "PRESETS",
    "Shard",
    "ShardingError",
    "ShardingPlan",
    "ShardingWarning",
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
