"""clip_weights and dce: numerics vs numpy, selection rules, idempotence, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maas_jax
from maas_jax import Op, SelectionError, UnusedRuleWarning, passes


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="up")(x))
        h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(4, name="down")(h)


@pytest.fixture
def net():
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (3, 8))
    variables = model.init(jax.random.key(1), x)
    # Large outliers so clipping matters; bias and LayerNorm scale too, to test defaults.
    variables = jax.tree.map(lambda v: v * 4.0, variables)
    return model, variables, x


def _clip_paths(variables, paths, m):
    from maas_jax._paths import flatten_leaves

    leaves = [
        np.clip(np.asarray(leaf.value), -m, m) if leaf.path in paths else leaf.value
        for leaf in flatten_leaves(variables)
    ]
    return jax.tree.unflatten(jax.tree.structure(variables), leaves)


def test_default_selection_is_matmul_weights_and_matches_numpy_clip(net):
    model, variables, x = net
    prog = maas_jax.trace_linen(model, variables, x)
    out = passes.clip_weights(0.5)(prog)
    assert out.history[-1].touched == ("params/down/kernel", "params/up/kernel")
    ref = model.apply(_clip_paths(variables, {"params/down/kernel", "params/up/kernel"}, 0.5), x)
    np.testing.assert_allclose(out(variables, x), ref, atol=1e-6)
    assert not np.allclose(out(variables, x), model.apply(variables, x), atol=1e-3)


def test_regex_op_callable_and_rule_lists(net):
    model, variables, x = net
    prog = maas_jax.trace_linen(model, variables, x)
    # A regex narrows the default candidates (contraction weights): the bias is not one.
    assert passes.clip_weights(1.0, where=r"up/")(prog).history[-1].touched == ("params/up/kernel",)
    # maas_jax.Path is the explicit opt-in for every leaf under a path.
    assert passes.clip_weights(1.0, where=maas_jax.Path(r"up/"))(prog).history[-1].touched == (
        "params/up/bias",
        "params/up/kernel",
    )
    by_op = passes.clip_weights(1.0, where=Op("dot_general", name_stack="down"))(prog)
    assert by_op.history[-1].touched == ("params/down/kernel",)
    by_fn = passes.clip_weights(1.0, where=lambda path, info: info.shape == (16,))(prog)
    assert by_fn.history[-1].touched == (
        "params/norm/bias",
        "params/norm/scale",
        "params/up/bias",
    )
    # First match wins; the second rule only matched what the first took, so it is unused.
    with pytest.warns(UnusedRuleWarning, match=r"'up/kernel', 'nothing_here' matched no parameter"):
        both = passes.clip_weights(1.0, where=[r"kernel", r"up/kernel", r"nothing_here"])(prog)
    assert both.history[-1].touched == ("params/down/kernel", "params/up/kernel")
    assert "unused rule: 'nothing_here'" in both.history[-1].notes


def test_no_match_returns_same_object_and_warns(net):
    model, variables, x = net
    prog = maas_jax.trace_linen(model, variables, x)
    with pytest.warns(UnusedRuleWarning, match="matched no parameter"):
        assert passes.clip_weights(1.0, where="Conv_9")(prog) is prog


def test_idempotent_structurally_and_numerically(net):
    model, variables, x = net
    prog = maas_jax.trace_linen(model, variables, x)
    once = passes.clip_weights(0.5)(prog)
    assert passes.clip_weights(0.5)(once) is once
    # A different bound is a different transform: applied again, composing to the tighter one.
    twice = passes.clip_weights(0.25)(once)
    counts, base = maas_jax.primitive_counts(twice), maas_jax.primitive_counts(prog)
    assert counts["clamp"] == 4 and counts["jit"] == base["jit"] + 4
    ref = model.apply(_clip_paths(variables, {"params/down/kernel", "params/up/kernel"}, 0.25), x)
    np.testing.assert_allclose(twice(variables, x), ref, atol=1e-6)
    # Later passes still see the parameter through the marker.
    table = maas_jax.consumers(twice)
    (use,) = table["params/up/kernel"]
    assert use.primitive == "dot_general"
    assert use.transforms == ("maas_clip_weights", "maas_clip_weights")


def test_bf16_weights_stay_bf16():
    params = {"w": (jnp.arange(8.0).reshape(2, 4) - 4).astype(jnp.bfloat16)}
    prog = maas_jax.trace(lambda p, x: x @ p["w"], params, jnp.ones((1, 2), jnp.bfloat16))
    out = passes.clip_weights(1.5)(prog)
    res = out(params, jnp.ones((1, 2), jnp.bfloat16))
    assert res.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(res, np.float32),
        np.clip(np.arange(8.0).reshape(2, 4) - 4, -1.5, 1.5).sum(0)[None],
    )


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_max_abs(bad):
    with pytest.raises(ValueError, match=r"clip_weights: max_abs must be a finite number > 0"):
        passes.clip_weights(bad)


def test_bad_regex_and_selector_types():
    with pytest.raises(SelectionError, match=r"'\(unclosed' is not a valid regular expression"):
        passes.clip_weights(1.0, where="(unclosed")
    with pytest.raises(SelectionError, match=r"Op\(name_stack=...\): '\[' is not a valid"):
        Op("dot_general", name_stack="[")
    with pytest.raises(SelectionError, match="cannot select with a int"):
        passes.clip_weights(1.0, where=3)


def test_integer_parameter_is_a_clear_error():
    params = {"w": jnp.ones((2, 2)), "steps": jnp.int32(3)}
    prog = maas_jax.trace(lambda p, x: x @ p["w"] * p["steps"], params, jnp.ones(2))
    with pytest.raises(TypeError, match=r"parameter 'steps' is int32.*Narrow `where=`"):
        passes.clip_weights(1.0, where=maas_jax.Path("steps"))(prog)


# ---- dce -------------------------------------------------------------------------------


def _with_dead_code(p, x):
    dead_top = jnp.sin(x) * 3.0  # noqa: F841 - dead on purpose

    def body(c, w):
        unused = jnp.cos(c) @ w  # noqa: F841 - dead inside the scan body
        return jnp.tanh(c @ w), None

    h = jax.lax.scan(body, x, p["stack"])[0]

    @jax.jit
    def head(h):
        _ = jnp.exp(h)
        return h @ p["out"]

    return head(h)


def test_dce_removes_dead_code_everywhere_and_is_exact():
    params = {"stack": jax.random.normal(jax.random.key(0), (2, 4, 4)), "out": jnp.ones((4, 2))}
    x = jnp.ones((3, 4))
    prog = maas_jax.trace(_with_dead_code, params, x)
    before = maas_jax.primitive_counts(prog)
    assert before["sin"] == 1 and before["cos"] == 1 and before["exp"] == 1
    out = passes.dce()(prog)
    after = maas_jax.primitive_counts(out)
    assert "sin" not in after and "cos" not in after and "exp" not in after
    assert after["dot_general"] == 2 and after["tanh"] == 1 and after["scan"] == 1
    np.testing.assert_array_equal(out(params, x), prog(params, x))
    assert passes.dce()(out) is out  # idempotent: nothing left to remove
    assert "removed" in out.history[-1].notes[0]
