"""Handlers that re-emit higher-order primitives around rewritten bodies.

One handler per kind, all here. Each receives the interpreter, the site and the operand values,
interprets the region's body under the same rewrite, and emits the construct again through the
public API (``lax.scan``, ``lax.while_loop``, ``lax.switch``, ``jax.checkpoint``,
``jax.shard_map``), so jax re-checks types and the result lowers like user code. ``jit`` is
special: when the rewritten body keeps the signature we substitute it into the original
equation, which keeps its shardings, donation and inline settings.

Name stacks inside sub-jaxprs are relative to the enclosing equation; the interpreter
concatenates them for reporting (``Site.name_stack``) while binding with the relative one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from maas_jax import _compat, _provenance
from maas_jax._interpreter import is_lifted, materialize
from maas_jax._provenance import Site


def _body_fn(interp: Any, region: _provenance.Region, site: Site) -> Callable[..., list[Any]]:
    closed = region.jaxpr

    def body(*args: Any) -> list[Any]:
        outs = interp.eval(
            closed.jaxpr,
            closed.consts,
            args,
            region.in_tags,
            name_stack=site.name_stack,
            regions=(*site.regions, region.kind),
        )
        # Regions return plain arrays: a pass's value objects do not cross region outputs.
        return [materialize(o) for o in outs]

    return body


def _used_only(
    mask: list[bool], fn: Callable[..., Any], invals: list[Any]
) -> tuple[Callable[..., Any], list[Any]]:
    """``fn`` taking only the used operands (unused ones are never read: None stands in)."""
    used = [v for v, m in zip(invals, mask, strict=True) if m]

    def wrapped(*vals: Any) -> Any:
        it = iter(vals)
        return fn(*[next(it) if m else None for m in mask])

    return wrapped, used


def _jit(interp: Any, site: Site, invals: list[Any]) -> list[Any]:
    eqn = site.eqn
    (region,) = _provenance.regions(eqn, site.in_tags)
    body = _body_fn(interp, region, site)
    old = region.jaxpr
    mask = interp.operand_mask(eqn)
    if any(is_lifted(v) for v in invals) or not all(mask):
        fn, used = _used_only(mask, body, invals)
        return list(jax.jit(_named(fn, _compat.jit_name(eqn) or "jit"))(*used))
    new = jax.make_jaxpr(body)(*[_compat.aval_struct(v.aval) for v in old.jaxpr.invars])
    same_signature = not new.consts and [v.aval for v in new.jaxpr.outvars] == [
        v.aval for v in old.jaxpr.outvars
    ]
    if same_signature:
        return _compat.bind_with_params(eqn.primitive, _compat.jit_with_jaxpr(eqn, new), invals)
    # The body's signature changed: emit a fresh jit (default shardings) with the same name.
    named = _named(body, _compat.jit_name(eqn) or "jit")
    return list(jax.jit(named)(*invals))


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        return fn(*args)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


def _call(interp: Any, site: Site, invals: list[Any]) -> list[Any]:
    (region,) = _provenance.regions(site.eqn, site.in_tags)
    return _body_fn(interp, region, site)(*invals)


def _scan(interp: Any, site: Site, invals: list[Any]) -> list[Any]:
    eqn = site.eqn
    n_consts, n_carry = _compat.scan_layout(eqn)
    (region,) = _provenance.regions(eqn, site.in_tags)
    body = _body_fn(interp, region, site)
    consts = invals[:n_consts]
    init = tuple(invals[n_consts : n_consts + n_carry])
    xs_mask = interp.operand_mask(eqn)[n_consts + n_carry :]
    xs = tuple(x for x, m in zip(invals[n_consts + n_carry :], xs_mask, strict=True) if m)

    def step(carry: tuple[Any, ...], x: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        it = iter(x)
        full_x = [next(it) if m else None for m in xs_mask]  # unused slices are never read
        outs = body(*consts, *carry, *full_x)
        return tuple(outs[:n_carry]), tuple(outs[n_carry:])

    carry, ys = lax.scan(step, init, xs, **_compat.scan_options(eqn))
    return [*carry, *ys]


def _while(interp: Any, site: Site, invals: list[Any]) -> list[Any]:
    eqn = site.eqn
    _, n_cond, _, n_body = _compat.while_parts(eqn)
    cond_region, body_region = _provenance.regions(eqn, site.in_tags)
    cond = _body_fn(interp, cond_region, site)
    body = _body_fn(interp, body_region, site)
    cond_consts = invals[:n_cond]
    body_consts = invals[n_cond : n_cond + n_body]
    init = tuple(invals[n_cond + n_body :])
    out = lax.while_loop(
        lambda c: cond(*cond_consts, *c)[0],
        lambda c: tuple(body(*body_consts, *c)),
        init,
    )
    return list(out)


def _cond(interp: Any, site: Site, invals: list[Any]) -> list[Any]:
    branches = [_body_fn(interp, r, site) for r in _provenance.regions(site.eqn, site.in_tags)]
    index, *ops = invals
    mask = interp.operand_mask(site.eqn)[1:]
    wrapped = [_used_only(mask, lambda *a, b=b: tuple(b(*a)), ops) for b in branches]
    used = wrapped[0][1]
    return list(lax.switch(index, [w for w, _ in wrapped], *used))


def _remat(interp: Any, site: Site, invals: list[Any]) -> list[Any]:
    (region,) = _provenance.regions(site.eqn, site.in_tags)
    body = _body_fn(interp, region, site)
    inner, used = _used_only(interp.operand_mask(site.eqn), lambda *a: tuple(body(*a)), invals)
    fn = jax.checkpoint(inner, **_compat.remat_options(site.eqn))
    return list(fn(*used))


def _custom(interp: Any, site: Site, invals: list[Any]) -> list[Any]:
    """custom_jvp / custom_vjp: opaque unless the rewrite asks to inline them.

    Rewriting only the primal body is wrong: under ``jax.grad`` jax differentiates with the
    user's rule, which recomputes from the original body, silently undoing the rewrite.
    """
    if interp.spec.inline_custom:
        (region,) = _provenance.regions(site.eqn, site.in_tags)
        return _body_fn(interp, region, site)(*invals)
    if interp.spec.rule is not None:
        interp.warn_opaque(site)
    return _compat.bind_eqn(site.eqn, [materialize(v) for v in invals])


def _shard_map(interp: Any, site: Site, invals: list[Any]) -> list[Any]:
    (region,) = _provenance.regions(site.eqn, site.in_tags)
    body = _body_fn(interp, region, site)
    opts = _compat.shard_map_options(site.eqn)
    mask = interp.operand_mask(site.eqn)
    inner, used = _used_only(mask, lambda *a: tuple(body(*a)), invals)
    in_specs = tuple(s for s, m in zip(opts["in_specs"], mask, strict=True) if m)
    fn = jax.shard_map(
        inner,
        mesh=opts["mesh"],
        in_specs=in_specs,
        out_specs=opts["out_specs"],
        axis_names=opts["axis_names"],
        check_vma=opts["check_vma"],
    )
    # Value objects (quantized arrays) would need a spec per leaf: pass plain arrays in.
    return list(fn(*[materialize(v) for v in used]))


HANDLERS: dict[str, Callable[[Any, Site, list[Any]], list[Any]]] = {
    "jit": _jit,
    "call": _call,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "remat": _remat,
    "custom_jvp": _custom,
    "custom_vjp": _custom,
    "shard_map": _shard_map,
}
