"""Pruning building blocks (maas_jax.passes.prune.{masks,schedules,optax_wrapper,export}).

Every mask is checked against an independent numpy reference (a stable sort of the scores:
the first ``round(s * n)`` entries are pruned, so ties go to the lower flat index), schedules
against the Zhu & Gupta formula written out by hand, the optax wrapper on a small regression
trained with AdamW, and compression bit for bit.
"""

from __future__ import annotations

import doctest
import importlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maas_jax.passes.prune import export, masks, optax_wrapper, schedules
from maas_jax.passes.prune.export import (
    CompressedFileError,
    compress,
    decompress,
    load_npz,
    save_npz,
    sparsity_report,
    sparsity_stats,
)
from maas_jax.passes.prune.masks import (
    block_mask,
    channel_scores,
    global_magnitude_masks,
    magnitude_mask,
    nm_mask,
    random_mask,
    snip_scores,
    sparsity_of,
    wanda_mask,
    wanda_scores,
)
from maas_jax.passes.prune.optax_wrapper import current_sparsity, masks_of, sparsify
from maas_jax.passes.prune.schedules import constant, periodic, polynomial_decay, should_update

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


# ---- independent numpy references ------------------------------------------------------


def ref_prune_lowest(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask pruning the round(s * n) lowest scores; ties: lower flat index pruned first."""
    flat = np.asarray(scores, np.float64).ravel()
    k = round(sparsity * flat.size)
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    return keep.reshape(np.shape(scores))


def tied_weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Weights with many exact ties in |w| (and both signs), to exercise tie-breaking."""
    return (rng.integers(-6, 7, size=shape) * 0.25).astype(np.float32)


@pytest.mark.parametrize("module", [masks, schedules, optax_wrapper, export])
def test_docstring_examples_run(module):
    mod = importlib.import_module(module.__name__)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ---- unstructured masks ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (8, 5), (3, 4, 6)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.8, 0.99])
def test_magnitude_mask_matches_sort_reference(shape, sparsity):
    w = tied_weights(np.random.default_rng(0), shape)
    want = ref_prune_lowest(np.abs(w), sparsity)
    got = np.asarray(magnitude_mask(jnp.asarray(w), sparsity=sparsity))
    np.testing.assert_array_equal(got, want)
    assert (~got).sum() == round(sparsity * w.size)  # exact achieved sparsity


def test_magnitude_mask_jit_static_and_traced_sparsity():
    w = tied_weights(np.random.default_rng(1), (16, 10))
    want = ref_prune_lowest(np.abs(w), 0.7)
    static = jax.jit(lambda x: magnitude_mask(x, sparsity=0.7))(w)
    traced = jax.jit(lambda x, s: magnitude_mask(x, sparsity=s))(w, jnp.float32(0.7))
    np.testing.assert_array_equal(np.asarray(static), want)
    np.testing.assert_array_equal(np.asarray(traced), want)


def test_magnitude_mask_threshold_and_bf16():
    w = tied_weights(np.random.default_rng(2), (6, 6))
    np.testing.assert_array_equal(
        np.asarray(magnitude_mask(w, threshold=0.5)), np.abs(w) > 0.5
    )  # equal to the threshold: pruned
    wb = jnp.asarray(w, jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(magnitude_mask(wb, sparsity=0.5)), ref_prune_lowest(np.abs(w), 0.5)
    )


def test_global_magnitude_matches_concatenated_reference():
    rng = np.random.default_rng(3)
    weights = {
        "b": tied_weights(rng, (5, 3)),
        "a": tied_weights(rng, (4, 4)),
        "c": rng.normal(size=(9,)).astype(np.float32),
    }
    for s in (0.0, 0.3, 0.75):
        got = global_magnitude_masks({k: jnp.asarray(v) for k, v in weights.items()}, s)
        keys = sorted(weights)  # jax leaf order of a dict
        ref = ref_prune_lowest(np.concatenate([np.abs(weights[k]).ravel() for k in keys]), s)
        start = 0
        for k in keys:
            n = weights[k].size
            np.testing.assert_array_equal(
                np.asarray(got[k]), ref[start : start + n].reshape(weights[k].shape)
            )
            start += n
        total_pruned = sum(int((~np.asarray(m)).sum()) for m in got.values())
        assert total_pruned == round(s * 40)
    # Layer-wise would prune 60% of each; global prunes the small-magnitude layer harder.
    small, big = jnp.full((10,), 0.1), jnp.arange(1.0, 11.0)
    g = global_magnitude_masks({"small": small, "big": big}, 0.5)
    assert sparsity_of(g["small"]) == 1.0 and sparsity_of(g["big"]) == 0.0


@pytest.mark.parametrize("shape,sparsity", [((10,), 0.3), ((7, 9), 0.5), ((4, 4, 4), 0.9)])
def test_random_mask_exact_count(shape, sparsity):
    m1 = random_mask(jax.random.key(0), shape, sparsity)
    m2 = random_mask(jax.random.key(1), shape, sparsity)
    size = int(np.prod(shape))
    assert m1.shape == shape and m1.dtype == jnp.bool_
    assert int((~m1).sum()) == int((~m2).sum()) == round(sparsity * size)
    assert not np.array_equal(np.asarray(m1), np.asarray(m2))
    traced = jax.jit(lambda s: random_mask(jax.random.key(0), shape, s))(jnp.float32(sparsity))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(m1))


def test_sparsity_of():
    assert sparsity_of(np.array([True, False, False, False])) == 0.75
    assert sparsity_of(jnp.array([0.0, -0.0, np.nan, 1.0])) == 0.5
    assert sparsity_of(np.zeros((0,))) == 0.0


# ---- N:M ---------------------------------------------------------------------------------


@st.composite
def nm_cases(draw):
    m = draw(st.integers(1, 8))
    n = draw(st.integers(1, m))
    groups = draw(st.integers(1, 3))
    other = draw(st.integers(1, 3))
    axis = draw(st.sampled_from([0, 1, -1, -2]))
    shape = [other, groups * m]
    if axis in (0, -2):
        shape.reverse()
    seed = draw(st.integers(0, 2**16))
    return n, m, axis, tuple(shape), seed


@pytest.mark.slow  # ~9 s of hypothesis examples; the slow CI step runs it on every landing
@SETTINGS
@given(nm_cases())
def test_nm_mask_invariants(case):
    n, m, axis, shape, seed = case
    w = tied_weights(np.random.default_rng(seed), shape)
    keep = np.asarray(nm_mask(jnp.asarray(w), n, m, axis))
    assert keep.shape == w.shape
    groups_w = np.moveaxis(np.abs(w), axis, -1).reshape(-1, m)
    groups_k = np.moveaxis(keep, axis, -1).reshape(-1, m)
    for gw, gk in zip(groups_w, groups_k, strict=True):
        assert gk.sum() == n  # exactly n kept in every group of m
        if n < m:
            assert gw[gk].min() >= gw[~gk].max()  # the kept are the n largest |w|
        np.testing.assert_array_equal(gk, ref_prune_lowest(gw, (m - n) / m))  # ties too
    assert sparsity_of(keep) == pytest.approx(1 - n / m)


def test_nm_2_4_is_half_and_along_contraction_axis():
    w = np.random.default_rng(4).normal(size=(16, 8)).astype(np.float32)
    keep = np.asarray(nm_mask(w, 2, 4, axis=-2))
    assert sparsity_of(keep) == 0.5
    assert (keep.reshape(4, 4, 8).sum(axis=1) == 2).all()


# ---- blocks, channels, saliencies ------------------------------------------------------


@pytest.mark.parametrize(
    "shape,block,axes",
    [((8, 12), (2, 3), (-2, -1)), ((3, 3, 8, 4), (4, 2), (-2, -1)), ((4, 3, 6), (2, 3), (0, 2))],
)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_block_mask_invariants(shape, block, axes, sparsity):
    w = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    keep = np.asarray(block_mask(jnp.asarray(w), block, sparsity, axes))
    assert keep.shape == w.shape
    moved_w = np.moveaxis(w, axes, (-2, -1))
    moved_k = np.moveaxis(keep, axes, (-2, -1))
    lead = moved_w.shape[:-2]
    r, c = moved_w.shape[-2] // block[0], moved_w.shape[-1] // block[1]
    tw = moved_w.reshape(*lead, r, block[0], c, block[1])
    tk = moved_k.reshape(*lead, r, block[0], c, block[1])
    # Every tile is all kept or all pruned.
    assert (tk.all(axis=(-3, -1)) == tk.any(axis=(-3, -1))).all()
    tile_keep = tk.all(axis=(-3, -1)).ravel()
    norms = np.sqrt((tw.astype(np.float64) ** 2).sum(axis=(-3, -1))).ravel()
    assert (~tile_keep).sum() == round(sparsity * norms.size)
    np.testing.assert_array_equal(tile_keep, ref_prune_lowest(norms, sparsity))


def test_channel_snip_wanda_scores_match_numpy():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
    g = rng.normal(size=w.shape).astype(np.float32)
    np.testing.assert_allclose(
        channel_scores(w, axis=-1), np.sqrt((w**2).sum(axis=(0, 1, 2))), rtol=1e-6
    )
    np.testing.assert_allclose(
        channel_scores(w, axis=2),
        np.linalg.norm(np.moveaxis(w, 2, 0).reshape(5, -1), axis=1),
        rtol=1e-6,
    )
    np.testing.assert_allclose(snip_scores(w, g), np.abs(w * g), rtol=1e-6)
    act = np.abs(rng.normal(size=(5,))).astype(np.float32)
    ref = np.abs(w) * act[None, None, :, None]
    np.testing.assert_allclose(wanda_scores(w, act, in_axis=2), ref, rtol=1e-6)
    keep = np.asarray(wanda_mask(w, act, in_axis=2, out_axis=3, sparsity=0.5))
    for o in range(4):  # per output: exactly half of its 45 weights, the lowest scores
        np.testing.assert_array_equal(keep[..., o], ref_prune_lowest(ref[..., o], 0.5))
        assert (~keep[..., o]).sum() == round(0.5 * 45)


# ---- schedules ---------------------------------------------------------------------------


def test_polynomial_decay_matches_zhu_gupta_by_hand():
    s = polynomial_decay(0.0, 0.8, 0, 30, frequency=5)
    # s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3, with t the last update step (every 5).
    hand = {
        0: 0.0,
        4: 0.0,
        5: 0.8 * (1 - (25 / 30) ** 3),  # 0.337037...
        9: 0.8 * (1 - (25 / 30) ** 3),
        15: 0.8 * (1 - 0.5**3),  # 0.7
        29: 0.8 * (1 - (5 / 30) ** 3),  # 0.796296...
        30: 0.8,
        1000: 0.8,
    }
    assert s(15) == pytest.approx(0.7)
    jitted = jax.jit(s)
    for t, want in hand.items():
        assert s(t) == pytest.approx(want, abs=1e-12)
        assert isinstance(s(t), float)
        got = jitted(jnp.int32(t))
        assert got.dtype == jnp.float32 and float(got) == pytest.approx(want, rel=1e-6, abs=1e-7)
    # Constant before begin_step, at the initial sparsity.
    late = polynomial_decay(0.2, 0.6, 10, 20, power=2)
    assert late(0) == late(10) == 0.2
    assert late(15) == pytest.approx(0.6 + (0.2 - 0.6) * 0.5**2)
    updates = [t for t in range(40) if s.should_update(t)]
    assert updates == [0, 5, 10, 15, 20, 25, 30]
    traced = jax.jit(jax.vmap(s.should_update))(jnp.arange(40, dtype=jnp.int32))
    assert np.flatnonzero(np.asarray(traced)).tolist() == updates


def test_should_update_constant_periodic():
    assert [t for t in range(15) if should_update(t, 3, 10, 4)] == [3, 7, 10]
    traced = jax.vmap(lambda t: should_update(t, 3, 10, 4))(jnp.arange(15))
    assert np.flatnonzero(np.asarray(traced)).tolist() == [3, 7, 10]
    c = constant(0.9, begin_step=5)
    assert (c(4), c(5), c(50)) == (0.0, 0.9, 0.9)
    assert [t for t in range(20) if c.should_update(t)] == [5]
    assert float(jax.jit(c)(jnp.int32(7))) == pytest.approx(0.9)
    p = periodic(polynomial_decay(0.0, 0.5, 2, 12), every=4)
    assert [t for t in range(20) if p.should_update(t)] == [2, 6, 10, 14, 18]
    assert p(9) == p(6) and p(14) == 0.5
    assert float(jax.jit(p)(jnp.int32(9))) == pytest.approx(p(9), rel=1e-6)
    assert periodic(0.3, 10)(25) == 0.3


def test_schedule_validation_errors():
    with pytest.raises(
        ValueError, match=r"end_step must be > begin_step.*begin_step=10, end_step=10"
    ):
        polynomial_decay(0.0, 0.5, 10, 10)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        polynomial_decay(0.0, 1.0, 0, 10)
    with pytest.raises(ValueError, match=r"must be <= final"):
        polynomial_decay(0.6, 0.5, 0, 10)
    with pytest.raises(ValueError, match=r"frequency must be an integer >= 1, got 0"):
        polynomial_decay(0.0, 0.5, 0, 10, frequency=0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got -0.1"):
        constant(-0.1)


# ---- the optax wrapper -------------------------------------------------------------------


def _regression():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(256, 20)).astype(np.float32)
    w_true = rng.normal(size=(20, 5)).astype(np.float32)
    w_true[rng.random(w_true.shape) < 0.8] = 0.0
    y = x @ w_true + 0.01 * rng.normal(size=(256, 5)).astype(np.float32)
    params = {
        "params": {
            "Dense_0": {
                "kernel": jnp.asarray(0.1 * rng.normal(size=(20, 5)), jnp.float32),
                "bias": jnp.zeros(5),
            }
        }
    }

    def loss(p):
        d = p["params"]["Dense_0"]
        return jnp.mean((x @ d["kernel"] + d["bias"] - y) ** 2)

    return params, loss


def test_sparsify_adamw_linear_regression():
    params, loss = _regression()
    sched = polynomial_decay(0.0, 0.8, 0, 30, frequency=5)
    tx = sparsify(optax.adamw(0.05, weight_decay=0.1), schedule=sched, where=r"kernel$")
    state = tx.init(params)
    assert masks_of(state)["params"]["Dense_0"]["bias"] is None

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    losses = [float(loss(params))]
    prev_mask = None
    for t in range(50):
        params, state = step(params, state)
        losses.append(float(loss(params)))
        mask = np.asarray(masks_of(state)["params"]["Dense_0"]["kernel"])
        kernel = np.asarray(params["params"]["Dense_0"]["kernel"])
        assert (kernel[~mask] == 0).all()  # exactly zero after every step
        assert (~mask).sum() == round(sched(t) * 100)  # the scheduled sparsity, exactly
        if prev_mask is not None:
            if not sched.should_update(t):
                np.testing.assert_array_equal(mask, prev_mask)  # kept between updates
            assert not (mask & ~prev_mask).any()  # pruned weights stay pruned
        prev_mask = mask
    assert int(state.count) == 50
    assert current_sparsity(state) == {"params/Dense_0/kernel": 0.8}
    assert sparsity_of(params["params"]["Dense_0"]["kernel"]) == 0.8
    assert losses[-1] < 0.5 * losses[0]
    assert np.asarray(params["params"]["Dense_0"]["bias"]).any()  # unselected leaf untouched


def test_sparsify_scopes_methods_nm_and_chain():
    rng = np.random.default_rng(8)
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)},
        "b": {"kernel": jnp.asarray(10 * rng.normal(size=(4, 6)), jnp.float32)},
    }
    grads = jax.tree.map(jnp.ones_like, params)

    def run(tx, steps=3):
        p, s = params, tx.init(params)
        for _ in range(steps):
            u, s = jax.jit(tx.update)(grads, s, p)
            p = optax.apply_updates(p, u)
        return p, s

    _, s = run(sparsify(optax.sgd(1e-3), schedule=0.5, scope="global"))
    sp = current_sparsity(s)
    assert sp["a/kernel"] * 32 + sp["b/kernel"] * 24 == 28  # exact overall, not per layer
    assert sp["a/kernel"] > sp["b/kernel"]  # the small-magnitude layer is pruned harder

    for method in ("random", "saliency"):
        p, s = run(sparsify(optax.sgd(1e-3), schedule=0.75, method=method))
        assert current_sparsity(s) == {"a/kernel": 0.75, "b/kernel": 0.75}
        for k in ("a", "b"):
            assert sparsity_of(p[k]["kernel"]) == 0.75

    chained = optax.chain(
        optax.clip_by_global_norm(1.0), sparsify(optax.adam(1e-2), schedule=0.0, n=2, m=4)
    )
    p, s = run(chained)
    keep = np.asarray(masks_of(s)["a"]["kernel"])
    assert (keep.reshape(2, 4, 4).sum(axis=1) == 2).all()  # 2:4 along the input axis (-2)
    assert sparsity_of(p["a"]["kernel"]) == 0.5
    assert masks_of(s)["b"]["kernel"].shape == (4, 6)


def test_sparsify_errors():
    params = {"w": jnp.ones((4, 6)), "b": jnp.ones(6)}
    tx = sparsify(optax.sgd(0.1), schedule=0.5)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"update\(\) needs the current params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match=r"selects no parameter.*paths are: b, w"):
        sparsify(optax.sgd(0.1), schedule=0.5, where=r"kernel$").init(params)
    with pytest.raises(ValueError, match=r"parameter 'w'.*m=4 must divide the size 6"):
        sparsify(optax.sgd(0.1), schedule=0.0, n=2, m=4, nm_axis=-1).init(params)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        sparsify(optax.sgd(0.1), schedule=1.0)
    with pytest.raises(ValueError, match=r"method must be one of"):
        sparsify(optax.sgd(0.1), schedule=0.5, method="rigl")
    with pytest.raises(ValueError, match=r"needs both n and m"):
        sparsify(optax.sgd(0.1), schedule=0.5, n=2)


# ---- mask error paths ------------------------------------------------------------------


def test_mask_error_paths():
    w = jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        magnitude_mask(w, sparsity=1.0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got -0.1"):
        magnitude_mask(w, sparsity=-0.1)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        random_mask(jax.random.key(0), (3,), 1.0)
    with pytest.raises(ValueError, match=r"exactly one of sparsity= and threshold="):
        magnitude_mask(w)
    with pytest.raises(ValueError, match=r"n <= m, got n=5, m=4"):
        nm_mask(w, 5, 4)
    with pytest.raises(ValueError, match=r"n >= 1.*got n=0"):
        nm_mask(w, 0, 4)
    with pytest.raises(ValueError, match=r"m=4 must divide the size 6 of axis -1"):
        nm_mask(w, 2, 4, axis=-1)
    with pytest.raises(ValueError, match=r"block \(3, 2\) must tile.*3 must divide 4"):
        block_mask(w, (3, 2), 0.5)
    with pytest.raises(ValueError, match=r"act_norm must have shape \(4,\)"):
        wanda_scores(w, jnp.ones(6), in_axis=0)
    assert bool(magnitude_mask(w, sparsity=0.99).any()) is False  # 0.99 is allowed: round(23.76)


# ---- compression ---------------------------------------------------------------------------


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _sparse_params():
    rng = np.random.default_rng(9)
    w = rng.normal(size=(64, 64)).astype(np.float32)
    keep = np.asarray(random_mask(jax.random.key(3), w.shape, 0.9))
    e = rng.normal(size=(32, 16)).astype(np.float32)
    e[0, :4] = [-0.0, np.nan, np.inf, -np.inf]
    params = {
        "dense": {
            "kernel": jnp.asarray(w),
            "bias": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
        },
        "emb": jnp.asarray(e, jnp.bfloat16),
        "step": np.int32(3),
    }
    return params, {"dense": {"kernel": keep, "bias": None}}, keep


def test_compress_round_trip_bit_exact_and_smaller(tmp_path):
    params, mask_tree, keep = _sparse_params()
    ct = compress(params, mask_tree)
    out = decompress(ct)
    masked_kernel = np.where(keep, np.asarray(params["dense"]["kernel"]), np.float32(0))
    np.testing.assert_array_equal(_bits(out["dense"]["kernel"]), _bits(masked_kernel))
    np.testing.assert_array_equal(_bits(out["emb"]), _bits(params["emb"]))  # -0.0, NaN, bf16
    assert out["emb"].dtype == jnp.bfloat16 and out["step"].dtype == np.int32
    kinds = {e.path: e.kind for e in ct.entries}
    assert kinds == {
        "dense/bias": "dense",
        "dense/kernel": "sparse",
        "emb": "dense",
        "step": "dense",
    }
    kernel_entry = next(e for e in ct.entries if e.path == "dense/kernel")
    assert kernel_entry.nbytes == 4096 // 8 + 4 * round(0.1 * 4096)
    assert kernel_entry.nbytes < 0.2 * kernel_entry.dense_nbytes
    assert ct.nbytes < ct.dense_nbytes

    # A flat {path: mask} dict means the same thing as the masks pytree.
    flat = compress(params, {"dense/kernel": keep})
    assert flat.nbytes == ct.nbytes

    f = tmp_path / "sparse.npz"
    save_npz(ct, f)
    assert f.stat().st_size < 0.4 * ct.dense_nbytes
    for loaded in (load_npz(f), load_npz(f, like=params)):
        back = decompress(loaded)
        for path in (("dense", "kernel"), ("dense", "bias"), ("emb",), ("step",)):
            a, b = out, back
            for k in path:
                a, b = a[k], b[k]
            np.testing.assert_array_equal(_bits(b), _bits(a))
            assert b.dtype == a.dtype and b.shape == a.shape
    assert jax.tree.structure(decompress(load_npz(f, like=params))) == jax.tree.structure(params)


def test_sparsity_stats_and_report():
    params, mask_tree, _ = _sparse_params()
    stats = sparsity_stats(params, mask_tree)
    k = stats["leaves"]["dense/kernel"]
    assert k["shape"] == (64, 64)
    assert k["sparsity"] == round(0.9 * 4096) / 4096
    assert k["dense_bytes"] == 4096 * 4 and k["compressed_bytes"] < k["dense_bytes"]
    g = stats["global"]
    assert g["size"] == 4096 + 64 + 512 + 1
    # The pruned kernel entries plus the -0.0 in emb (zero by value, kept bit-exact).
    assert g["sparsity"] == (round(0.9 * 4096) + 1) / g["size"]
    report = sparsity_report(params, mask_tree)
    lines = report.splitlines()
    assert lines[0].split()[:3] == ["path", "shape", "sparsity"]
    assert any(line.startswith("dense/kernel") and "89.99%" in line for line in lines)
    assert lines[-1].startswith("global")


def test_load_npz_rejects_corrupted_files(tmp_path):
    params, mask_tree, _ = _sparse_params()
    good = tmp_path / "good.npz"
    save_npz(compress(params, mask_tree), good)
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    kernel_i = next(i for i in range(4) if f"{i}.bitmask" in arrays)

    def write(name, changes):
        a = {k: v for k, v in {**arrays, **changes}.items() if v is not None}
        path = tmp_path / name
        np.savez(path, **a)
        return path

    kv, kb = f"{kernel_i}.values", f"{kernel_i}.bitmask"
    with pytest.raises(
        CompressedFileError, match=r"array '\d\.bitmask' for 'dense/kernel' is missing"
    ):
        load_npz(write("missing.npz", {kb: None}))
    with pytest.raises(CompressedFileError, match=r"stores 409 values but its bitmask marks 410"):
        load_npz(write("short.npz", {kv: arrays[kv][:-1]}))
    with pytest.raises(CompressedFileError, match=r"bitmask of 'dense/kernel' is uint8\[511\]"):
        load_npz(write("badmask.npz", {kb: arrays[kb][:-1]}))
    with pytest.raises(CompressedFileError, match=r"values of 'dense/kernel' are float32"):
        load_npz(write("dtype.npz", {kv: arrays[kv].view(np.float32)}))
    with pytest.raises(CompressedFileError, match=r"unexpected arrays \['extra'\]"):
        load_npz(write("extra.npz", {"extra": np.zeros(3)}))
    with pytest.raises(CompressedFileError, match=r"'__meta__' array is missing"):
        load_npz(write("nometa.npz", {"__meta__": None}))
    with pytest.raises(CompressedFileError, match=r"'__meta__' is not a"):
        load_npz(write("badmeta.npz", {"__meta__": np.array("{not json")}))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(CompressedFileError, match=r"not a readable .npz file"):
        load_npz(garbage)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CompressedFileError):
        load_npz(truncated)
    with pytest.raises(CompressedFileError, match=r"does not match like="):
        load_npz(good, like={"other": jnp.ones(3)})
    assert zipfile.is_zipfile(good)
