"""Issue 8: pruning scan-stacked weights per layer along the right axis, baked masks, selection.

Every mask is compared with a plain-numpy reference written from the definition:

* N:M: in each layer, along the axis the layer contracts (its inputs), every group of ``m``
  consecutive weights keeps the ``n`` largest ``|w|``;
* Wanda: score ``|w| * ||x||`` with ``||x||`` the L2 norm of *that layer's* input feature over
  all calibration tokens; each output channel of each layer keeps the best ``1 - s`` of its
  inputs;
* magnitude: per layer, the ``round(s * size)`` smallest ``|w|`` are pruned.

Layouts of a stacked weight ``w`` of shape ``(L, a, b)`` used in ``lax.scan``: ``h @ w[l]``
(contracted axis 1), ``w[l] @ h`` and ``h @ w[l].T`` (contracted axis 2), plus a Flax
``nn.scan`` model whose kernels are ``(L, in, out)`` and biases ``(L, out)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from maas_jax.passes.prune.optax_wrapper import masks_of, sparsify

import maas_jax
from maas_jax import passes

L, D = 3, 16  # layers, features (divisible by 4 for 2:4)

# ---- numpy references ---------------------------------------------------------------------


def np_nm(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive entries along ``axis`` (ties: lower first)."""
    moved = np.moveaxis(np.abs(np.asarray(w, np.float64)), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    order = np.argsort(groups, axis=-1, kind="stable")  # ascending: the first m - n are pruned
    keep = np.ones(groups.shape, bool)
    np.put_along_axis(keep, order[..., : m - n], False, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def np_rate(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Prune exactly round(s * size) smallest |w| (stable on ties)."""
    flat = np.abs(np.asarray(w, np.float64)).ravel()
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[: round(sparsity * flat.size)]] = False
    return keep.reshape(np.shape(w))


def np_rows(scores: np.ndarray, axis: int, sparsity: float) -> np.ndarray:
    """Per row (all other axes fixed), prune round(s * row) lowest scores along ``axis``."""
    moved = np.moveaxis(scores, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    keep = np.stack([np_rate(r, sparsity) for r in flat]).reshape(moved.shape)
    return np.moveaxis(keep, -1, axis)


# ---- the three lax.scan layouts -----------------------------------------------------------
# Each: (name, weight shape, contracted axis of the stacked weight, model, numpy model that
# also returns every layer's input activations as (tokens, features)).


def _hw(p, x):  # h @ w[l]; x: (B, D)
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
    return h


def _np_hw(p, x):
    h, acts = np.asarray(x, np.float64), []
    for w in np.asarray(p["w"], np.float64):
        acts.append(h)
        h = np.tanh(h @ w)
    return h, acts


def _wh(p, x):  # w[l] @ h; x: (D, B), tokens are columns
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(w @ h), None), x, p["w"])
    return h


def _np_wh(p, x):
    h, acts = np.asarray(x, np.float64), []
    for w in np.asarray(p["w"], np.float64):
        acts.append(h.T)
        h = np.tanh(w @ h)
    return h, acts


def _hwt(p, x):  # h @ w[l].T; x: (B, D)
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w.T), None), x, p["w"])
    return h


def _np_hwt(p, x):
    h, acts = np.asarray(x, np.float64), []
    for w in np.asarray(p["w"], np.float64):
        acts.append(h)
        h = np.tanh(h @ w.T)
    return h, acts


LAYOUTS = {
    "h@w": (_hw, _np_hw, 1, (5, D)),
    "w@h": (_wh, _np_wh, 2, (D, 5)),
    "h@w.T": (_hwt, _np_hwt, 2, (5, D)),
}


def _layout(name, seed=0):
    fn, np_fn, axis, xshape = LAYOUTS[name]
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"w": jax.random.normal(k[0], (L, D, D)) / 4}
    batches = [jax.random.normal(k[i], xshape) * (1 + jnp.arange(xshape[0] * xshape[1]).reshape(xshape) % 7) for i in (1, 2)]  # fmt: skip
    prog = maas_jax.trace(fn, params, batches[0])
    return fn, np_fn, axis, params, batches, prog


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_nm_on_stacked_weight_groups_along_each_layers_input_axis(layout):
    fn, _, axis, params, batches, prog = _layout(layout)
    want = np_nm(params["w"], 2, 4, axis)
    # the reference itself: exactly 2 of every 4 consecutive inputs kept, per layer and output
    groups = np.moveaxis(want, axis, -1).reshape(L, D, D // 4, 4)
    assert (groups.sum(-1) == 2).all()
    pruned = passes.prune("nm", n=2, m=4)(prog)
    x = batches[1]
    np.testing.assert_allclose(pruned(params, x), fn({"w": params["w"] * want}, x), atol=1e-6)
    got = passes.prune("nm", n=2, m=4).masks_for(prog, params).masks["w"]
    np.testing.assert_array_equal(got, want)


def test_nm_accepts_a_stack_whose_input_axis_m_divides():
    w = jax.random.normal(jax.random.key(3), (3, 16, 6))  # per layer (in=16, out=6)

    def fn(p, x):
        _, ys = jax.lax.scan(lambda c, wl: (c, x @ wl), 0.0, p["w"])
        return ys

    x = jax.random.normal(jax.random.key(4), (2, 16))
    prog = maas_jax.trace(fn, {"w": w}, x)
    want = np_nm(w, 2, 4, axis=1)
    np.testing.assert_allclose(
        passes.prune("nm", n=2, m=4)(prog)({"w": w}, x), fn({"w": w * want}, x), atol=1e-6
    )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_wanda_on_stacked_weight_prunes_per_layer_and_output_channel(layout):
    fn, np_fn, axis, params, batches, prog = _layout(layout)
    masks = passes.compute_masks(prog, params, method="wanda", sparsity=0.5, batches=batches)
    # numpy: each layer's own input activations over all batches
    sq = np.zeros((L, D))
    for b in batches:
        _, acts = np_fn(params, b)
        sq += np.stack([(a**2).sum(0) for a in acts])
    w = np.asarray(params["w"], np.float64)
    norms = np.sqrt(sq)[:, :, None] if axis == 1 else np.sqrt(sq)[:, None, :]
    want = np_rows(np.abs(w) * norms, axis, 0.5)
    got = masks.masks["w"]
    assert (got.sum(axis=axis) == D // 2).all()  # exactly 8 of 16 per (layer, output)
    np.testing.assert_array_equal(got, want)
    x = batches[0]
    out = passes.prune(masks=masks)(prog)
    np.testing.assert_allclose(out(params, x), fn({"w": params["w"] * want}, x), atol=1e-6)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_magnitude_is_per_layer_and_global_is_global(layout):
    fn, _, _, params, batches, prog = _layout(layout)
    w = np.asarray(params["w"])
    per_layer = np.stack([np_rate(lw, 0.75) for lw in w])
    got = passes.compute_masks(prog, params, method="magnitude", sparsity=0.75).masks["w"]
    np.testing.assert_array_equal(got, per_layer)
    in_graph = passes.prune(sparsity=0.75)(prog)
    x = batches[0]
    np.testing.assert_allclose(in_graph(params, x), fn({"w": w * per_layer}, x), atol=1e-6)
    glob = passes.compute_masks(prog, params, method="global_magnitude", sparsity=0.75)
    np.testing.assert_array_equal(glob.masks["w"], np_rate(w, 0.75))


# ---- a Flax nn.scan model: (L, in, out) kernels, (L, out) biases ----------------------------


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D)(h)), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        h, _ = scan(name="layers")(x, None)
        return h


def _flax_scan():
    model = _Stack()
    x = jax.random.normal(jax.random.key(5), (4, D))
    variables = model.init(jax.random.key(6), x)
    # non-zero biases, so a pruned bias would show
    variables = jax.tree.map(
        lambda v: v + 0.1 * jnp.cos(jnp.arange(v.size).reshape(v.shape)), variables
    )
    prog = maas_jax.trace(model.apply, variables, x)
    return model, variables, x, prog


def _with(variables, path, value):
    out = jax.tree.map(lambda v: v, variables)
    d = out
    *parents, leaf = path.split("/")
    for k in parents:
        d = d[k]
    d[leaf] = value
    return out


KERNEL, BIAS = "params/layers/Dense_0/kernel", "params/layers/Dense_0/bias"


def _leaf(variables, path):
    d = variables
    for k in path.split("/"):
        d = d[k]
    return d


def test_flax_nn_scan_nm_where_dense_prunes_kernels_only_along_inputs():
    model, variables, x, prog = _flax_scan()
    kernel = np.asarray(_leaf(variables, KERNEL))
    assert kernel.shape == (L, D, D) and _leaf(variables, BIAS).shape == (L, D)
    want = np_nm(kernel, 2, 4, axis=1)
    pruned = passes.prune("nm", n=2, m=4, where=r"Dense")(prog)
    assert pruned.history[-1].touched == (KERNEL,)
    ref = model.apply(_with(variables, KERNEL, kernel * want), x)
    np.testing.assert_allclose(pruned(variables, x), ref, atol=1e-6)


def test_flax_nn_scan_wanda_per_layer():
    model, variables, x, prog = _flax_scan()
    batches = [x, jax.random.normal(jax.random.key(7), (4, D)) * 3]
    masks = passes.compute_masks(prog, variables, method="wanda", sparsity=0.5, batches=batches)
    assert set(masks.masks) == {KERNEL}
    k = np.asarray(_leaf(variables, KERNEL), np.float64)
    b = np.asarray(_leaf(variables, BIAS), np.float64)
    sq = np.zeros((L, D))
    for batch in batches:
        h = np.asarray(batch, np.float64)
        for layer in range(L):
            sq[layer] += (h**2).sum(0)
            h = np.tanh(h @ k[layer] + b[layer])
    want = np_rows(k * np.sqrt(sq)[:, :, None], 1, 0.5)
    np.testing.assert_array_equal(masks.masks[KERNEL], want)


# ---- baked masks: computed once, no sort in the program -------------------------------------

SORTS = ("sort", "top_k", "argsort", "argmax", "argmin", "cumsum", "approx_top_k")


def _mlp():
    k = jax.random.split(jax.random.key(8), 4)
    params = {
        "w1": jax.random.normal(k[0], (16, 32)),
        "b1": jax.random.normal(k[1], (32,)),
        "w2": jax.random.normal(k[2], (32, 8)),
    }
    x = jax.random.normal(k[3], (5, 16))

    def f(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return f, params, x, maas_jax.trace(f, params, x)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sparsity=0.5),
        dict(method="nm", n=2, m=4),
        dict(method="block", block=(4, 4), sparsity=0.5),
    ],
)
def test_baked_masks_have_no_sort_and_match_in_graph_masks(kwargs):
    f, params, x, prog = _mlp()
    in_graph = passes.prune(**kwargs)(prog)
    baked = passes.prune(**kwargs).bake(params)(prog)
    assert any(p in maas_jax.primitive_counts(in_graph) for p in SORTS)  # the slow path sorts
    assert not any(p in maas_jax.primitive_counts(baked) for p in SORTS)
    np.testing.assert_array_equal(baked(params, x), in_graph(params, x))
    assert "bake" in in_graph.history[-1].notes[0]  # the slow path says how to avoid it


def test_baked_rate_masks_equal_numpy_and_stacked_per_layer():
    f, params, x, prog = _mlp()
    baked = passes.prune(sparsity=0.5).bake(params)(prog)
    masked = {k: (v * np_rate(v, 0.5) if k != "b1" else v) for k, v in params.items()}
    np.testing.assert_allclose(baked(params, x), f(masked, x), atol=1e-6)
    fn, _, axis, sparams, batches, sprog = _layout("w@h")
    sbaked = passes.prune("nm", n=2, m=4).bake(sparams)(sprog)
    assert not any(p in maas_jax.primitive_counts(sbaked) for p in SORTS)
    want = sparams["w"] * np_nm(sparams["w"], 2, 4, axis)
    np.testing.assert_allclose(sbaked(sparams, batches[0]), fn({"w": want}, batches[0]), atol=1e-6)


def test_bake_with_the_wrong_params_says_so():
    _, params, _, prog = _mlp()
    with pytest.raises(ValueError, match=r"params has no leaf 'w1'.*traced with"):
        passes.prune(sparsity=0.5).bake({"v": params["w1"]})(prog)
    bad = dict(params, w1=jnp.ones((16, 31)))
    with pytest.raises(ValueError, match=r"params\['w1'\] has shape \(16, 31\).*\(16, 32\)"):
        passes.prune(sparsity=0.5).masks_for(prog, bad)


# ---- selection: where= narrows the weights, it never widens them ----------------------------


def test_rate_prune_where_layers_leaves_the_stacked_bias_alone():
    model, variables, x, prog = _flax_scan()
    pruned = passes.prune(sparsity=0.5, where=r"layers")(prog)
    assert pruned.history[-1].touched == (KERNEL,)
    kernel = np.asarray(_leaf(variables, KERNEL))
    ref = model.apply(
        _with(variables, KERNEL, kernel * np.stack([np_rate(k, 0.5) for k in kernel])), x
    )
    np.testing.assert_allclose(pruned(variables, x), ref, atol=1e-6)
    # the explicit opt-in still prunes the bias (per layer)
    both = passes.prune(sparsity=0.5, where=maas_jax.Path(r"layers"))(prog)
    assert set(both.history[-1].touched) == {KERNEL, BIAS}


def test_where_matching_only_biases_warns_and_changes_nothing():
    _, params, _, prog = _mlp()
    with pytest.warns(
        maas_jax.UnusedRuleWarning,
        match=r"'\^b' matched",  # "... no parameter" or "... only parameters that are not weights"
    ):
        assert passes.prune(sparsity=0.5, where=r"^b")(prog) is prog
    opted = passes.prune(sparsity=0.5, where=maas_jax.Path(r"^b"))(prog)
    assert opted.history[-1].touched == ("b1",)


def test_nm_where_dense_on_a_flax_mlp_with_biases():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))  # biases (8,), (3,)

    x = jax.random.normal(jax.random.key(9), (3, 12))
    variables = MLP().init(jax.random.key(10), x)
    prog = maas_jax.trace(MLP().apply, variables, x)
    out = passes.prune("nm", n=2, m=4, where=r"Dense")(prog)
    masked = jax.tree_util.tree_map_with_path(
        lambda kp, v: v * np_nm(v, 2, 4, 0) if kp[-1].key == "kernel" else v, variables
    )
    np.testing.assert_allclose(out(variables, x), MLP().apply(masked, x), atol=1e-6)


@pytest.mark.parametrize("with_program", [False, True])
def test_sparsify_default_leaves_a_stacked_bias_dense(with_program):
    _, variables, x, prog = _flax_scan()
    params = variables["params"]
    tx = sparsify(optax.sgd(0.0), schedule=0.5, program=prog if with_program else None)
    state = tx.init(params)
    masks = masks_of(state)["layers"]["Dense_0"]
    assert masks["bias"] is None and masks["kernel"] is not None
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)["layers"]["Dense_0"]
    np.testing.assert_array_equal(new["bias"], params["layers"]["Dense_0"]["bias"])
    kernel = np.asarray(params["layers"]["Dense_0"]["kernel"])
    if with_program:  # the program says the leaf is stacked: the rate holds per layer
        want = np.stack([np_rate(k, 0.5) for k in kernel])
    else:
        want = np_rate(kernel, 0.5)
    np.testing.assert_array_equal(np.asarray(new["kernel"]) != 0, want)


def test_sparsify_nm_axis_from_the_program_and_bias_opt_in():
    fn, _, axis, params, _, prog = _layout("w@h")  # contracted axis 2, not the default -2
    tx = sparsify(optax.sgd(0.0), schedule=0.0, n=2, m=4, program=prog)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_array_equal(masks_of(state)["w"], np_nm(params["w"], 2, 4, axis))
    p = {"w": jnp.ones((L, 4, 6)), "b": jnp.ones((L, 6))}
    with pytest.raises(
        ValueError, match=r"matches only other leaves: \['b'\].*maas_jax.Path\(regex\)"
    ):
        sparsify(optax.sgd(0.1), schedule=0.5, where=r"^b").init(p)
    opted = sparsify(optax.sgd(0.1), schedule=0.5, where=maas_jax.Path(r"^b")).init(p)
    assert masks_of(opted)["b"] is not None and masks_of(opted)["w"] is None


def test_sparsify_program_must_match_params():
    _, variables, _, prog = _flax_scan()
    with pytest.raises(ValueError, match=r"program= has no parameter matching the leaves \['w'\]"):
        sparsify(optax.sgd(0.1), schedule=0.5, program=prog).init({"w": jnp.ones((4, 4))})


def test_nm_and_wanda_refuse_a_weight_without_a_single_input_axis():
    w = jax.random.normal(jax.random.key(11), (8, 8))
    prog = maas_jax.trace(lambda p, x: x @ p["w"] + x @ p["w"].T, {"w": w}, jnp.ones((2, 8)))
    with pytest.raises(
        ValueError,
        match=r"N:M \(2:4\) needs the input \(contracted\) axis of 'w'.*contract different axes",
    ):
        passes.prune("nm", n=2, m=4)(prog)
    with pytest.raises(ValueError, match=r"wanda.*contract different axes"):
        passes.compute_masks(
            prog, {"w": w}, method="wanda", sparsity=0.5, batches=[jnp.ones((2, 8))]
        )


def test_wanda_on_a_convolution_uses_the_im2col_input_norms():
    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), padding="VALID", use_bias=False)(x)

    x = jax.random.normal(jax.random.key(12), (2, 6, 5, 3)) * jnp.arange(1.0, 4.0)
    variables = Conv().init(jax.random.key(13), x)
    prog = maas_jax.trace(Conv().apply, variables, x)
    masks = passes.compute_masks(prog, variables, method="wanda", sparsity=0.5, batches=[x])
    k = np.asarray(variables["params"]["Conv_0"]["kernel"], np.float64)  # (3, 3, in, out)
    xs = np.asarray(x, np.float64)
    sq = np.zeros((3, 3, 3))
    for dh in range(3):
        for dw in range(3):
            sq[dh, dw] = (xs[:, dh : dh + 4, dw : dw + 3, :] ** 2).sum((0, 1, 2))
    scores = np.abs(k) * np.sqrt(sq)[..., None]
    rows = scores.reshape(-1, 4)  # one row per output channel, over (kh, kw, in)
    want = np.stack([np_rate(r, 0.5) for r in rows.T], axis=1).reshape(k.shape)
    np.testing.assert_array_equal(masks.masks["params/Conv_0/kernel"], want)


def test_pass_docstring_examples_run():
    import doctest

    from maas_jax.passes.prune import pass_

    result = doctest.testmod(pass_, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0
