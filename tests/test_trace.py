"""Tracing: roles and paths, calling convention, composition with jax transforms, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maas_jax
from maas_jax import InputRef, ParamRef, ProgramCallError, TraceError


class _Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        h = nn.Dense(8, kernel_init=init)(x)
        h = nn.BatchNorm(use_running_average=True)(h)
        return nn.Dense(2)(nn.relu(h))


def test_linen_roles_paths_collections_and_logical_axes():
    model = _Boxed()
    x = jnp.ones((3, 4))
    variables = model.init(jax.random.key(0), x)
    prog = maas_jax.trace_linen(model, variables, x)
    by_path = {r.path: r for r in prog.roles}
    # Box suffixes stripped; hand-written expected list.
    assert set(prog.param_paths) == {
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
        "params/BatchNorm_0/bias",
        "params/BatchNorm_0/scale",
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    }
    k = by_path["params/Dense_0/kernel"]
    assert k == ParamRef(
        "params/Dense_0/kernel", "params", (4, 8), np.dtype("float32"), ("embed", "mlp")
    )
    assert k.trainable
    assert by_path["batch_stats/BatchNorm_0/mean"].collection == "batch_stats"
    assert not by_path["batch_stats/BatchNorm_0/mean"].trainable
    assert by_path["params/Dense_1/kernel"].logical_axes is None
    assert by_path["args/0"] == InputRef("args/0", (3, 4), np.dtype("float32"))
    np.testing.assert_array_equal(prog(variables, x), model.apply(variables, x))


def test_nnx_roles_are_variable_types():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.lin(x))

    model = Net(nnx.Rngs(0))
    x = jnp.ones((2, 4))
    prog, state = maas_jax.trace_nnx(model, x)
    colls = {r.path: r.collection for r in prog.params}
    assert colls == {
        "bn/bias": "Param",
        "bn/mean": "BatchStat",
        "bn/scale": "Param",
        "bn/var": "BatchStat",
        "lin/bias": "Param",
        "lin/kernel": "Param",
    }
    np.testing.assert_array_equal(prog(state, x), model(x))


def test_pure_function_program_is_bit_exact_and_composes():
    def f(p, x, y):
        return {"out": jnp.tanh(x @ p["w"]) * y + p["b"], "aux": (x.sum(),)}

    params = {"w": jax.random.normal(jax.random.key(1), (5, 3)), "b": jnp.arange(3.0)}
    x, y = jax.random.normal(jax.random.key(2), (4, 5)), jnp.float32(2.0)
    prog = maas_jax.trace(f, params, x, y)
    assert [r.path for r in prog.roles] == ["b", "w", "args/0", "args/1"]
    assert all(r.collection == "params" for r in prog.params)
    got, want = prog(params, x, y), f(params, x, y)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    jax.tree.map(
        np.testing.assert_array_equal, jax.jit(prog)(params, x, y), jax.jit(f)(params, x, y)
    )

    def loss(fn):
        return lambda p: jnp.sum(fn(p, x, y)["out"] ** 2)

    jax.tree.map(
        np.testing.assert_array_equal, jax.grad(loss(prog))(params), jax.grad(loss(f))(params)
    )
    xs = jnp.stack([x, 2 * x, 3 * x])
    batched = jax.vmap(prog, in_axes=(None, 0, None))(params, xs, y)
    ref = jax.vmap(f, in_axes=(None, 0, None))(params, xs, y)
    jax.tree.map(np.testing.assert_array_equal, batched, ref)
    assert maas_jax.to_fn(prog)(params, x, y)["out"].shape == (4, 3)


def test_trace_from_abstract_shapes():
    params = {"w": jax.ShapeDtypeStruct((5, 3), jnp.float32)}
    prog = maas_jax.trace(
        lambda p, x: x @ p["w"], params, jax.ShapeDtypeStruct((2, 5), jnp.float32)
    )
    w = jnp.ones((5, 3))
    np.testing.assert_array_equal(prog({"w": w}, jnp.ones((2, 5))), jnp.full((2, 3), 5.0))


def test_non_array_leaf_is_a_clear_error():
    with pytest.raises(TraceError, match=r"leaf 'params/act' is a str.*functools.partial"):
        maas_jax.trace(lambda p, x: x, {"params": {"act": "relu", "w": jnp.ones(2)}}, jnp.ones(2))
    with pytest.raises(TraceError, match=r"leaf 'args/1' is a object"):
        maas_jax.trace(lambda p, x, y: x, {"w": jnp.ones(2)}, jnp.ones(2), object())


def test_calling_with_other_shapes_or_structure_is_a_clear_error():
    prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 2))}, jnp.ones((3, 4)))
    with pytest.raises(
        ProgramCallError,
        match=r"argument args/0 was traced as float32\[3,4\] but got float32\[5,4\]",
    ):
        prog({"w": jnp.ones((4, 2))}, jnp.ones((5, 4)))
    with pytest.raises(
        ProgramCallError, match=r"argument w was traced as float32\[4,2\] but got int32\[4,2\]"
    ):
        prog({"w": jnp.ones((4, 2), jnp.int32)}, jnp.ones((3, 4)))
    with pytest.raises(ProgramCallError, match="structured as"):
        prog({"w": jnp.ones((4, 2)), "extra": jnp.ones(1)}, jnp.ones((3, 4)))


def test_nnx_declared_logical_axes_are_kept():
    import flax

    old = flax.config.flax_always_shard_variable
    flax.config.update("flax_always_shard_variable", False)  # no mesh here: keep names only
    try:
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        lin = nnx.Linear(4, 8, kernel_init=init, rngs=nnx.Rngs(0))
    finally:
        flax.config.update("flax_always_shard_variable", old)
    prog, _ = maas_jax.trace_nnx(lin, jnp.ones((1, 4)))
    assert {r.path: r.logical_axes for r in prog.params} == {
        "bias": None,
        "kernel": ("embed", "mlp"),
    }
