"""Tiny models built with real third-party constructors, as pure ``fn(params, *inputs)``.

Each factory returns ``(fn, params, inputs)``: ``fn`` is a pure JAX function of a parameter
pytree and example inputs, ``params`` holds concrete float32 arrays from the library's own
random initializer (fixed seeds, no downloads, no pretrained weights). The library is imported
with ``pytest.importorskip`` inside the factory, so a missing library skips only its models.

Parameter trees are dicts keyed so that pytree key paths read like the library's names:

* Equinox: ``eqx.partition(model, eqx.is_array)`` -> the module tree (``layers/0/weight``);
* Keras 3 / keras-hub: ``{"trainable": {v.path: v.value}, "non_trainable": {...}}``
  (``trainable/dense/kernel``); ``fn`` rebuilds the variable lists for ``stateless_call``;
* penzai: ``{label: data_array}`` from ``pz.unbind_params(model, freeze=True)``
  (``transformer/blocks/attention/query.weights``); ``fn`` re-wraps the named arrays and binds
  them back into the model.

This module must not import ``maas_jax``: it is the independent reference.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest

Model = tuple[Callable[..., Any], Any, tuple[Any, ...]]


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ------------------------------------------------------------------------------------------
# Equinox
# ------------------------------------------------------------------------------------------


def _eqx():
    return pytest.importorskip("equinox")


@functools.cache
def _eqx_classes():
    """Equinox modules used below (defined lazily: equinox may be absent)."""
    eqx = _eqx()

    class TransformerBlock(eqx.Module):
        """Pre-norm block on one sequence ``(seq, dim)``: attention + GELU MLP, residuals."""

        norm1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        norm2: eqx.nn.LayerNorm
        up: eqx.nn.Linear
        down: eqx.nn.Linear

        def __init__(self, dim: int, hidden: int, heads: int, key: jax.Array):
            k1, k2, k3 = jax.random.split(key, 3)
            self.norm1 = eqx.nn.LayerNorm(dim)
            self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k1)
            self.norm2 = eqx.nn.LayerNorm(dim)
            self.up = eqx.nn.Linear(dim, hidden, key=k2)
            self.down = eqx.nn.Linear(hidden, dim, key=k3)

        def __call__(self, x: jax.Array) -> jax.Array:
            h = jax.vmap(self.norm1)(x)
            x = x + self.attn(h, h, h)
            h = jax.vmap(self.norm2)(x)
            return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))

    class ResidualMLP(eqx.Module):
        """One layer of the scan-over-layers idiom: ``x + down(gelu(up(norm(x))))`` on a vector."""

        norm: eqx.nn.LayerNorm
        up: eqx.nn.Linear
        down: eqx.nn.Linear

        def __init__(self, dim: int, hidden: int, key: jax.Array):
            k1, k2 = jax.random.split(key)
            self.norm = eqx.nn.LayerNorm(dim)
            self.up = eqx.nn.Linear(dim, hidden, key=k1)
            self.down = eqx.nn.Linear(hidden, dim, key=k2)

        def __call__(self, x: jax.Array) -> jax.Array:
            return x + self.down(jax.nn.gelu(self.up(self.norm(x))))

    return TransformerBlock, ResidualMLP


def _eqx_init(make: Callable[[jax.Array], Any]) -> Any:
    """``make(jax.random.key(0))`` under ``eqx.filter_jit``: one compile for all initializers."""
    return _eqx().filter_jit(make)(jax.random.key(0))


def _eqx_batched(module) -> tuple[Any, Callable[..., Any]]:
    """``(params, fn)`` for an unbatched Equinox module, ``fn`` vmapped over the batch axis."""
    eqx = _eqx()
    params, static = eqx.partition(module, eqx.is_array)

    def fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    return params, fn


def eqx_mlp() -> Model:
    """``eqx.nn.MLP`` 6 -> 16 -> 16 -> 4 (GELU), on a batch of 3 vectors."""
    eqx = _eqx()
    mlp = _eqx_init(lambda k: eqx.nn.MLP(6, 4, 16, 2, activation=jax.nn.gelu, key=k))
    params, fn = _eqx_batched(mlp)
    return fn, params, (_normal(1, (3, 6)),)


def eqx_transformer_block() -> Model:
    """One pre-norm transformer block (MultiheadAttention, LayerNorm, Linear) on 2 x 5 x 8."""
    block_cls, _ = _eqx_classes()
    params, fn = _eqx_batched(_eqx_init(lambda k: block_cls(8, 16, 2, k)))
    return fn, params, (_normal(1, (2, 5, 8)),)


def eqx_scan_layers() -> Model:
    """Three residual MLP layers stacked by ``eqx.filter_vmap`` and run by ``lax.scan``.

    The Equinox idiom: the stacked module is split with ``eqx.partition``, the arrays (each
    with a leading layer axis) are scanned over and recombined with the static part per step.
    """
    eqx = _eqx()
    _, layer_cls = _eqx_classes()
    stacked = _eqx_init(
        lambda k: eqx.filter_vmap(lambda kk: layer_cls(8, 16, kk))(jax.random.split(k, 3))
    )
    params, static = eqx.partition(stacked, eqx.is_array)

    def fn(p, x):
        def step(h, layer_params):
            layer = eqx.combine(layer_params, static)
            return jax.vmap(layer)(h), None

        h, _ = jax.lax.scan(step, x, p)
        return h

    return fn, params, (_normal(1, (4, 8)),)


def eqx_cnn() -> Model:
    """``eqx.nn.Conv2d`` CNN: conv 3->4, depthwise conv (groups=4), strided conv 4->8, pool, linear."""
    eqx = _eqx()
    relu = eqx.nn.Lambda(jax.nn.relu)
    pool = eqx.nn.Lambda(lambda x: jnp.mean(x, axis=(1, 2)))

    def make(key):
        k = jax.random.split(key, 4)
        return eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(3, 4, 3, padding=1, key=k[0]),
                relu,
                eqx.nn.Conv2d(4, 4, 3, padding=1, groups=4, key=k[1]),
                relu,
                eqx.nn.Conv2d(4, 8, 3, stride=2, key=k[2]),
                relu,
                pool,
                eqx.nn.Linear(8, 3, key=k[3]),
            ]
        )

    cnn = _eqx_init(make)
    params, fn = _eqx_batched(cnn)
    return fn, params, (_normal(1, (2, 3, 8, 8)),)


# ------------------------------------------------------------------------------------------
# Keras 3 (JAX backend) and keras-hub
# ------------------------------------------------------------------------------------------


def _keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras uses the {keras.backend.backend()!r} backend, not jax")
    keras.utils.set_random_seed(0)
    return keras


def _keras_stateless(model) -> tuple[Any, Callable[..., Any]]:
    """``(params, fn)`` for a built Keras model, through ``model.stateless_call``.

    ``params = {"trainable": {v.path: v.value}, "non_trainable": {v.path: v.value}}``;
    ``fn(params, *inputs)`` rebuilds the two variable lists in the model's order.
    """
    trainable = [v.path for v in model.trainable_variables]
    non_trainable = [v.path for v in model.non_trainable_variables]
    assert len(set(trainable + non_trainable)) == len(trainable) + len(non_trainable)
    params = {
        "trainable": {v.path: jnp.asarray(v.value) for v in model.trainable_variables},
        "non_trainable": {v.path: jnp.asarray(v.value) for v in model.non_trainable_variables},
    }

    def fn(p, *inputs):
        out, _ = model.stateless_call(
            [p["trainable"][k] for k in trainable],
            [p["non_trainable"][k] for k in non_trainable],
            *inputs,
        )
        return out

    return params, fn


def keras_mlp() -> Model:
    """``keras.Sequential`` of Dense layers 6 -> 16 (relu) -> 16 (gelu) -> 4."""
    keras = _keras()
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(16, activation="relu", name="dense_in"),
            layers.Dense(16, activation="gelu", name="dense_hidden"),
            layers.Dense(4, name="dense_out"),
        ],
        name="mlp",
    )
    params, fn = _keras_stateless(model)
    return fn, params, (_normal(1, (3, 6)),)


def keras_cnn() -> Model:
    """Functional CNN: Conv2D, BatchNormalization, DepthwiseConv2D, SeparableConv2D, Dense."""
    keras = _keras()
    layers = keras.layers
    inp = keras.Input((8, 8, 3))
    h = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise")(h)
    h = layers.SeparableConv2D(6, 3, strides=2, activation="relu", name="separable")(h)
    h = layers.GlobalAveragePooling2D(name="pool")(h)
    out = layers.Dense(3, name="head")(h)
    params, fn = _keras_stateless(keras.Model(inp, out, name="cnn"))
    return fn, params, (_normal(1, (2, 8, 8, 3)),)


def keras_transformer() -> Model:
    """Functional post-norm encoder block (MultiHeadAttention, LayerNormalization, Dense)."""
    keras = _keras()
    layers = keras.layers
    inp = keras.Input((6, 8))
    a = layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(inp, inp)
    x = layers.LayerNormalization(name="ln1")(layers.Add()([inp, a]))
    h = layers.Dense(16, activation="gelu", name="ffn_up")(x)
    h = layers.Dense(8, name="ffn_down")(h)
    x = layers.LayerNormalization(name="ln2")(layers.Add()([x, h]))
    out = layers.Dense(5, name="head")(layers.GlobalAveragePooling1D(name="pool")(x))
    params, fn = _keras_stateless(keras.Model(inp, out, name="encoder"))
    return fn, params, (_normal(1, (2, 6, 8)),)


def kerashub_gpt2() -> Model:
    """``keras_hub.models.GPT2Backbone`` (2 layers, hidden 8), randomly initialized.

    Inputs are the backbone's dict ``{"token_ids", "padding_mask"}``; the output is the final
    hidden states ``(batch, seq, hidden)``. Non-trainable variables are the dropout seed states.
    """
    _keras()
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    params, fn = _keras_stateless(backbone)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 50, jnp.int32)
    mask = jnp.ones((2, 8), jnp.int32).at[1, 6:].set(0)
    return fn, params, ({"token_ids": tokens, "padding_mask": mask},)


# ------------------------------------------------------------------------------------------
# penzai
# ------------------------------------------------------------------------------------------


def _penzai_lm(**config: Any) -> Model:
    """A llama-like ``penzai.models.transformer`` LM as ``fn(params, tokens) -> logits``.

    ``params`` is ``{label: data_array}`` of the model's unbound parameters; ``fn`` re-wraps
    each array in its named axes, binds the values back into the model and calls it on
    ``tokens`` tagged ``("batch", "seq")``, returning logits ``(batch, seq, vocabulary)``.
    """
    pytest.importorskip("penzai")
    from penzai import pz
    from penzai.models.transformer.variants import llamalike_common

    cfg = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=2,
        query_head_multiplier=1,
        embedding_dim=8,
        projection_dim=4,
        mlp_hidden_dim=16,
        num_decoder_blocks=2,
        vocab_size=32,
        **config,
    )
    build_lm = llamalike_common.build_llamalike_transformer
    unbound = build_lm(cfg, init_base_rng=None)  # the model with parameter slots
    # Initialize under one jit (eager init compiles every initializer separately).
    values = jax.jit(lambda key: pz.unbind_params(build_lm(cfg, key), freeze=True)[1])(
        jax.random.key(0)
    )
    templates = {v.label: v for v in values}
    params = {v.label: v.value.data_array for v in values}

    def fn(p, tokens):
        bound = pz.bind_variables(
            unbound,
            [
                dataclasses.replace(t, value=dataclasses.replace(t.value, data_array=p[label]))
                for label, t in templates.items()
            ],
        )
        logits = bound(pz.nx.wrap(tokens).tag("batch", "seq"))
        return logits.unwrap("batch", "seq", "vocabulary")

    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 32, jnp.int32)
    return fn, params, (tokens,)


def penzai_gemmalike() -> Model:
    """Unrolled 2-block penzai transformer, Gemma-style: GeGLU MLP, tied embedding/logits."""
    return _penzai_lm(mlp_variant="geglu_approx", tie_embedder_and_logits=True)


def penzai_llama_layerstack() -> Model:
    """Llama-style penzai transformer (SwiGLU, lm_head) with its blocks in a ``pz.nn.LayerStack``.

    The stacked block parameters carry a leading ``blocks`` axis and run under ``lax.scan``.
    """
    return _penzai_lm(mlp_variant="swiglu", tie_embedder_and_logits=False, use_layer_stack=True)


MODELS: dict[str, Callable[[], Model]] = {
    "eqx_mlp": eqx_mlp,
    "eqx_transformer_block": eqx_transformer_block,
    "eqx_scan_layers": eqx_scan_layers,
    "eqx_cnn": eqx_cnn,
    "keras_mlp": keras_mlp,
    "keras_cnn": keras_cnn,
    "keras_transformer": keras_transformer,
    "kerashub_gpt2": kerashub_gpt2,
    "penzai_gemmalike": penzai_gemmalike,
    "penzai_llama_layerstack": penzai_llama_layerstack,
}
MODEL_NAMES = tuple(MODELS)


@functools.cache
def build(name: str) -> Model:
    """The model ``name``, built once (skips the test if its library is missing)."""
    return MODELS[name]()
