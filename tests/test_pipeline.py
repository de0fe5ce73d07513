"""Pipelines: identity, composition laws, nesting, verification and error context."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

import maas_jax
from maas_jax import PassError, Program, passes


def _f(p, x):
    h = jnp.tanh(x @ p["w1"])
    return jax.lax.scan(lambda c, w: (jnp.sin(c @ w), None), h, p["stack"])[0]


@pytest.fixture
def program_and_args():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": 3 * jax.random.normal(k1, (6, 4)),
        "stack": 3 * jax.random.normal(k2, (3, 4, 4)),
    }
    x = jax.random.normal(k3, (2, 6))
    return maas_jax.trace(_f, params, x), params, x


def test_empty_pipeline_is_identity(program_and_args):
    prog, params, x = program_and_args
    assert maas_jax.pipeline()(prog) is prog


def test_sequential_equals_manual_composition_and_nesting_equals_flat(program_and_args):
    prog, params, x = program_and_args
    a, b, c = passes.clip_weights(2.0), passes.clip_weights(1.0, where="stack"), passes.dce()
    manual = c(b(a(prog)))
    flat = maas_jax.pipeline(a, b, c)(prog)
    nested = maas_jax.pipeline(maas_jax.pipeline(a, b), maas_jax.pipeline(c))(prog)
    want = manual(params, x)
    np.testing.assert_array_equal(flat(params, x), want)
    np.testing.assert_array_equal(nested(params, x), want)
    assert str(flat.jaxpr) == str(manual.jaxpr) == str(nested.jaxpr)
    assert [r.config for r in flat.history] == [r.config for r in manual.history]
    # Independent reference: the model run on weights clipped by hand.
    ref_params = {"w1": jnp.clip(params["w1"], -2, 2), "stack": jnp.clip(params["stack"], -1, 1)}
    np.testing.assert_allclose(want, _f(ref_params, x), atol=1e-6)


def test_pipeline_repr_and_hash():
    p = maas_jax.pipeline(
        passes.clip_weights(3.0, where=["a", "b"]), maas_jax.pipeline(passes.dce())
    )
    assert repr(p) == "pipeline(clip_weights(max_abs=3.0, where=('a', 'b')), pipeline(dce()))"
    assert hash(p) == hash(
        maas_jax.pipeline(
            passes.clip_weights(3.0, where=("a", "b")), maas_jax.pipeline(passes.dce())
        )
    )
    assert [type(x).__name__ for x in p.leaves()] == ["ClipWeights", "DCE"]


def test_not_a_pass_is_rejected():
    with pytest.raises(TypeError, match="is not a pass"):
        maas_jax.pipeline(passes.dce(), 3)


def _corrupting_pass(program: Program) -> Program:
    """Re-types the first matmul's output: a pass bug the verifier must catch."""
    j = program.jaxpr.jaxpr
    k = next(i for i, e in enumerate(j.eqns) if e.primitive.name == "dot_general")
    eqn = j.eqns[k]
    aval = eqn.outvars[0].aval
    bad_aval = type(aval)((aval.shape[0] + 1, *aval.shape[1:]), aval.dtype)
    bad = eqn.replace(outvars=[jcore.Var(bad_aval)])
    broken = j.replace(eqns=[*j.eqns[:k], bad, *j.eqns[k + 1 :]])
    return program.replace(jaxpr=jcore.ClosedJaxpr(broken, program.jaxpr.consts))


def test_invalid_program_names_pass_previous_passes_equation_and_source(program_and_args):
    prog, _, _ = program_and_args
    with pytest.raises(PassError) as info:
        maas_jax.pipeline(passes.clip_weights(1.0), passes.dce(), _corrupting_pass)(prog)
    msg = str(info.value)
    assert "pass _corrupting_pass" in msg
    assert "passes run before it: clip_weights, dce" in msg
    assert "does not type-check" in msg
    assert "test_pipeline.py" in msg  # the user's source line of the offending equation
    assert "jaxpr around it" in msg


@dataclasses.dataclass(frozen=True)
class _ShapeChanger:
    name = "shape_changer"

    def __call__(self, program):
        new = maas_jax.trace(lambda p, x: _f(p, x)[:1], *_example())
        return program.replace(jaxpr=new.jaxpr, out_tree=new.out_tree)


def _example():
    return {"stack": jnp.ones((3, 4, 4)), "w1": jnp.ones((6, 4))}, jnp.ones((2, 6))


def test_signature_change_must_be_declared(program_and_args):
    prog, _, _ = program_and_args
    with pytest.raises(PassError, match="changed the program's signature"):
        maas_jax.pipeline(_ShapeChanger())(prog)


def test_pass_returning_non_program_is_reported(program_and_args):
    prog, _, _ = program_and_args
    with pytest.raises(PassError, match="returned a str, not a Program"):
        maas_jax.pipeline(lambda p: "oops")(prog)


def test_rule_failure_is_wrapped_with_primitive_and_source(program_and_args):
    prog, _, _ = program_and_args

    def rule(site, invals):
        raise ValueError("boom")

    def failing_pass(program):
        new = maas_jax.rewrite(
            program, maas_jax.Rewrite("failing", rule=rule, rule_primitives=frozenset({"sin"}))
        )
        return program.replace(jaxpr=new)

    with pytest.raises(PassError) as info:
        maas_jax.pipeline(passes.dce(), failing_pass)(prog)
    msg = str(info.value)
    assert "pass failing_pass" in msg and "passes run before it: dce" in msg
    assert "rewriting `sin` failed at" in msg and "test_pipeline.py" in msg and "boom" in msg
