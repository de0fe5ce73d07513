"""Handlers that re-emit higher-order primitives around rewritten bodies.

One handler per kind, all here. Each receives the interpreter, the site and the operand values,
interprets the region's body under the same rewrite, and emits the construct again through the
public API (``lax.scan``, ``lax.while_loop``, ``lax.switch``, ``jax.checkpoint``,
``jax.shard_map``), so jax re-checks types and the result lowers like user code. ``jit`` is
special: when the rewritten body keeps the signature we substitute it into the original
equation, which keeps its shardings, donation and inline settings.

The interpreter passes itself to each handler (see :class:`RegionInterpreter`); this module
imports only the value-object helpers (``_values``), never the interpreter.

Name stacks inside sub-jaxprs are relative to the enclosing equation; the interpreter
concatenates them for reporting (``Site.name_stack``) while binding with the relative one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
from jax import lax

from maas_jax import _compat, _provenance
from maas_jax._errors import MaasError
from maas_jax._provenance import Site
from maas_jax._values import is_lifted, materialize, scan_prepare, scan_slice, shapes_changed


class RegionInterpreter(Protocol):
    """What a handler needs of the interpreter that calls it (``_interpreter.Interpreter``).

    The interpreter passes itself to the handler, so this module never imports it: the
    dependency runs one way (``_interpreter`` -> ``_regions`` -> ``_values``).
    """

    spec: Any  # the Rewrite: pass_name, rule, side_outputs, reshape, inline_custom

    def eval(
        self,
        jaxpr: Any,
        consts: Sequence[Any],
        args: Sequence[Any],
        in_tags: Sequence[Any] | None = None,
        *,
        name_stack: str = "",
        regions: tuple[str, ...] = (),
    ) -> list[Any]: ...

    def operand_mask(self, eqn: Any) -> list[bool]: ...

    def region_keys(self, eqn: Any) -> tuple[Any, ...]: ...

    def collect(self, keys: tuple[Any, ...], fn: Callable[[], Any]) -> tuple[Any, tuple]: ...

    def emit_all(self, keys: tuple[Any, ...], values: Any) -> None: ...

    def warn_opaque(self, site: Site) -> None: ...


def _body_fn(
    interp: RegionInterpreter, region: _provenance.Region, site: Site
) -> Callable[..., list[Any]]:
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


def _jit(interp: RegionInterpreter, site: Site, invals: list[Any]) -> list[Any]:
    eqn = site.eqn
    (region,) = _provenance.regions(eqn, site.in_tags)
    body = _body_fn(interp, region, site)
    old = region.jaxpr
    mask = interp.operand_mask(eqn)
    keys = interp.region_keys(eqn)
    name = _compat.jit_name(eqn) or "jit"
    if keys:  # statistics leave the jit as extra outputs
        fn, used = _used_only(mask, body, invals)
        side = _named(lambda *a: interp.collect(keys, lambda: fn(*a)), name)
        outs, stats = jax.jit(side)(*used)
        interp.emit_all(keys, stats)
        return list(outs)
    reshaped = interp.spec.reshape and shapes_changed(eqn, invals)
    if any(is_lifted(v) for v in invals) or not all(mask) or reshaped:
        fn, used = _used_only(mask, body, invals)
        return list(jax.jit(_named(fn, name))(*used))
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


def _call(interp: RegionInterpreter, site: Site, invals: list[Any]) -> list[Any]:
    (region,) = _provenance.regions(site.eqn, site.in_tags)
    return _body_fn(interp, region, site)(*invals)


def _scan(interp: RegionInterpreter, site: Site, invals: list[Any]) -> list[Any]:
    eqn = site.eqn
    n_consts, n_carry = _compat.scan_layout(eqn)
    (region,) = _provenance.regions(eqn, site.in_tags)
    body = _body_fn(interp, region, site)
    consts = invals[:n_consts]
    # Carries come back from the body as plain arrays: they must enter as plain arrays too.
    init = tuple(materialize(v) for v in invals[n_consts : n_consts + n_carry])
    xs_mask = interp.operand_mask(eqn)[n_consts + n_carry :]
    xs = tuple(
        scan_prepare(x) for x, m in zip(invals[n_consts + n_carry :], xs_mask, strict=True) if m
    )

    keys = interp.region_keys(eqn)
    sides = [interp.spec.side_outputs[k] for k in keys]

    def step(carry_ext: Any, x: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        carry, stats = carry_ext
        it = iter(x)
        # Unused slices are never read; a value object's slice gets the spec of one layer.
        full_x = [scan_slice(next(it)) if m else None for m in xs_mask]
        outs, new = interp.collect(keys, lambda: body(*consts, *carry, *full_x))
        # Statistics of every iteration merge into a carry (e.g. the max over layers).
        merged = tuple(sd.combine(a, b) for sd, a, b in zip(sides, stats, new, strict=True))
        return (tuple(outs[:n_carry]), merged), tuple(outs[n_carry:])

    init_stats = tuple(sd.neutral() for sd in sides)
    (carry, stats), ys = lax.scan(step, (init, init_stats), xs, **_compat.scan_options(eqn))
    interp.emit_all(keys, stats)
    return [*carry, *ys]


def _while(interp: RegionInterpreter, site: Site, invals: list[Any]) -> list[Any]:
    eqn = site.eqn
    _, n_cond, _, n_body = _compat.while_parts(eqn)
    cond_region, body_region = _provenance.regions(eqn, site.in_tags)
    cond = _body_fn(interp, cond_region, site)
    body = _body_fn(interp, body_region, site)
    cond_consts = invals[:n_cond]
    body_consts = invals[n_cond : n_cond + n_body]
    init = tuple(materialize(v) for v in invals[n_cond + n_body :])
    keys = interp.region_keys(eqn)
    sides = [interp.spec.side_outputs[k] for k in keys]

    def step(ce: Any) -> Any:
        c, stats = ce
        outs, new = interp.collect(keys, lambda: tuple(body(*body_consts, *c)))
        return outs, tuple(sd.combine(a, b) for sd, a, b in zip(sides, stats, new, strict=True))

    out, stats = lax.while_loop(
        lambda ce: cond(*cond_consts, *ce[0])[0],
        step,
        (init, tuple(sd.neutral() for sd in sides)),
    )
    interp.emit_all(keys, stats)
    return list(out)


def _cond(interp: RegionInterpreter, site: Site, invals: list[Any]) -> list[Any]:
    branches = [_body_fn(interp, r, site) for r in _provenance.regions(site.eqn, site.in_tags)]
    index, *ops = invals
    mask = interp.operand_mask(site.eqn)[1:]
    keys = interp.region_keys(site.eqn)

    def branch_fn(b: Callable[..., Any]) -> Callable[..., Any]:
        # Every branch returns every key (untaken sites give the merge identity).
        return lambda *a: interp.collect(keys, lambda: tuple(b(*a)))

    wrapped = [_used_only(mask, branch_fn(b), ops) for b in branches]
    used = wrapped[0][1]
    outs, stats = lax.switch(index, [w for w, _ in wrapped], *used)
    interp.emit_all(keys, stats)
    return list(outs)


def _remat(interp: RegionInterpreter, site: Site, invals: list[Any]) -> list[Any]:
    (region,) = _provenance.regions(site.eqn, site.in_tags)
    body = _body_fn(interp, region, site)
    keys = interp.region_keys(site.eqn)
    inner, used = _used_only(
        interp.operand_mask(site.eqn),
        lambda *a: interp.collect(keys, lambda: tuple(body(*a))),
        invals,
    )
    fn = jax.checkpoint(inner, **_compat.remat_options(site.eqn))
    outs, stats = fn(*used)
    interp.emit_all(keys, stats)
    return list(outs)


def _custom(interp: RegionInterpreter, site: Site, invals: list[Any]) -> list[Any]:
    """custom_jvp / custom_vjp: opaque unless the rewrite asks to inline them.

    Rewriting only the primal body is wrong: under ``jax.grad`` jax differentiates with the
    user's rule, which recomputes from the original body, silently undoing the rewrite.
    """
    if interp.spec.inline_custom or (interp.spec.reshape and shapes_changed(site.eqn, invals)):
        # (a body traced for other shapes cannot be re-bound: inline it, losing the custom
        # derivative — structured pruning produces inference programs)
        (region,) = _provenance.regions(site.eqn, site.in_tags)
        return _body_fn(interp, region, site)(*invals)
    if interp.spec.rule is not None:
        interp.warn_opaque(site)
    return _compat.bind_eqn(site.eqn, [materialize(v) for v in invals])


def _shard_map(interp: RegionInterpreter, site: Site, invals: list[Any]) -> list[Any]:
    (region,) = _provenance.regions(site.eqn, site.in_tags)
    body = _body_fn(interp, region, site)
    opts = _compat.shard_map_options(site.eqn)
    if interp.region_keys(site.eqn):
        raise MaasError(
            f"{interp.spec.pass_name}: statistics cannot yet be collected inside the shard_map "
            f"at {site.source}; use dynamic activation quantization for the layers inside it."
        )
    mask = interp.operand_mask(site.eqn)
    inner, _ = _used_only(mask, lambda *a: tuple(body(*a)), invals)
    in_specs = []
    vals = []
    for v, s, m in zip(invals, opts["in_specs"], mask, strict=True):
        if not m:
            continue
        # A value object (a quantized weight) enters with one partition spec per leaf, so the
        # body still sees it quantized (w8a8 inside shard_map stays w8a8).
        specs_of = getattr(v, "__maas_shard_specs__", None) if is_lifted(v) else None
        if specs_of is not None:
            in_specs.append(specs_of(s))
            vals.append(v)
        else:
            in_specs.append(s)
            vals.append(materialize(v))
    fn = jax.shard_map(
        inner,
        mesh=opts["mesh"],
        in_specs=tuple(in_specs),
        out_specs=opts["out_specs"],
        axis_names=opts["axis_names"],
        check_vma=opts["check_vma"],
    )
    return list(fn(*vals))


HANDLERS: dict[str, Callable[[RegionInterpreter, Site, list[Any]], list[Any]]] = {
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
