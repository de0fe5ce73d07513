"""Liveness through regions: which equations and which region operands are really used.

An operand of a higher-order equation is used only if the matching input of its body is used
(recursively), so dead-code elimination can drop a weight that only dead code inside a scan
body read — the case of a float weight once its integer copy is stored.
"""

from __future__ import annotations

from jax.extend import core as jcore

from maas_jax import _compat


def _is_var(v: object) -> bool:
    return not isinstance(v, jcore.Literal)


def readers(jaxpr: jcore.Jaxpr) -> dict[object, list[jcore.JaxprEqn]]:
    """For each variable of ``jaxpr``'s top level: the equations that read it, in order."""
    out: dict[object, list[jcore.JaxprEqn]] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if _is_var(v):
                out.setdefault(v, []).append(eqn)
    return out


def used_invars(jaxpr: jcore.Jaxpr) -> list[bool]:
    """For each input of ``jaxpr``: whether a live equation or an output needs it."""
    live, needed = _analyse(jaxpr)
    del live
    return [v in needed for v in jaxpr.invars]


def live_equations(jaxpr: jcore.Jaxpr) -> list[bool]:
    """Which equations contribute to the outputs or have effects (backward liveness)."""
    return _analyse(jaxpr)[0]


def _analyse(jaxpr: jcore.Jaxpr) -> tuple[list[bool], set[object]]:
    needed = {v for v in jaxpr.outvars if _is_var(v)}
    live = [False] * len(jaxpr.eqns)
    for k in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[k]
        if eqn.effects or any(v in needed for v in eqn.outvars):
            live[k] = True
            for v, used in zip(eqn.invars, used_operands(eqn), strict=True):
                if used and _is_var(v):
                    needed.add(v)
    return live, needed


def used_operands(eqn: jcore.JaxprEqn) -> list[bool]:
    """For each operand of ``eqn``: whether the equation really reads it."""
    n = len(eqn.invars)
    kind = _compat.hop_kind(eqn)
    if kind in ("jit", "call"):
        if _compat.jit_name(eqn).startswith("maas_"):
            return [True] * n  # our markers are kept whole
        return used_invars(_compat.jit_jaxpr(eqn).jaxpr)
    if kind == "remat":
        return used_invars(_compat.remat_body(eqn).jaxpr)
    if kind == "shard_map":
        return used_invars(_compat.shard_map_body(eqn).jaxpr)
    if kind == "scan":
        n_consts, n_carry = _compat.scan_layout(eqn)
        body = used_invars(_compat.scan_body(eqn).jaxpr)
        return body[:n_consts] + [True] * n_carry + body[n_consts + n_carry :]
    if kind == "while":
        cond, n_cond, body, n_body = _compat.while_parts(eqn)
        cond_used = used_invars(cond.jaxpr)[:n_cond]
        body_used = used_invars(body.jaxpr)[:n_body]
        return cond_used + body_used + [True] * (n - n_cond - n_body)
    if kind == "cond":
        branches = [used_invars(b.jaxpr) for b in _compat.cond_branches(eqn)]
        return [True] + [any(col) for col in zip(*branches, strict=True)]
    return [True] * n  # custom_jvp/custom_vjp stay opaque; unknown primitives too
