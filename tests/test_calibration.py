"""Static activation calibration: observers vs numpy, regions, sharded data, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from maas_jax.passes import QuantRule
from maas_jax.passes.quantize.calibration import (
    HIST_BINS,
    CalibrationWarning,
    mse_threshold,
    percentile_threshold,
)
from zoo import by_name

import maas_jax
from maas_jax import passes


def _single_dense(method, **kw):
    w = jax.random.normal(jax.random.key(0), (16, 8))
    prog = maas_jax.trace(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((256, 16)))
    fq = passes.fake_quant("int8", act="int8", act_mode="static", calibration=method, **kw)(prog)
    keys = jax.random.split(jax.random.key(1), 6)
    # Heavy-tailed activations: a few large outliers, as real activations have.
    batches = [jax.random.t(k, 3.0, (256, 16)) for k in keys]
    return fq, {"w": w}, batches


def _scale_of(program):
    return dict(program.meta["fake_quant_pass"].act_scales)[0]


def test_minmax_and_moving_average_equal_numpy():
    fq, params, batches = _single_dense("minmax")
    cal = passes.calibrate(fq, params, batches, progress=False)
    per_batch = [float(np.max(np.abs(np.asarray(b)))) for b in batches]
    assert _scale_of(cal) == pytest.approx(max(per_batch), rel=1e-7)
    fq, params, batches = _single_dense("moving_average")
    cal = passes.calibrate(fq, params, batches, progress=False)
    avg = per_batch[0]
    for v in per_batch[1:]:
        avg = 0.9 * avg + 0.1 * v
    assert _scale_of(cal) == pytest.approx(avg, rel=1e-6)


def test_percentile_matches_numpy_within_one_bin():
    fq, params, batches = _single_dense("percentile", percentile=99.0)
    cal = passes.calibrate(fq, params, batches, progress=False)
    samples = np.abs(np.concatenate([np.asarray(b).ravel() for b in batches]))
    t, width = _scale_of(cal), samples.max() / HIST_BINS
    # The definition, on the raw samples: t covers 99% of them, one bin less does not.
    assert np.mean(samples <= t + 1e-6) >= 0.99
    assert np.mean(samples <= t - width - 1e-6) < 0.99
    assert abs(t - np.percentile(samples, 99.0)) < 5 * width


def _empirical_mse(samples, t, qmax=127):
    step = t / qmax
    q = np.clip(np.round(samples / step), -qmax, qmax) * step
    return float(np.mean((samples - q) ** 2))


@pytest.mark.parametrize("method", ["mse", "kl"])
def test_mse_and_kl_clip_outliers_and_beat_minmax(method):
    fq, params, batches = _single_dense(method)
    cal = passes.calibrate(fq, params, batches, progress=False)
    samples = np.concatenate([np.asarray(b).ravel() for b in batches])
    t, absmax = _scale_of(cal), float(np.abs(samples).max())
    assert 0 < t < absmax
    # The independent check of the purpose: less quantization error on the data itself.
    assert _empirical_mse(samples, t) < _empirical_mse(samples, absmax)


def test_mse_threshold_on_a_hand_made_histogram():
    # 1e6 values at 0.95 (bin centre) and one at 99.95, absmax 100. Expected error at range t:
    # 1e6 * (t/127)^2 / 12 + (99.95 - t)^2, minimal at t = 199.9 / (2e6/193548 + 2) = 16.21.
    hist = np.zeros(1000)
    hist[9] = 1e6
    hist[-1] = 1.0
    t = mse_threshold(hist, 100.0, 127)
    assert abs(t - 16.21) < 0.4  # the candidate grid step is 100/256
    assert percentile_threshold(hist, 100.0, 50.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name", ["linen_scan_remat_transformer", "pure_control_flow", "nested_jit"]
)
def test_statistics_leave_scan_remat_cond_while_and_jit(name):
    m = by_name(name)
    prog = maas_jax.trace(m.fn, m.params, *m.inputs)
    rule = QuantRule(
        where=tuple(f"^{p}$" for p in m.weight_paths if "embed" not in p),
        weight="int8",
        act="int8",
        act_mode="static",
    )
    fq = passes.fake_quant(rules=[rule])(prog)
    assert fq.meta["uncalibrated_sites"]
    with pytest.raises(passes.ConvertError, match="never calibrated.*calibrate"):
        passes.convert()(fq)
    batches = [
        tuple(
            jax.tree.map(
                lambda x, s=s: x * s if jnp.issubdtype(x.dtype, jnp.floating) else x, m.inputs
            )
        )
        for s in (0.5, 1.0)
    ]
    if name == "pure_control_flow":  # one cond branch is never taken on these inputs
        with pytest.warns(CalibrationWarning, match=r"\[5\] saw no non-zero activation"):
            cal = passes.calibrate(fq, m.params, batches, progress=False)
        assert cal.meta["fake_quant_pass"].dynamic_sites == (5,)
    else:
        cal = passes.calibrate(fq, m.params, batches, progress=False)
    scales = dict(cal.meta["fake_quant_pass"].act_scales)
    assert scales and all(np.isfinite(v) and v > 0 for v in scales.values())
    assert not cal.meta["uncalibrated_sites"]
    int_prog = passes.convert()(cal)
    stored = passes.convert_params(int_prog, cal, m.params)
    jax.tree.map(
        np.testing.assert_array_equal, int_prog(stored, *m.inputs), cal(m.params, *m.inputs)
    )


def test_sharded_batches_give_the_same_ranges():
    fq, params, batches = _single_dense("minmax")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
    a = passes.calibrate(fq, params, batches, progress=False)
    b = passes.calibrate(fq, params, sharded, progress=False)
    assert _scale_of(a) == _scale_of(b)


def test_bad_calibration_data_and_programs():
    fq, params, batches = _single_dense("minmax")
    bad = [batches[0], batches[1].at[3, 2].set(jnp.nan)]
    with pytest.raises(passes.CalibrationError, match="batch 1 has NaN or inf in input args/0"):
        passes.calibrate(fq, params, bad, progress=False)
    with pytest.raises(passes.CalibrationError, match="no calibration batches"):
        passes.calibrate(fq, params, [], progress=False)
    plain = maas_jax.trace(lambda p, x: x @ p["w"], params, batches[0])
    with pytest.raises(passes.CalibrationError, match="not a fake-quant program"):
        passes.calibrate(plain, params, batches, progress=False)
    dyn = passes.fake_quant("int8", act="int8")(plain)
    with pytest.raises(
        passes.CalibrationError, match="no contraction has a static-activation rule"
    ):
        passes.calibrate(dyn, params, batches, progress=False)


def test_progress_is_printed(capsys):
    fq, params, batches = _single_dense("percentile")
    passes.calibrate(fq, params, batches[:2], progress=True)
    err = capsys.readouterr().err
    assert "calibrate ranges: 2/2 batches" in err and "calibrate histograms: 2/2 batches" in err
