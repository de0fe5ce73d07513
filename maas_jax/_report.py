"""Reports over a Program: parameters and their consumers, and contraction coverage.

Coverage answers the question silent tools never do: *which matmuls and convolutions did my
passes actually touch?* Every dot_general / conv_general_dilated is listed, recursively, with
its module path, source line, the parameters feeding it and the passes that transformed them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from maas_jax._compat import CONTRACTION_PRIMITIVES
from maas_jax._program import Program
from maas_jax._provenance import (
    MARKER_PREFIX,
    Lineage,
    Site,
    consumers,
    initial_lineages,
    walk_lineage,
)


@dataclasses.dataclass(frozen=True)
class CoverageEntry:
    """One contraction: its operands (parameter paths or ``"activation"``) and what touched it.

    An operand counts as a parameter when it is computed from parameters alone (a view, a
    dequantized or folded weight, ``w.reshape(...)``, ``W[i]``); several parameters are joined
    with ``+``. ``int_operands`` says whether it runs on integers (``s8 x s8``).
    """

    primitive: str
    name_stack: str
    source: str
    regions: tuple[str, ...]
    operands: tuple[str, ...]  # "params/x" (or "a+b") or "activation" / "constant"
    touched_by: tuple[str, ...]
    opaque: bool  # inside a region no rewrite can reach (unknown primitive)
    in_custom: bool  # inside a custom_jvp/custom_vjp region (left opaque by default)
    int_operands: bool = False
    sums: bool = True  # False: a dot_general contracting nothing (a broadcast product)

    @property
    def touched(self) -> bool:
        return bool(self.touched_by)

    @property
    def has_param(self) -> bool:
        """A real contraction (it sums) with an operand derived from parameters."""
        return self.sums and any(o not in ("activation", "constant") for o in self.operands)

    @property
    def untouched_weight(self) -> bool:
        """A contraction with a parameter operand that no pass transformed: a likely skip."""
        return self.has_param and not self.touched


def _entry(site: Site, lins: tuple[Lineage | None, ...], history: Any) -> CoverageEntry:
    operands, touched = [], []
    for lin in lins[:2]:
        if lin is None:
            operands.append("activation")
        elif not lin.paths:
            operands.append("constant")
        else:
            operands.append("+".join(sorted(lin.paths)))
            touched.extend(x.removeprefix(MARKER_PREFIX) for x in lin.transforms)
            for path in lin.paths:  # stored integers of a converted program
                touched.extend(history.get(path, ()))
    if MARKER_PREFIX in site.name_stack:  # a rule rewrote the contraction itself
        touched.extend(
            part.removeprefix(MARKER_PREFIX)
            for part in site.name_stack.split("/")
            if part.startswith(MARKER_PREFIX)
        )
    ints = all(
        jnp.issubdtype(v.aval.dtype, jnp.integer) for v in site.eqn.invars[:2]
    ) and site.primitive in ("dot_general", "conv_general_dilated")
    sums = True
    if site.primitive == "dot_general":
        (lc, _), _ = site.eqn.params["dimension_numbers"]
        sums = bool(lc)
    return CoverageEntry(
        site.primitive,
        site.name_stack,
        site.source,
        site.regions,
        tuple(operands),
        tuple(dict.fromkeys(touched)),
        "opaque" in site.regions,
        any(r in ("custom_jvp", "custom_vjp") for r in site.regions),
        ints,
        sums,
    )


def _stored_history(program: Program) -> dict[str, tuple[str, ...]]:
    """Parameters of a converted program that hold what a pass stored (``w/qvalue``)."""
    out: dict[str, list[str]] = {}
    stored = {p for rec in program.history if rec.name == "convert" for p in rec.touched}
    for r in program.params:
        parent = r.path.rsplit("/", 1)[0]
        if parent in stored:
            out.setdefault(r.path, []).append("convert")
    return {k: tuple(v) for k, v in out.items()}


def coverage(program: Program) -> list[CoverageEntry]:
    """Every contraction in the program and the passes that touched its operands.

    An operand derived from parameters only (through views, dequantization, folding, reshapes
    or constant indexing) counts as that parameter; ``untouched_weight`` flags contractions
    with such an operand that no pass transformed.

    >>> import jax.numpy as jnp
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 2))}, jnp.ones(2))
    >>> [e.touched_by for e in maas_jax.coverage(passes.clip_weights(1.0)(prog))]
    [('clip_weights',)]
    >>> [e.untouched_weight for e in maas_jax.coverage(prog)]
    [True]
    """
    entries: list[CoverageEntry] = []
    history = _stored_history(program)

    def visit(site: Site, lins: tuple[Lineage | None, ...]) -> None:
        if site.primitive in CONTRACTION_PRIMITIVES:
            entries.append(_entry(site, lins, history))

    walk_lineage(program.jaxpr.jaxpr, initial_lineages(program), visit)
    return entries


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def param_report(program: Program, *, max_rows: int | None = None) -> str:
    """A table of parameters: path, shape, dtype, bytes, logical axes and consumers."""
    table = consumers(program)
    rows = []
    total = 0
    for r in program.params:
        nbytes = int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize
        total += nbytes
        uses = table[r.path]
        prims = sorted({u.primitive + ("[opaque]" if u.opaque else "") for u in uses})
        axes = ",".join(a or "-" for a in r.logical_axes) if r.logical_axes else ""
        rows.append(
            (
                r.path,
                "x".join(map(str, r.shape)) or "()",
                r.dtype.name,
                _fmt_bytes(nbytes),
                axes,
                f"{len(uses)}: {' '.join(prims)}" if uses else "0 (unused)",
            )
        )
    head = ("parameter", "shape", "dtype", "bytes", "logical axes", "uses")
    shown = rows if max_rows is None else rows[:max_rows]
    text = _table(head, shown)
    if max_rows is not None and len(rows) > max_rows:
        text += f"\n... {len(rows) - max_rows} more parameters"
    return text + f"\n{len(rows)} parameters, {_fmt_bytes(total)}"


def coverage_report(program: Program, *, max_rows: int | None = None) -> str:
    """Coverage as a text table, ending with a one-line summary."""
    entries = coverage(program)
    any_touched = any(e.touched for e in entries)  # before any pass, nothing is "left out"
    rows = [
        (
            e.primitive.replace("conv_general_dilated", "conv"),
            e.name_stack or "<root>",
            " x ".join(e.operands),
            ",".join(e.touched_by) + (" [int]" if e.int_operands else "")
            or (
                "OPAQUE"
                if e.opaque
                else ("UNTOUCHED" if e.untouched_weight and any_touched else "-")
            ),
            " > ".join(e.regions) or "top",
        )
        for e in entries
    ]
    shown = rows if max_rows is None else rows[:max_rows]
    text = _table(("op", "module path", "operands", "touched by", "regions"), shown)
    if max_rows is not None and len(rows) > max_rows:
        text += f"\n... {len(rows) - max_rows} more sites"
    n_touched = sum(e.touched for e in entries)
    n_weight = sum(e.has_param for e in entries)
    n_int = sum(e.int_operands for e in entries)
    untouched = [e for e in entries if e.untouched_weight]
    text += (
        f"\n{len(entries)} contractions, {n_weight} with a parameter operand, "
        f"{n_touched} touched by a pass, {n_int} on integers, "
        f"{sum(e.opaque for e in entries)} opaque"
    )
    if untouched and n_touched:
        # Some pass ran, yet these weight contractions were left as they were: say so.
        text += f"\nUNTOUCHED weight contractions ({len(untouched)}):"
        for e in untouched[:20]:
            text += f"\n  {e.primitive} {' x '.join(e.operands)} at {e.name_stack or '<root>'} ({e.source})"
        if len(untouched) > 20:
            text += f"\n  ... {len(untouched) - 20} more"
    return text


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    cols = list(zip(head, *rows, strict=False)) if rows else [(h,) for h in head]
    widths = [min(60, max(len(str(c)) for c in col)) for col in cols]

    def cell(c: Any) -> str:
        # Keep the end of long names: "...layer_0/attention/query" says more than the root.
        s = str(c)
        return s if len(s) <= 60 else "..." + s[-57:]

    def line(cells: tuple[Any, ...]) -> str:
        return "  ".join(cell(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def primitive_counts(program_or_jaxpr: Any) -> dict[str, int]:
    """How many times each primitive occurs, counting inside every region (recursively).

    >>> import jax, jax.numpy as jnp
    >>> import maas_jax
    >>> prog = maas_jax.trace(lambda p, x: jax.jit(jnp.sin)(x @ p), jnp.ones((2, 2)), jnp.ones(2))
    >>> maas_jax.primitive_counts(prog)
    {'dot_general': 1, 'jit': 1, 'sin': 1}
    """
    from maas_jax._compat import sub_jaxprs

    j = program_or_jaxpr
    j = getattr(j, "jaxpr", j)  # Program -> ClosedJaxpr
    j = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
    counts: dict[str, int] = {}

    def visit(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
            for sub in sub_jaxprs(eqn):
                visit(sub)

    visit(j)
    return dict(sorted(counts.items()))
