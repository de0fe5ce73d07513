"""Smoke tests of the qwix side-by-side baseline (benchmarks/qwix_baseline.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import qwix_baseline  # noqa: E402


@pytest.fixture(scope="module")
def mlp():
    # A narrower, shorter copy of the benchmark MLP keeps the test fast.
    model = qwix_baseline.MLP4x1024(width=256)
    x = jax.random.normal(jax.random.key(1), (32, 256), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    return model, variables, x, np.asarray(model.apply(variables, x))


def _rel_err(out, reference):
    return float(np.linalg.norm(np.asarray(out) - reference) / np.linalg.norm(reference))


def test_available():
    assert qwix_baseline.available()


def test_make_mlp_shapes():
    model, variables, x = qwix_baseline.make_mlp(batch=4)
    assert x.shape == (4, 1024) and x.dtype == jnp.float32
    assert sorted(variables["params"]) == ["dense0", "dense1", "dense2", "dense3"]
    assert model.apply(variables, x).shape == (4, 1024)


@pytest.mark.parametrize("act_qtype", ["int8", None])
def test_int8_output_close_to_fp32(mlp, act_qtype):
    model, variables, x, reference = mlp
    apply_fn, qvariables, seconds = qwix_baseline.qwix_ptq(
        model, variables, x, weight_qtype="int8", act_qtype=act_qtype
    )
    assert seconds > 0
    assert _rel_err(jax.jit(apply_fn)(qvariables, x), reference) < 0.05


def test_w8a8_is_real_int8_and_dynamic(mlp):
    model, variables, x, _ = mlp
    apply_fn, qvariables, _ = qwix_baseline.qwix_ptq(model, variables, x)
    hlo = jax.jit(apply_fn).lower(qvariables, x).as_text()
    assert "i8>" in hlo and "-> tensor<32x256xi32>" in hlo  # s8 x s8 -> s32 dots
    # Dynamic activations: no activation scale was stored with the params.
    flat = jax.tree_util.tree_flatten_with_path(qvariables)[0]
    assert not any("scale" in jax.tree_util.keystr(path[:3]) for path, _ in flat)


def test_int8_bytes_below_a_third_of_fp32(mlp):
    model, variables, x, _ = mlp
    _, qvariables, _ = qwix_baseline.qwix_ptq(model, variables, x, act_qtype=None)
    fp32 = qwix_baseline.param_bytes(variables)
    assert fp32 == sum(4 * leaf.size for leaf in jax.tree.leaves(variables))
    assert qwix_baseline.param_bytes(qvariables) < 0.3 * fp32


def test_param_bytes_counts_qarray_leaves(mlp):
    model, variables, x, _ = mlp
    _, qvariables, _ = qwix_baseline.qwix_ptq(model, variables, x, weight_qtype="int4")
    kernel = qvariables["params"]["dense0"]["kernel"]
    leaves = jax.tree.leaves(kernel)
    assert sorted(str(leaf.dtype) for leaf in leaves) == ["float32", "int4"]
    # qvalue (int4 stored one byte per value) + per-channel float32 scale.
    assert qwix_baseline.param_bytes(kernel) == 256 * 256 + 4 * 256
    assert qwix_baseline.param_bytes({"a": np.zeros(3, np.float64), "b": None}) == 24


def test_timers_return_positive_numbers(mlp):
    model, variables, x, _ = mlp
    fn = jax.jit(model.apply)
    median, (low, high) = qwix_baseline.time_fn(fn, variables, x, repeats=3)
    assert 0 < low <= median <= high
    seconds = qwix_baseline.time_to_first_result(lambda: jax.jit(model.apply)(variables, x))
    assert seconds > 0


def test_conv_weight_only_is_rejected_by_qwix():
    pytest.importorskip("sklearn")
    report = qwix_baseline.qwix_conv_report(modes=[("int8 weight-only", "int8", None)])
    assert "requires same act_qtype and weight_qtype" in report["int8 weight-only"]
