"""Side-by-side baseline: the same models quantized by qwix (``pip install qwix``).

qwix is the quantization library maas_jax is measured against (see shared/ANCHORS.md).
This module wraps its post-training quantization (PTQ) path in a few helpers so that
benchmarks can run qwix and maas_jax on the same model, inputs and timer:

* :func:`qwix_ptq`: float Linen model + variables -> qwix-quantized apply function and
  variables, plus the wall time that took.
* :func:`param_bytes`: bytes of the arrays actually stored (qwix's quantized weights are
  ``WithAux(QArray(qvalue, scale, zero_point))`` pytrees; their array leaves are counted).
* :func:`time_fn`, :func:`time_to_first_result`: latency and cold-start timers.
* :class:`MLP4x1024` / :func:`make_mlp`: the 4x1024 MLP at batch 256 of the issue.
* :func:`qwix_minilm_cosine`: embedding drift of qwix-quantized all-MiniLM-L6-v2.
* :func:`qwix_conv_report`: what qwix does with the digits CNN in several modes.

Run as a script for the numbers on this machine::

    python benchmarks/qwix_baseline.py

Import it from other benchmark scripts (which put ``benchmarks/`` on ``sys.path``) with
``import qwix_baseline``.
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = [
    "MLP4x1024",
    "available",
    "make_mlp",
    "param_bytes",
    "qwix_conv_report",
    "MINILM_DENSE_ONLY",
    "count_integer_dots",
    "qwix_minilm_cosine",
    "qwix_ptq",
    "time_fn",
    "time_to_first_result",
]


def available() -> bool:
    """Whether qwix can be imported (``pip install qwix``)."""
    return importlib.util.find_spec("qwix") is not None


# --------------------------------------------------------------------------------------
# The benchmark model
# --------------------------------------------------------------------------------------


class MLP4x1024(nn.Module):
    """Four ``Dense(1024)`` layers with relu between them (none after the last).

    Input ``[batch, 1024]``, output ``[batch, 1024]``; about 4.2M float32 parameters.
    """

    width: int = 1024
    depth: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            if i:
                x = nn.relu(x)
            x = nn.Dense(self.width, name=f"dense{i}")(x)
        return x


def make_mlp(seed: int = 0, batch: int = 256) -> tuple[MLP4x1024, dict[str, Any], jax.Array]:
    """The 4x1024 MLP, its initialized variables and a random input batch.

    Args:
        seed: Seeds the parameters (``jax.random.key(seed)``) and the input
            (``jax.random.key(seed + 1)``).
        batch: Rows of the input.

    Returns:
        ``(model, variables, x)`` with ``variables = {"params": ...}`` and ``x`` a
        ``[batch, 1024]`` float32 standard-normal array.
    """
    model = MLP4x1024()
    x = jax.random.normal(jax.random.key(seed + 1), (batch, model.width), jnp.float32)
    variables = model.init(jax.random.key(seed), x)
    return model, variables, x


# --------------------------------------------------------------------------------------
# qwix PTQ
# --------------------------------------------------------------------------------------


@contextmanager
def _quiet_qwix() -> Iterator[None]:
    """Silences the one deprecation warning qwix 0.1.8 triggers on every call with flax 0.12.

    qwix's ``flax_util.unbox`` tests ``isinstance(x, nnx.Variable | nnx.VariableState)``
    and flax warns about ``nnx.VariableState`` with ``stacklevel=2``, which attributes the
    warning to qwix (so a ``filterwarnings = error`` test run fails on it).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="'VariableState' was removed", category=DeprecationWarning
        )
        yield


def qwix_ptq(
    model: nn.Module,
    variables: dict[str, Any],
    *inputs: Any,
    weight_qtype: str | None = "int8",
    act_qtype: str | None = "int8",
    tile_size: int | float | None = None,
    method: str = "__call__",
    module_path: str = ".*",
    **apply_kwargs: Any,
) -> tuple[Callable[..., Any], dict[str, Any], float]:
    """Quantizes a Linen model with qwix PTQ, the way qwix's documentation does it.

    ``qwix.quantize_model(model, qwix.PtqProvider(rules))``, then the abstract quantized
    params from ``jax.eval_shape(ptq.init, ...)`` and ``qwix.quantize_params``. Activation
    quantization (``act_qtype`` set) is *dynamic-range*: ``act_static_scale=False`` and
    ``act_calibration_method="absmax"``, i.e. scales are computed at run time per row of
    each dot's non-contracting axes (per token for ``[tokens, features]`` inputs).

    Args:
        model: The float Linen model (not modified).
        variables: Its float variables: ``{"params": ..., <other collections>}``; the other
            collections (e.g. ``batch_stats``) are passed through unchanged.
        *inputs: Example positional inputs of ``method`` (shapes matter, values do not).
        weight_qtype: Weight type, e.g. ``"int8"``, ``"int4"``.
        act_qtype: Activation type, or None for weight-only quantization.
        tile_size: Sub-channel tile along the contraction axis (qwix ``tile_size``).
        method: Name of the model method to quantize and run, e.g. ``"embed_sentences"``.
            Must be a name: qwix installs the intercepted methods on a new subclass, and
            the original function object (``method=BertEncoder.embed_sentences``) runs
            unintercepted on the quantized params and fails with a cryptic
            ``ValueError: setting an array element with a sequence``.
        module_path: Regex on the Flax module path selecting what to quantize.
        **apply_kwargs: Keyword arguments of ``method`` used for the abstract init and by
            the returned ``apply_fn`` (e.g. ``train=False``).

    Returns:
        ``(apply_fn, qvariables, quantize_seconds)``: ``apply_fn(qvariables, *inputs)``
        runs the quantized model (not jitted); ``quantize_seconds`` is the wall time from
        the float model to quantized params ready on the device.

    Raises:
        ModuleNotFoundError: If qwix is not installed.
    """
    if not available():
        raise ModuleNotFoundError("qwix is not installed: pip install qwix", name="qwix")
    import qwix

    rule = qwix.QuantizationRule(
        module_path=module_path,
        weight_qtype=weight_qtype,
        act_qtype=act_qtype,
        tile_size=tile_size,
        # None means "static in ODML, dynamic in XLA"; say it explicitly. qwix rejects
        # act_static_scale set (even to False) when act_qtype is None.
        act_static_scale=False if act_qtype is not None else None,
        act_calibration_method="absmax" if act_qtype is not None else None,
    )
    start = time.perf_counter()
    with _quiet_qwix():
        qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]), methods=(method,))
        abstract = jax.eval_shape(
            lambda *a: qmodel.init(jax.random.key(0), *a, method=method, **apply_kwargs),
            *inputs,
        )
        # quantize_params wants a pure dict of jax.Array (numpy leaves: TypeError).
        params = jax.tree.map(jnp.asarray, nn.unbox(variables["params"]))
        qparams = qwix.quantize_params(params, abstract["params"])
        qvariables = {**variables, "params": qparams}
        jax.block_until_ready(qvariables)
    seconds = time.perf_counter() - start

    def apply_fn(qvariables: dict[str, Any], *args: Any) -> Any:
        with _quiet_qwix():
            return qmodel.apply(qvariables, *args, method=method, **apply_kwargs)

    return apply_fn, qvariables, seconds


def param_bytes(tree: Any) -> int:
    """Bytes of all array leaves of ``tree`` as stored on the device.

    qwix's quantized weights are pytrees (``WithAux`` -> ``QArray``) whose leaves are the
    stored arrays ``qvalue``, ``scale`` and, for asymmetric types, ``zero_point``; the
    static ``how``/``qtype`` fields are not leaves. For jax arrays the device buffer size
    is used (``on_device_size_in_bytes``): int4 takes one byte per value on CPU, not half.

    Args:
        tree: Any pytree (variables, a quantized param tree, ...); non-array leaves count 0.

    Returns:
        The total byte count.
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and hasattr(leaf, "on_device_size_in_bytes"):
            total += int(leaf.on_device_size_in_bytes())
        elif hasattr(leaf, "nbytes"):
            total += int(leaf.nbytes)
    return total


# --------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------


def time_fn(
    fn: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 2
) -> tuple[float, tuple[float, float]]:
    """Wall time of ``fn(*args)`` including ``block_until_ready`` on its result.

    Args:
        fn: The function (jit it first to time compiled code).
        *args: Its arguments.
        repeats: Timed calls.
        warmup: Untimed calls first (compilation, caches).

    Returns:
        ``(median_seconds, (min_seconds, max_seconds))``.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), (min(times), max(times))


def time_to_first_result(make_and_run: Callable[[], Any]) -> float:
    """Seconds from a float model to the first compiled quantized result.

    Clears jax's compilation caches first, then times ``make_and_run()`` (which should
    quantize, jit and run once) up to ``block_until_ready`` on what it returns.

    Args:
        make_and_run: A no-argument function doing everything from the float model on.

    Returns:
        The elapsed wall time in seconds.
    """
    jax.clear_caches()
    start = time.perf_counter()
    jax.block_until_ready(make_and_run())
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------


#: qwix module paths of MiniLM's dense layers only (Q, K, V, attention output, FFN in/out):
#: the 36 contractions maas_jax quantizes. The default ``".*"`` also matches the attention
#: modules, whose score and context einsums (activation x activation) qwix then quantizes.
MINILM_DENSE_ONLY = r".*/(query|key|value|output|intermediate)$"


def count_integer_dots(fn: Callable[..., Any], *args: Any) -> tuple[int, int]:
    """``(integer dot_generals, all dot_generals)`` in ``jax.make_jaxpr(fn)(*args)``,
    sub-jaxprs (jit, scan, custom_jvp, ...) included: counted independently of either
    library's own report."""
    from jax.extend import core as jcore

    def walk(jaxpr: Any) -> tuple[int, int]:
        n_int = n_all = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                n_all += 1
                if all(jnp.issubdtype(v.aval.dtype, jnp.integer) for v in eqn.invars):
                    n_int += 1
            for v in eqn.params.values():
                for sub in v if isinstance(v, tuple | list) else (v,):
                    inner = getattr(sub, "jaxpr", sub)
                    if isinstance(inner, jcore.Jaxpr):
                        a, b = walk(inner)
                        n_int, n_all = n_int + a, n_all + b
        return n_int, n_all

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def qwix_minilm_cosine(
    weight_qtype: str = "int8",
    act_qtype: str | None = "int8",
    num_sentences: int = 64,
    module_path: str = ".*",
    *,
    return_counts: bool = False,
) -> Any:
    """Mean cosine between qwix-quantized and float all-MiniLM-L6-v2 sentence embeddings.

    The Linen ``BertEncoder`` is quantized with every Dense (``module_path=".*"``) under
    the given types, and run through ``embed_sentences`` so pooling and normalization run
    as in the float model. With ``act_qtype`` set, qwix also quantizes both operands of the
    attention einsums (score and context products) with dynamic per-row scales.

    Args:
        weight_qtype: Weight type.
        act_qtype: Activation type (dynamic-range), or None for weight-only.
        num_sentences: How many of :data:`maas_jax.models.sentences.SENTENCES` (from the
            start) are embedded, as one batch padded to the longest.

    Returns:
        The mean over sentences of ``cos(e_qwix, e_float)``.
    """
    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    model, variables, tokenizer, embed_fn = load_minilm()
    batch = tokenizer.encode(list(SENTENCES[:num_sentences]))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    reference = np.asarray(jax.jit(embed_fn)(variables, *args))
    apply_fn, qvariables, _ = qwix_ptq(
        model,
        variables,
        *args,
        weight_qtype=weight_qtype,
        act_qtype=act_qtype,
        method="embed_sentences",
        module_path=module_path,
    )
    quantized = np.asarray(jax.jit(apply_fn)(qvariables, *args))
    cos = np.sum(reference * quantized, axis=-1) / (
        np.linalg.norm(reference, axis=-1) * np.linalg.norm(quantized, axis=-1)
    )
    if return_counts:
        return float(np.mean(cos)), count_integer_dots(apply_fn, qvariables, *args)
    return float(np.mean(cos))


#: (label, weight_qtype, act_qtype) of :func:`qwix_conv_report`.
CONV_MODES: tuple[tuple[str, str, str | None], ...] = (
    ("w8a8", "int8", "int8"),
    ("int8 weight-only", "int8", None),
    ("w4a8", "int4", "int8"),
    ("w4a4", "int4", "int4"),
)


def qwix_conv_report(
    modes: Sequence[tuple[str, str, str | None]] = CONV_MODES, kind: str = "cnn_bn"
) -> dict[str, str]:
    """Quantizes the digits CNN with qwix in several modes and records what happens.

    Args:
        modes: ``(label, weight_qtype, act_qtype)`` triples.
        kind: Which :func:`maas_jax.models.digits.pretrained` model.

    Returns:
        ``{label: "test accuracy 0.9750 (float 0.9750)" or "<ExceptionType>: message"}``.
    """
    from maas_jax.models import digits

    model, variables, (_, _, x_test, y_test) = digits.pretrained(kind)
    float_acc = digits.accuracy(jax.jit(digits.make_apply(model)), variables, x_test, y_test)
    report = {}
    for label, weight_qtype, act_qtype in modes:
        try:
            apply_fn, qvariables, _ = qwix_ptq(
                model,
                variables,
                x_test[:1],
                weight_qtype=weight_qtype,
                act_qtype=act_qtype,
                train=False,
            )
            acc = digits.accuracy(jax.jit(apply_fn), qvariables, x_test, y_test)
            report[label] = f"test accuracy {acc:.4f} (float {float_acc:.4f})"
        except Exception as err:  # recording what qwix raises is the point
            message = str(err).splitlines()[0] if str(err) else ""
            report[label] = f"{type(err).__name__}: {message}"
    return report


# --------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------

#: (label, weight_qtype, act_qtype, tile_size) of the MLP benchmark. The first three are
#: the modes of shared/ANCHORS.md; the last two are extra points.
MLP_MODES: tuple[tuple[str, str, str | None, int | None], ...] = (
    ("w8a8 (dynamic per-token)", "int8", "int8", None),
    ("int8 weight-only", "int8", None, None),
    ("int4 weight-only", "int4", None, None),
    ("int4 weight-only, tile 128", "int4", None, 128),
    ("w4a8 (dynamic per-token)", "int4", "int8", None),
)

#: Timed calls per latency measurement of the script.
REPEATS = 50


def main() -> None:
    """Prints the qwix numbers of this machine (compare with shared/ANCHORS.md)."""
    if not available():
        print("qwix is not installed: pip install qwix")
        return
    import qwix

    print(
        f"qwix {qwix.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{platform.processor() or platform.machine()}"
    )
    model, variables, x = make_mlp()
    print(f"\n4x1024 MLP, batch {x.shape[0]}: median (min-max) of {REPEATS} runs")
    fp32 = jax.jit(model.apply)
    median, (low, high) = time_fn(fp32, variables, x, repeats=REPEATS)
    reference = np.asarray(fp32(variables, x))
    print(
        f"  {'fp32':28s} {median * 1e3:7.2f} ms ({low * 1e3:.2f}-{high * 1e3:.2f})"
        f"  params {param_bytes(variables):>10,d} B"
    )
    # One untimed quantization first, so the "quantize" column below does not include the
    # one-time compilation of qwix's eager quantization ops (the cold numbers follow).
    qwix_ptq(model, variables, x)
    for label, weight_qtype, act_qtype, tile_size in MLP_MODES:
        apply_fn, qvariables, quantize_s = qwix_ptq(
            model, variables, x, weight_qtype=weight_qtype, act_qtype=act_qtype, tile_size=tile_size
        )
        run = jax.jit(apply_fn)
        median, (low, high) = time_fn(run, qvariables, x, repeats=REPEATS)
        out = np.asarray(run(qvariables, x))
        rel = np.linalg.norm(out - reference) / np.linalg.norm(reference)
        print(
            f"  {label:28s} {median * 1e3:7.2f} ms ({low * 1e3:.2f}-{high * 1e3:.2f})"
            f"  params {param_bytes(qvariables):>10,d} B  rel err {rel:.4f}"
            f"  quantize {quantize_s * 1e3:.0f} ms"
        )

    print("\nModel to first result (jax.clear_caches() first; quantize + jit + run):")

    def fp32_first():
        return jax.jit(model.apply)(variables, x)

    print(f"  {'fp32 (jit + run)':28s} {time_to_first_result(fp32_first):.3f} s")
    for label, weight_qtype, act_qtype, tile_size in MLP_MODES[:3]:

        def first(weight_qtype=weight_qtype, act_qtype=act_qtype, tile_size=tile_size):
            apply_fn, qvariables, _ = qwix_ptq(
                model,
                variables,
                x,
                weight_qtype=weight_qtype,
                act_qtype=act_qtype,
                tile_size=tile_size,
            )
            return jax.jit(apply_fn)(qvariables, x)

        print(f"  {label:28s} {time_to_first_result(first):.3f} s")

    print("\nall-MiniLM-L6-v2, first 64 sentences: mean cosine(qwix, fp32) of embeddings")
    try:
        for label, act_qtype in (("w8a8 (dynamic)", "int8"), ("int8 weight-only", None)):
            print(f"  {label:28s} {qwix_minilm_cosine('int8', act_qtype):.6f}")
    except ModuleNotFoundError as err:
        print(f"  skipped: {err}")

    print("\nDigits CNN (conv + BatchNorm) under qwix PTQ:")
    try:
        for label, result in qwix_conv_report().items():
            print(f"  {label:28s} {result}")
    except ModuleNotFoundError as err:
        print(f"  skipped: {err}")


if __name__ == "__main__":
    main()
