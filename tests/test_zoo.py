"""Sanity tests of the model zoo itself (independent of maas_jax).

If these fail, engine tests that compare against the zoo prove nothing.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr
from zoo import (
    BATCH,
    MODEL_NAMES,
    ZooModel,
    by_name,
    map_params,
    param_paths,
    traced_weight_paths,
    zoo,
)

names = pytest.mark.parametrize("name", MODEL_NAMES)


@functools.cache
def _jitted(name: str):
    return jax.jit(by_name(name).fn)


def _run(m: ZooModel, params=None):
    """``m``'s output (compiled once per model) for ``params`` (default: its own)."""
    return _jitted(m.name)(m.params if params is None else params, *m.inputs)


def _max_abs_diff(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True))


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _loss(fn, inputs):
    def loss(params):
        return sum(jnp.sum(y) for y in jax.tree.leaves(fn(params, *inputs)))

    return loss


# ------------------------------------------------------------------------------------------
# The catalogue
# ------------------------------------------------------------------------------------------


def test_names_and_lookup():
    models = zoo()
    assert [m.name for m in models] == list(MODEL_NAMES)
    assert len(set(MODEL_NAMES)) == len(MODEL_NAMES) == 10
    assert by_name("linen_mlp") is by_name("linen_mlp")  # cached: built once
    with pytest.raises(KeyError, match="no zoo model"):
        by_name("nope")


@names
def test_params_and_inputs_are_concrete(name):
    m = by_name(name)
    leaves = jax.tree.leaves(m.params)
    assert leaves
    for x in leaves:
        assert isinstance(x, jax.Array) and x.dtype == jnp.float32
    for x in m.inputs:
        assert isinstance(x, jax.Array)
    if m.vmappable:
        assert m.batch_inputs is not None and len(m.batch_inputs) == len(m.inputs)
        for xb, x in zip(m.batch_inputs, m.inputs, strict=True):
            assert xb.shape == (BATCH, *x.shape) and xb.dtype == x.dtype
    else:
        assert m.batch_inputs is None


# ------------------------------------------------------------------------------------------
# Every model runs, is finite, and jit == eager
# ------------------------------------------------------------------------------------------


@names
def test_runs_finite_and_jit_matches_eager(name):
    m = by_name(name)
    eager = m.fn(m.params, *m.inputs)
    assert jax.tree.leaves(eager)
    assert _all_finite(eager)
    jitted = _run(m)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@names
def test_jaxpr_is_traceable_and_closed(name):
    m = by_name(name)
    closed = jax.make_jaxpr(m.fn)(m.params, *m.inputs)
    n_params = len(jax.tree.leaves(m.params))
    assert len(closed.jaxpr.invars) == n_params + len(m.inputs)


# ------------------------------------------------------------------------------------------
# Differentiability
# ------------------------------------------------------------------------------------------


@names
def test_derivatives_finite(name):
    m = by_name(name)
    loss = _loss(m.fn, m.inputs)
    if m.has_while:
        with pytest.raises(ValueError, match="[Rr]everse-mode"):
            jax.grad(loss)(m.params)
        tangent = map_params(m.params, lambda _, x: jnp.ones_like(x))
        primal, tan = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(m.params, tangent)
        assert _all_finite((primal, tan))
        assert float(jnp.abs(tan)) > 0
        return
    grads = jax.jit(jax.grad(loss))(m.params)
    assert jax.tree.structure(grads) == jax.tree.structure(m.params)
    assert _all_finite(grads)
    by_path = dict(zip(param_paths(grads), jax.tree.leaves(grads), strict=True))
    assert any(float(jnp.max(jnp.abs(by_path[p]))) > 0 for p in m.weight_paths)


# ------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------


@names
def test_vmap_matches_per_example(name):
    m = by_name(name)
    if not m.vmappable:
        pytest.skip("not vmappable")
    in_axes = (None,) + (0,) * len(m.inputs)
    batched = jax.jit(jax.vmap(m.fn, in_axes=in_axes))(m.params, *m.batch_inputs)
    f = _jitted(name)
    for b in range(BATCH):
        one = f(m.params, *(x[b] for x in m.batch_inputs))
        got = jax.tree.map(lambda y, b=b: y[b], batched)
        assert _max_abs_diff(one, got) < 1e-5


# ------------------------------------------------------------------------------------------
# Param paths and weight_paths
# ------------------------------------------------------------------------------------------


@names
def test_weight_paths_exist(name):
    m = by_name(name)
    paths = param_paths(m.params)
    assert len(paths) == len(set(paths)) == len(jax.tree.leaves(m.params))
    assert m.weight_paths and len(set(m.weight_paths)) == len(m.weight_paths)
    assert set(m.weight_paths) <= set(paths), set(m.weight_paths) - set(paths)
    for p in paths:
        assert "value" not in p.split("/"), p


@names
def test_weight_paths_are_exactly_the_matmul_conv_operands(name):
    m = by_name(name)
    assert traced_weight_paths(m) == set(m.weight_paths)


@names
def test_each_weight_is_used(name):
    """Zeroing any one listed weight changes the output: every weight is really consumed."""
    m = by_name(name)
    base = _run(m)
    for w in m.weight_paths:
        zeroed = map_params(m.params, lambda p, x, w=w: x * 0 if p == w else x)
        assert _max_abs_diff(base, _run(m, zeroed)) > 1e-4, w


@names
def test_clipping_weights_changes_output(name):
    """Clip tests (``|w| <= 0.5``) on the zoo cannot pass vacuously."""
    m = by_name(name)
    wp = set(m.weight_paths)
    leaves = dict(zip(param_paths(m.params), jax.tree.leaves(m.params), strict=True))
    for p in wp:
        assert float(jnp.max(jnp.abs(leaves[p]))) > 1.0, f"{p} has no large entries"
    clipped = map_params(m.params, lambda p, x: jnp.clip(x, -0.5, 0.5) if p in wp else x)
    assert _max_abs_diff(_run(m), _run(m, clipped)) > 1e-3


def test_param_path_convention():
    cnn = param_paths(by_name("linen_cnn_bn").params)
    assert "batch_stats/BatchNorm_0/mean" in cnn and "batch_stats/BatchNorm_0/var" in cnn
    assert "params/Conv_0/kernel" in cnn
    tf = param_paths(by_name("linen_scan_remat_transformer").params)
    assert "params/layers/q/kernel" in tf and "params/embed/embedding" in tf
    assert param_paths(by_name("nnx_mlp").params)[:2] == ["bn/bias", "bn/mean"]
    assert "l1/kernel" in param_paths(by_name("nnx_mlp").params)
    assert param_paths({"a": [jnp.zeros(1), {"b": jnp.zeros(1)}]}) == ["a/0", "a/1/b"]


def test_boxes_are_kept():
    tf = by_name("linen_scan_remat_transformer").params
    boxes = [
        x
        for x in jax.tree.leaves(tf, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        if isinstance(x, nn.LogicallyPartitioned)
    ]
    assert len(boxes) == 7  # q, k, v, o, mlp_in, mlp_out (stacked) and head kernels
    q = tf["params"]["layers"]["q"]["kernel"]
    assert isinstance(q, nn.LogicallyPartitioned)
    assert q.names == ("layers", "embed", "heads") and q.value.shape == (3, 16, 16)
    state = by_name("nnx_mlp").params
    assert isinstance(state, nnx.State)
    assert isinstance(state["l1"]["kernel"], nnx.Param)
    assert isinstance(state["bn"]["mean"], nnx.BatchStat)


# ------------------------------------------------------------------------------------------
# map_params
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linen_scan_remat_transformer", "nnx_mlp", "linen_cnn_bn"])
def test_map_params_preserves_structure_and_boxes(name):
    m = by_name(name)
    seen = []

    def record(path, x):
        seen.append(path)
        return x

    same = map_params(m.params, record)
    assert seen == param_paths(m.params)
    assert jax.tree.structure(same) == jax.tree.structure(m.params)
    assert type(same) is type(m.params)
    assert _max_abs_diff(same, m.params) == 0.0

    target = m.weight_paths[0]
    clipped = map_params(m.params, lambda p, x: jnp.clip(x, -0.5, 0.5) if p == target else x)
    assert jax.tree.structure(clipped) == jax.tree.structure(m.params)
    old = dict(zip(param_paths(m.params), jax.tree.leaves(m.params), strict=True))
    new = dict(zip(param_paths(clipped), jax.tree.leaves(clipped), strict=True))
    for p in old:
        if p == target:
            assert float(jnp.max(jnp.abs(new[p]))) <= 0.5
            assert not bool(jnp.array_equal(new[p], old[p]))
        else:
            assert new[p] is old[p]
    # the mapped params still run through the model
    assert _all_finite(_run(m, clipped))


def test_map_params_on_plain_pytrees():
    tree = {"w": jnp.ones((2, 2)), "layers": [jnp.ones(3), (jnp.zeros(1),)]}
    out = map_params(tree, lambda p, x: x + len(p))
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    assert float(out["w"][0, 0]) == 2.0
    assert float(out["layers"][0][0]) == 1.0 + len("layers/0")
    assert float(out["layers"][1][0][0]) == len("layers/1/0")


# ------------------------------------------------------------------------------------------
# Each model really exercises the construct it is named after
# ------------------------------------------------------------------------------------------


def _prim_paths(jaxpr, prefix=()) -> set[tuple[str, ...]]:
    """Every (enclosing higher-order primitives..., primitive) chain in ``jaxpr``."""
    out = set()
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        chain = (*prefix, eqn.primitive.name)
        out.add(chain)
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                if isinstance(sub, ClosedJaxpr | Jaxpr):
                    out |= _prim_paths(sub, chain)
    return out


_JIT = {"jit", "pjit"}
_REMAT = {"remat2", "checkpoint", "remat"}
_PSUM = {"psum", "psum_invariant"}


def _has(chains, *pattern) -> bool:
    """Some chain contains ``pattern`` (sets of alternative names) as a contiguous run."""
    pats = [p if isinstance(p, set) else {p} for p in pattern]
    for c in chains:
        for i in range(len(c) - len(pats) + 1):
            if all(c[i + k] in pats[k] for k in range(len(pats))):
                return True
    return False


def test_models_exercise_their_constructs():
    def chains(name):
        m = by_name(name)
        return _prim_paths(jax.make_jaxpr(m.fn)(m.params, *m.inputs))

    c = chains("linen_cnn_bn")
    assert _has(c, "conv_general_dilated")
    c = chains("linen_scan_remat_transformer")
    assert _has(c, "scan", _REMAT, "dot_general")
    c = chains("pure_control_flow")
    assert _has(c, "scan", "dot_general")  # scan closing over w1
    assert _has(c, "scan", "cond", "dot_general")
    assert _has(c, "cond", "dot_general")
    assert _has(c, "while", "dot_general")
    c = chains("pure_scan_cond")
    assert _has(c, "scan", "cond", "dot_general") and not _has(c, "while")
    c = chains("tied_embeddings")
    assert _has(c, "gather") and _has(c, "dot_general")
    c = chains("custom_vjp")
    assert _has(c, "custom_vjp_call", "dot_general") and _has(c, "custom_jvp_call")
    c = chains("nested_jit")
    assert _has(c, _JIT, _JIT, "dot_general")
    c = chains("shard_map_8dev")
    # with check_vma (the default) psum / pmean of a varying value trace as psum_invariant
    assert _has(c, "shard_map", "dot_general") and _has(c, "shard_map", _PSUM)

    m = by_name("shard_map_8dev")
    (eqn,) = [
        e
        for e in jax.make_jaxpr(m.fn)(m.params, *m.inputs).jaxpr.eqns
        if e.primitive.name == "shard_map"
    ]
    mesh = eqn.params["mesh"]
    assert mesh.size == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
