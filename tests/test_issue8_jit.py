"""When fake-quant and converted programs agree bit for bit, and when they may not (issue 8.8).

Eagerly (op by op) the converted program computes exactly what the fake-quant program does:
same integer codes, same int32 accumulators, same float epilogue. Under ``jax.jit`` each
program is compiled as its own XLA module, and XLA fuses and vectorizes the float ops around
the integer contractions (softmax's ``exp`` and sums, SwiGLU, RMSNorm's ``rsqrt``) per module:
the two can then differ by an ulp or two, exactly as ``jax.jit(model)`` differs from the eager
float model itself. The integers never differ. These tests pin that statement down on the
penzai tied-embedding transformer, where it was observed.
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import maas_jax
from maas_jax import passes

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def tied_lm():
    pytest.importorskip("penzai")
    import third_party_models as tpm

    fn, params, inputs = tpm._penzai_lm(mlp_variant="swiglu", tie_embedder_and_logits=True)
    fq = passes.fake_quant("int8", act="int8")(maas_jax.trace(fn, params, *inputs))
    return fn, params, inputs, fq, passes.convert()(fq)


@pytest.mark.slow
def test_eager_bit_exact_and_jit_within_float_rounding(tied_lm):
    fn, params, inputs, fq, int_prog = tied_lm
    stored = passes.convert_params(int_prog, fq, params)
    eager_fq, eager_int = fq(params, *inputs), int_prog(stored, *inputs)
    np.testing.assert_array_equal(np.asarray(eager_int), np.asarray(eager_fq))
    jit_fq = np.asarray(jax.jit(fq)(params, *inputs))
    jit_int = np.asarray(jax.jit(int_prog)(stored, *inputs))
    # Within a few float32 roundings of the largest logit: the fused epilogue, not the math.
    tol = 8 * np.finfo(np.float32).eps * float(np.abs(jit_fq).max())
    assert float(np.abs(jit_int - jit_fq).max()) <= tol
    # The same order of difference as the float model's own jit vs eager.
    float_jit = np.asarray(jax.jit(fn)(params, *inputs))
    float_eager = np.asarray(fn(params, *inputs))
    assert float(np.abs(float_jit - float_eager).max()) <= tol


def test_stored_integers_equal_a_numpy_quantization_of_the_weights(tied_lm):
    """What the converted program runs on, jitted or not, is the numpy int8 quantization of
    each float weight: ``round_half_even(w / (max|w| / 127))`` over the spec's shared axes."""
    _, params, _, fq, int_prog = tied_lm
    stored = jax.jit(lambda p: passes.convert_params(int_prog, fq, p))(params)
    specs = fq.meta["fake_quant"]
    assert specs
    for path, spec in specs.items():
        assert spec.tile is None and spec.symmetric
        w = np.asarray(params[path], np.float32)
        absmax = np.max(np.abs(w), axis=spec.reduce_axes, keepdims=True)
        scale = np.where(
            absmax / np.float32(127) >= np.finfo(np.float32).tiny,
            absmax / np.float32(127),
            np.float32(1),
        )
        want = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        node = stored
        for key in path.split("/"):
            node = node[key]
        np.testing.assert_array_equal(np.asarray(node["qvalue"]), want, err_msg=path)
        np.testing.assert_allclose(np.asarray(node["scale"]), scale, rtol=0, atol=0)
