"""Run a Program under its sharding plan: jit with its shardings, place, initialise, train.

The ``shard`` pass (``maas_jax.passes.shard``) is the policy: it decides a
:class:`ShardingPlan` and stores it in ``program.meta["sharding"]``. What runs a program with
that plan, and what reports on it, is mechanism and lives in the core:

* :func:`sharded_jit`, :func:`in_shardings` — ``jax.jit`` with the plan's shardings;
* :func:`place`, :func:`sharded_init` — parameters onto the mesh (or created there);
* :func:`make_train_step`, :func:`state_shardings` — one compiled, sharded training step with
  optimizer state that follows its parameters;
* :func:`plan_report`, :func:`format_report`, :func:`format_bytes` — the plan, compiled:
  per-device bytes, FLOPs and collectives (an analysis of the compiled program).

Every name here is also importable from ``maas_jax.passes`` (and ``maas_jax.passes.shard``),
where it lived before.

>>> import jax, jax.numpy as jnp
>>> import maas_jax
>>> from maas_jax import passes, runtime
>>> mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
>>> params = {"w": jnp.ones((4, 8))}
>>> prog = maas_jax.trace(lambda p, x: x @ p["w"], params, jnp.ones((2, 4)))
>>> sharded = passes.shard(mesh, rules=[("w", (None, "model"))], batch_axis=None)(prog)
>>> runtime.sharded_jit(sharded)(runtime.place(sharded, params), jnp.ones((2, 4))).shape
(2, 8)
>>> runtime.plan_report(sharded, params, jnp.ones((2, 4)))["param_bytes_per_device"]
128
"""

from maas_jax._analysis import format_bytes, format_report, plan_report
from maas_jax._runtime import (
    ShardingError,
    ShardingPlan,
    in_shardings,
    make_train_step,
    named_fn,
    place,
    plan_of,
    sharded_init,
    sharded_jit,
    state_shardings,
)

__all__ = [
    "ShardingError",
    "ShardingPlan",
    "format_bytes",
    "format_report",
    "in_shardings",
    "make_train_step",
    "named_fn",
    "place",
    "plan_of",
    "plan_report",
    "sharded_init",
    "sharded_jit",
    "state_shardings",
]
