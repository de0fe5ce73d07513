"""A small real model and data set for quantization and pruning accuracy experiments.

The data are scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no
download). Two Flax Linen models train on them in a few seconds on a CPU:

* :class:`DigitsCNN`: two 3x3 convolutions (the second with stride 2), each optionally
  followed by BatchNorm, then a 64-unit hidden layer (about 40k parameters).
* :class:`DigitsMLP`: one 128-unit hidden layer (about 10k parameters).

:func:`pretrained` trains once per process and caches the result, so tests and benchmarks
can call it repeatedly.

Example:
    >>> from maas_jax.models.digits import accuracy, make_apply, pretrained
    >>> model, variables, (x_train, y_train, x_test, y_test) = pretrained("mlp")
    >>> accuracy(make_apply(model), variables, x_test, y_test) >= 0.95
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "DigitsCNN",
    "DigitsMLP",
    "KINDS",
    "accuracy",
    "load_digits_split",
    "make_apply",
    "make_model",
    "pretrained",
    "train",
]

Array = Any
Variables = Mapping[str, Any]
ApplyFn = Callable[[Variables, Array], Array]

NUM_CLASSES = 10

#: Model kinds understood by :func:`make_model` and :func:`pretrained`.
KINDS = ("cnn_bn", "cnn", "mlp")

# Training settings per kind: (epochs, learning rate). Chosen so that each kind reaches
# its accuracy target (CNN-BN >= 97%, MLP >= 95% test accuracy) in a few seconds on CPU.
_TRAIN_SETTINGS = {
    "cnn_bn": (15, 3e-3),
    "cnn": (15, 3e-3),
    "mlp": (30, 3e-3),
}


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads scikit-learn's 8x8 digits with a fixed stratified 80/20 train/test split.

    Args:
        seed: ``random_state`` of :func:`sklearn.model_selection.train_test_split`; the
            same seed always gives the same split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images as float32 NHWC arrays of shape
        ``[N, 8, 8, 1]`` scaled to ``[0, 1]``, labels as int32 arrays of shape ``[N]``
        (1437 training and 360 test examples).

    Raises:
        ModuleNotFoundError: If scikit-learn is not installed.

    Example:
        >>> from maas_jax.models.digits import load_digits_split
        >>> x_train, y_train, x_test, y_test = load_digits_split()
        >>> x_train.shape, x_train.dtype, y_test.shape, y_test.dtype
        ((1437, 8, 8, 1), dtype('float32'), (360,), dtype('int32'))
        >>> float(x_train.min()), float(x_train.max())
        (0.0, 1.0)
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The digits data set comes from scikit-learn, which is not installed. "
            "Install it with: pip install scikit-learn",
            name="sklearn",
        ) from err

    digits = load_digits()
    images = (np.asarray(digits.images, np.float32) / 16.0)[..., None]  # pixels are 0..16
    labels = np.asarray(digits.target, np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Conv(16, 3x3) -> [BN] -> relu -> Conv(32, 3x3, stride 2) -> [BN] -> relu -> Dense(64) -> relu -> Dense(10).

    Attributes:
        use_batchnorm: Put a BatchNorm after each convolution (the convolutions then
            have no bias). BatchNorm uses batch statistics and updates its running
            averages (collection ``batch_stats``) when ``train`` is true, and uses the
            running averages otherwise.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from maas_jax.models.digits import DigitsCNN
        >>> model = DigitsCNN()
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
        >>> sorted(variables)
        ['batch_stats', 'params']
        >>> model.apply(variables, jnp.zeros((5, 8, 8, 1))).shape
        (5, 10)
    """

    use_batchnorm: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Computes logits.

        Args:
            x: ``[batch, 8, 8, 1]`` images.
            train: Use batch statistics in BatchNorm (and update the running averages,
                which needs ``mutable=["batch_stats"]``).

        Returns:
            ``[batch, 10]`` logits.
        """
        for i, (features, stride) in enumerate(((16, 1), (32, 2))):
            x = nn.Conv(
                features,
                (3, 3),
                strides=(stride, stride),
                padding="SAME",
                use_bias=not self.use_batchnorm,
                name=f"conv{i}",
            )(x)
            if self.use_batchnorm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64, name="dense0")(x))
        return nn.Dense(NUM_CLASSES, name="dense1")(x)


class DigitsMLP(nn.Module):
    """Flatten -> Dense(128) -> relu -> Dense(10).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from maas_jax.models.digits import DigitsMLP
        >>> model = DigitsMLP()
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
        >>> model.apply(variables, jnp.zeros((3, 8, 8, 1))).shape
        (3, 10)
    """

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Computes logits.

        Args:
            x: ``[batch, 8, 8, 1]`` images (any trailing shape; it is flattened).
            train: Ignored (the MLP behaves the same in training and evaluation); present
                so every model here takes the same arguments.

        Returns:
            ``[batch, 10]`` logits.
        """
        del train
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="dense0")(x))
        return nn.Dense(NUM_CLASSES, name="dense1")(x)


def make_model(kind: str) -> nn.Module:
    """Returns an untrained model of the given kind.

    Args:
        kind: ``"cnn_bn"`` (:class:`DigitsCNN` with BatchNorm), ``"cnn"`` (without) or
            ``"mlp"`` (:class:`DigitsMLP`).

    Returns:
        The Linen module.

    Raises:
        ValueError: For an unknown kind.
    """
    if kind == "cnn_bn":
        return DigitsCNN(use_batchnorm=True)
    if kind == "cnn":
        return DigitsCNN(use_batchnorm=False)
    if kind == "mlp":
        return DigitsMLP()
    raise ValueError(f"unknown digits model kind {kind!r}; expected one of {KINDS}")


def make_apply(model: nn.Module) -> ApplyFn:
    """Returns the evaluation-mode logits function ``apply_fn(variables, x)`` of ``model``.

    The result is pure (not jitted), so it can be traced by maas_jax or ``jax.jit``.

    Args:
        model: A :class:`DigitsCNN` or :class:`DigitsMLP`.

    Returns:
        ``model.apply`` for the MLP; ``lambda variables, x: model.apply(variables, x,
        train=False)`` for the CNN (BatchNorm then uses its running averages).
    """
    if isinstance(model, DigitsMLP):
        return model.apply

    def apply_fn(variables: Variables, x: Array) -> Array:
        return model.apply(variables, x, train=False)

    return apply_fn


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Trains ``model`` with Adam on softmax cross-entropy.

    Each epoch visits the examples in a fresh random order, in ``len(x) // batch_size``
    full batches (the remainder, different each epoch, is skipped). One epoch is a single
    jitted ``lax.scan`` over the batches. BatchNorm running averages (``batch_stats``) are
    updated in training mode. The result depends only on the arguments: the same seed gives
    the same variables.

    Args:
        model: A Linen module called as ``model.apply(variables, x, train=...)``
            (:class:`DigitsCNN` or :class:`DigitsMLP`).
        x: ``[N, 8, 8, 1]`` float32 training images.
        y: ``[N]`` integer labels.
        epochs: Passes over the data.
        batch_size: Examples per step (at most ``N``).
        lr: Adam learning rate.
        seed: Seeds the initialization and the batch order.

    Returns:
        The trained variables: ``{"params": ...}`` plus ``"batch_stats"`` for BatchNorm.

    Raises:
        ValueError: If ``x`` and ``y`` differ in length or ``batch_size`` exceeds it.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be in [1, {n}]")
    steps = n // batch_size

    variables = model.init(jax.random.key(seed), jnp.asarray(x[:1]), train=False)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(state)
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    def loss_fn(params, state, xb, yb):
        if mutable:
            logits, new_state = model.apply(
                {"params": params, **state}, xb, train=True, mutable=mutable
            )
        else:
            logits, new_state = model.apply({"params": params}, xb, train=True), state
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, dict(new_state)

    def step(carry, batch):
        params, state, opt_state = carry
        xb, yb = batch
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, state, opt_state), loss

    @jax.jit
    def run_epoch(carry, xs, ys):
        return jax.lax.scan(step, carry, (xs, ys))

    rng = np.random.default_rng(seed)
    carry = (params, state, opt_state)
    for _ in range(epochs):
        order = rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size)
        carry, _ = run_epoch(carry, x[order], y[order])
    params, state, _ = carry
    return {"params": params, **state}


def accuracy(
    apply_fn: ApplyFn,
    variables: Any,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 512,
) -> float:
    """Fraction of examples whose argmax logit equals the label.

    The examples are evaluated in batches of ``min(batch_size, len(x))``; the last batch
    is padded with copies of the first example (and the padded rows ignored), so
    ``apply_fn`` always sees the same input shape and a jitted function compiles once.

    Args:
        apply_fn: ``apply_fn(variables, x) -> [batch, classes]`` logits, e.g.
            :func:`make_apply` of a model or a maas_jax Program (called as
            ``program(variables, x)``).
        variables: Passed unchanged to ``apply_fn``.
        x: ``[N, ...]`` inputs.
        y: ``[N]`` integer labels.
        batch_size: Largest batch passed to ``apply_fn``.

    Returns:
        The accuracy in ``[0, 1]`` as a Python float.

    Raises:
        ValueError: If ``x`` is empty or ``x`` and ``y`` differ in length.

    Example:
        >>> import numpy as np
        >>> from maas_jax.models.digits import accuracy
        >>> logits = np.array([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0], [5.0, 4.0]])
        >>> accuracy(lambda v, x: v[x[:, 0]], logits, np.arange(4)[:, None], np.array([1, 0, 0, 0]))
        0.75
    """
    x = np.asarray(x)
    y = np.asarray(y)
    n = len(x)
    if n == 0:
        raise ValueError("accuracy() needs at least one example")
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    batch = min(batch_size, n)
    correct = 0
    for start in range(0, n, batch):
        xb = x[start : start + batch]
        real = len(xb)
        if real < batch:
            xb = np.concatenate([xb, np.repeat(xb[:1], batch - real, axis=0)])
        logits = np.asarray(apply_fn(variables, xb))[:real]
        correct += int(np.sum(np.argmax(logits, axis=-1) == y[start : start + real]))
    return correct / n


@functools.lru_cache(maxsize=16)
def pretrained(kind: str = "cnn_bn", seed: int = 0) -> tuple[nn.Module, dict[str, Any], tuple]:
    """Trains a model of the given kind once per process and returns it (cached).

    Args:
        kind: ``"cnn_bn"``, ``"cnn"`` or ``"mlp"`` (see :func:`make_model`).
        seed: Seeds the data split and the training.

    Returns:
        ``(model, variables, data)`` with ``data = load_digits_split(seed)``, i.e.
        ``(x_train, y_train, x_test, y_test)``. The same objects are returned on every
        call with the same arguments: do not modify them in place.

    Raises:
        ValueError: For an unknown kind.
    """
    model = make_model(kind)
    epochs, lr = _TRAIN_SETTINGS[kind]
    data = load_digits_split(seed)
    variables = train(model, data[0], data[1], epochs=epochs, lr=lr, seed=seed)
    return model, variables, data
