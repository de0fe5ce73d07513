"""Running a Program under its sharding plan (the mechanism behind ``maas_jax.runtime``).

The ``shard`` pass (``maas_jax.passes.shard``, a policy) decides a :class:`ShardingPlan` and
stores it in ``program.meta["sharding"]``; these helpers read that plan and run the program
with it. They need only the plan's data (a mesh and a ``PartitionSpec`` per parameter and input
path), so the plan type lives here, next to its consumers (this module, the plan report in
``_analysis`` and ``export``), and the core never imports the pass library.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maas_jax._errors import MaasError
from maas_jax._paths import flatten_leaves
from maas_jax._program import ParamRef, Program


class ShardingError(MaasError, ValueError):
    """A sharding rule or plan is invalid (unknown axis, axis used twice, indivisible dim), or
    a program that needs a plan has none."""


@dataclasses.dataclass(frozen=True, eq=False)
class ShardingPlan:
    """Where every parameter and input of a Program lives on ``mesh``.

    ``param_specs`` / ``input_specs`` map paths to ``PartitionSpec``s (a missing path is
    replicated); ``notes`` say what the planner could not split as asked. Built by the
    ``shard`` pass and stored in ``program.meta["sharding"]``.
    """

    mesh: Any
    param_specs: dict[str, P]
    input_specs: dict[str, P]
    notes: tuple[str, ...]

    def sharding(self, spec: P) -> NamedSharding:
        """``spec`` on this plan's mesh."""
        return NamedSharding(self.mesh, spec)

    def replicated_fraction(self, program: Program) -> float:
        """The fraction of ``program``'s parameter bytes that every device holds whole."""
        total = rep = 0
        for r in program.params:
            n = int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize
            total += n
            if all(a is None for a in self.param_specs.get(r.path, P())):
                rep += n
        return rep / max(total, 1)

    def bytes_per_device(self, program: Program) -> int:
        """Parameter bytes one device holds under this plan (static count, no compilation)."""
        sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
        out = 0
        for r in program.params:
            n = int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize
            for entry in self.param_specs.get(r.path, P()):
                for axis in (entry,) if isinstance(entry, str) else (entry or ()):
                    n //= sizes[axis]
            out += n
        return out


def plan_of(program: Program) -> ShardingPlan:
    """The sharding plan the ``shard`` pass stored in ``program``; raises if there is none."""
    plan = program.meta.get("sharding")
    if plan is None:
        raise ShardingError(
            f"{program.name!r} has no sharding plan: run maas_jax.passes.shard(mesh, ...) first"
        )
    return plan


def in_shardings(program: Program) -> tuple[Any, ...]:
    """Per-argument shardings ``(params_tree, *inputs)`` for ``jax.jit``."""
    plan = plan_of(program)
    leaves = [
        plan.sharding(plan.param_specs.get(r.path, P()))
        if isinstance(r, ParamRef)
        else plan.sharding(plan.input_specs.get(r.path, P()))
        for r in program.roles
    ]
    params, inputs = jax.tree.unflatten(program.in_tree, leaves)
    return (params, *inputs)


def named_fn(program: Program) -> Any:
    """``program`` as a function named after it, so that XLA op names read ``jit(<name>)/...``
    (a Program object has no ``__name__``: jax would write ``jit(<unnamed function>)``)."""

    def call(params: Any, *inputs: Any) -> Any:
        return program(params, *inputs)

    name = re.sub(r"[^\w.<>-]", "_", program.name) or "program"
    call.__name__ = call.__qualname__ = name
    return call


def sharded_jit(program: Program, *, donate_params: bool = False) -> Any:
    """``jax.jit(program)`` with the plan's in/out shardings (and optional donation); op names
    in the compiled program read ``jit(<program.name>)/...``."""
    shardings = in_shardings(program)
    return jax.jit(
        named_fn(program),
        in_shardings=shardings,
        donate_argnums=(0,) if donate_params else (),
    )


def state_shardings(program: Program, state: Any) -> Any:
    """Shardings for optimizer state that follow the parameters (optax ``mu``/``nu``, ...).

    A state leaf whose path ends with a parameter's path and has its shape gets that
    parameter's sharding (suffix matching, as MaxText's anchored rules do); scalars and
    anything else (step counts) are replicated.
    """
    plan = plan_of(program)
    by_path = {r.path: (r.shape, plan.param_specs.get(r.path, P())) for r in program.params}
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
    import optax  # only training needs it

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

    step.__name__ = step.__qualname__ = f"{named_fn(program).__name__}_train_step"
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
