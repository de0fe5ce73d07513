"""Structured pruning: remove whole output channels and the inputs that read them.

Masks leave shapes as they are, and XLA runs a masked matmul at dense speed. Removing a
dense layer's hidden units (or a convolution's output channels) — and the matching bias
entries, BatchNorm statistics and input rows of the layer that consumes them — gives a smaller
program that is faster on every backend.

1. :func:`channel_plan` scores each producer kernel's output channels (L2 norm) on the real
   parameters, keeps the best ``1 - sparsity``, and follows the channels through the program to
   find every parameter axis that must shrink with them: a static analysis over the jaxpr that
   goes through elementwise ops (activations, bias adds, BatchNorm arithmetic, including
   parameter-only operands computed from several parameters), broadcasts, reshapes that keep
   the axis, transposes, reductions over other axes and jit/custom_jvp bodies, until a
   contraction sums over them. Anything else — a reduction over the channels (LayerNorm), a
   reshape that merges them, channels reaching the output or a residual add with an unpruned
   stream — is an error naming the parameter and the reason.
2. :func:`prune_channels` re-traces the program with the smaller parameters: the engine's
   ``reshape`` mode re-derives broadcast/reshape shapes and re-traces regions. The parameter
   tree keeps its structure; :meth:`ChannelPlan.shrink_params` slices the real parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from maas_jax.passes._weights import select_weights

from maas_jax import MaasError, ParamRef, PassRecord, Program, Rewrite
from maas_jax.extend import (
    CONTRACTION_PRIMITIVES,
    Interpreter,
    Site,
    flatten_leaves,
    initial_tags,
    join_name_stack,
    map_dims_to_param,
    output_tags,
    region_kind,
    regions,
    sub_jaxprs,
)

ELEMENTWISE = frozenset(
    {
        "add", "sub", "mul", "div", "max", "min", "neg", "tanh", "logistic", "exp", "log",
        "log1p", "expm1", "erf", "erfc", "integer_pow", "pow", "sqrt", "rsqrt", "abs", "sign",
        "select_n", "convert_element_type", "copy", "copy_p", "pvary", "square", "sin", "cos",
        "clamp", "reduce_precision", "stop_gradient", "ge", "gt", "le", "lt", "eq", "ne",
    }
)  # fmt: skip
_PASS_THROUGH_HOPS = ("jit", "call", "custom_jvp", "custom_vjp", "remat")


class StructuredPruningError(MaasError, ValueError):
    """Channels cannot be removed: names the parameter and what consumes its channels."""


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    producer: str  # kernel path
    axis: int  # its output-channel axis
    size: int
    keep: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelPlan:
    """Which channels survive, and every parameter axis that shrinks with them."""

    groups: tuple[ChannelGroup, ...]
    slices: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]  # path -> ((axis, group), ...)
    skipped: tuple[str, ...] = ()

    def shrink_params(self, params: Any) -> Any:
        """The parameter tree with the pruned channels removed (same tree structure)."""
        by_path = dict(self.slices)
        leaves = []
        for leaf in flatten_leaves(params):
            value = leaf.value
            for axis, g in by_path.get(leaf.path, ()):
                value = np.take(np.asarray(value), self.groups[g].keep, axis=axis)
            leaves.append(value)
        return jax.tree.unflatten(jax.tree.structure(params), leaves)

    def report(self) -> str:
        lines = [f"{g.producer}: {len(g.keep)}/{g.size} channels kept" for g in self.groups]
        lines += [f"{p}: shrinks along axes {[a for a, _ in s]}" for p, s in self.slices]
        lines += [f"skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def _producer_axis(info: Any) -> int | None:
    """The output-channel axis of a kernel consumed once by a dot (rhs) or a convolution."""
    contractions = [u for u in info.uses if u.primitive in CONTRACTION_PRIMITIVES]
    if len(contractions) != 1 or contractions[0].operand != 1 or contractions[0].sliced:
        return None
    use = contractions[0]
    dims = dict(use.dims)
    if use.primitive == "conv_general_dilated":
        return map_dims_to_param([dims["rhs_spec"][0]], use.views)[0]
    (_, rc), (_, rb) = dims["contracting"], dims["batch"]
    ndim = len(info.shape)
    free = [a for a in range(ndim) if a not in rc and a not in rb]
    if len(free) != 1:
        return None
    return map_dims_to_param([free[0]], use.views)[0]


def channel_plan(
    program: Program, params: Any, *, sparsity: float, where: Any = None
) -> ChannelPlan:
    """Choose the channels to keep and find every parameter axis that shrinks with them.

    Args:
      program: the traced model.
      params: its real parameters (channels are scored by the L2 norm of the kernel slices).
      sparsity: fraction of each producer's output channels to remove, in [0, 1).
      where: producer kernels (default: every kernel whose channels can be followed; the
        others are listed in ``plan.skipped``). Explicitly selected kernels that cannot be
        pruned raise :class:`StructuredPruningError`.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"channel_plan: sparsity must be in [0, 1), got {sparsity!r}")
    sel, todo = select_weights(
        program, where, pass_name="channel_plan", allow_opaque=False, config=""
    )
    values = {leaf.path: leaf.value for leaf in flatten_leaves(params)}
    candidates = {}
    skipped = []
    for path in todo:
        axis = _producer_axis(sel.infos[path])
        if axis is None:
            if where is not None:
                raise StructuredPruningError(
                    f"channel_plan: {path!r} is not the kernel of exactly one dense/conv layer "
                    "(used several times, scan-stacked or as a left operand): its output "
                    "channels are not one layer's units"
                )
            skipped.append(f"{path}: not one layer's kernel")
            continue
        candidates[path] = axis
    while True:
        try:
            slices = _follow(program, candidates)
            break
        except StructuredPruningError as e:
            if where is not None or e.producer is None:
                raise
            skipped.append(f"{e.producer}: {e}")
            candidates.pop(e.producer)
    groups = []
    for path, axis in candidates.items():
        w = np.asarray(values[path], np.float32)
        norms = np.sqrt(np.sum(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) ** 2, axis=1))
        size = w.shape[axis]
        k = max(1, size - int(round(sparsity * size)))
        keep = np.sort(np.argsort(-norms, kind="stable")[:k])
        groups.append(ChannelGroup(path, axis, size, tuple(int(i) for i in keep)))
    index = {g.producer: i for i, g in enumerate(groups)}
    out: dict[str, list[tuple[int, int]]] = {}
    for path, entries in slices.items():
        for axis, producer in entries:
            if (axis, index[producer]) not in out.setdefault(path, []):
                out[path].append((axis, index[producer]))
    return ChannelPlan(
        tuple(groups), tuple((p, tuple(s)) for p, s in sorted(out.items())), tuple(skipped)
    )


class _FlowError(StructuredPruningError):
    def __init__(self, producer: str | None, message: str):
        super().__init__(f"cannot remove channels of {producer!r}: {message}")
        self.producer = producer


def _follow(program: Program, producers: dict[str, int]) -> dict[str, list[tuple[int, str]]]:
    """Static channel flow: which parameter axes shrink with each producer's channels."""
    slices: dict[str, list[tuple[int, str]]] = {}

    def add_slice(path: str, axis: int, producer: str) -> None:
        if (axis, producer) not in slices.setdefault(path, []):
            slices[path].append((axis, producer))

    jaxpr = program.jaxpr.jaxpr
    out_state = _follow_jaxpr(jaxpr, initial_tags(program), {}, producers, add_slice, "")
    for _v, st in zip(jaxpr.outvars, out_state, strict=True):
        if st is not None:
            raise _FlowError(st[0], "its channels reach the program's output")
    return slices


def _follow_jaxpr(
    jaxpr: Any, in_tags: Any, in_state: dict, producers: dict, add_slice: Any, ns: str
) -> list:
    """Follow channel states through one jaxpr level (recursing into jit/remat bodies)."""
    tags: dict[Any, Any] = dict(zip(jaxpr.invars, in_tags, strict=True))
    state: dict[Any, tuple[str, int]] = {v: st for v, st in in_state.items() if st is not None}
    made_by: dict[Any, Site] = {}

    def tag_of(v: Any) -> Any:
        return None if isinstance(v, jcore.Literal) else tags.get(v)

    def backward(v: Any, axis: int, producer: str, site: Site) -> None:
        """Shrink every parameter a parameter-only operand is computed from."""
        if isinstance(v, jcore.Literal) or v.aval.shape[axis] == 1:
            return
        if v in state:
            raise _FlowError(
                producer, f"`{site.primitive}` at {site.source} mixes two channel groups"
            )
        t = tag_of(v)
        if t is not None and not t.sliced:
            (d,) = map_dims_to_param([axis], t.views)
            if d is None:
                raise _FlowError(producer, f"{t.path!r} is reshaped before `{site.primitive}`")
            add_slice(t.path, d, producer)
            return
        src = made_by.get(v)
        if src is None:
            raise _FlowError(
                producer, f"`{site.primitive}` at {site.source} mixes them with an input"
            )
        name, eqn = src.primitive, src.eqn
        if name in ELEMENTWISE:
            for u in eqn.invars:
                if not isinstance(u, jcore.Literal) and u.aval.ndim == v.aval.ndim:
                    backward(u, axis, producer, site)
            return
        if name == "broadcast_in_dim":
            bd = tuple(eqn.params["broadcast_dimensions"])
            if axis in bd:
                backward(eqn.invars[0], bd.index(axis), producer, site)
            return
        if name == "reshape":
            j = _reshape_axis(tuple(eqn.params["new_sizes"]), tuple(eqn.invars[0].aval.shape), axis)
            if j is None:
                raise _FlowError(producer, f"the reshape at {src.source} merges the channel axis")
            backward(eqn.invars[0], j, producer, site)
            return
        if name == "transpose":
            backward(eqn.invars[0], tuple(eqn.params["permutation"])[axis], producer, site)
            return
        raise _FlowError(
            producer,
            f"`{site.primitive}` at {site.source} combines them with a value computed by "
            f"`{name}` at {src.source}, which cannot be sliced",
        )

    for eqn in jaxpr.eqns:
        in_t = tuple(tag_of(v) for v in eqn.invars)
        site = Site(eqn, in_t, join_name_stack(ns, eqn), ())
        chan = [
            (i, state[v])
            for i, v in enumerate(eqn.invars)
            if not isinstance(v, jcore.Literal) and v in state
        ]
        kind = region_kind(eqn)
        if chan and kind in ("jit", "call", "remat") and not _body_is_elementwise(eqn):
            (region,) = regions(eqn, in_t)
            sub_state = {
                sv: state.get(v)
                for sv, v in zip(region.jaxpr.jaxpr.invars, eqn.invars, strict=True)
                if not isinstance(v, jcore.Literal)
            }
            outs = _follow_jaxpr(
                region.jaxpr.jaxpr, region.in_tags, sub_state, producers, add_slice, site.name_stack
            )
            for v, st in zip(eqn.outvars, outs, strict=True):
                if st is not None:
                    state[v] = st
        elif chan:
            _consume(site, chan, state, backward, add_slice)
        tag = in_t[1] if len(in_t) > 1 else None
        if (
            eqn.primitive.name in CONTRACTION_PRIMITIVES
            and tag is not None
            and tag.path in producers
        ):
            state[eqn.outvars[0]] = (tag.path, _output_channel_axis(eqn))
            add_slice(tag.path, producers[tag.path], tag.path)
        for v, t in zip(
            eqn.outvars, output_tags(eqn, in_t, None, site.name_stack, ()), strict=True
        ):
            tags[v] = t
            made_by[v] = site
    return [None if isinstance(v, jcore.Literal) else state.get(v) for v in jaxpr.outvars]


def _output_channel_axis(eqn: Any) -> int:
    if eqn.primitive.name == "conv_general_dilated":
        return eqn.params["dimension_numbers"].out_spec[1]
    return len(eqn.outvars[0].aval.shape) - 1  # rhs free axis comes last


def _reshape_axis(out_shape: tuple[int, ...], in_shape: tuple[int, ...], axis: int) -> int | None:
    before, size = math.prod(out_shape[:axis]), out_shape[axis]
    for i, n in enumerate(in_shape):
        if math.prod(in_shape[:i]) == before and n == size:
            return i
    return None


def _body_is_elementwise(eqn: Any) -> bool:
    for sub in sub_jaxprs(eqn):
        for e in sub.eqns:
            kind = region_kind(e)
            if kind in _PASS_THROUGH_HOPS:
                if not _body_is_elementwise(e):
                    return False
            elif e.primitive.name not in ELEMENTWISE and e.primitive.name != "broadcast_in_dim":
                return False
    return True


def _consume(site: Site, chan: list, state: dict, backward: Any, add_slice: Any) -> None:
    eqn, name = site.eqn, site.primitive
    groups = {c for _, c in chan}
    producer, axis = chan[0][1]
    if len(groups) > 1:
        raise _FlowError(producer, f"`{name}` at {site.source} mixes two channel groups")
    kind = region_kind(eqn)
    if name in ELEMENTWISE or (kind in _PASS_THROUGH_HOPS and _body_is_elementwise(eqn)):
        for _i, v in enumerate(eqn.invars):
            if isinstance(v, jcore.Literal) or v in state or v.aval.ndim == 0:
                continue
            if v.aval.ndim != len(eqn.invars[chan[0][0]].aval.shape):
                raise _FlowError(producer, f"`{name}` at {site.source} broadcasts them oddly")
            backward(v, axis, producer, site)
        for out in eqn.outvars:
            state[out] = (producer, axis)
        return
    if name == "broadcast_in_dim":
        state[eqn.outvars[0]] = (producer, tuple(eqn.params["broadcast_dimensions"])[axis])
        return
    if name == "reshape":
        new = tuple(eqn.params["new_sizes"])
        old = tuple(eqn.invars[0].aval.shape)
        before = math.prod(old[:axis])
        match = [j for j in range(len(new)) if math.prod(new[:j]) == before and new[j] == old[axis]]
        if not match:
            raise _FlowError(
                producer, f"the reshape at {site.source} merges or splits the channel axis"
            )
        state[eqn.outvars[0]] = (producer, match[0])
        return
    if name == "transpose":
        state[eqn.outvars[0]] = (producer, tuple(eqn.params["permutation"]).index(axis))
        return
    if name.startswith("reduce_") or name in ("argmax", "argmin"):
        axes = tuple(eqn.params.get("axes", ()))
        if axis in axes:
            raise _FlowError(
                producer,
                f"`{name}` at {site.source} reduces over the channels (a LayerNorm or a mean "
                "over features?): removing channels would change its result",
            )
        state[eqn.outvars[0]] = (producer, axis - sum(a < axis for a in axes))
        return
    if name == "dot_general":
        ((k, _),) = chan[:1]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        mine, other = (lc, rc) if k == 0 else (rc, lc)
        if axis not in mine:
            raise _FlowError(producer, f"`dot_general` at {site.source} does not sum over them")
        tag = site.in_tags[1 - k]
        if tag is None:
            raise _FlowError(
                producer, f"`dot_general` at {site.source} multiplies them with a non-parameter"
            )
        (d,) = map_dims_to_param([other[mine.index(axis)]], tag.views)
        if d is None:
            raise _FlowError(
                producer, f"the consumer kernel {tag.path!r} is reshaped: cannot slice"
            )
        add_slice(tag.path, d, producer)
        return
    if name == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        tag = site.in_tags[1]
        if chan[0][0] != 0 or axis != dn.lhs_spec[1] or tag is None:
            raise _FlowError(
                producer, f"the convolution at {site.source} does not read them as input features"
            )
        if eqn.params["feature_group_count"] > 1:  # depthwise: channels pass through
            (d,) = map_dims_to_param([dn.rhs_spec[0]], tag.views)
            add_slice(tag.path, d, producer)
            state[eqn.outvars[0]] = (producer, dn.out_spec[1])
            return
        (d,) = map_dims_to_param([dn.rhs_spec[1]], tag.views)
        add_slice(tag.path, d, producer)
        return
    raise _FlowError(
        producer,
        f"they flow into `{name}` at {site.source}, which structured pruning cannot follow",
    )


@dataclasses.dataclass(frozen=True, eq=False)
class PruneChannels:
    """The pass :func:`prune_channels` returns (changes the parameter shapes)."""

    plan: ChannelPlan
    name = "prune_channels"
    changes_signature = True

    def __repr__(self) -> str:
        return f"prune_channels(<{len(self.plan.groups)} groups>)"

    def __call__(self, program: Program) -> Program:
        if not self.plan.groups:
            return program
        by_path = dict(self.plan.slices)
        roles, structs = [], []
        for role, var in zip(program.roles, program.jaxpr.jaxpr.invars, strict=True):
            shape = list(var.aval.shape)
            for axis, g in by_path.get(role.path, ()):
                shape[axis] = len(self.plan.groups[g].keep)
            if isinstance(role, ParamRef):
                role = dataclasses.replace(role, shape=tuple(shape))
            roles.append(role)
            structs.append(jax.ShapeDtypeStruct(tuple(shape), var.aval.dtype))
        interp = Interpreter(Rewrite(self.name, reshape=True, inline_custom=True))
        closed = program.jaxpr
        new = jax.make_jaxpr(lambda *flat: interp.eval(closed.jaxpr, closed.consts, list(flat)))(
            *structs
        )
        record = PassRecord(self.name, repr(self), tuple(by_path), (self.plan.report(),))
        return program.with_record(record, jaxpr=new, roles=tuple(roles))


def prune_channels(plan: ChannelPlan) -> PruneChannels:
    """Remove the channels ``plan`` drops: a smaller program (call it with
    ``plan.shrink_params(params)``).

    >>> import jax, jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> p = {"a": jnp.array([[1.0, 0.01, 2.0]]), "b": jnp.ones((3, 1))}
    >>> prog = maas_jax.trace(lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"], p, jnp.ones((1, 1)))
    >>> plan = passes.channel_plan(prog, p, sparsity=1 / 3)
    >>> small = passes.prune_channels(plan)(prog)
    >>> [r.shape for r in small.params]
    [(1, 2), (2, 1)]
    >>> small(plan.shrink_params(p), jnp.ones((1, 1))).tolist()
    [[3.0]]
    """
    return PruneChannels(plan)
