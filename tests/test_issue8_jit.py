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


def test_stored_integers_are_those_the_jitted_fake_quant_program_computes(tied_lm):
    _, params, _, fq, int_prog = tied_lm
    eager = passes.convert_params(int_prog, fq, params)
    jitted = jax.jit(lambda p: passes.convert_params(int_prog, fq, p))(params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
