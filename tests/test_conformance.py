"""Conformance suite: every exported pass, on every zoo model, keeps the contract.

Signature (pytrees, shapes, dtypes, roles) preserved, type-checks, deterministic, hashable
with a readable repr, callable under jit without retracing, and a no-op returns its input.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jcore
from zoo import MODEL_NAMES, by_name

import maas_jax
from maas_jax import passes

PASSES = {
    "clip_weights": lambda: passes.clip_weights(0.5),
    "dce": lambda: passes.dce(),
    "fold_batchnorm": lambda: passes.fold_batchnorm(),
    "fake_quant": lambda: passes.fake_quant(
        rules=[passes.QuantRule(where=r"kernel$|^w\w*$|^w$", weight="int8", act="int8")]
    ),
}


@pytest.mark.filterwarnings("ignore::maas_jax.OpaqueRegionWarning")  # the custom_vjp model
@pytest.mark.parametrize("pass_name", sorted(PASSES))
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_pass_contract(pass_name, model):
    m = by_name(model)
    p = PASSES[pass_name]()
    assert p == PASSES[pass_name]() and hash(p) == hash(PASSES[pass_name]())
    assert repr(p).startswith(pass_name + "(")
    prog = maas_jax.trace(m.fn, m.params, *m.inputs)
    out = maas_jax.pipeline(p)(prog)  # the pipeline type-checks and compares signatures
    again = PASSES[pass_name]()(prog)
    assert str(out.jaxpr) == str(again.jaxpr)  # deterministic
    jcore.check_jaxpr(out.jaxpr.jaxpr)
    assert (out.in_tree, out.out_tree, out.roles) == (prog.in_tree, prog.out_tree, prog.roles)
    traces = []

    def call(params, *inputs):
        traces.append(1)
        return out(params, *inputs)

    jitted = jax.jit(call)
    first = jitted(m.params, *m.inputs)
    shifted = jax.tree.map(
        lambda x: x * 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, m.inputs
    )
    jitted(m.params, *shifted)
    assert len(traces) == 1
    assert jax.tree.structure(first) == jax.tree.structure(m.fn(m.params, *m.inputs))
    # Nothing left to do: the same object comes back.
    assert PASSES[pass_name]()(out) is out
