"""``fold_batchnorm``: fold inference-mode BatchNorm into the preceding conv / dense kernel.

In a traced model, ``BatchNorm(use_running_average=True)`` after a convolution or a dense layer
is an affine per-channel chain on the contraction's output ``y``::

    y = conv(x, kernel)            # or dot_general; maybe followed by `add y bias`
    r = sub y mean                 # mean, var, scale, bias: parameters (running statistics)
    w = mul r (rsqrt(var + eps) * scale)
    out = add w bias

which is ``out = y * m + a`` with per-channel vectors ``m`` and ``a`` computed from parameters
only, and ``conv(x, kernel) * m == conv(x, kernel * m)``. Folding rewrites it to::

    out = conv(x, maas_fold_batchnorm(kernel, m)) + a      # into="kernel" (default)
    out = conv(x, kernel) * m + a                           # into="output"

**Analysis** (top-level equations only; see *Limits*). A forward pass marks every variable
*parameter-only* (computed from parameters, pass state, constants and literals, without
effects) or not. A *chain* starts at a ``dot_general`` / ``conv_general_dilated`` ``E`` whose
right operand is a parameter (a provenance tag: the parameter seen through views or earlier
passes' markers) and whose left operand is not parameter-only. Its output must be used only by
one ``add``/``sub``/``mul``/``div`` whose other operand is parameter-only and broadcasts along
the output-feature axis only (the last axis for dense; ``out_spec[1]`` for conv), and so on
while each intermediate is used once. The chain is combined symbolically into ``y * m + a``
(``add c: a + c``; ``sub c: a - c``; ``c - y: -m, c - a``; ``mul c: m c, a c``;
``div c: m / c, a / c``). Only chains with a parameter-dependent scale are folded, so a plain
bias add (or ``y * 0.5``) is left alone, and training-mode BatchNorm never matches: its
statistics depend on ``y`` (which then has several uses).

**Rewrite.** The new program is ``jax.make_jaxpr`` of the engine's interpreter over the
original jaxpr with a rule on the chain's equations (same signature: the BatchNorm statistics
stay inputs, now read only to compute ``m`` and ``a``). The intermediate chain equations pass
their input through. Then, with ``into="kernel"`` (classic folding), at ``E`` the rule emits
the contraction on the kernel operand scaled along its output-feature axis (``rhs_spec[0]`` for
conv, the right operand's free axis for dot_general) inside a ``jit`` named
``maas_fold_batchnorm``, and the chain's last equation emits ``y' + a``. Provenance records the
marker as a transform (``Use.transforms``), so later passes still see the kernel parameter at
``E``. Only this use gets the folded kernel; other uses of the same kernel see the original.
With ``into="output"``, ``E`` is left alone and the last equation emits ``y * m + a``.

The parameter-only values ``m`` and ``a`` depend on may be computed *after* ``E`` in the jaxpr
(Flax broadcasts the statistics after the convolution). They are evaluated on demand, from the
program inputs, when ``E`` needs them; every equation of that parameter-only slice is then
evaluated once (the rule hands the interpreter the value when it reaches the equation), so no
computation is duplicated and none is left dead.

**Stored vectors.** The per-channel vectors the rewritten program adds (``a``; ``m`` and ``a``
with ``into="output"``) depend on parameters only, so they are computed inside a ``jit`` named
``precomputed["<path>", ...]`` (:data:`PRECOMPUTED`), whose name lists where ``convert`` stores
its outputs: ``<kernel path>_folded_bias`` and ``<kernel path>_folded_scale`` (``_1``, ``_2``
... when taken). ``convert`` turns the region's outputs into stored inputs computed once by
``convert_params``, so a converted program keeps one float vector per folded layer (two with
``into="output"``) instead of the BatchNorm scale, bias, mean and var, and none of the folding
arithmetic (``rsqrt``) runs per call. The region is not a ``maas_*`` marker: it transforms no
single parameter, so provenance passes no parameter's tag through it. (With
``into="kernel"``, ``m`` only feeds the folded kernel, which a quantized kernel's stored
integers already include.)

**Quantization.** A later ``fake_quant`` quantizes the folded kernel: the engine applies a
pass's weight transform at the end of the marker chain earlier passes put on the parameter (here
``maas_fold_batchnorm`` at the contraction), so the convolution runs on the integers of
``kernel * m``. ``into="output"`` keeps the kernel and applies ``m`` to the output instead;
with per-channel weight scales it gives the same integers (the scale of ``kernel * m`` for
channel ``c`` is ``|m_c|`` times that of ``kernel``), and it leaves the stored kernel unchanged.

**Limits.** Chains inside jit/remat/scan bodies are not folded (the rewrite only looks at the
top level), nor chains on a contraction whose kernel is its *left* operand, a dot_general whose
kernel has several free axes (``DenseGeneral`` with a multi-axis output), dtype casts inside the
chain (Flax layers with ``dtype=bfloat16`` cast before BatchNorm, so they are not folded), or
``batch_group_count > 1`` convolutions. With per-tensor (not per-channel) weight quantization,
``into="output"`` then ``fake_quant`` quantizes the unfolded kernel, which is not the same as
quantizing the folded one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from maas_jax import (
    ParamRef,
    PassRecord,
    Program,
    Rewrite,
    StateRef,
    apply_marked,
)
from maas_jax.extend import (
    Interpreter,
    Site,
    Tag,
    aval_struct,
    bind_eqn,
    current_name_stack,
    eqn_context,
    eqn_name_stack,
    initial_tags,
    is_floating,
    jit_name,
    materialize,
    readers,
    region_kind,
    walk,
)

MARKER = "maas_fold_batchnorm"

_CHAIN_OPS = frozenset({"add", "sub", "mul", "div"})

# Parameter-only lattice: a value is a constant, depends on parameters (and constants) only,
# or depends on the program's data inputs (an activation).
_CONST, _PARAM, _ACT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Step:
    """One equation of a chain: ``op`` is ``add``, ``sub`` (y - c), ``rsub`` (c - y), ``mul``
    or ``div`` (y / c); ``other`` is the parameter-only operand ``c``."""

    eqn: jcore.JaxprEqn
    op: str
    other: Any  # jcore.Var or jcore.Literal
    operand: int  # which operand of ``eqn`` is the chain's value


@dataclasses.dataclass(frozen=True)
class Chain:
    """A contraction ``eqn`` followed by an affine per-channel chain ``steps``."""

    eqn: jcore.JaxprEqn
    kernel_path: str
    kernel_axis: int  # the output-feature axis of the contraction's right operand
    out_axis: int  # the output-feature axis of its output
    features: int
    steps: tuple[Step, ...]

    def describe(self) -> str:
        ops = " ".join(s.op for s in self.steps)
        ns = str(eqn_name_stack(self.eqn)) or "<root>"
        return f"{self.kernel_path}: {self.eqn.primitive.name} at {ns} + [{ops}]"


# ---- analysis ---------------------------------------------------------------------------


def _kinds(program: Program) -> dict[Any, int]:
    """The parameter-only lattice value of every top-level variable."""
    jaxpr = program.jaxpr.jaxpr
    kind: dict[Any, int] = {v: _CONST for v in jaxpr.constvars}
    for v, role in zip(jaxpr.invars, program.roles, strict=True):
        kind[v] = _PARAM if isinstance(role, ParamRef | StateRef) else _ACT
    for eqn in jaxpr.eqns:
        k = max(
            (kind[v] for v in eqn.invars if not isinstance(v, jcore.Literal)),
            default=_CONST,
        )
        if eqn.effects:
            k = _ACT
        for v in eqn.outvars:
            kind[v] = k
    return kind


def _kind(kind: dict[Any, int], v: Any) -> int:
    return _CONST if isinstance(v, jcore.Literal) else kind[v]


def _feature_axes(eqn: jcore.JaxprEqn) -> tuple[int, int] | None:
    """(output-feature axis of the right operand, of the output), or None if unsupported."""
    if eqn.primitive.name == "conv_general_dilated":
        if eqn.params.get("batch_group_count", 1) != 1:
            return None
        dn = eqn.params["dimension_numbers"]
        return dn.rhs_spec[0], dn.out_spec[1]
    if eqn.primitive.name == "dot_general":
        (_, rc), (_, rb) = eqn.params["dimension_numbers"]
        rhs_nd = len(eqn.invars[1].aval.shape)
        free = [d for d in range(rhs_nd) if d not in rc and d not in rb]
        if len(free) != 1:
            return None
        return free[0], len(eqn.outvars[0].aval.shape) - 1
    return None


def _per_channel(other: Any, out_shape: tuple[int, ...], axis: int) -> bool:
    """Whether ``other`` broadcasts against an output of ``out_shape`` along ``axis`` only."""
    shape = tuple(other.aval.shape)
    if shape == ():
        return True
    if len(shape) != len(out_shape):
        return False
    return all(n == 1 for d, n in enumerate(shape) if d != axis) and shape[axis] in (
        1,
        out_shape[axis],
    )


def find_chains(program: Program) -> list[Chain]:
    """Every foldable contraction + per-channel affine chain at the program's top level."""
    jaxpr = program.jaxpr.jaxpr
    kind = _kinds(program)
    uses = readers(jaxpr)
    outputs = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    tags: dict[int, tuple[Tag | None, ...]] = {}

    def visit(site: Site) -> None:
        if not site.regions and site.primitive in ("dot_general", "conv_general_dilated"):
            tags[id(site.eqn)] = site.in_tags

    walk(jaxpr, initial_tags(program), visit)

    chains = []
    for eqn in jaxpr.eqns:
        in_tags = tags.get(id(eqn))
        if in_tags is None or in_tags[1] is None or _kind(kind, eqn.invars[0]) != _ACT:
            continue
        axes = _feature_axes(eqn)
        if axes is None:
            continue
        kernel_axis, out_axis = axes
        y = eqn.outvars[0]
        if not is_floating(y.aval.dtype):
            continue
        out_shape = tuple(y.aval.shape)
        steps: list[Step] = []
        cur = y
        while cur not in outputs and len(uses.get(cur, ())) == 1:
            nxt = uses[cur][0]
            step = _step(nxt, cur, out_shape, out_axis, kind)
            if step is None:
                break
            steps.append(step)
            cur = nxt.outvars[0]
        # Fold only a real scale that depends on parameters: not a bias add, not `y * 0.5`.
        if not any(s.op in ("mul", "div") and _kind(kind, s.other) == _PARAM for s in steps):
            continue
        chains.append(
            Chain(
                eqn,
                in_tags[1].path,
                kernel_axis,
                out_axis,
                out_shape[out_axis],
                tuple(steps),
            )
        )
    return chains


def _step(
    eqn: jcore.JaxprEqn, cur: Any, out_shape: tuple[int, ...], axis: int, kind: dict[Any, int]
) -> Step | None:
    name = eqn.primitive.name
    if name not in _CHAIN_OPS or len(eqn.invars) != 2:
        return None
    out = eqn.outvars[0]
    if tuple(out.aval.shape) != out_shape or out.aval.dtype != cur.aval.dtype:
        return None
    a, b = eqn.invars
    if a is cur and b is not cur:
        pos, other = 0, b
    elif b is cur and a is not cur:
        pos, other = 1, a
    else:
        return None
    if _kind(kind, other) == _ACT or not _per_channel(other, out_shape, axis):
        return None
    if name == "sub":
        return Step(eqn, "sub" if pos == 0 else "rsub", other, pos)
    if name == "div":
        return Step(eqn, "div", other, pos) if pos == 0 else None
    return Step(eqn, name, other, pos)


# ---- the rewrite ------------------------------------------------------------------------


class _Slice:
    """Evaluates parameter-only variables on demand from the program inputs, once each."""

    def __init__(self, jaxpr: jcore.Jaxpr, needed: Sequence[Any]):
        self.jaxpr = jaxpr
        self.producer: dict[Any, jcore.JaxprEqn] = {}
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                self.producer[v] = eqn
        # The backward slice of `needed`: the equations the rule must answer for.
        self.eqns: dict[int, jcore.JaxprEqn] = {}
        todo = [v for v in needed if not isinstance(v, jcore.Literal)]
        while todo:
            v = todo.pop()
            eqn = self.producer.get(v)
            if eqn is None or id(eqn) in self.eqns:
                continue
            self.eqns[id(eqn)] = eqn
            todo.extend(u for u in eqn.invars if not isinstance(u, jcore.Literal))
        self.env: dict[Any, Any] = {}
        self.base_ns: Any = None

    def start(self, consts: Sequence[Any], args: Sequence[Any]) -> None:
        self.env = dict(zip(self.jaxpr.constvars, consts, strict=True))
        self.env.update(zip(self.jaxpr.invars, args, strict=True))
        self.base_ns = current_name_stack()

    def value(self, v: Any) -> Any:
        if isinstance(v, jcore.Literal):
            return v.val
        if v not in self.env:
            self._bind(self.producer[v], [self.value(u) for u in self.producer[v].invars])
        return self.env[v]

    def reached(self, eqn: jcore.JaxprEqn, invals: list[Any]) -> list[Any]:
        """The interpreter reached a slice equation: evaluate it unless done on demand."""
        if eqn.outvars[0] not in self.env:
            self._bind(eqn, invals)
        return [self.env[v] for v in eqn.outvars]

    def _bind(self, eqn: jcore.JaxprEqn, invals: list[Any]) -> None:
        ns = self.base_ns + eqn_name_stack(eqn)
        with eqn_context(eqn, ns):
            outs = bind_eqn(eqn, [materialize(x) for x in invals])
        self.env.update(zip(eqn.outvars, outs, strict=True))


def _vector(x: Any, features: int, axis: int, dtype: Any) -> Any:
    """A per-channel operand (scalar, or size 1 / ``features`` on ``axis``) as a vector."""
    x = jnp.asarray(x, dtype)
    if x.ndim:
        x = x.reshape(x.shape[axis])
    return jnp.broadcast_to(x, (features,))


def _combine_scale(chain: Chain, cs: Sequence[Any], dtype: Any) -> Any | None:
    """``m`` with ``chain(y) == y * m + a`` from the chain's operands ``cs``; None stands for 1."""
    m: Any = None
    for step, raw in zip(chain.steps, cs, strict=True):
        if step.op in ("add", "sub"):
            continue
        c = _vector(raw, chain.features, chain.out_axis, dtype)
        if step.op == "rsub":
            m = -jnp.ones_like(c) if m is None else -m
        elif step.op == "mul":
            m = c if m is None else m * c
        else:  # div
            m = 1 / c if m is None else m / c
    return m


def _combine_shift(chain: Chain, cs: Sequence[Any], dtype: Any) -> Any | None:
    """``a`` with ``chain(y) == y * m + a`` from the chain's operands ``cs``; None stands for 0.

    ``a`` never depends on ``m``, so the two are computed separately (same operations, same
    bits as computing them together).
    """
    a: Any = None
    for step, raw in zip(chain.steps, cs, strict=True):
        if a is None and step.op in ("mul", "div"):
            continue
        c = _vector(raw, chain.features, chain.out_axis, dtype)
        if step.op == "add":
            a = c if a is None else a + c
        elif step.op == "sub":
            a = -c if a is None else a - c
        elif step.op == "rsub":
            a = c if a is None else c - a
        elif step.op == "mul":
            a = a * c
        else:  # div
            a = a / c
    return a


# ---- precomputed (stored) values ------------------------------------------------------------

#: Name prefix of a ``jit`` region computing values from parameters only, which ``convert``
#: stores (computes once in ``convert_params``) instead of recomputing them on every call. The
#: rest of the name is a JSON list of the parameter paths its outputs are stored at. It is
#: deliberately not a ``maas_*`` marker: it transforms no single parameter, so provenance must
#: not pass a parameter's tag through it.
PRECOMPUTED = "precomputed"


def precomputed_name(paths: Sequence[str]) -> str:
    """The ``jit`` name of a precomputed region whose outputs are stored at ``paths``."""
    return PRECOMPUTED + json.dumps(list(paths))


def precomputed_paths(eqn: jcore.JaxprEqn) -> tuple[str, ...] | None:
    """The stored paths of a precomputed ``jit`` equation, or None if ``eqn`` is not one."""
    if region_kind(eqn) != "jit":
        return None
    name = jit_name(eqn)
    if not name.startswith(PRECOMPUTED + "["):
        return None
    paths = json.loads(name[len(PRECOMPUTED) :])
    if len(paths) != len(eqn.outvars):
        return None
    return tuple(paths)


def _precomputed(fn: Any, paths: Sequence[str], args: Sequence[Any]) -> Any:
    """``fn(*args)`` inside a precomputed region storing its outputs at ``paths``."""

    def region(*xs: Any) -> Any:
        return fn(*xs)

    region.__name__ = region.__qualname__ = precomputed_name(paths)
    return jax.jit(region)(*args)


def _has_shift(chain: Chain) -> bool:
    return any(s.op in ("add", "sub", "rsub") for s in chain.steps)


def _stored_paths(chain: Chain, into: str, taken: set[str]) -> tuple[str, ...]:
    """Where ``convert`` stores the chain's vectors: ``<kernel path>_folded_scale`` (``m``,
    ``into="output"`` only) and ``<kernel path>_folded_bias`` (``a``), made unique."""
    names = ["folded_scale"] if into == "output" else []
    if _has_shift(chain):
        names.append("folded_bias")
    return tuple(_unique(f"{chain.kernel_path}_{n}", taken) for n in names)


def _unique(path: str, taken: set[str]) -> str:
    out, k = path, 0
    while out in taken:
        k += 1
        out = f"{path}_{k}"
    taken.add(out)
    return out


def _taken_paths(program: Program) -> set[str]:
    taken = {r.path for r in program.roles}
    for eqn in program.jaxpr.jaxpr.eqns:
        taken.update(precomputed_paths(eqn) or ())
    return taken


def _folded_program(program: Program, chains: list[Chain], into: str) -> jcore.ClosedJaxpr:
    closed = program.jaxpr
    by_contraction = {id(c.eqn): c for c in chains} if into == "kernel" else {}
    last_step = {id(c.steps[-1].eqn): c for c in chains}
    passthrough = {id(s.eqn): s for c in chains for s in c.steps[:-1]}
    sl = _Slice(closed.jaxpr, [s.other for c in chains for s in c.steps])
    taken = _taken_paths(program)
    stored = {id(c.eqn): _stored_paths(c, into, taken) for c in chains}

    def operands(chain: Chain) -> list[Any]:
        return [sl.value(s.other) for s in chain.steps]

    def at_contraction(chain: Chain, site: Site, invals: list[Any]) -> list[Any]:
        lhs, kernel = (materialize(x) for x in invals)
        with jax.named_scope(MARKER):
            m = _combine_scale(chain, operands(chain), site.eqn.outvars[0].aval.dtype)
        if m is not None:
            kernel = apply_marked(_scale_kernel(chain.kernel_axis), (kernel, m), MARKER)
        return bind_eqn(site.eqn, [lhs, kernel])

    def at_last_step(chain: Chain, invals: list[Any]) -> list[Any]:
        y = materialize(invals[chain.steps[-1].operand])
        shape = [1] * y.ndim
        shape[chain.out_axis] = chain.features
        cs = operands(chain)
        paths = stored[id(chain.eqn)]
        with jax.named_scope(MARKER):
            # The per-channel vectors depend on parameters only: a precomputed region, which
            # `convert` turns into stored inputs (so the converted program keeps neither the
            # BatchNorm statistics nor this arithmetic).
            m = a = None
            if into == "kernel":
                if _has_shift(chain):
                    a = _precomputed(lambda *c: _combine_shift(chain, c, y.dtype), paths, cs)
            else:
                if not _has_shift(chain):
                    fn = lambda *c: _combine_scale(chain, c, y.dtype)  # noqa: E731
                    m = _precomputed(fn, paths[:1], cs)
                else:
                    fn = lambda *c: (  # noqa: E731
                        _combine_scale(chain, c, y.dtype),
                        _combine_shift(chain, c, y.dtype),
                    )
                    m, a = _precomputed(fn, paths, cs)
            if m is not None:
                y = y * m.reshape(shape)
            if a is not None:
                y = y + a.reshape(shape)
        return [y]

    def rule(site: Site, invals: list[Any]) -> list[Any] | None:
        key = id(site.eqn)
        if key in by_contraction:
            return at_contraction(by_contraction[key], site, invals)
        if key in passthrough:
            return [invals[passthrough[key].operand]]
        if key in last_step:
            return at_last_step(last_step[key], invals)
        if key in sl.eqns:
            return sl.reached(site.eqn, invals)
        return None

    targets = {*by_contraction, *passthrough, *last_step, *sl.eqns}  # all at the top level
    spec = Rewrite(
        FoldBatchNorm.name,
        rule=rule,
        rule_primitives=frozenset(e.primitive.name for e in closed.jaxpr.eqns if id(e) in targets),
        wants=lambda eqn: id(eqn) in targets,
    )
    interp = Interpreter(spec)
    tags = initial_tags(program)

    def run(*flat: Any) -> list[Any]:
        sl.start(closed.consts, flat)
        outs = interp.eval(closed.jaxpr, closed.consts, list(flat), tags)
        return [materialize(v) for v in outs]

    structs = [aval_struct(v.aval) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(run)(*structs)


def _scale_kernel(axis: int) -> Any:
    """``(kernel, m) -> kernel * m`` along the kernel's output-feature ``axis``."""

    def scale(args: tuple[Any, Any]) -> Any:
        kernel, m = args
        return kernel * lax.broadcast_in_dim(m.astype(kernel.dtype), kernel.shape, (axis,))

    return scale


# ---- the pass ---------------------------------------------------------------------------

_INTO = ("kernel", "output")


@dataclasses.dataclass(frozen=True)
class FoldBatchNorm:
    """The pass :func:`fold_batchnorm` returns."""

    into: str = "kernel"
    name = "fold_batchnorm"

    def __post_init__(self) -> None:
        if self.into not in _INTO:
            raise ValueError(
                f"fold_batchnorm: into must be 'kernel' (scale the kernel) or 'output' (one "
                f"per-channel multiply-add after the contraction), got {self.into!r}"
            )

    def __repr__(self) -> str:
        return (
            "fold_batchnorm()" if self.into == "kernel" else f"fold_batchnorm(into={self.into!r})"
        )

    def __call__(self, program: Program) -> Program:
        chains = find_chains(program)
        if self.into == "output":
            # Already `y * m (+ a)`: folding again would rebuild the same form.
            chains = [c for c in chains if tuple(s.op for s in c.steps) not in _CANONICAL]
        if not chains:
            return program
        new = _folded_program(program, chains, self.into)
        touched = tuple(dict.fromkeys(c.kernel_path for c in chains))
        notes = tuple(c.describe() for c in chains)
        record = PassRecord(self.name, repr(self), touched, notes)
        return program.with_record(record, jaxpr=new)


_CANONICAL = (("mul",), ("mul", "add"))


def fold_batchnorm(into: str = "kernel") -> FoldBatchNorm:
    """Fold inference-mode BatchNorm (any per-channel affine chain) into the preceding layer.

    Finds each ``dot_general`` / convolution on a parameter kernel whose output goes only
    through a chain of per-channel ``add``/``sub``/``mul``/``div`` by parameter-only values
    (``BatchNorm(use_running_average=True)``, NNX ``BatchNorm`` in eval mode, a preceding bias
    add, a learnt per-channel scale) and rewrites the chain ``y * m + a``:

    * ``into="kernel"`` (default): the contraction consumes ``kernel * m`` (inside a ``jit``
      named ``maas_fold_batchnorm``, so later passes still see the kernel parameter there) and
      the chain becomes one ``add a``. This is classic folding.
    * ``into="output"``: the kernel is left as it is and the chain becomes one per-channel
      multiply-add ``y * m + a`` after the contraction.

    A later ``fake_quant`` quantizes the folded kernel ``kernel * m`` (weight transforms apply
    after the markers of earlier passes), so the folded contraction runs on integers.

    The program's signature is unchanged: the BatchNorm statistics stay inputs and are read
    to compute ``m`` and ``a``. The vectors added after the contraction are computed in a
    ``jit`` named ``precomputed[...]``, which ``convert`` stores (as
    ``<kernel path>_folded_bias``, and ``_folded_scale`` for ``into="output"``), dropping the
    BatchNorm arrays nothing else reads.

    Args:
      into: ``"kernel"`` or ``"output"`` (see above).

    Returns:
      A pass. A program with nothing to fold is returned unchanged (the same object), so the
      pass is idempotent.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import maas_jax
    >>> from maas_jax import passes
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.BatchNorm(use_running_average=True)(nn.Dense(3)(x))
    >>> x = jnp.ones((2, 4))
    >>> variables = Net().init(jax.random.key(0), x)
    >>> prog = maas_jax.trace_linen(Net(), variables, x)
    >>> folded = passes.fold_batchnorm()(prog)
    >>> folded.history[-1].touched
    ('params/Dense_0/kernel',)
    >>> bool(jnp.allclose(folded(variables, x), prog(variables, x), atol=1e-6))
    True
    >>> passes.fold_batchnorm()(folded) is folded
    True
    """
    return FoldBatchNorm(into)
