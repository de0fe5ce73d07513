"""Issue 8, items 7 and 12: non-finite weights, and BatchNorm arrays after fold + convert.

Non-finite weights: where the parameters are concrete (``convert_params``, ``calibrate``,
``quantize_model``) a NaN or inf in a quantized weight raises, naming the parameter path. In
the traced fake-quant graph nothing can raise, so a scale group holding a NaN or inf gets a
NaN scale: every output element the float model computes as non-finite is NaN (in fact the
whole output channel rescaled by that weight scale is NaN), never a finite wrong answer.
References are numpy (an int8 quantize/matmul written out here) and the float model itself.

BatchNorm: after ``fold_batchnorm`` + ``fake_quant`` + ``convert`` the stored tree holds one
folded bias vector per layer instead of the four BatchNorm arrays, the converted jaxpr has no
``rsqrt``/``sqrt`` left, and the converted program equals the fake-quant one bit for bit.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore
from maas_jax.passes.quantize.numerics import compute_qparams, make_spec

import maas_jax
from maas_jax import passes
from maas_jax.models import digits

F32 = np.float32

# ---- helpers ------------------------------------------------------------------------------


def _np_int8(a, axis):
    """Symmetric int8 per-group codes and scales over ``axis`` (numpy, float32 throughout)."""
    a = np.asarray(a, F32)
    scale = np.max(np.abs(a), axis=axis, keepdims=True) / F32(127)
    scale = np.where(scale >= np.finfo(F32).tiny, scale, F32(1)).astype(F32)
    codes = np.clip(np.round(a / scale), -127, 127).astype(np.int32)  # round half to even
    return codes, scale


def _np_w8a8(x, w):
    """Integer reference of ``x @ w``: per-token activation, per-channel weight scales."""
    qx, sx = _np_int8(x, axis=1)
    qw, sw = _np_int8(w, axis=0)
    return ((qx @ qw).astype(F32) * sx) * sw


def _matmul_program(w, x):
    return maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, x)


def _weights(bad=None):
    w = np.array(jax.random.normal(jax.random.key(0), (8, 5)), F32)
    w[:, 3] = 0.0  # an all-zero channel keeps its scale of 1.0
    if bad is not None:
        w[2, 1] = bad
    return jnp.asarray(w)


X = jax.random.normal(jax.random.key(1), (4, 8))
BAD = pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])


def _primitives(jaxpr):
    """Every primitive name in ``jaxpr`` and its sub-jaxprs (a jaxpr walk of its own)."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if isinstance(sub, jcore.ClosedJaxpr | jcore.Jaxpr):
                    out.extend(_primitives(sub))
    return out


def _leaves(tree):
    return {
        jax.tree_util.keystr(k, simple=True, separator="/"): v
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _nbytes(tree):
    return sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(tree))


# ---- A. non-finite weights -----------------------------------------------------------------


def test_finite_model_is_unaffected_and_equals_numpy_integer_reference():
    w = _weights()
    fq = passes.fake_quant("int8", act="int8")(_matmul_program(w, X))
    np.testing.assert_array_equal(np.asarray(fq({"w": w}, X)), _np_w8a8(X, w))
    converted = passes.convert()(fq)
    stored = passes.convert_params(converted, fq, {"w": w})
    qw, sw = _np_int8(w, axis=0)
    np.testing.assert_array_equal(np.asarray(stored["w"]["qvalue"]), qw)
    np.testing.assert_array_equal(np.asarray(stored["w"]["scale"]), sw)
    assert float(stored["w"]["scale"][0, 3]) == 1.0  # the all-zero channel


def test_compute_qparams_nan_scale_for_non_finite_groups():
    x = np.array([[1.0, np.nan, 0.0, 2.0], [3.0, 1.0, 0.0, np.inf]], F32)
    for symmetric in (True, False):
        scale = np.asarray(compute_qparams(x, make_spec("int8", 0, 2, symmetric=symmetric)).scale)
        assert np.isnan(scale[0, [1, 3]]).all()
        assert scale[0, 2] == 1.0  # all-zero group
        want = 3.0 / F32(127) if symmetric else 3.0 / F32(255)
        assert scale[0, 0] == F32(want)


@BAD
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weight="int8", act="int8"),
        dict(weight="int8"),
        dict(weight="int4", act="int8"),
        dict(weight="int8", act="int8", symmetric=False),
        dict(weight="fp8_e4m3", act="fp8_e4m3"),
        dict(weight="int8", act="int8", granularity="per_tensor"),
    ],
    ids=["w8a8", "w8", "w4a8", "asym", "fp8", "per_tensor"],
)
def test_fake_quant_output_is_nan_wherever_float_output_is_not_finite(bad, kwargs):
    w = _weights(bad)
    want = np.asarray(X @ w)
    assert not np.isfinite(want[:, 1]).any()  # the float model: column 1 is NaN/inf
    fq = passes.fake_quant(**kwargs)(_matmul_program(w, X))
    got = np.asarray(fq({"w": w}, X))
    assert np.isnan(got[~np.isfinite(want)]).all()
    if kwargs.get("granularity") == "per_tensor":
        assert np.isnan(got).all()  # one scale for the whole weight
    else:
        assert np.isnan(got[:, 1]).all()  # the whole channel
        assert np.isfinite(np.delete(got, 1, axis=1)).all()  # other channels untouched


@BAD
def test_fake_quant_under_jit_and_convert_stay_nan(bad):
    w = _weights(bad)
    fq = passes.fake_quant("int8", act="int8")(_matmul_program(w, X))
    got = np.asarray(jax.jit(fq)({"w": w}, X))
    assert np.isnan(got[:, 1]).all()
    good = _weights()
    np.testing.assert_array_equal(np.delete(got, 1, 1), np.delete(_np_w8a8(X, good), 1, 1))


def test_nan_activation_row_is_nan_not_finite():
    w = _weights()
    x = np.asarray(X).copy()
    x[2, 5] = np.nan
    fq = passes.fake_quant("int8", act="int8")(_matmul_program(w, jnp.asarray(x)))
    got = np.asarray(fq({"w": w}, jnp.asarray(x)))
    assert np.isnan(got[2]).all()  # per-token scale of row 2 is NaN
    np.testing.assert_array_equal(np.delete(got, 2, 0), _np_w8a8(np.delete(x, 2, 0), w))


@BAD
def test_convert_params_names_the_non_finite_weight(bad):
    w = _weights(bad)
    fq = passes.fake_quant("int8", act="int8")(_matmul_program(w, X))
    converted = passes.convert()(fq)
    n_nan, n_inf = (1, 0) if np.isnan(bad) else (0, 1)
    match = (
        rf"convert_params: parameter 'w' has non-finite values: {n_nan} NaN and {n_inf} inf "
        r"among 40 \(first at index \(2, 1\)\)"
    )
    with pytest.raises(passes.ConvertError, match=match):
        passes.convert_params(converted, fq, {"w": w})


@BAD
def test_calibrate_names_the_non_finite_weight(bad):
    w = _weights(bad)
    fq = passes.fake_quant("int8", act="int8", act_mode="static")(_matmul_program(w, X))
    with pytest.raises(passes.CalibrationError, match=r"calibrate: parameter 'w' has non-finite"):
        passes.calibrate(fq, {"w": w}, [X], progress=False)


@pytest.mark.parametrize(
    ("recipe", "error", "where"),
    [
        ("w8a8", passes.ConvertError, "convert_params"),
        ("w4", passes.ConvertError, "convert_params"),
        ("w8a8-static", passes.CalibrationError, "calibrate"),
    ],
)
def test_quantize_model_raises_on_non_finite_weight(recipe, error, where):
    w = _weights(np.nan)
    with pytest.raises(error, match=rf"{where}: parameter 'w' has non-finite"):
        passes.quantize_model(
            lambda p, x: x @ p["w"], {"w": w}, X, recipe=recipe, calibration_data=[X]
        )


# ---- B. BatchNorm after folding --------------------------------------------------------------


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), name="conv")(x)  # with a bias: folded into the stored bias too
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def _conv_bn():
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 4))
    v = ConvBN().init(jax.random.key(3), x)
    rng = np.random.default_rng(0)
    v = {
        "params": {
            **v["params"],
            "bn": {
                "scale": jnp.asarray(rng.normal(size=6), F32),
                "bias": jnp.asarray(rng.normal(size=6), F32),
            },
        },
        "batch_stats": {
            "bn": {
                "mean": jnp.asarray(rng.normal(size=6), F32),
                "var": jnp.asarray(np.abs(rng.normal(size=6)) + 0.1, F32),
            }
        },
    }
    return v, x


def _fold_quant_convert(prog, variables, into):
    fq = passes.fake_quant("int8", act="int8")(passes.fold_batchnorm(into)(prog))
    converted = passes.convert()(fq)
    return fq, converted, passes.convert_params(converted, fq, variables)


def _check_no_batchnorm_left(converted, stored, bn_names):
    paths = set(_leaves(stored))
    assert not [p for p in paths if p.split("/")[-1] in ("mean", "var")], paths
    assert not [p for p in paths if any(f"/{b}/" in p for b in bn_names)], paths
    assert "batch_stats" not in stored
    assert {r.path for r in converted.params} == paths
    prims = _primitives(converted.jaxpr)
    assert "rsqrt" not in prims and "sqrt" not in prims
    assert prims.count("conv_general_dilated") >= 1


@pytest.mark.parametrize("into", ["kernel", "output"])
def test_tiny_linen_conv_bn_stores_only_the_folded_vectors(into):
    variables, x = _conv_bn()
    prog = maas_jax.trace_linen(ConvBN(), variables, x)
    fq, converted, stored = _fold_quant_convert(prog, variables, into)
    np.testing.assert_array_equal(np.asarray(converted(stored, x)), np.asarray(fq(variables, x)))
    _check_no_batchnorm_left(converted, stored, ["bn"])
    leaves = _leaves(stored)
    # The folded bias against numpy: (conv bias - mean) * scale / sqrt(var + eps) + bn bias.
    bn, st = variables["params"]["bn"], variables["batch_stats"]["bn"]
    m = np.asarray(bn["scale"]) / np.sqrt(np.asarray(st["var"]) + F32(1e-5))
    a = (np.asarray(variables["params"]["conv"]["bias"]) - np.asarray(st["mean"])) * m
    a = a + np.asarray(bn["bias"])
    np.testing.assert_allclose(leaves["params/conv/kernel_folded_bias"], a, rtol=1e-5)
    # conv: int8 kernel 3*3*4*6, scale 6 f32, folded bias 6 f32 (+ folded scale 6 f32 when
    # into="output"); head: int8 kernel 150*3, scale 3 f32, bias 3 f32.
    want = 3 * 3 * 4 * 6 + 6 * 4 + 6 * 4 + 150 * 3 + 3 * 4 + 3 * 4
    if into == "output":
        want += 6 * 4
        np.testing.assert_allclose(leaves["params/conv/kernel_folded_scale"], m, rtol=1e-5)
    else:
        assert "params/conv/kernel_folded_scale" not in leaves
    assert _nbytes(stored) == want
    assert set(leaves) == {
        "params/conv/kernel/qvalue",
        "params/conv/kernel/scale",
        "params/conv/kernel_folded_bias",
        "params/head/kernel/qvalue",
        "params/head/kernel/scale",
        "params/head/bias",
    } | ({"params/conv/kernel_folded_scale"} if into == "output" else set())
    # Still close to the float model.
    np.testing.assert_allclose(
        np.asarray(converted(stored, x)), np.asarray(ConvBN().apply(variables, x)), atol=0.1
    )


@pytest.fixture(scope="module")
def cnn_bn():
    model, variables, data = digits.pretrained("cnn_bn")
    x_test = jnp.asarray(data[2])
    prog = maas_jax.trace(digits.make_apply(model), variables, x_test)
    return variables, x_test, prog


@pytest.mark.parametrize("into", ["kernel", "output"])
def test_digits_cnn_bn_stores_only_the_folded_bias(cnn_bn, into):
    variables, x_test, prog = cnn_bn
    fq, converted, stored = _fold_quant_convert(prog, variables, into)
    np.testing.assert_array_equal(
        np.asarray(converted(stored, x_test)), np.asarray(fq(variables, x_test))
    )
    _check_no_batchnorm_left(converted, stored, ["bn0", "bn1"])
    leaves = _leaves(stored)
    assert leaves["params/conv0/kernel_folded_bias"].shape == (16,)
    assert leaves["params/conv1/kernel_folded_bias"].shape == (32,)
    # int8 kernels + f32 per-channel scales, f32 folded biases (conv) and dense biases.
    want = (
        (3 * 3 * 1 * 16 + 16 * 4 + 16 * 4)  # conv0
        + (3 * 3 * 16 * 32 + 32 * 4 + 32 * 4)  # conv1
        + (512 * 64 + 64 * 4 + 64 * 4)  # dense0
        + (64 * 10 + 10 * 4 + 10 * 4)  # dense1
    )
    if into == "output":
        want += (16 + 32) * 4  # the folded scales
    assert _nbytes(stored) == want
    # No BatchNorm arithmetic left: the only float vector ops on conv outputs are rescales.
    assert "precomputed" not in str(converted.jaxpr)


def test_batchnorm_array_used_elsewhere_stays_stored():
    rng = np.random.default_rng(1)
    p = {
        "w": jnp.asarray(rng.normal(size=(4, 3)), F32),
        "mean": jnp.asarray(rng.normal(size=3), F32),
        "var": jnp.asarray(np.abs(rng.normal(size=3)) + 0.5, F32),
    }

    def fn(p, x):
        y = (x @ p["w"] - p["mean"]) * jax.lax.rsqrt(p["var"] + 1e-5)
        return y, p["mean"] * 2.0  # `mean` has another use

    x = jnp.asarray(rng.normal(size=(2, 4)), F32)
    fq, converted, stored = _fold_quant_convert(maas_jax.trace(fn, p, x), p, "kernel")
    assert set(_leaves(stored)) == {"mean", "w/qvalue", "w/scale", "w_folded_bias"}
    got, want = converted(stored, x), fq(p, x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    want_bias = -np.asarray(p["mean"]) / np.sqrt(np.asarray(p["var"]) + F32(1e-5))
    np.testing.assert_allclose(np.asarray(stored["w_folded_bias"]), want_bias, rtol=1e-6)


def test_non_finite_batchnorm_statistics_name_what_they_poison():
    variables, x = _conv_bn()
    prog = maas_jax.trace_linen(ConvBN(), variables, x)
    fq = passes.fake_quant("int8", act="int8")(passes.fold_batchnorm()(prog))
    converted = passes.convert()(fq)
    bad_var = jax.tree.map(lambda a: a, variables)
    bad_var["batch_stats"]["bn"]["var"] = variables["batch_stats"]["bn"]["var"].at[2].set(-1.0)
    with pytest.raises(
        passes.ConvertError,
        match=r"convert_params: the value quantized for parameter 'params/conv/kernel' has "
        r"non-finite values: 1 NaN and 0 inf among 6.*batch_stats/bn/var",
    ):
        passes.convert_params(converted, fq, bad_var)
    bad_mean = jax.tree.map(lambda a: a, variables)
    bad_mean["batch_stats"]["bn"]["mean"] = variables["batch_stats"]["bn"]["mean"].at[0].set(np.inf)
    with pytest.raises(
        passes.ConvertError,
        match=r"convert_params: the precomputed value 'params/conv/kernel_folded_bias' has "
        r"non-finite values: 0 NaN and 1 inf.*batch_stats/bn/mean",
    ):
        passes.convert_params(converted, fq, bad_mean)
