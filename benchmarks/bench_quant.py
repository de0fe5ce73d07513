"""maas_jax quantization vs qwix and float, side by side in one run.

1. 4x1024 MLP at batch 256 (CPU): latency of converted w8a8 / int8 weight-only / packed int4
   weight-only programs vs qwix's PTQ of the same model and vs fp32 — timed in interleaved
   rounds so machine load hits every variant alike; stored parameter bytes; time from the
   float model to the first compiled quantized result (cold caches).
2. all-MiniLM-L6-v2: mean embedding cosine to fp32 over 64 sentences, ours vs qwix, for int8
   weight-only and w8a8 dynamic.
3. Digits CNN (sklearn digits): int8 PTQ test accuracy vs float; conv weight-only and w4a8
   (qwix rejects both on convolutions).

    python benchmarks/bench_quant.py [--quick] [--out benchmarks/results/quant.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qwix_baseline as qb  # noqa: E402

import maas_jax  # noqa: E402
from maas_jax import passes  # noqa: E402

MODES = {  # label -> fake_quant kwargs (ours) and qwix (weight_qtype, act_qtype)
    "w8a8": (dict(weight="int8", act="int8"), ("int8", "int8")),
    "int8 weight-only": (dict(weight="int8"), ("int8", None)),
    "int4 weight-only": (dict(weight="int4"), ("int4", None)),
}


def ours_int_program(fn, params, *inputs, **quant):
    """float function -> converted integer program and its stored parameters."""
    prog = maas_jax.trace(fn, params, *inputs)
    fq = passes.fake_quant(**quant)(prog)
    int_prog = passes.convert()(fq)
    return int_prog, passes.convert_params(int_prog, fq, params), fq


def interleaved(fns: dict[str, tuple], rounds: int, reps: int) -> dict[str, dict]:
    """Median/min/max per variant, timing each variant for ``reps`` calls per round in turn."""
    times = {k: [] for k in fns}
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))  # compile + warm
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append(time.perf_counter() - t0)
    return {
        k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
        for k, v in times.items()
    }


def mlp_section(quick: bool) -> dict:
    model, params, x = qb.make_mlp(batch=64 if quick else 256)
    fns = {"fp32": (jax.jit(model.apply), (params, x))}
    bytes_ = {"fp32": qb.param_bytes(params)}
    err = {}
    ref = np.asarray(model.apply(params, x))
    for label, (ours, (wq, aq)) in MODES.items():
        int_prog, stored, _ = ours_int_program(model.apply, params, x, **ours)
        fns[f"maas_jax {label}"] = (jax.jit(int_prog), (stored, x))
        bytes_[f"maas_jax {label}"] = qb.param_bytes(stored)
        out = np.asarray(int_prog(stored, x))
        err[f"maas_jax {label}"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        if qb.available():
            apply_fn, qvars, _ = qb.qwix_ptq(model, params, x, weight_qtype=wq, act_qtype=aq)
            fns[f"qwix {label}"] = (jax.jit(apply_fn), (qvars, x))
            bytes_[f"qwix {label}"] = qb.param_bytes(qvars)
            out = np.asarray(apply_fn(qvars, x))
            err[f"qwix {label}"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    lat = interleaved(fns, rounds=2 if quick else 10, reps=3 if quick else 10)

    def first_ours():
        int_prog, stored, _ = ours_int_program(model.apply, params, x, weight="int8", act="int8")
        return jax.jit(int_prog)(stored, x)

    first = {"maas_jax w8a8": qb.time_to_first_result(first_ours)}
    if qb.available():

        def first_qwix():
            apply_fn, qvars, _ = qb.qwix_ptq(
                model, params, x, weight_qtype="int8", act_qtype="int8"
            )
            return jax.jit(apply_fn)(qvars, x)

        first["qwix w8a8"] = qb.time_to_first_result(first_qwix)
    return {
        "shape": {"batch": int(x.shape[0]), "width": 1024, "layers": 4},
        "latency": lat,
        "bytes": bytes_,
        "bytes_ratio_to_fp32": {k: v / bytes_["fp32"] for k, v in bytes_.items()},
        "relative_error_to_fp32": err,
        "model_to_first_result_s": first,
    }


def minilm_section(n: int) -> dict:
    from maas_jax.models.minilm import load_minilm
    from maas_jax.models.sentences import SENTENCES

    model, variables, tokenizer, embed_fn = load_minilm()
    batch = tokenizer.encode(list(SENTENCES[:n]))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ref = np.asarray(jax.jit(embed_fn)(variables, *args))
    out = {}
    for label in ("w8a8", "int8 weight-only"):
        ours, (wq, aq) = MODES[label]
        int_prog, stored, _ = ours_int_program(embed_fn, variables, *args, **ours)
        emb = np.asarray(jax.jit(int_prog)(stored, *args))
        out[f"maas_jax {label}"] = float(np.mean(np.sum(emb * ref, -1)))
        if qb.available():
            # like for like: qwix on the dense layers only, the contractions we quantize
            cos, counts = qb.qwix_minilm_cosine(
                wq, aq, num_sentences=n, module_path=qb.MINILM_DENSE_ONLY, return_counts=True
            )
            out[f"qwix {label} (dense layers)"] = cos
            ints = {
                "maas_jax": qb.count_integer_dots(functools.partial(int_prog, stored), *args),
                "qwix": counts,
            }
            out[f"integer dots / all dots, {label}"] = {k: list(v) for k, v in ints.items()}
            if aq is not None:
                # qwix's default also quantizes the 12 attention einsums (48 of 48)
                out[f"qwix {label} (all contractions)"] = qb.qwix_minilm_cosine(
                    wq, aq, num_sentences=n
                )
    return {"sentences": n, "mean_cosine_to_fp32": out}


def digits_section() -> dict:
    from maas_jax.models import digits

    model, variables, (x_tr, y_tr, x_te, y_te) = digits.pretrained("cnn_bn")
    apply_fn = digits.make_apply(model)
    base = digits.accuracy(apply_fn, variables, x_te, y_te)
    res = {"float": base}
    for label, quant in (
        ("int8 w8a8", dict(weight="int8", act="int8")),
        ("int8 weight-only (conv too)", dict(weight="int8")),
        ("w4a8 (conv too)", dict(weight="int4", act="int8")),
    ):
        # Scored on the converted program (stored integers), the thing a user ships.
        prog = maas_jax.trace(apply_fn, variables, x_te)
        res[label] = _converted_accuracy(prog, variables, x_te, y_te, passes.fake_quant(**quant))
    res["drop_points_int8_w8a8"] = 100 * (base - res["int8 w8a8"])
    res["BatchNorm folded + w8a8"] = _converted_accuracy(
        prog, variables, x_te, y_te, passes.fold_batchnorm(), passes.fake_quant("int8", act="int8")
    )
    res["drop_points_folded_w8a8"] = 100 * (base - res["BatchNorm folded + w8a8"])
    # Static (calibrated) int8 activations on 4 training batches, percentile 99.99.
    batches = [x_tr[i : i + len(x_te)] for i in range(0, 4 * len(x_te), len(x_te))]
    batches = [b for b in batches if len(b) == len(x_te)]
    static = passes.fake_quant("int8", act="int8", act_mode="static", calibration="percentile")
    res["int8 w8a8 static (percentile)"] = _converted_accuracy(
        prog, variables, x_te, y_te, static, calibration=batches
    )
    res.update(qat_section())
    return res


def _converted_accuracy(prog, variables, x, y, *steps, calibration=None) -> float:
    """Accuracy of ``prog`` after ``steps`` + ``convert``, run on its stored integers."""
    from maas_jax.models import digits

    recipe = maas_jax.pipeline(*steps, passes.convert())
    int_prog, stored = maas_jax.optimize(prog, variables, recipe, calibration_data=calibration)
    return digits.accuracy(jax.jit(int_prog), stored, x, y)


def finetune(apply_fn, variables, x_tr, y_tr, tx, epochs, batch=64):
    """Cross-entropy fine-tuning of ``variables["params"]`` through ``apply_fn`` (a Program or a
    model's apply), in shuffled batches of ``batch``; other collections stay fixed."""
    import optax

    params = variables["params"]
    state = tx.init(params)

    def loss(p, x, y):
        logits = apply_fn({**variables, "params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(x_tr))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            params, state = step(params, state, x_tr[idx], y_tr[idx])
    return {**variables, "params": params}


def qat_section(epochs: int = 4, batch: int = 64) -> dict:
    """int4 QAT: fine-tune the float digits CNN through the fake-quant program (STE)."""
    import optax

    from maas_jax.models import digits

    model, variables, (x_tr, y_tr, x_te, y_te) = digits.pretrained("cnn_bn")
    apply_fn = digits.make_apply(model)
    base = digits.accuracy(apply_fn, variables, x_te, y_te)
    quant = passes.fake_quant("int4", act="int8")
    train_prog = quant(maas_jax.trace(apply_fn, variables, x_tr[:batch]))
    eval_prog = jax.jit(quant(maas_jax.trace(apply_fn, variables, x_te)))
    ptq = digits.accuracy(eval_prog, variables, x_te, y_te)
    trained = finetune(train_prog, variables, x_tr, y_tr, optax.adam(3e-4), epochs, batch)
    qat = digits.accuracy(eval_prog, trained, x_te, y_te)
    return {
        "int4 (w4a8) PTQ, before QAT": ptq,
        f"int4 (w4a8) after {epochs} epochs QAT": qat,
        "drop_points_int4_qat": 100 * (base - qat),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpus": __import__("os").cpu_count(),
            "jax": jax.__version__,
            "qwix": __import__("importlib.metadata").metadata.version("qwix")
            if qb.available()
            else None,
        },
        "command": "python " + " ".join(sys.argv),
    }
    res["mlp"] = mlp_section(ns.quick)
    m = res["mlp"]
    print(f"4x1024 MLP, batch {m['shape']['batch']}:")
    for k, v in m["latency"].items():
        print(
            f"  {k:<28} {v['median_ms']:7.2f} ms  (min {v['min_ms']:.2f})  "
            f"bytes {m['bytes_ratio_to_fp32'][k]:.3f} x fp32  "
            f"rel.err {m['relative_error_to_fp32'].get(k, 0.0):.4f}"
        )
    for k, v in m["model_to_first_result_s"].items():
        print(f"  model -> first result, {k:<16} {v:.3f} s")
    if not ns.quick:
        res["minilm"] = minilm_section(64)
        print("all-MiniLM-L6-v2, 64 sentences, mean cosine to fp32:")
        for k, v in res["minilm"]["mean_cosine_to_fp32"].items():
            print(f"  {k:<28} {v:.6f}" if isinstance(v, float) else f"  {k:<28} {v}")
        res["digits"] = digits_section()
        print("digits CNN (BatchNorm, not folded) test accuracy:")
        for k, v in res["digits"].items():
            print(f"  {k:<28} {v:.4f}" if isinstance(v, float) else f"  {k:<28} {v}")
    if ns.out:
        ns.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
