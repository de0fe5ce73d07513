"""prune and compute_masks against numpy references; zeros survive QAT and conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from zoo import by_name, map_params

import maas_jax
from maas_jax import passes


def _net():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k[0], (16, 32)), "w2": jax.random.normal(k[1], (32, 8))}
    x = jax.random.normal(k[2], (6, 16))

    def f(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    return f, params, x


def _np_rate_mask(w, sparsity):
    """numpy: prune exactly round(s * n) smallest |w| (stable order on ties)."""
    w = np.asarray(w)
    k = int(round(sparsity * w.size))
    order = np.argsort(np.abs(w).ravel(), kind="stable")
    keep = np.ones(w.size, bool)
    keep[order[:k]] = False
    return keep.reshape(w.shape)


def test_magnitude_rate_and_threshold_equal_masked_model():
    f, params, x = _net()
    prog = maas_jax.trace(f, params, x)
    out = passes.prune(sparsity=0.75)(prog)
    masked = {k: v * _np_rate_mask(v, 0.75) for k, v in params.items()}
    np.testing.assert_allclose(out(params, x), f(masked, x), atol=1e-6)
    thr = passes.prune(threshold=0.5)(prog)
    by_t = {k: jnp.where(jnp.abs(v) > 0.5, v, 0.0) for k, v in params.items()}
    np.testing.assert_allclose(thr(params, x), f(by_t, x), atol=1e-6)
    assert passes.prune(sparsity=0.75)(out) is out  # idempotent


def _effective(prog, params, n_in):
    """The weight the program multiplies by, read out with an identity input."""
    return np.asarray(prog(params, jnp.eye(n_in)))


def test_nm_2_4_keeps_two_of_every_four_along_the_contracted_axis():
    w = jax.random.normal(jax.random.key(1), (16, 6))
    prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((16, 16)))
    eff = _effective(passes.prune("nm", n=2, m=4)(prog), {"w": w}, 16)
    groups = eff.reshape(4, 4, 6)  # (group, member, column): groups run along the input axis
    assert ((groups != 0).sum(axis=1) == 2).all()
    kept_ref = np.argsort(-np.abs(np.asarray(w)).reshape(4, 4, 6), axis=1)[:, :2]
    kept = np.argsort(-(groups != 0).astype(int), axis=1, kind="stable")[:, :2]
    assert (np.sort(kept, axis=1) == np.sort(kept_ref, axis=1)).all()


def test_global_vs_layerwise_thresholds_vs_numpy():
    f, params, x = _net()
    prog = maas_jax.trace(f, params, x)
    masks = passes.compute_masks(prog, params, method="global_magnitude", sparsity=0.6)
    allw = np.concatenate([np.abs(np.asarray(v)).ravel() for v in params.values()])
    t = np.sort(allw)[int(round(0.6 * allw.size)) - 1]
    for path, w in params.items():
        np.testing.assert_array_equal(masks.masks[path], np.abs(np.asarray(w)) > t)
    assert masks.sparsity() == pytest.approx(0.6, abs=1 / allw.size)
    out = passes.prune(masks=masks)(prog)
    np.testing.assert_allclose(
        out(params, x), f({k: v * masks.masks[k] for k, v in params.items()}, x), atol=1e-6
    )


def test_wanda_and_snip_masks_vs_numpy():
    w = jax.random.normal(jax.random.key(2), (8, 4))
    batches = [jax.random.normal(jax.random.key(i), (5, 8)) * (1 + jnp.arange(8)) for i in (3, 4)]
    prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, batches[0])
    wanda = passes.compute_masks(prog, {"w": w}, method="wanda", sparsity=0.5, batches=batches)
    norms = np.sqrt(sum((np.asarray(b) ** 2).sum(0) for b in batches))
    scores = np.abs(np.asarray(w)) * norms[:, None]
    want = np.zeros_like(scores, bool)
    for j in range(4):  # per output column: keep the 4 best of 8
        want[np.argsort(-scores[:, j])[:4], j] = True
    np.testing.assert_array_equal(wanda.masks["w"], want)
    snip = passes.compute_masks(
        prog, {"w": w}, method="snip", sparsity=0.5, batches=batches,
        loss=lambda out, batch: jnp.sum(out**2),
    )  # fmt: skip
    g = sum(2 * np.asarray(b).T @ (np.asarray(b) @ np.asarray(w)) for b in batches)
    sal = np.abs(np.asarray(w) * g)
    np.testing.assert_array_equal(snip.masks["w"], sal > np.median(sal))


def test_scan_stacked_layers_are_pruned_per_layer():
    m = by_name("linen_scan_remat_transformer")
    prog = maas_jax.trace(m.fn, m.params, *m.inputs)
    out = passes.prune(sparsity=0.5, where=r"layers/q/kernel")(prog)

    def mask_layers(path, w):
        if path != "params/layers/q/kernel":
            return w
        return jnp.stack([lw * _np_rate_mask(lw, 0.5) for lw in w])

    ref = m.fn(map_params(m.params, mask_layers), *m.inputs)
    np.testing.assert_allclose(out(m.params, *m.inputs), ref, atol=1e-5)


def test_zeros_survive_fake_quant_convert_and_a_qat_loop():
    f, params, x = _net()
    prog = maas_jax.trace(f, params, x)
    both = maas_jax.pipeline(passes.prune(sparsity=0.5), passes.fake_quant("int8", act="int8"))(
        prog
    )
    int_prog = passes.convert()(both)
    stored = passes.convert_params(int_prog, both, params)
    for name in ("w1", "w2"):
        q = np.asarray(stored[name]["qvalue"])
        assert (q[~_np_rate_mask(params[name], 0.5)] == 0).all()
    np.testing.assert_array_equal(int_prog(stored, x), both(params, x))
    # QAT with the sparsity wrapper: pruned weights stay exactly zero through Adam updates.
    from maas_jax.passes.prune import optax_wrapper, schedules

    fq = passes.fake_quant("int8", act="int8")(prog)
    target = jnp.sin(x[:, :8])
    tx = optax_wrapper.sparsify(optax.adam(1e-2), schedule=schedules.constant(0.5), where=r"^w")
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: jnp.mean((fq(q, x) - target) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = params
    for _ in range(20):
        p, state = step(p, state)
        for name in ("w1", "w2"):
            assert float(jnp.mean(p[name] == 0)) == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\), got 1.0"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
        (dict(method="nm", n=5, m=4), r"1 <= n <= m \(n is KEPT per m\)"),
        (dict(method="nm"), "needs n= and m="),
        (dict(method="block", sparsity=0.5), r"needs block=\(rows, cols\)"),
        (dict(method="lottery", sparsity=0.5), "method must be one of"),
    ],
)
def test_bad_prune_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        passes.prune(**kwargs)


def test_nm_group_not_dividing_names_the_parameter():
    w = jnp.ones((6, 4))
    prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((2, 6)))
    with pytest.raises(
        ValueError, match=r"m=4 along axis 0 .* do not divide 'w' of shape \(6, 4\)"
    ):
        passes.prune("nm", n=2, m=4)(prog)
