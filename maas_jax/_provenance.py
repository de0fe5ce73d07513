"""Parameter provenance: which equations consume each parameter, seen through views and regions.

A forward dataflow analysis. Every program input that is a parameter starts with a
:class:`Tag` naming its path. Tags flow

* through *view* ops (reshape, transpose, convert_element_type, broadcast, ... — the value is
  the parameter seen differently), recording the view so later passes can map dimensions back;
* through our own marker regions (``jit`` named ``maas_*``: a pass's transform of the weight),
  recording the transform so later passes still recognise the parameter;
* into regions: jit/call/remat/custom_jvp/custom_vjp/cond bodies one-to-one, scan and while
  consts one-to-one, scan ``xs`` as *sliced* (a stacked per-layer parameter loses its leading
  axis), shard_map operands as local shards.

Any other equation that receives a tagged operand is a *use* of the parameter. Unknown
primitives that carry sub-jaxprs (``pallas_call``, a user's custom primitive) are recorded as
*opaque* uses: the engine cannot see what happens inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jax.extend import core as jcore

from maas_jax import _compat
from maas_jax._program import ParamRef, Program

MARKER_PREFIX = "maas_"


@dataclasses.dataclass(frozen=True)
class Tag:
    """Where a value comes from: parameter ``path`` seen through ``views``.

    ``sliced`` counts leading axes removed by scan slicing; ``transforms`` names the maas_jax
    marker regions (pass transforms) the value went through; ``local_shard`` is set inside a
    shard_map body.
    """

    path: str
    views: tuple[tuple[str, Any], ...] = ()
    sliced: int = 0
    transforms: tuple[str, ...] = ()
    local_shard: bool = False


@dataclasses.dataclass(frozen=True)
class Use:
    """One equation that consumes a parameter (possibly inside regions)."""

    path: str
    primitive: str
    operand: int
    name_stack: str
    source: str
    regions: tuple[str, ...]
    dims: tuple[tuple[str, Any], ...] = ()
    views: tuple[tuple[str, Any], ...] = ()
    sliced: int = 0
    transforms: tuple[str, ...] = ()
    opaque: bool = False
    shape: tuple[int, ...] = ()  # the operand as the equation sees it (after the views)

    @property
    def contracted_dims(self) -> tuple[int, ...] | None:
        """The operand's dims this contraction sums over (as consumed), or None if not one.

        dot_general: its contracting dims; a convolution: the features and the window
        (``spec[1:]`` of the operand's layout, features first). Map them back to the
        parameter with :func:`map_dims_to_param` / :func:`map_dims_to_param_axes`.
        """
        d = dict(self.dims)
        if self.primitive == "dot_general" and "contracting" in d:
            return tuple(d["contracting"][self.operand])
        if self.primitive == "conv_general_dilated" and "rhs_spec" in d:
            return tuple((d["rhs_spec"] if self.operand == 1 else d["lhs_spec"])[1:])
        return None

    def describe(self) -> str:
        where = " > ".join(self.regions) if self.regions else "top level"
        names = [v for v, _ in self.views if v != "scan_slice"]
        extra = f" via {'/'.join(names)}" if names else ""
        sl = f" (scan-sliced x{self.sliced})" if self.sliced else ""
        return (
            f"{self.primitive}[operand {self.operand}]{extra}{sl} in {where} "
            f"at {self.name_stack or '<root>'} ({self.source})"
        )


@dataclasses.dataclass(frozen=True)
class Site:
    """An equation visited by the walker, with its context (used by coverage and rules)."""

    eqn: jcore.JaxprEqn
    in_tags: tuple[Tag | None, ...]
    name_stack: str
    regions: tuple[str, ...]
    constant: tuple[bool, ...] = ()  # which operands are constants (see is_view)

    @property
    def primitive(self) -> str:
        return self.eqn.primitive.name

    @property
    def source(self) -> str:
        return _compat.source_line(self.eqn)


def join_name_stack(prefix: str, eqn: jcore.JaxprEqn) -> str:
    """The full name stack of ``eqn``: the enclosing ``prefix`` joined with its own (relative)
    name stack, ``"encoder/layer_0" + "dense"`` -> ``"encoder/layer_0/dense"``."""
    own = str(_compat.eqn_name_stack(eqn))
    if prefix and own:
        return f"{prefix}/{own}"
    return prefix or own


def is_marker(eqn: jcore.JaxprEqn) -> bool:
    """Whether ``eqn`` is a pass's marker region: a ``jit`` named ``maas_<pass>`` around a
    parameter transform (see :func:`maas_jax.apply_marked`)."""
    return _compat.hop_kind(eqn) == "jit" and _compat.jit_name(eqn).startswith(MARKER_PREFIX)


_VIEW_KEYS = (
    "permutation",
    "new_sizes",
    "dimensions",
    "shape",
    "broadcast_dimensions",
    "start_indices",
    "limit_indices",
    "strides",
    "slice_sizes",
)


def _view_summary(eqn: jcore.JaxprEqn) -> tuple[tuple[str, Any], ...]:
    """The view's shape-relevant params and its input shape, as hashable data."""
    p = eqn.params
    if eqn.primitive.name == _compat.GATHER_PRIMITIVE:
        items = list(_compat.gather_summary(eqn).items())
    else:
        items = [(k, p[k]) for k in _VIEW_KEYS if p.get(k) is not None]
    items.append(("in_shape", tuple(eqn.invars[0].aval.shape)))
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in items)


def is_view(eqn: jcore.JaxprEqn, constant: Sequence[bool] = ()) -> bool:
    """Whether ``eqn``'s output is its first operand seen differently (a view of it).

    ``constant`` flags which operands are constants (a ``gather`` with constant indices such as
    ``W[jnp.array([0, 2])]`` selects rows of the parameter; with indices from the inputs it is
    an embedding lookup, a *use* of the table).
    """
    name = eqn.primitive.name
    if name in _compat.VIEW_PRIMITIVES:
        return True
    return name == _compat.GATHER_PRIMITIVE and len(constant) > 1 and bool(constant[1])


def constant_flags(eqn: jcore.JaxprEqn, consts: set[Any]) -> tuple[bool, ...]:
    """Which operands of ``eqn`` are literals or computed from constants only."""
    return tuple(isinstance(v, jcore.Literal) or v in consts for v in eqn.invars)


def note_constants(eqn: jcore.JaxprEqn, flags: Sequence[bool], consts: set[Any]) -> None:
    """Record ``eqn``'s outputs as constants when every operand is (``iota``, index math)."""
    if all(flags) and not _compat.sub_jaxprs(eqn):
        consts.update(eqn.outvars)


def view_out_tag(eqn: jcore.JaxprEqn, in_tags: Sequence[Tag | None]) -> Tag | None:
    """The tag of a view op's output: the operand's tag with this view appended."""
    t = in_tags[0] if in_tags else None
    if t is None or any(x is not None for x in in_tags[1:]):
        return None
    return dataclasses.replace(t, views=(*t.views, (eqn.primitive.name, _view_summary(eqn))))


# ---- regions: how tags map into and out of sub-jaxprs --------------------------------


@dataclasses.dataclass(frozen=True)
class Region:
    """A sub-jaxpr of a known higher-order equation and the tags of its inputs."""

    kind: str
    jaxpr: jcore.ClosedJaxpr
    in_tags: tuple[Tag | None, ...]
    outputs_map_to_eqn: bool  # sub-jaxpr outputs are the equation's outputs one-to-one


def _sliced(t: Tag | None) -> Tag | None:
    # Slicing is recorded as a view too, so dimensions map back through it in order.
    if t is None:
        return None
    return dataclasses.replace(t, sliced=t.sliced + 1, views=(*t.views, ("scan_slice", ())))


def _local(t: Tag | None) -> Tag | None:
    return None if t is None else dataclasses.replace(t, local_shard=True)


def regions(
    eqn: jcore.JaxprEqn,
    in_tags: Sequence[Any],
    *,
    sliced: Callable[[Any], Any] | None = None,
    local: Callable[[Any], Any] | None = None,
) -> list[Region]:
    """The sub-jaxprs of a known higher-order equation with their input tags.

    ``sliced`` / ``local`` map what enters as a scan ``xs`` / a shard_map operand (default:
    the :class:`Tag` rules); loop carries always enter as None. :func:`walk_lineage` passes
    identities.
    """
    _sliced_ = sliced or _sliced
    _local_ = local or _local
    kind = _compat.hop_kind(eqn)
    tags = tuple(in_tags)
    if kind in ("jit", "call"):
        return [Region(kind, _compat.jit_jaxpr(eqn), tags, True)]
    if kind == "remat":
        return [Region(kind, _compat.remat_body(eqn), tags, True)]
    if kind in ("custom_jvp", "custom_vjp"):
        return [Region(kind, _compat.custom_call_body(eqn), tags, True)]
    if kind == "shard_map":
        return [Region(kind, _compat.shard_map_body(eqn), tuple(map(_local_, tags)), True)]
    if kind == "scan":
        n_consts, n_carry = _compat.scan_layout(eqn)
        consts, xs = tags[:n_consts], tags[n_consts + n_carry :]
        sub = (*consts, *([None] * n_carry), *map(_sliced_, xs))
        return [Region(kind, _compat.scan_body(eqn), sub, False)]
    if kind == "while":
        cond, n_cond, body, n_body = _compat.while_parts(eqn)
        carry = [None] * (len(tags) - n_cond - n_body)
        return [
            Region("while_cond", cond, (*tags[:n_cond], *carry), False),
            Region("while", body, (*tags[n_cond : n_cond + n_body], *carry), False),
        ]
    if kind == "cond":
        return [Region("cond", b, tags[1:], True) for b in _compat.cond_branches(eqn)]
    return []


# ---- the walker ------------------------------------------------------------------------

Visitor = Callable[[Site], None]


def walk(
    jaxpr: jcore.Jaxpr,
    in_tags: Sequence[Tag | None],
    visit: Visitor,
    *,
    name_stack: str = "",
    regions_: tuple[str, ...] = (),
    opaque: bool = False,
) -> list[Tag | None]:
    """Visit every equation of ``jaxpr`` and its sub-jaxprs; return the output tags."""
    env: dict[Any, Tag | None] = dict(zip(jaxpr.invars, in_tags, strict=True))
    consts: set[Any] = set(jaxpr.constvars)

    def read(v: Any) -> Tag | None:
        return None if isinstance(v, jcore.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        tags = tuple(read(v) for v in eqn.invars)
        flags = constant_flags(eqn, consts)
        note_constants(eqn, flags, consts)
        ns = join_name_stack(name_stack, eqn)
        visit(Site(eqn, tags, ns, regions_ + (("opaque",) if opaque else ()), flags))
        outs = eqn_out_tags(eqn, tags, visit, ns, regions_, opaque, flags)
        for v, t in zip(eqn.outvars, outs, strict=True):
            env[v] = t
    return [read(v) for v in jaxpr.outvars]


def eqn_out_tags(
    eqn: jcore.JaxprEqn,
    tags: tuple[Tag | None, ...],
    visit: Visitor | None,
    ns: str,
    regions_: tuple[str, ...],
    opaque: bool = False,
    constant: Sequence[bool] = (),
) -> list[Tag | None]:
    """Tags of ``eqn``'s outputs; recurses into regions (visiting them) when ``visit`` is set.

    ``constant`` flags the operands that are constants (see :func:`is_view`).
    """
    n_out = len(eqn.outvars)
    if is_view(eqn, constant):
        return [view_out_tag(eqn, tags)] + [None] * (n_out - 1)
    if is_marker(eqn):
        t = tags[0] if tags else None
        name = _compat.jit_name(eqn)
        out = None if t is None else dataclasses.replace(t, transforms=(*t.transforms, name))
        return [out] + [None] * (n_out - 1)
    kind = _compat.hop_kind(eqn)
    if kind is None:
        if visit is not None:
            for sub in _compat.sub_jaxprs(eqn):  # unknown region: list its contents, tagless
                walk(
                    sub,
                    [None] * len(sub.invars),
                    visit,
                    name_stack=ns,
                    regions_=(*regions_, eqn.primitive.name),
                    opaque=True,
                )
        return [None] * n_out
    outs: list[Tag | None] | None = None
    for region in regions(eqn, tags):
        sub_visit = visit if visit is not None else (lambda _s: None)
        sub_out = walk(
            region.jaxpr.jaxpr,
            region.in_tags,
            sub_visit,
            name_stack=ns,
            regions_=(*regions_, region.kind),
            opaque=opaque,
        )
        if region.outputs_map_to_eqn:
            # cond: an output keeps a tag only if every branch agrees on it.
            outs = (
                sub_out
                if outs is None
                else [a if a == b else None for a, b in zip(outs, sub_out, strict=True)]
            )
    if outs is None or kind == "shard_map":
        return [None] * n_out
    return outs


# ---- analyses ---------------------------------------------------------------------------


def initial_tags(program: Program) -> list[Tag | None]:
    """One tag per jaxpr input of ``program``: ``Tag(path)`` for parameters, None otherwise
    (the starting point of :func:`walk`)."""
    return [Tag(r.path) if isinstance(r, ParamRef) else None for r in program.roles]


def _uses_from_site(site: Site) -> list[Use]:
    eqn = site.eqn
    if is_view(eqn, site.constant) or is_marker(eqn):
        return []
    kind = _compat.hop_kind(eqn)
    if kind is not None:
        return []  # the region's own equations are the uses
    opaque = bool(_compat.sub_jaxprs(eqn))
    if eqn.primitive.name == _compat.GATHER_PRIMITIVE:
        dims = tuple(sorted(_compat.gather_summary(eqn).items()))  # a table lookup
    else:
        dims = tuple(sorted(_compat.contraction_summary(eqn).items()))
    out = []
    for i, t in enumerate(site.in_tags):
        if t is not None:
            out.append(
                Use(
                    t.path,
                    eqn.primitive.name,
                    i,
                    site.name_stack,
                    site.source,
                    site.regions,
                    dims,
                    t.views,
                    t.sliced,
                    t.transforms,
                    opaque,
                    tuple(eqn.invars[i].aval.shape),
                )
            )
    return out


def consumers(program: Program) -> dict[str, tuple[Use, ...]]:
    """The consumer table: for every parameter path, the equations that use it.

    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"].T, {"w": jnp.ones((3, 2))}, jnp.ones(2))
    >>> [(u.primitive, u.operand, [v for v, _ in u.views]) for u in maas_jax.consumers(prog)["w"]]
    [('dot_general', 1, ['transpose'])]
    """
    table: dict[str, list[Use]] = {r.path: [] for r in program.params}

    def visit(site: Site) -> None:
        for use in _uses_from_site(site):
            table[use.path].append(use)

    walk(program.jaxpr.jaxpr, initial_tags(program), visit)
    return {k: tuple(v) for k, v in table.items()}


def contraction_sites(program: Program) -> list[Site]:
    """Every dot_general / conv_general_dilated in the program, recursively, in order."""
    sites: list[Site] = []

    def visit(site: Site) -> None:
        if site.primitive in _compat.CONTRACTION_PRIMITIVES:
            sites.append(site)

    walk(program.jaxpr.jaxpr, initial_tags(program), visit)
    return sites


def all_sites(program: Program) -> list[Site]:
    """Every equation of the program, recursively, with tags and context."""
    sites: list[Site] = []
    walk(program.jaxpr.jaxpr, initial_tags(program), sites.append)
    return sites


def map_dims_to_param(dims: Sequence[int], views: Sequence[tuple[str, Any]]) -> list[int | None]:
    """Map dimensions of a viewed operand back to the parameter's own dimensions.

    ``views`` is a :attr:`Tag.views` chain (applied in order, parameter first). A dimension that
    the views created (a broadcast axis) or mixed (a reshape merging axes) maps to ``None``.

    >>> map_dims_to_param([0], [("transpose", (("permutation", (1, 0)), ("in_shape", (3, 4))))])
    [1]
    >>> map_dims_to_param([0], [("scan_slice", ())])
    [1]
    """
    out: list[int | None] = list(dims)
    for name, summary in reversed(list(views)):
        p = dict(summary)
        out = [None if d is None else _back(name, p, d) for d in out]
    return out


def _back(name: str, p: dict[str, Any], d: int) -> int | None:
    if name == "transpose":
        return p["permutation"][d]
    if name == "scan_slice":
        return d + 1
    if name == "broadcast_in_dim":
        bd = tuple(p["broadcast_dimensions"])
        return bd.index(d) if d in bd else None
    if name == "squeeze":
        kept = [i for i in range(len(p["in_shape"])) if i not in set(p["dimensions"])]
        return kept[d]
    if name == "reshape":
        return _reshape_back(tuple(p["in_shape"]), tuple(p["new_sizes"]), d)
    if name == "gather":
        return _gather_back(p, d)
    return d  # dtype/layout-only views and slices keep dimensions


def _gather_back(p: dict[str, Any], d: int) -> int | None:
    """The operand axis an output axis of a gather is (an offset axis), else None."""
    offset = tuple(p["offset_dims"])
    if d not in offset:
        return None  # an axis of the indices
    dropped = set(p["collapsed_slice_dims"]) | set(p["operand_batching_dims"])
    kept = [i for i in range(len(p["in_shape"])) if i not in dropped]
    return kept[offset.index(d)]


def map_dims_to_param_axes(
    dims: Sequence[int], views: Sequence[tuple[str, Any]]
) -> tuple[set[int], bool]:
    """The parameter axes whose elements feed ``dims`` of a viewed operand.

    Unlike :func:`map_dims_to_param`, a reshape that merged axes maps back to *all* of them
    (``w.reshape(a * b, c)`` contracted over its first axis contracts ``w``'s axes 0 and 1),
    and an axis that the views created (a broadcast) maps to nothing: the parameter has no such
    axis. Returns ``(axes, exact)``; ``exact`` is False when some view could not be mapped (an
    unknown view), so the caller must be conservative.

    >>> map_dims_to_param_axes([0], [("reshape", (("new_sizes", (6, 4)), ("in_shape", (2, 3, 4))))])
    ({0, 1}, True)
    """
    current: list[set[int]] = [{d} for d in dims]
    exact = True
    for name, summary in reversed(list(views)):
        p = dict(summary)
        nxt: list[set[int]] = []
        for axes in current:
            out: set[int] = set()
            for d in axes:
                if name == "reshape":
                    out |= _reshape_group(tuple(p["in_shape"]), tuple(p["new_sizes"]), d)
                elif name == "broadcast_in_dim":
                    bd = tuple(p["broadcast_dimensions"])
                    if d in bd:
                        out.add(bd.index(d))
                else:
                    back = _back(name, p, d)
                    if back is not None:
                        out.add(back)
                    elif name != "gather":
                        exact = False
            nxt.append(out)
        current = nxt
    return set().union(*current) if current else set(), exact


def reshape_groups(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split a reshape into groups ``(in_axes, out_axes)`` of equal element count.

    Size-1 axes join the group they sit next to. ``(3, 3, C, 1) -> (3, 3, 1, C)`` is
    ``[((0,), (0,)), ((1,), (1,)), ((2, 3), (2, 3))]``.

    >>> reshape_groups((2, 3, 4), (6, 4))
    [((0, 1), (0,)), ((2,), (1,))]
    """
    import math

    groups: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    i = j = 0
    n, m = len(in_shape), len(out_shape)
    while i < n or j < m:
        gi, gj = [], []
        pi = pj = 1
        while True:
            if i < n and (pi <= pj or j >= m):
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            elif j < m:
                pj *= out_shape[j]
                gj.append(j)
                j += 1
            if pi == pj and (gi or gj):
                # absorb trailing size-1 axes into this group
                while i < n and in_shape[i] == 1 and (j >= m or out_shape[j] != 1):
                    gi.append(i)
                    i += 1
                while j < m and out_shape[j] == 1 and (i >= n or in_shape[i] != 1):
                    gj.append(j)
                    j += 1
                if i >= n and j >= m or (gi and gj) or math.prod(in_shape[i:]) == 1:
                    break
            if i >= n and j >= m:
                break
        groups.append((tuple(gi), tuple(gj)))
    return groups


def _reshape_group(in_shape: tuple[int, ...], out_shape: tuple[int, ...], d: int) -> set[int]:
    for gi, gj in reshape_groups(in_shape, out_shape):
        if d in gj:
            return {i for i in gi if in_shape[i] != 1} or set(gi)
    return set()


def _reshape_back(in_shape: tuple[int, ...], out_shape: tuple[int, ...], d: int) -> int | None:
    """The input axis an output axis of a reshape is, if it is one unchanged axis."""
    import math

    before, size = math.prod(out_shape[:d]), out_shape[d]
    for i, n in enumerate(in_shape):
        if math.prod(in_shape[:i]) == before and n == size:
            return i
    return None


# ---- lineage: which values are computed from parameters alone ---------------------------


@dataclasses.dataclass(frozen=True)
class Lineage:
    """A value computed from parameters (and constants) only, with no input in its history.

    Views keep a parameter's identity (:class:`Tag`); lineage is wider: a dequantized weight
    (``q * scale``), a folded kernel (``w * gamma / sqrt(var)``), ``w.reshape(...)`` or
    ``W[i]`` all derive from parameters alone. ``transforms`` are the marker regions (pass
    transforms) on the way. Coverage uses it so that a contraction whose operand *derives* from
    a parameter is counted, whatever ops stand between them.
    """

    paths: frozenset[str]
    transforms: tuple[str, ...] = ()

    def join(self, other: Lineage) -> Lineage:
        return Lineage(
            self.paths | other.paths, tuple(dict.fromkeys(self.transforms + other.transforms))
        )


CONSTANT = Lineage(frozenset())  # literals, closed-over constants, iota


LineageVisitor = Callable[[Site, tuple["Lineage | None", ...]], None]


def walk_lineage(
    jaxpr: jcore.Jaxpr,
    in_lins: Sequence[Lineage | None],
    visit: LineageVisitor,
    *,
    name_stack: str = "",
    regions_: tuple[str, ...] = (),
    opaque: bool = False,
) -> list[Lineage | None]:
    """Visit every equation with the lineage of its operands (None: depends on an input).

    Bodies of unknown higher-order primitives are visited too, with ``"opaque"`` appended to
    the sites' regions (nothing is known about what flows in).
    """
    env: dict[Any, Lineage | None] = dict(zip(jaxpr.invars, in_lins, strict=True))
    for v in jaxpr.constvars:
        env[v] = CONSTANT

    def read(v: Any) -> Lineage | None:
        return CONSTANT if isinstance(v, jcore.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        lins = tuple(read(v) for v in eqn.invars)
        ns = join_name_stack(name_stack, eqn)
        visit(Site(eqn, (), ns, regions_ + (("opaque",) if opaque else ())), lins)
        outs: list[Lineage | None]
        kind = _compat.hop_kind(eqn)
        if kind is None and _compat.sub_jaxprs(eqn):
            for sub in _compat.sub_jaxprs(eqn):
                walk_lineage(
                    sub,
                    [None] * len(sub.invars),
                    visit,
                    name_stack=ns,
                    regions_=(*regions_, eqn.primitive.name),
                    opaque=True,
                )
        if is_marker(eqn) and lins and lins[0] is not None:
            name = _compat.jit_name(eqn)
            base = lins[0]
            for other in lins[1:]:
                base = base if other is None else base.join(other)
            marked = Lineage(base.paths, tuple(dict.fromkeys((*base.transforms, name))))
            outs = [marked] * len(eqn.outvars)
        elif kind is not None and not is_marker(eqn):
            outs = [None] * len(eqn.outvars)
            first = True
            same = lambda x: x  # noqa: E731  (a lineage is the same for a slice or a shard)
            for region in regions(eqn, lins, sliced=same, local=same):
                rkind, maps = region.kind, region.outputs_map_to_eqn
                sub_out = walk_lineage(
                    region.jaxpr.jaxpr,
                    region.in_tags,
                    visit,
                    name_stack=ns,
                    regions_=(*regions_, rkind),
                    opaque=opaque,
                )
                if maps:  # cond: an output keeps a lineage only if every branch agrees
                    outs = (
                        sub_out
                        if first
                        else [a if a == b else None for a, b in zip(outs, sub_out, strict=True)]
                    )
                    first = False
        elif any(x is None for x in lins):
            outs = [None] * len(eqn.outvars)
        else:
            joined = CONSTANT
            for x in lins:
                joined = joined.join(x)  # type: ignore[union-attr]
            outs = [joined] * len(eqn.outvars)
        for v, lin in zip(eqn.outvars, outs, strict=True):
            env[v] = lin
    return [read(v) for v in jaxpr.outvars]


def initial_lineages(program: Program) -> list[Lineage | None]:
    return [
        Lineage(frozenset({r.path})) if isinstance(r, ParamRef) else None for r in program.roles
    ]
