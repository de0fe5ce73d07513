"""The digits data split, the small CNN/MLP models, their training and ``accuracy``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")

from maas_jax.models import digits  # noqa: E402


def test_split_shapes_dtypes_and_ranges():
    x_train, y_train, x_test, y_test = digits.load_digits_split()
    assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int32 and y_test.dtype == np.int32
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
    # Stratified: every class keeps (almost exactly) its share in the test split.
    all_counts = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    np.testing.assert_allclose(np.bincount(y_test, minlength=10), all_counts * 0.2, atol=1)


def test_split_is_deterministic_and_seeded():
    a, b = digits.load_digits_split(0), digits.load_digits_split(0)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    c = digits.load_digits_split(1)
    assert not np.array_equal(a[3], c[3])
    # Train and test together hold every image once.
    assert len(a[0]) + len(a[2]) == 1797
    np.testing.assert_allclose(
        np.sort(np.concatenate([a[0], a[2]]).sum(axis=(1, 2, 3))),
        np.sort(np.concatenate([c[0], c[2]]).sum(axis=(1, 2, 3))),
    )


def test_accuracy_matches_numpy_argmax():
    logits = np.array(
        [[0.1, 2.0, -1.0], [3.0, 0.0, 0.5], [0.0, 1.0, 4.0], [5.0, 4.0, 0.0], [0.0, 0.0, 1.0]],
        np.float32,
    )
    labels = np.array([1, 0, 1, 0, 2], np.int32)
    rows = np.arange(len(logits))[:, None]

    def apply_fn(variables, x):
        return variables[x[:, 0]]

    expected = float(np.mean(np.argmax(logits, axis=1) == labels))
    assert expected == 0.8
    # Several batch sizes, including ones that leave a padded last batch.
    for batch_size in (1, 2, 3, 5, 512):
        assert digits.accuracy(apply_fn, logits, rows, labels, batch_size=batch_size) == expected


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        digits.accuracy(lambda v, x: x, None, np.zeros((0, 2)), np.zeros((0,)))
    with pytest.raises(ValueError, match="examples"):
        digits.accuracy(lambda v, x: x, None, np.zeros((3, 2)), np.zeros((2,)))


def test_make_model_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown digits model kind"):
        digits.make_model("resnet")


def test_train_is_deterministic():
    x, y, _, _ = digits.load_digits_split()
    model = digits.DigitsCNN()
    a = digits.train(model, x[:256], y[:256], epochs=1, seed=3)
    b = digits.train(model, x[:256], y[:256], epochs=1, seed=3)
    assert sorted(a) == ["batch_stats", "params"]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # Training mode updated the BatchNorm running averages.
    assert float(jnp.abs(a["batch_stats"]["bn0"]["mean"]).max()) > 0


@pytest.mark.parametrize("kind, target", [("cnn_bn", 0.97), ("cnn", 0.97), ("mlp", 0.95)])
def test_pretrained_accuracy(kind, target):
    model, variables, (_, _, x_test, y_test) = digits.pretrained(kind)
    assert digits.accuracy(digits.make_apply(model), variables, x_test, y_test) >= target
    # Cached: the second call returns the very same objects without training again.
    assert digits.pretrained(kind)[1] is variables


def test_pretrained_accepts_a_jitted_apply():
    model, variables, (_, _, x_test, y_test) = digits.pretrained("cnn_bn")
    apply_fn = digits.make_apply(model)
    eager = digits.accuracy(apply_fn, variables, x_test, y_test)
    assert digits.accuracy(jax.jit(apply_fn), variables, x_test, y_test, batch_size=100) == eager


def test_batchnorm_eval_output_does_not_depend_on_the_batch():
    model, variables, (_, _, x_test, _) = digits.pretrained("cnn_bn")
    apply_fn = jax.jit(digits.make_apply(model))
    full = np.asarray(apply_fn(variables, x_test[:32]))
    alone = np.concatenate([np.asarray(apply_fn(variables, x_test[i : i + 1])) for i in range(4)])
    np.testing.assert_allclose(full[:4], alone, rtol=1e-5, atol=1e-5)
    shuffled = np.asarray(apply_fn(variables, x_test[:32][::-1]))[::-1]
    np.testing.assert_allclose(full, shuffled, rtol=1e-5, atol=1e-5)
