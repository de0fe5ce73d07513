"""The rewrite engine: interpret a Program's jaxpr, apply rules, re-trace the result.

We never edit equations in place. :func:`rewrite` builds a Python function that walks the
jaxpr and re-binds every equation on the current trace (inside the equation's own source
context, so names and source lines survive into HLO), letting a pass

* transform chosen parameters once, at their entry into the program (``entry=``), wrapped in a
  named marker region (``jit`` named ``maas_<pass>``) so later passes still see the parameter;
* replace individual equations (``rule=``), anywhere: the engine re-emits jit, scan, while,
  cond, remat and shard_map regions around rewritten bodies (see ``_regions.py``: the
  handlers receive this interpreter as an argument and never import this module);
* drop dead equations (``drop_dead=True``).

``jax.make_jaxpr`` of that function is the new Program's jaxpr. When nothing inside a region
needs rewriting the region is re-bound untouched, so the identity rewrite is bit-exact.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

from maas_jax import _compat, _provenance
from maas_jax._errors import (
    MaasError,
    OpaqueRegionWarning,
    RewriteError,
    UnsupportedPrimitiveError,
)
from maas_jax._liveness import live_equations, readers, used_operands
from maas_jax._program import ParamRef, Program
from maas_jax._provenance import Site, Tag
from maas_jax._regions import HANDLERS

# The value-object helpers live in ``_values`` (shared with the region handlers); they stay
# importable from here.
from maas_jax._values import (  # noqa: F401
    is_lifted,
    lifted_view,
    materialize,
    scan_prepare,
    scan_slice,
    shapes_changed,
)

# A rule receives the site (equation, operand tags, name stack, regions) and the operand values;
# it returns the output values, or None to leave the equation as it is.
Rule = Callable[[Site, list[Any]], "list[Any] | None"]


@dataclasses.dataclass(frozen=True)
class SideOutput:
    """A statistic a rule emits: its shape/dtype, how values merge, and the merge identity."""

    shape: tuple[int, ...]
    dtype: Any
    merge: str  # "max" | "min" | "sum"
    identity: float

    def combine(self, a: Any, b: Any) -> Any:
        import jax.numpy as jnp

        return {"max": jnp.maximum, "min": jnp.minimum, "sum": jnp.add}[self.merge](a, b)

    def neutral(self) -> Any:
        import jax.numpy as jnp

        return jnp.full(self.shape, self.identity, self.dtype)


_ACTIVE: list[Interpreter] = []


def emit(key: Any, value: Any) -> None:
    """Called by a rule: add ``value`` to side output ``key`` of the running rewrite."""
    if not _ACTIVE:
        raise RuntimeError("maas_jax.emit called outside a rewrite with side outputs")
    _ACTIVE[-1].emit(key, value)


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """What one rewrite does. Built by passes; see :func:`rewrite`."""

    pass_name: str
    entry: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
    entry_marked: bool = True  # wrap entry transforms in the pass's marker region
    rule: Rule | None = None
    rule_primitives: frozenset[str] = frozenset()  # primitives the rule is called on
    # Which equations make the engine enter a region to reach them (default: those in
    # rule_primitives). Narrow it when the rule only cares about a few of those equations.
    wants: Callable[[jcore.JaxprEqn], bool] | None = None
    # Side outputs (observer statistics): the rule calls ``emit(key, value)``; values leave
    # every region (as extra outputs / loop carries) merged as ``side_outputs[key]`` says.
    side_outputs: Mapping[Any, SideOutput] = dataclasses.field(default_factory=dict)
    side_key: Callable[[jcore.JaxprEqn], Any] | None = None  # which equation emits which key
    # Operand shapes may differ from the recorded ones (structured pruning): regions whose
    # operands changed shape are re-traced, and broadcast/reshape shapes follow the operands.
    reshape: bool = False
    drop_dead: bool = False
    force_recurse: bool = False  # re-emit every region even if nothing inside changes (tests)
    inline_custom: bool = False  # inline custom_jvp/custom_vjp bodies so rules reach inside


def rewrite(program: Program, spec: Rewrite) -> jcore.ClosedJaxpr:
    """Re-trace ``program`` under ``spec``; returns the new closed jaxpr (same signature).

    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import Rewrite, rewrite
    >>> prog = maas_jax.trace(lambda p, x: x * p["w"], {"w": jnp.full(2, 5.0)}, jnp.ones(2))
    >>> new = rewrite(prog, Rewrite("halve", entry={"w": lambda w: w / 2}))
    >>> jax.extend.core.jaxpr_as_fun(new)(jnp.full(2, 5.0), jnp.ones(2))[0].tolist()
    [2.5, 2.5]
    """
    interp = Interpreter(spec)
    closed = program.jaxpr
    entry = _entry_applier(program, spec)

    def run(*flat: Any) -> list[Any]:
        vals, in_tags = entry(flat, interp)
        return [materialize(v) for v in interp.eval(closed.jaxpr, closed.consts, vals, in_tags)]

    structs = [_compat.aval_struct(v.aval) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(run)(*structs)


def _entry_points(program: Program, spec: Rewrite) -> dict[Any, tuple[ParamRef, Any]]:
    """Where each transformed parameter "enters": after the markers earlier passes put on it.

    A parameter that an earlier pass already transformed (``clip_weights``, a folded kernel)
    reaches its uses through that pass's marker region; a later pass must transform the marker's
    output, not the raw input, or the order of the passes would be inverted. Each variable on
    the marker chain that something other than a marker reads is an entry point.
    """
    jaxpr = program.jaxpr.jaxpr
    reading = readers(jaxpr)
    outputs = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    points: dict[Any, tuple[ParamRef, Any]] = {}
    for role, invar in zip(program.roles, jaxpr.invars, strict=True):
        if not isinstance(role, ParamRef) or spec.entry.get(role.path) is None:
            continue
        stack = [invar]
        while stack:
            v = stack.pop()
            eqns = reading.get(v, [])
            markers = [e for e in eqns if _provenance.is_marker(e) and e.invars[0] is v]
            if len(eqns) > len(markers) or v in outputs or not markers:
                points[v] = (role, spec.entry[role.path])
            stack.extend(e.outvars[0] for e in markers)
    return points


def _entry_applier(program: Program, spec: Rewrite) -> Callable[[Any], tuple[list, list]]:
    """Applies ``spec.entry`` to the flat inputs; returns values and tags.

    Entry points further down a marker chain are handed to the interpreter
    (``Interpreter.entry_at``), which applies them when it computes them.
    """
    tags = _provenance.initial_tags(program)
    marker = f"{_provenance.MARKER_PREFIX}{spec.pass_name}"
    # One jitted marker per distinct transform: parameters of equal shape (the layers of a
    # deep model) then hit jax's trace cache instead of re-tracing the transform each time.
    marked: dict[int, Callable[[Any], Any]] = {}
    points = _entry_points(program, spec)

    def transform_value(transform: Any, value: Any, tag: Tag | None) -> tuple[Any, Tag | None]:
        if not spec.entry_marked:
            return transform(value), tag  # the transform places its own markers
        if id(transform) not in marked:
            marked[id(transform)] = marked_fn(transform, marker)
        if tag is not None:
            tag = dataclasses.replace(tag, transforms=(*tag.transforms, marker))
        return marked[id(transform)](value), tag

    def apply(flat: Any, interp: Interpreter) -> tuple[list, list]:
        vals = list(flat)
        in_tags = list(tags)
        invars = program.jaxpr.jaxpr.invars
        for i, v in enumerate(invars):
            if v in points:
                vals[i], in_tags[i] = transform_value(points[v][1], vals[i], in_tags[i])
        interp.entry_at = {
            v: (lambda value, tag, t=t: transform_value(t, value, tag))
            for v, (_, t) in points.items()
            if v not in set(invars)
        }
        return vals, in_tags

    return apply


def rewrite_with_side_outputs(
    program: Program, spec: Rewrite
) -> tuple[jcore.ClosedJaxpr, tuple[Any, ...]]:
    """Like :func:`rewrite`, with the side outputs appended to the outputs (keys in order)."""
    keys = tuple(sorted(spec.side_outputs, key=repr))
    interp = Interpreter(spec)
    closed = program.jaxpr
    entry = _entry_applier(program, spec)

    def run(*flat: Any) -> list[Any]:
        _ACTIVE.append(interp)
        try:
            vals, in_tags = entry(flat, interp)
            outs, stats = interp.collect(
                keys,
                lambda: [
                    materialize(v) for v in interp.eval(closed.jaxpr, closed.consts, vals, in_tags)
                ],
            )
        finally:
            _ACTIVE.pop()
        return [*outs, *stats]

    structs = [_compat.aval_struct(v.aval) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(run)(*structs), keys


def marked_fn(transform: Callable[[Any], Any], marker: str) -> Callable[[Any], Any]:
    """``transform`` as a ``jit`` region named ``marker``.

    The name is how later analyses recognise the transformed value as the same parameter.
    """

    def marked(v: Any) -> Any:
        return transform(v)

    marked.__name__ = marked.__qualname__ = marker
    return jax.jit(marked)


def apply_marked(transform: Callable[[Any], Any], x: Any, marker: str) -> Any:
    """Apply ``transform`` to ``x`` inside a ``jit`` region named ``marker``."""
    return marked_fn(transform, marker)(x)


class Interpreter:
    """Evaluates jaxprs under a :class:`Rewrite`, equation by equation."""

    def __init__(self, spec: Rewrite):
        self.spec = spec
        self._touches_cache: dict[int, bool] = {}
        self._frames: list[dict[Any, Any]] = [{}]
        # Top-level variables at which an entry transform applies (end of a marker chain).
        self.entry_at: dict[Any, Callable[[Any, Any], tuple[Any, Any]]] = {}
        self._keys_cache: dict[int, tuple[Any, ...]] = {}

    # -- side outputs ---------------------------------------------------------------------
    def emit(self, key: Any, value: Any) -> None:
        frame = self._frames[-1]
        side = self.spec.side_outputs[key]
        frame[key] = side.combine(frame[key], value) if key in frame else value

    def collect(self, keys: tuple[Any, ...], fn: Callable[[], Any]) -> tuple[Any, tuple[Any, ...]]:
        """Run ``fn`` in a fresh frame; return its result and the frame's values for ``keys``."""
        self._frames.append({})
        try:
            out = fn()
        finally:
            frame = self._frames.pop()
        sides = self.spec.side_outputs
        return out, tuple(frame[k] if k in frame else sides[k].neutral() for k in keys)

    def emit_all(self, keys: tuple[Any, ...], values: Any) -> None:
        for k, v in zip(keys, values, strict=True):
            self.emit(k, v)

    def region_keys(self, eqn: jcore.JaxprEqn) -> tuple[Any, ...]:
        """Side-output keys emitted by equations inside ``eqn``'s regions (recursively)."""
        if self.spec.side_key is None:
            return ()
        key = id(eqn)
        if key not in self._keys_cache:
            found: list[Any] = []

            def visit(jaxpr: jcore.Jaxpr) -> None:
                for e in jaxpr.eqns:
                    k = self.spec.side_key(e)
                    if k is not None and k not in found:
                        found.append(k)
                    if _compat.hop_kind(e) not in (None, "custom_jvp", "custom_vjp"):
                        for sub in _compat.sub_jaxprs(e):
                            visit(sub)

            for sub in _compat.sub_jaxprs(eqn):
                visit(sub)
            self._keys_cache[key] = tuple(sorted(found, key=repr))
        return self._keys_cache[key]

    # -- the main loop --------------------------------------------------------------
    def eval(
        self,
        jaxpr: jcore.Jaxpr,
        consts: Sequence[Any],
        args: Sequence[Any],
        in_tags: Sequence[Tag | None] | None = None,
        *,
        name_stack: str = "",
        regions: tuple[str, ...] = (),
    ) -> list[Any]:
        env: dict[Any, Any] = {}
        tenv: dict[Any, Tag | None] = {}
        in_tags = list(in_tags) if in_tags is not None else [None] * len(jaxpr.invars)
        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x, t in zip(jaxpr.invars, args, in_tags, strict=True):
            env[v] = x
            tenv[v] = t
        consts_: set[Any] = set(jaxpr.constvars)

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        live = live_equations(jaxpr) if self.spec.drop_dead else None
        for k, eqn in enumerate(jaxpr.eqns):
            if live is not None and not live[k]:
                continue
            invals = [read(v) for v in eqn.invars]
            tags = tuple(None if isinstance(v, jcore.Literal) else tenv.get(v) for v in eqn.invars)
            ns = _provenance.join_name_stack(name_stack, eqn)
            flags = _provenance.constant_flags(eqn, consts_)
            _provenance.note_constants(eqn, flags, consts_)
            site = Site(eqn, tags, ns, regions, flags)
            bind_ns = _compat.current_name_stack() + _compat.eqn_name_stack(eqn)
            with _compat.eqn_context(eqn, bind_ns):
                try:
                    outvals = self._eval_eqn(site, invals)
                except MaasError:
                    raise
                except Exception as e:
                    raise RewriteError(
                        f"{self.spec.pass_name}: rewriting `{eqn.primitive.name}` failed at "
                        f"{site.source} (name stack {ns or '<root>'!r}): "
                        f"{type(e).__name__}: {e}"
                    ) from e
            out_tags = (
                _provenance.eqn_out_tags(eqn, tags, None, ns, regions, constant=flags)
                if self.spec.rule is not None
                else [None] * len(eqn.outvars)
            )
            for v, x, t in zip(eqn.outvars, outvals, out_tags, strict=True):
                if v in self.entry_at:
                    x, t = self.entry_at[v](x, t)
                env[v] = x
                tenv[v] = t
        return [read(v) for v in jaxpr.outvars]

    def _eval_eqn(self, site: Site, invals: list[Any]) -> list[Any]:
        eqn = site.eqn
        spec = self.spec
        if spec.rule is not None and eqn.primitive.name in spec.rule_primitives:
            out = spec.rule(site, invals)
            if out is not None:
                return list(out)
        if invals and is_lifted(invals[0]) and _provenance.is_view(eqn, site.constant):
            viewed = lifted_view(eqn, invals)
            if viewed is not None:
                return [viewed]
        kind = _compat.hop_kind(eqn)
        reshaped = spec.reshape and shapes_changed(eqn, invals)
        if (
            kind is not None
            and not _provenance.is_marker(eqn)
            and (reshaped or self._recurse_into(eqn))
        ):
            return HANDLERS[kind](self, site, invals)
        if reshaped and eqn.primitive.name in _SHAPE_PARAM_RULES:
            return _SHAPE_PARAM_RULES[eqn.primitive.name](eqn, invals)
        if kind is None and _compat.sub_jaxprs(eqn) and self._touches(eqn):
            tagged = [t.path for t in site.in_tags if t is not None]
            if tagged or spec.rule is not None:
                raise UnsupportedPrimitiveError(
                    f"{spec.pass_name}: `{eqn.primitive.name}` at {site.source} (name stack "
                    f"{site.name_stack or '<root>'!r}) has a body maas_jax cannot see into, and "
                    f"the pass would rewrite equations inside it"
                    + (f"; parameters flowing in: {', '.join(tagged)}" if tagged else "")
                    + ". Rewriting only around it would silently skip them. Exclude these "
                    "parameters or this region with `where=`, or rewrite the region yourself."
                )
        return _compat.bind_eqn(eqn, [materialize(v) for v in invals])

    # -- when to go inside a region ---------------------------------------------------
    def _recurse_into(self, eqn: jcore.JaxprEqn) -> bool:
        if self.spec.force_recurse:
            return True
        return self._touches(eqn) or bool(self.region_keys(eqn))

    def _touches(self, eqn: jcore.JaxprEqn) -> bool:
        """Whether the rule or dead-code removal has anything to do inside ``eqn``'s regions."""
        key = id(eqn)
        if key not in self._touches_cache:
            self._touches_cache[key] = (
                self.spec.drop_dead
                and _compat.hop_kind(eqn) is not None
                and not all(used_operands(eqn))
            ) or any(self._jaxpr_touched(j) for j in _compat.sub_jaxprs(eqn))
        return self._touches_cache[key]

    def _jaxpr_touched(self, jaxpr: jcore.Jaxpr) -> bool:
        if self.spec.drop_dead and (
            not all(live_equations(jaxpr))
            or any(not all(used_operands(e)) for e in jaxpr.eqns if _compat.hop_kind(e))
        ):
            return True
        wants = self.spec.wants or (lambda e: e.primitive.name in self.spec.rule_primitives)
        for eqn in jaxpr.eqns:
            if self.spec.rule is not None and wants(eqn):
                return True
            if not _provenance.is_marker(eqn) and self._touches(eqn):
                return True
        return False

    def operand_mask(self, eqn: jcore.JaxprEqn) -> list[bool]:
        """Which operands a re-emitted region must receive (all, unless dropping dead code)."""
        if not self.spec.drop_dead:
            return [True] * len(eqn.invars)
        return used_operands(eqn)

    def warn_opaque(self, site: Site) -> None:
        warnings.warn(
            f"{self.spec.pass_name}: `{site.primitive}` "
            f"{_compat.custom_call_name(site.eqn)!r} at {site.source} contains equations this "
            "pass would rewrite, but custom_jvp/custom_vjp regions are left opaque: rewriting "
            "only the primal would be undone by the custom derivative under jax.grad. Pass "
            "inline_custom=True to inline the region (its custom derivative is then replaced "
            "by ordinary autodiff).",
            OpaqueRegionWarning,
            stacklevel=2,
        )


def _changed_axes(old: tuple[int, ...], new: tuple[int, ...]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]


def _broadcast_rule(eqn: jcore.JaxprEqn, invals: list[Any]) -> list[Any]:
    """broadcast_in_dim after an operand axis shrank: the matching output axis shrinks too."""
    (x,) = invals[:1]
    shape = list(eqn.params["shape"])
    old = tuple(eqn.invars[0].aval.shape)
    for i in _changed_axes(old, tuple(x.shape)):
        shape[eqn.params["broadcast_dimensions"][i]] = x.shape[i]
    params = {**eqn.params, "shape": tuple(shape)}
    return _compat.bind_with_params(eqn.primitive, params, [materialize(v) for v in invals])


def _reshape_rule(eqn: jcore.JaxprEqn, invals: list[Any]) -> list[Any]:
    """reshape after an operand axis shrank: the output axis that *is* that axis shrinks."""
    import math

    x = invals[0]
    old_in = tuple(eqn.invars[0].aval.shape)
    new_sizes = list(eqn.params["new_sizes"])
    for i in _changed_axes(old_in, tuple(x.shape)):
        before = math.prod(old_in[:i])
        match = [
            j
            for j in range(len(new_sizes))
            if math.prod(new_sizes[:j]) == before and new_sizes[j] == old_in[i]
        ]
        if not match:
            raise RewriteError(
                f"reshape at {_compat.source_line(eqn)} merges or splits axis {i} "
                f"(size {old_in[i]} -> {x.shape[i]}): its new shape cannot be derived"
            )
        new_sizes[match[0]] = x.shape[i]
    params = {**eqn.params, "new_sizes": tuple(new_sizes)}
    return _compat.bind_with_params(eqn.primitive, params, [materialize(v) for v in invals])


def _conv_rule(eqn: jcore.JaxprEqn, invals: list[Any]) -> list[Any]:
    """A depthwise convolution whose channels shrank keeps one group per channel."""
    params = dict(eqn.params)
    dn = params["dimension_numbers"]
    old = eqn.invars[0].aval.shape[dn.lhs_spec[1]]
    new = invals[0].shape[dn.lhs_spec[1]]
    if params["feature_group_count"] == old and old > 1:
        params["feature_group_count"] = new
    return _compat.bind_with_params(eqn.primitive, params, [materialize(v) for v in invals])


_SHAPE_PARAM_RULES = {
    "broadcast_in_dim": _broadcast_rule,
    "reshape": _reshape_rule,
    "conv_general_dilated": _conv_rule,
}
