"""``dce``: dead code elimination, through regions.

Equations whose results reach no output and that have no effects are dropped, at the top level
and inside jit, scan, while, cond, remat and shard_map bodies, and so are region *inputs* that
nothing inside reads (scan ``xs``, closed-over constants, jit/remat/cond/shard_map operands).
Region outputs and loop carries are kept; custom_jvp/custom_vjp bodies are left as they are.
"""

from __future__ import annotations

import dataclasses

from jax.extend import core as jcore

from maas_jax import PassRecord, Program, Rewrite, rewrite
from maas_jax.extend import (
    is_marker,
    live_equations,
    region_kind,
    require_program,
    sub_jaxprs,
    used_operands,
)

_OPAQUE_KINDS = (None, "custom_jvp", "custom_vjp")


def count_dead(jaxpr: jcore.Jaxpr) -> int:
    """Dead equations in ``jaxpr`` and the regions dce can rewrite."""
    live = live_equations(jaxpr)
    n = live.count(False)
    for eqn, alive in zip(jaxpr.eqns, live, strict=True):
        if alive and region_kind(eqn) not in _OPAQUE_KINDS and not is_marker(eqn):
            n += used_operands(eqn).count(False)  # region inputs nothing inside reads
            n += sum(count_dead(j) for j in sub_jaxprs(eqn))
    return n


@dataclasses.dataclass(frozen=True)
class DCE:
    """The pass object :func:`dce` returns."""

    name = "dce"

    def __repr__(self) -> str:
        return "dce()"

    def __call__(self, program: Program) -> Program:
        require_program(program, repr(self))
        dead = count_dead(program.jaxpr.jaxpr)
        if not dead:
            return program
        new = rewrite(program, Rewrite(self.name, drop_dead=True))
        record = PassRecord(self.name, repr(self), (), (f"removed {dead} dead equations",))
        return program.with_record(record, jaxpr=new)


def dce() -> DCE:
    """Remove equations whose results are never used (and that have no side effects).

    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> def f(p, x):
    ...     unused = jnp.sin(x) * 2.0
    ...     return x + p["b"]
    >>> prog = maas_jax.trace(f, {"b": jnp.ones(3)}, jnp.ones(3))
    >>> len(prog.jaxpr.jaxpr.eqns), len(passes.dce()(prog).jaxpr.jaxpr.eqns)
    (3, 1)
    """
    return DCE()
