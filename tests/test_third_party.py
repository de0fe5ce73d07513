"""maas_jax passes on tiny models built by real third-party libraries.

Equinox, Keras 3 (JAX backend), keras-hub and penzai each build their models their own way
(module pytrees, ``stateless_call``, named arrays, ``vmap``-ed linears, ``LayerStack`` scans);
``third_party_models`` turns each into a pure ``fn(params, *inputs)``. For every model:

1. the identity pipeline reproduces ``fn`` bit for bit;
2. ``clip_weights`` equals ``fn`` on parameters clipped by hand with numpy;
3. w8a8 ``fake_quant`` -> ``convert``: the integer program equals the fake-quant program bit
   for bit, stays close to float, and every contraction with a weight operand runs on int8;
4. gradients flow through the fake-quant program to every quantized weight;
5. the default ``fake_quant`` leaves no weight contraction untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Literal, jaxprs_in_params
from third_party_models import MODEL_NAMES, build

import maas_jax
from maas_jax import passes

BOUND = 0.05  # clip_weights bound: below most initial weights of these tiny models
CONTRACTIONS = ("dot_general", "conv_general_dilated")

names = pytest.mark.parametrize("name", MODEL_NAMES)


# ------------------------------------------------------------------------------------------
# Helpers (independent of maas_jax)
# ------------------------------------------------------------------------------------------


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)``: pytree key paths joined with ``/`` (``layers/0/weight``)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = ["/".join(_key_str(k) for k in kp) for kp, _ in flat]
    assert len(set(paths)) == len(paths), paths
    return paths, [leaf for _, leaf in flat], treedef


def _map_by_path(tree: Any, f) -> Any:
    """``tree`` with each leaf replaced by ``f(path, leaf)``."""
    paths, leaves, treedef = _paths_and_leaves(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [f(p, x) for p, x in zip(paths, leaves, strict=True)]
    )


def _flat_out(tree: Any) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _assert_trees_equal(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


@dataclasses.dataclass(frozen=True)
class Contraction:
    """One dot_general / conv_general_dilated found by :func:`contractions`."""

    where: str  # equation indices and primitives from the top jaxpr down
    operand_dtypes: tuple[str, ...]
    preferred_element_type: str | None
    from_weight: bool  # an operand is computed from parameters only (no model input)

    @property
    def on_integers(self) -> bool:
        return self.operand_dtypes == ("int8", "int8") and self.preferred_element_type == "int32"


_PARAM, _INPUT = 1, 2  # dependency bits of a jaxpr variable


def contractions(closed: Any, n_params: int) -> list[Contraction]:
    """Every contraction in ``closed`` (recursively) and whether an operand is a weight.

    A dependency analysis: each variable records whether it depends on the parameters (the
    first ``n_params`` inputs) and/or on the model inputs (the rest). An operand "derives from
    a weight" when it depends on parameters only: the weight itself, any view of it, or its
    dequantization ``q * scale`` -- but not an activation such as ``x @ w + b``. Regions
    (jit, scan with its carries, while, cond, remat, custom_jvp/vjp, shard_map) are entered
    by matching their body's inputs to the equation's operands.
    """
    jaxpr = closed.jaxpr
    bits = [_PARAM] * n_params + [_INPUT] * (len(jaxpr.invars) - n_params)
    found: dict[str, Contraction] = {}
    _walk(jaxpr, bits, "", found)
    return list(found.values())


def _walk(jaxpr: Any, in_bits: list[int], where: str, found: dict[str, Contraction]) -> list[int]:
    env = dict(zip(jaxpr.invars, in_bits, strict=True))

    def read(a: Any) -> int:
        return 0 if isinstance(a, Literal) else env.get(a, 0)  # constvars: 0

    for i, eqn in enumerate(jaxpr.eqns):
        ins = [read(v) for v in eqn.invars]
        here = f"{where}/{i}:{eqn.primitive.name}"
        if eqn.primitive.name in CONTRACTIONS:
            pref = eqn.params.get("preferred_element_type")
            found[here] = Contraction(
                here,
                tuple(np.dtype(v.aval.dtype).name for v in eqn.invars[:2]),
                None if pref is None else np.dtype(pref).name,
                _PARAM in ins[:2] and _sums(eqn),
            )
        outs = _region(eqn, ins, here, found)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _sums(eqn: Any) -> bool:
    """False for a dot_general that contracts nothing: a broadcast product (penzai applies a
    norm's scale that way), not a matmul with a weight."""
    if eqn.primitive.name != "dot_general":
        return True
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    return bool(lhs_contracting)


def _or(a: list[int], b: list[int]) -> list[int]:
    return [x | y for x, y in zip(a, b, strict=True)]


def _region(eqn: Any, ins: list[int], here: str, found: dict[str, Contraction]) -> list[int]:
    """Dependency bits of ``eqn``'s outputs, walking its bodies (if any) for contractions."""
    subs = list(jaxprs_in_params(eqn.params))
    union = functools.reduce(lambda a, b: a | b, ins, 0)
    n_out = len(eqn.outvars)
    name = eqn.primitive.name
    if not subs:
        return [union] * n_out
    if name == "scan":  # operands: consts, initial carries, xs (sliced); to a fixpoint
        nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
        bits = list(ins)
        while True:
            outs = _walk(subs[0], bits, here, found)
            new = bits[:nc] + _or(bits[nc : nc + nk], outs[:nk]) + bits[nc + nk :]
            if new == bits:
                return outs
            bits = new
    if name == "while":
        cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
        while True:
            outs = _walk(eqn.params["body_jaxpr"].jaxpr, bconsts + carry, here + "/body", found)
            _walk(eqn.params["cond_jaxpr"].jaxpr, cconsts + carry, here + "/cond", found)
            new = _or(carry, outs)
            if new == carry:
                return carry
            carry = new
    if name == "cond":
        outs = [ins[0]] * n_out
        for k, branch in enumerate(subs):
            outs = _or(outs, _walk(branch, ins[1:], f"{here}/branch{k}", found))
        return outs
    # Call-like regions (jit, remat, custom_jvp/vjp, shard_map): body inputs = operands.
    result = None
    for k, sub in enumerate(subs):
        if len(sub.invars) == len(ins):
            outs = _walk(sub, ins, f"{here}/{k}", found)
            if len(outs) == n_out:
                result = outs if result is None else _or(result, outs)
        else:  # unknown calling convention: every input may depend on everything
            _walk(sub, [union] * len(sub.invars), f"{here}/{k}", found)
    return result if result is not None else [union] * n_out


def _weight_sites(program: maas_jax.Program) -> list[maas_jax.CoverageEntry]:
    """maas_jax's coverage entries with a parameter operand (the weight contractions)."""
    return [e for e in maas_jax.coverage(program) if e.has_param]


# ------------------------------------------------------------------------------------------
# Traced programs (built once per model)
# ------------------------------------------------------------------------------------------


@functools.cache
def _program(name: str) -> maas_jax.Program:
    fn, params, inputs = build(name)
    return maas_jax.trace(fn, params, *inputs)


@functools.cache
def _w8a8(name: str) -> maas_jax.Program:
    return passes.fake_quant("int8", act="int8")(_program(name))


@functools.cache
def _jitted_fn(name: str):
    return jax.jit(build(name)[0])


@functools.cache
def _reference_out(name: str) -> Any:
    """``jax.jit(fn)(params, *inputs)``: the float output every test compares against."""
    _, params, inputs = build(name)
    return _jitted_fn(name)(params, *inputs)


# ------------------------------------------------------------------------------------------
# 1. identity
# ------------------------------------------------------------------------------------------


@names
def test_identity_pipeline_is_bit_exact(name):
    """``pipeline()(program)`` == ``fn`` bit for bit, both under ``jax.jit``.

    The traced jaxpr must be ``fn``'s own computation: same jaxpr, same HLO, same bits.
    """
    _, params, inputs = build(name)
    out = maas_jax.pipeline()(_program(name))
    _assert_trees_equal(jax.jit(out)(params, *inputs), _reference_out(name))


# ------------------------------------------------------------------------------------------
# 2. clip_weights
# ------------------------------------------------------------------------------------------


@names
def test_clip_weights_equals_fn_on_hand_clipped_params(name):
    """``clip_weights(0.05)`` == ``fn`` on params whose touched leaves are clipped with numpy
    (both jitted, to 1e-6).

    The touched set is what the pass reports (``history[-1].touched``); it must name real
    parameter paths, include every parameter that a contraction consumes (the default
    selection), and clipping must change the output (else the comparison proves nothing).
    """
    _, params, inputs = build(name)
    prog = _program(name)
    out = passes.clip_weights(BOUND)(prog)
    touched = set(out.history[-1].touched)
    paths, _, _ = _paths_and_leaves(params)
    assert touched and touched <= set(paths), sorted(touched - set(paths))

    def clip(path, x):
        if path not in touched:
            return x
        return jnp.asarray(np.clip(np.asarray(x), -BOUND, BOUND))

    clipped = _map_by_path(params, clip)
    want = _jitted_fn(name)(clipped, *inputs)
    got = jax.jit(out)(params, *inputs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
    assert not np.allclose(_flat_out(want), _flat_out(_reference_out(name)), atol=1e-4)
    consumed = {
        path
        for e in _weight_sites(prog)
        for o in e.operands
        if o not in ("activation", "constant")
        for path in o.split("+")
    }
    assert consumed <= touched, sorted(consumed - touched)


# ------------------------------------------------------------------------------------------
# 3. w8a8: fake quant -> convert
# ------------------------------------------------------------------------------------------


@pytest.mark.slow  # eager fake-quant compiles op by op: `make test-slow` (CI runs it)
@names
def test_w8a8_converted_is_exact_close_and_runs_on_integers(name):
    """Converted w8a8 == fake-quant bit for bit (eager); cosine to float > 0.99; int8 dots.

    Every dot_general / conv_general_dilated of the converted jaxpr (recursively, inside
    scan / jit / ... bodies) with an operand computed from parameters only must take int8 x
    int8 operands with ``preferred_element_type=int32``, and there must be as many of them as
    the float program has weight contractions (``coverage`` entries with a parameter operand).
    """
    _, params, inputs = build(name)
    prog = _program(name)
    fq = _w8a8(name)
    int_prog = passes.convert()(fq)
    stored = passes.convert_params(int_prog, fq, params)

    fake = fq(params, *inputs)
    _assert_trees_equal(int_prog(stored, *inputs), fake)

    a, b = _flat_out(fake), _flat_out(_reference_out(name))
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine > 0.99, cosine

    n_weight_sites = len(_weight_sites(prog))
    assert n_weight_sites > 0
    sites = contractions(int_prog.jaxpr, len(jax.tree.leaves(stored)))
    weight_sites = [c for c in sites if c.from_weight]
    on_floats = [c for c in weight_sites if not c.on_integers]
    assert not on_floats, "\n".join(map(str, on_floats))
    assert len(weight_sites) == n_weight_sites, (len(weight_sites), n_weight_sites)
    # The independent dataflow and maas_jax's coverage agree on the float program.
    float_sites = contractions(prog.jaxpr, len(jax.tree.leaves(params)))
    assert sum(c.from_weight for c in float_sites) == n_weight_sites


# ------------------------------------------------------------------------------------------
# 4. gradients through fake quant
# ------------------------------------------------------------------------------------------


@pytest.mark.slow  # eager fake-quant compiles op by op: `make test-slow` (CI runs it)
@names
def test_grad_through_fake_quant_reaches_quantized_weights(name):
    """``jax.grad`` of ``sum(fq(params, *inputs) * r)`` (fixed random ``r``) w.r.t. the float
    parameters is finite everywhere and nonzero for every weight fake_quant quantized."""
    _, params, inputs = build(name)
    fq = _w8a8(name)
    quantized = fq.history[-1].touched
    assert quantized
    paths, leaves, treedef = _paths_and_leaves(params)
    floats = {p: x for p, x in zip(paths, leaves, strict=True) if _is_float(x)}
    assert set(quantized) <= set(floats)
    out_leaves = jax.tree.leaves(_reference_out(name))
    keys = jax.random.split(jax.random.key(7), len(out_leaves))
    weights = [jax.random.normal(k, jnp.shape(y)) for k, y in zip(keys, out_leaves, strict=True)]

    def loss(float_params):
        full = [float_params.get(p, x) for p, x in zip(paths, leaves, strict=True)]
        out = fq(jax.tree_util.tree_unflatten(treedef, full), *inputs)
        return sum(jnp.sum(y * w) for y, w in zip(jax.tree.leaves(out), weights, strict=True))

    grads = jax.jit(jax.grad(loss))(floats)
    bad = [p for p, g in grads.items() if not np.all(np.isfinite(g))]
    assert not bad, bad
    zero = [p for p in quantized if not np.any(np.asarray(grads[p]) != 0)]
    assert not zero, zero


# ------------------------------------------------------------------------------------------
# 5. coverage
# ------------------------------------------------------------------------------------------


@names
def test_default_fake_quant_touches_every_weight_contraction(name):
    """After ``fake_quant()`` (default rule) no contraction with a parameter operand is
    untouched in ``maas_jax.coverage``."""
    fq = passes.fake_quant()(_program(name))
    sites = _weight_sites(fq)
    assert sites
    untouched = [e for e in sites if not e.touched]
    assert not untouched, maas_jax.coverage_report(fq)
