"""``maas-jax tour``: the optimizer on the bundled all-MiniLM-L6-v2 model and a digits CNN.

Load the weights into our Flax BERT, trace the sentence-embedding function, print the
parameter / consumer / coverage reports, run pipelines and check their outputs; then prune and
quantize a small CNN trained on scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def _progress(message: str) -> None:
    """Say what a long, silent step is doing before it starts."""
    print(message, flush=True)


def _pipeline_summary(pipe: Any, width: int = 96) -> str:
    """One line per pass, long configurations shortened: readable where ``repr`` is not."""
    from maas_jax._pipeline import pass_name

    steps = list(pipe.leaves())
    lines = [f"pipeline of {len(steps)} passes:"]
    for i, p in enumerate(steps, 1):
        text = repr(p)
        if len(text) > width:
            text = text[: width - 5] + " ...)"
        lines.append(f"  {i}. {pass_name(p):<15} {text}")
    return "\n".join(lines)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def demo(n_sentences: int = 16, clip_quantile: float = 0.9999) -> int:
    """The README demo. Returns a process exit code (non-zero if a check fails)."""
    import maas_jax
    from maas_jax import passes
    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    _section("load all-MiniLM-L6-v2 (bundled weights, our Flax Linen BERT)")
    model, variables, tokenizer, embed_fn = load_minilm(logical_axes=True)
    sentences = list(SENTENCES[:n_sentences])
    batch = tokenizer.encode(sentences, pad_to=64)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    print(f"{len(sentences)} sentences, padded to {args[0].shape[1]} tokens")

    _section("trace")
    t0 = time.perf_counter()
    program = maas_jax.trace(embed_fn, variables, *args, name="minilm_embed")
    print(f"{program}  (traced in {time.perf_counter() - t0:.2f} s)")

    _section("parameters (first 12) and their consumers")
    print(maas_jax.param_report(program, max_rows=12))
    table = maas_jax.consumers(program)
    q = "params/encoder/layer_0/attention/query/kernel"
    print(f"\nconsumers of {q}:")
    for use in table[q]:
        print("  " + use.describe())
    emb = "params/embeddings/word_embeddings/embedding"
    print(f"consumers of {emb}:")
    for use in table[emb]:
        print("  " + use.describe())

    _section("coverage before any pass (first 8 contractions)")
    print(maas_jax.coverage_report(program, max_rows=8))

    reference = jax.jit(embed_fn)(variables, *args)
    failures = 0

    _section("identity pipeline: outputs must be bit-exact")
    for label, pipe in [
        ("pipeline()", maas_jax.pipeline()),
        ("pipeline(dce())", maas_jax.pipeline(passes.dce())),
    ]:
        out_prog = pipe(program)
        out = jax.jit(out_prog)(variables, *args)
        exact = bool(np.array_equal(np.asarray(out), np.asarray(reference)))
        failures += not exact
        print(
            f"{label:<22} max |diff| = {float(jnp.max(jnp.abs(out - reference))):.1e}  "
            f"bit-exact: {exact}"
        )

    _section("clip_weights + dce")
    weights = [
        np.abs(np.asarray(leaf))
        for path, leaf in _leaves_by_path(variables).items()
        if path.endswith("kernel")
    ]
    bound = float(np.quantile(np.concatenate([w.ravel() for w in weights]), clip_quantile))
    pipe = maas_jax.pipeline(passes.clip_weights(bound), passes.dce())
    print(_pipeline_summary(pipe))
    clipped, t_pass = _timed(pipe, program)
    print(
        f"passes ran in {t_pass:.2f} s; clipped: {len(clipped.history[0].touched)} weights "
        f"at |w| <= {bound:.3f} (the {clip_quantile:.2%} quantile of |kernel|)"
    )
    print(maas_jax.coverage_report(clipped, max_rows=4))
    compiled_fn = jax.jit(clipped)
    lowered = compiled_fn.trace(variables, *args).lower()
    t0 = time.perf_counter()
    lowered.compile()
    t_compile = time.perf_counter() - t0
    out = compiled_fn(variables, *args)
    cos = np.sum(np.asarray(out) * np.asarray(reference), axis=-1)
    print(
        f"XLA compile {t_compile:.2f} s; embedding cosine to fp32 after clipping: "
        f"mean {cos.mean():.6f}, min {cos.min():.6f}"
    )
    manual = jax.jit(embed_fn)(_clip_kernels(variables, clipped.history[0].touched, bound), *args)
    agree = float(jnp.max(jnp.abs(out - manual)))
    ok = agree <= 1e-6
    failures += not ok
    print(f"matches the model run on clipped weights by hand: max |diff| = {agree:.1e}  ok: {ok}")

    _section("quantize: int8 weight-only and w8a8 (dynamic per-token), converted to integers")
    t_float = _latency(jax.jit(embed_fn), variables, *args)
    float_bytes = _nbytes(variables)
    print(
        f"{'model':<26}{'params':>12}{'vs fp32':>9}{'latency':>11}{'speed':>7}"
        f"{'cosine mean':>13}{'min':>10}"
    )
    print(
        f"{'fp32':<26}{_mib(float_bytes):>12}{1.0:>9.3f}{t_float * 1e3:>9.1f}ms{1.0:>7.2f}"
        f"{1.0:>13.6f}{1.0:>10.6f}"
    )
    for label, recipe in (("int8 weight-only", "w8"), ("w8a8 dynamic", "w8a8")):
        _progress(
            f"  quantizing MiniLM {recipe}, converting to integers and timing it "
            f"(about {_QUANT_SECONDS[recipe]} s on 2 CPU cores)..."
        )
        fq = passes.fake_quant(**passes.RECIPES[recipe])(program)
        int_prog = passes.convert()(fq)
        stored = passes.convert_params(int_prog, fq, variables)
        fn = jax.jit(int_prog)
        out = np.asarray(fn(stored, *args))
        exact = bool(np.array_equal(out, np.asarray(jax.jit(fq)(variables, *args))))
        failures += not exact
        cos = np.sum(out * np.asarray(reference), axis=-1)
        t = _latency(fn, stored, *args)
        nbytes = _nbytes(stored)
        print(
            f"{label:<26}{_mib(nbytes):>12}{nbytes / float_bytes:>9.3f}{t * 1e3:>9.1f}ms"
            f"{t_float / t:>7.2f}{cos.mean():>13.6f}{cos.min():>10.6f}"
            f"   converted == fake-quant bit for bit: {exact}"
        )
    print(
        "(params: stored weights incl. the 44.7 MiB word-embedding table, which stays float: "
        "it is only gathered)"
    )

    failures += _prune_and_quantize_digits()

    _section("result")
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


def _prune_and_quantize_digits() -> int:
    """fold BatchNorm + 50% magnitude pruning + int8 in one pipeline on the digits CNN."""
    import maas_jax
    from maas_jax import passes
    from maas_jax.models import digits
    from maas_jax.passes.prune import export

    _section("prune + quantize the digits CNN in one pipeline (sklearn digits)")
    _progress(
        f"training the digits CNN on sklearn digits "
        f"(about {_DIGITS_TRAIN_SECONDS} s on 2 CPU cores)..."
    )
    model, variables, (_, _, x_te, y_te) = digits.pretrained("cnn_bn")
    apply_fn = digits.make_apply(model)
    program = maas_jax.trace(apply_fn, variables, x_te, name="digits_cnn")
    masks = passes.compute_masks(program, variables, method="global_magnitude", sparsity=0.5)
    pipe = maas_jax.pipeline(
        passes.fold_batchnorm(), passes.prune(masks=masks), passes.fake_quant("int8", act="int8")
    )
    print(_pipeline_summary(pipe))
    fq = pipe(program)
    int_prog = passes.convert()(fq)
    stored = passes.convert_params(int_prog, fq, variables)
    acc_float = digits.accuracy(apply_fn, variables, x_te, y_te)
    acc_q = digits.accuracy(jax.jit(int_prog), stored, x_te, y_te)
    print(
        f"test accuracy: float {acc_float:.4f} -> 50% pruned + int8 {acc_q:.4f} "
        f"(no fine-tuning; benchmarks/bench_prune.py fine-tunes with the optax wrapper)"
    )
    print(export.sparsity_report(stored))
    dense = _nbytes(variables)
    packed = export.compress(stored).nbytes
    print(
        f"parameters: float {dense / 1024:.1f} KiB -> int8 {_nbytes(stored) / 1024:.1f} KiB "
        f"-> int8 + bitmask compression {packed / 1024:.1f} KiB ({packed / dense:.3f}x)"
    )
    ok = acc_q >= acc_float - 0.05
    print(f"accuracy within 5 points of float: {ok}")
    return 0 if ok else 1


def _latency(fn: Any, *args: Any, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    from maas_jax._paths import flatten_leaves

    return {leaf.path: leaf.value for leaf in flatten_leaves(tree)}


def _clip_kernels(variables: Any, paths: Sequence[str], bound: float) -> Any:
    from maas_jax._paths import flatten_leaves

    chosen = set(paths)
    leaves = [
        jnp.clip(leaf.value, -bound, bound) if leaf.path in chosen else leaf.value
        for leaf in flatten_leaves(variables)
    ]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(variables), leaves)


# Rough wall times of the demo's long silent steps on 2 CPU cores (the progress lines say them).
_QUANT_SECONDS = {"w8": 10, "w8a8": 15}
_DIGITS_TRAIN_SECONDS = 10
_N_SENTENCES = 72  # len(maas_jax.models.sentences.SENTENCES), checked by tests/test_cli.py


def _sentence_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= n <= _N_SENTENCES:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {_N_SENTENCES} (the bundled demo sentences), got {n}"
        )
    return n


def _quantile(text: str) -> float:
    try:
        q = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < q <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a quantile in (0, 1], e.g. 0.9999 (clip at the 99.99th percentile of "
            f"|w|), got {q}"
        )
    return q


def add_parser(sub: Any) -> None:
    d = sub.add_parser(
        "tour",
        help="a tour of the optimizer on MiniLM and the digits CNN (reports, pipelines, checks)",
    )
    d.add_argument(
        "--sentences",
        type=_sentence_count,
        default=16,
        help=f"how many demo sentences, 1 to {_N_SENTENCES} (default 16)",
    )
    d.add_argument(
        "--clip-quantile",
        type=_quantile,
        default=0.9999,
        help="clip kernels at this quantile of |w|, in (0, 1] (default 0.9999)",
    )
    d.set_defaults(run=lambda ns: demo(ns.sentences, ns.clip_quantile))
