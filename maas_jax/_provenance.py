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

    @property
    def primitive(self) -> str:
        return self.eqn.primitive.name

    @property
    def source(self) -> str:
        return _compat.source_line(self.eqn)


def join_name_stack(prefix: str, eqn: jcore.JaxprEqn) -> str:
    own = str(_compat.eqn_name_stack(eqn))
    if prefix and own:
        return f"{prefix}/{own}"
    return prefix or own


def is_marker(eqn: jcore.JaxprEqn) -> bool:
    return _compat.hop_kind(eqn) == "jit" and _compat.jit_name(eqn).startswith(MARKER_PREFIX)


_VIEW_KEYS = ("permutation", "new_sizes", "dimensions", "shape", "broadcast_dimensions")


def _view_summary(eqn: jcore.JaxprEqn) -> tuple[tuple[str, Any], ...]:
    """The view's shape-relevant params and its input shape, as hashable data."""
    p = eqn.params
    items = [(k, p[k]) for k in _VIEW_KEYS if p.get(k) is not None]
    items.append(("in_shape", tuple(eqn.invars[0].aval.shape)))
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in items)


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


def regions(eqn: jcore.JaxprEqn, in_tags: Sequence[Tag | None]) -> list[Region]:
    """The sub-jaxprs of a known higher-order equation with their input tags."""
    kind = _compat.hop_kind(eqn)
    tags = tuple(in_tags)
    if kind in ("jit", "call"):
        return [Region(kind, _compat.jit_jaxpr(eqn), tags, True)]
    if kind == "remat":
        return [Region(kind, _compat.remat_body(eqn), tags, True)]
    if kind in ("custom_jvp", "custom_vjp"):
        return [Region(kind, _compat.custom_call_body(eqn), tags, True)]
    if kind == "shard_map":
        return [Region(kind, _compat.shard_map_body(eqn), tuple(map(_local, tags)), True)]
    if kind == "scan":
        n_consts, n_carry = _compat.scan_layout(eqn)
        consts, xs = tags[:n_consts], tags[n_consts + n_carry :]
        sub = (*consts, *([None] * n_carry), *map(_sliced, xs))
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

    def read(v: Any) -> Tag | None:
        return None if isinstance(v, jcore.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        tags = tuple(read(v) for v in eqn.invars)
        ns = join_name_stack(name_stack, eqn)
        visit(Site(eqn, tags, ns, regions_ + (("opaque",) if opaque else ())))
        outs = eqn_out_tags(eqn, tags, visit, ns, regions_, opaque)
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
) -> list[Tag | None]:
    """Tags of ``eqn``'s outputs; recurses into regions (visiting them) when ``visit`` is set."""
    n_out = len(eqn.outvars)
    if eqn.primitive.name in _compat.VIEW_PRIMITIVES:
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
    return [Tag(r.path) if isinstance(r, ParamRef) else None for r in program.roles]


def _uses_from_site(site: Site) -> list[Use]:
    eqn = site.eqn
    if eqn.primitive.name in _compat.VIEW_PRIMITIVES or is_marker(eqn):
        return []
    kind = _compat.hop_kind(eqn)
    if kind is not None:
        return []  # the region's own equations are the uses
    opaque = bool(_compat.sub_jaxprs(eqn))
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
    return d  # dtype/layout-only views keep dimensions


def _reshape_back(in_shape: tuple[int, ...], out_shape: tuple[int, ...], d: int) -> int | None:
    """The input axis an output axis of a reshape is, if it is one unchanged axis."""
    import math

    before, size = math.prod(out_shape[:d]), out_shape[d]
    for i, n in enumerate(in_shape):
        if math.prod(in_shape[:i]) == before and n == size:
            return i
    return None
