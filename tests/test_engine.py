"""The rewrite engine over the model zoo: identity, clipping at entry and at every use.

References are independent of the engine: the zoo's own function called with parameters
transformed by hand (``zoo.map_params``), differentiated by jax directly.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore
from zoo import MODEL_NAMES, by_name, map_params

import maas_jax
from maas_jax import OpaqueRegionWarning, Rewrite, passes
from maas_jax._compat import sub_jaxprs

BOUND = 0.5


def _trace(m):
    return maas_jax.trace(m.fn, m.params, *m.inputs, name=m.name)


def _clipped_params(m, params=None):
    chosen = set(m.weight_paths)
    return map_params(
        m.params if params is None else params,
        lambda path, w: jnp.clip(w, -BOUND, BOUND) if path in chosen else w,
    )


def _assert_tree_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def _name_stacks(jaxpr, depth=0, out=None):
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        out.append((depth, eqn.primitive.name, str(eqn.source_info.name_stack)))
        for sub in sub_jaxprs(eqn):
            _name_stacks(sub, depth + 1, out)
    return out


# ---- identity ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_identity_pipeline_and_forced_rewrite_are_bit_exact(name):
    m = by_name(name)
    prog = _trace(m)
    assert maas_jax.pipeline()(prog) is prog
    want = m.fn(m.params, *m.inputs)
    jax.tree.map(np.testing.assert_array_equal, prog(m.params, *m.inputs), want)
    # Re-emit every region (jit, scan, while, cond, remat, shard_map) with no change.
    new = maas_jax.rewrite(prog, Rewrite("identity", force_recurse=True))
    jcore.check_jaxpr(new.jaxpr)
    forced = prog.replace(jaxpr=new)
    jax.tree.map(np.testing.assert_array_equal, forced(m.params, *m.inputs), want)
    before, after = maas_jax.primitive_counts(prog), maas_jax.primitive_counts(forced)
    # lax.switch clamps its index: the only equations re-emission may add.
    extra = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    extra = {k: v for k, v in extra.items() if v}
    assert set(extra) <= {"clamp"} and extra.get("clamp", 0) == before.get("cond", 0)
    if not before.get("cond"):
        assert _name_stacks(prog.jaxpr.jaxpr) == _name_stacks(new.jaxpr)


# ---- clip_weights at entry --------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_clip_weights_equals_model_on_clipped_params(name):
    m = by_name(name)
    prog = _trace(m)
    out = maas_jax.pipeline(passes.clip_weights(BOUND), passes.dce())(prog)
    assert set(out.history[0].touched) == set(m.weight_paths)
    ref_params = _clipped_params(m)
    want = m.fn(ref_params, *m.inputs)
    _assert_tree_close(out(m.params, *m.inputs), want, 1e-6)
    _assert_tree_close(
        jax.jit(out)(m.params, *m.inputs), jax.jit(m.fn)(ref_params, *m.inputs), 1e-6
    )
    cov = maas_jax.coverage(out)
    for entry in cov:
        weight_operands = [o for o in entry.operands if o in m.weight_paths]
        if weight_operands:
            assert entry.touched_by == ("clip_weights",), entry


def _scalar(tree):
    return sum(jnp.sum(jnp.asarray(x, jnp.float32) ** 2) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_clipped_program_differentiates_like_the_reference(name):
    m = by_name(name)
    out = passes.clip_weights(BOUND)(_trace(m))

    def loss_prog(p):
        return _scalar(out(p, *m.inputs))

    def loss_ref(p):
        return _scalar(m.fn(_clipped_params(m, p), *m.inputs))

    if m.has_while:  # while_loop has no reverse mode: compare forward-mode derivatives
        tangent = jax.tree.map(jnp.ones_like, m.params)
        _, got = jax.jvp(loss_prog, (m.params,), (tangent,))
        _, want = jax.jvp(loss_ref, (m.params,), (tangent,))
        np.testing.assert_allclose(got, want, rtol=1e-5)
        return
    _assert_tree_close(jax.grad(loss_prog)(m.params), jax.grad(loss_ref)(m.params), 1e-4)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if by_name(n).vmappable])
def test_clipped_program_vmaps(name):
    m = by_name(name)
    out = passes.clip_weights(BOUND)(_trace(m))
    in_axes = (None,) + (0,) * len(m.inputs)
    got = jax.vmap(out, in_axes=in_axes)(m.params, *m.batch_inputs)
    want = jax.vmap(m.fn, in_axes=in_axes)(_clipped_params(m), *m.batch_inputs)
    _assert_tree_close(got, want, 1e-5)


# ---- rules at every use: the engine's region handlers, checked numerically ---------------


def clip_at_use(prog, paths, *, inline_custom=False):
    """A rule-based rewrite: clamp a weight operand at each contraction that consumes it.

    Equivalent to clipping at entry when the weights are only consumed by contractions,
    which makes the region handlers (scan slices, cond branches, while bodies, shard_map
    shards, remat, nested jit) checkable against the independent reference.
    """
    chosen = set(paths)

    def rule(site, invals):
        if not any(t is not None and t.path in chosen for t in site.in_tags):
            return None
        vals = [
            jnp.clip(v, -BOUND, BOUND) if t is not None and t.path in chosen else v
            for v, t in zip(invals, site.in_tags, strict=True)
        ]
        return maas_jax._compat.bind_eqn(site.eqn, vals)

    spec = Rewrite(
        "clip_at_use",
        rule=rule,
        rule_primitives=frozenset({"dot_general", "conv_general_dilated"}),
        inline_custom=inline_custom,
    )
    return prog.replace(jaxpr=maas_jax.rewrite(prog, spec))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rules_reach_every_region(name):
    m = by_name(name)
    prog = _trace(m)
    # Embeddings used by a gather too are not "only consumed by contractions".
    paths = [p for p in m.weight_paths if "embed" not in p]
    out = clip_at_use(prog, paths, inline_custom=True)
    jcore.check_jaxpr(out.jaxpr.jaxpr)
    chosen = set(paths)
    ref = map_params(m.params, lambda p, w: jnp.clip(w, -BOUND, BOUND) if p in chosen else w)
    _assert_tree_close(out(m.params, *m.inputs), m.fn(ref, *m.inputs), 1e-6)
    counts = maas_jax.primitive_counts(out)
    n_weight_uses = sum(
        1
        for s in maas_jax.contraction_sites(prog)
        for t in s.in_tags
        if t is not None and t.path in chosen
    )
    added_min = counts.get("min", 0) - maas_jax.primitive_counts(prog).get("min", 0)
    assert added_min >= n_weight_uses > 0  # jnp.clip = max then min, once per weight use


def test_custom_vjp_is_opaque_by_default_and_inlined_on_request():
    m = by_name("custom_vjp")
    prog = _trace(m)
    ref = m.fn(_clipped_params(m), *m.inputs)
    with pytest.warns(OpaqueRegionWarning, match=r"custom_vjp_call.*inline_custom=True"):
        opaque = clip_at_use(prog, m.weight_paths)
    # The custom_vjp body still sees the unclipped weight: outputs differ from the reference.
    assert not np.allclose(np.asarray(opaque(m.params, *m.inputs)), np.asarray(ref), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inlined = clip_at_use(prog, m.weight_paths, inline_custom=True)
    _assert_tree_close(inlined(m.params, *m.inputs), ref, 1e-6)
    assert "custom_vjp_call" not in maas_jax.primitive_counts(inlined)


# ---- provenance survives into HLO ---------------------------------------------------------


def test_source_lines_and_module_names_reach_the_lowered_hlo():
    m = by_name("linen_scan_remat_transformer")
    out = clip_at_use(_trace(m), ["params/layers/q/kernel"])
    text = jax.jit(out).trace(m.params, *m.inputs).lower().as_text(debug_info=True)
    assert "zoo.py" in text  # the model's source file
    assert "layers/q/dot_general" in text  # module path inside scan + remat


# ---- unknown higher-order primitives ------------------------------------------------------


def _opaque_call_primitive():
    prim = jcore.Primitive("user_opaque_call")
    prim.multiple_results = True
    prim.def_impl(lambda *args, jaxpr: jcore.jaxpr_as_fun(jaxpr)(*args))
    prim.def_abstract_eval(lambda *avals, jaxpr: [v.aval for v in jaxpr.jaxpr.outvars])
    return prim


_OPAQUE = _opaque_call_primitive()


def _with_opaque(p, x):
    inner = jax.make_jaxpr(lambda w, h: [jnp.tanh(h @ w)])(p["hidden"], x)
    (h,) = _OPAQUE.bind(p["hidden"], x, jaxpr=inner)
    return h @ p["out"]


def test_parameter_into_unknown_region_is_a_clear_error():
    params = {"hidden": 3 * jnp.ones((4, 4)), "out": jnp.ones((4, 2))}
    x = jnp.ones((1, 4))
    prog = maas_jax.trace(_with_opaque, params, x)
    (use,) = maas_jax.consumers(prog)["hidden"]
    assert use.opaque and use.primitive == "user_opaque_call"
    with pytest.raises(
        maas_jax.UnsupportedPrimitiveError,
        match=r"'hidden' flows into `user_opaque_call`.*allow_opaque=True",
    ):
        passes.clip_weights(0.5)(prog)
    with pytest.raises(
        maas_jax.UnsupportedPrimitiveError, match=r"'hidden' flows into `user_opaque_call`"
    ):
        passes.clip_weights(0.5, where="hidden")(prog)
    ok = passes.clip_weights(0.5, where="hidden", allow_opaque=True)(prog)
    np.testing.assert_allclose(
        ok(params, x), _with_opaque({**params, "hidden": jnp.full((4, 4), 0.5)}, x), atol=1e-6
    )
    with pytest.raises(
        maas_jax.UnsupportedPrimitiveError,
        match=r"`user_opaque_call` at .*test_engine.py.*parameters flowing in: hidden",
    ):
        clip_at_use(prog, ["hidden"])
    assert any(e.opaque for e in maas_jax.coverage(prog))
