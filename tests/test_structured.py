"""Structured pruning: shapes shrink; outputs equal the dense model with those channels zeroed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from maas_jax.passes.prune import StructuredPruningError

import maas_jax
from maas_jax import passes


def _mlp_params(key=0):
    k = jax.random.split(jax.random.key(key), 6)
    return {
        "w1": jax.random.normal(k[0], (8, 16)),
        "b1": jax.random.normal(k[1], (16,)),
        "w2": jax.random.normal(k[2], (16, 12)),
        "b2": jax.random.normal(k[3], (12,)),
        "w3": jax.random.normal(k[4], (12, 3)),
    }


def _mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jnp.tanh(jax.jit(lambda a: a @ p["w2"])(h) + p["b2"])
    return h @ p["w3"]


def _zero_dropped(plan, params):
    """The independent reference: the dense parameters with the dropped channels zeroed."""
    by_path = dict(plan.slices)
    out = {}
    for path, value in params.items():
        value = np.array(value)
        for axis, g in by_path.get(path, ()):
            group = plan.groups[g]
            dropped = sorted(set(range(group.size)) - set(group.keep))
            idx = [slice(None)] * value.ndim
            idx[axis] = dropped
            value[tuple(idx)] = 0.0
        out[path] = jnp.asarray(value)
    return out


def test_mlp_hidden_units_shrink_and_match_zeroed_dense_model():
    params = _mlp_params()
    x = jax.random.normal(jax.random.key(9), (5, 8))
    prog = maas_jax.trace(_mlp, params, x)
    plan = passes.channel_plan(prog, params, sparsity=0.5)
    assert {g.producer: len(g.keep) for g in plan.groups} == {"w1": 8, "w2": 6}
    assert any("w3" in s for s in plan.skipped)  # its channels are the model's output
    small = passes.prune_channels(plan)(prog)
    small_params = plan.shrink_params(params)
    assert {r.path: r.shape for r in small.params} == {
        "b1": (8,), "b2": (6,), "w1": (8, 8), "w2": (8, 6), "w3": (6, 3)
    }  # fmt: skip
    ref = _mlp(_zero_dropped(plan, params), x)
    np.testing.assert_allclose(small(small_params, x), ref, atol=1e-5)
    # kept channels are the largest-norm columns (hand check on w1)
    norms = np.linalg.norm(np.asarray(params["w1"]), axis=0)
    assert set(plan.groups[0].keep) == set(np.argsort(-norms)[:8])


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8)(x)  # depthwise: channels pass through
        x = nn.relu(x)
        x = nn.Conv(4, (3, 3))(x)
        return x.mean(axis=(1, 2))


def test_conv_batchnorm_depthwise_channels_shrink():
    model = _CNN()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    variables = model.init(jax.random.key(1), x)
    stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    prog = maas_jax.trace_linen(model, variables, x)
    plan = passes.channel_plan(prog, variables, sparsity=0.5, where=r"Conv_0/kernel")
    small = passes.prune_channels(plan)(prog)
    shapes = {r.path: r.shape for r in small.params}
    assert shapes["params/Conv_0/kernel"] == (3, 3, 3, 4)
    assert shapes["batch_stats/BatchNorm_0/mean"] == (4,)
    assert shapes["params/Conv_1/kernel"] == (3, 3, 1, 4)  # depthwise kernel: out axis
    assert shapes["params/Conv_2/kernel"] == (3, 3, 4, 4)
    flat = {leaf.path: leaf.value for leaf in maas_jax._paths.flatten_leaves(variables)}
    zeroed = _zero_dropped(plan, flat)
    ref_vars = jax.tree.unflatten(jax.tree.structure(variables), [zeroed[p] for p in flat])
    np.testing.assert_allclose(
        small(plan.shrink_params(variables), x), model.apply(ref_vars, x), atol=1e-5
    )


def test_channels_into_layernorm_are_a_clear_error():
    def f(p, x):
        h = x @ p["w1"]
        h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-5)
        return h @ p["w2"]

    params = {"w1": jnp.ones((4, 6)), "w2": jnp.ones((6, 2))}
    prog = maas_jax.trace(f, params, jnp.ones((3, 4)))
    with pytest.raises(StructuredPruningError, match=r"'w1'.*reduces over the channels"):
        passes.channel_plan(prog, params, sparsity=0.5, where="w1")
    plan = passes.channel_plan(prog, params, sparsity=0.5)  # default: skipped, with the reason
    assert not plan.groups and any("reduces over the channels" in s for s in plan.skipped)
    assert passes.prune_channels(plan)(prog) is prog


def test_residual_and_output_channels_are_errors():
    def residual(p, x):
        return (x @ p["w"] + x) @ p["v"]

    params = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 2))}
    prog = maas_jax.trace(residual, params, jnp.ones((3, 4)))
    with pytest.raises(StructuredPruningError, match=r"'w'.*mixes them with an input"):
        passes.channel_plan(prog, params, sparsity=0.5, where="^w$")
    with pytest.raises(StructuredPruningError, match=r"'v'.*reach the program's output"):
        passes.channel_plan(prog, params, sparsity=0.5, where="^v$")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        passes.channel_plan(prog, params, sparsity=1.0)
