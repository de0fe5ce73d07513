"""Pruning: structured vs masked vs dense latency, and an accuracy table, side by side.

1. 4x1024 MLP at batch 256 (CPU): dense, 50% unstructured masks (in the graph), and 50% of the
   hidden units removed by structured pruning — timed in interleaved rounds.
2. Digits CNN (sklearn digits): gradual magnitude pruning to 50/80/90% (Zhu & Gupta schedule,
   fine-tuning with the optax wrapper), 2:4, and 50% + int8 w8a8: test accuracy vs dense.

    python benchmarks/bench_prune.py [--quick] [--out benchmarks/results/prune.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qwix_baseline as qb  # noqa: E402
from bench_quant import finetune, interleaved  # noqa: E402
from maas_jax.passes.prune import optax_wrapper, schedules  # noqa: E402

import maas_jax  # noqa: E402
from maas_jax import passes  # noqa: E402


def mlp_section(quick: bool) -> dict:
    model, params, x = qb.make_mlp(batch=64 if quick else 256)
    prog = maas_jax.trace(model.apply, params, x)
    masks = passes.compute_masks(prog, params, method="magnitude", sparsity=0.5)
    masked = passes.prune(masks=masks)(prog)
    plan = passes.channel_plan(prog, params, sparsity=0.5)
    small = passes.prune_channels(plan)(prog)
    small_params = plan.shrink_params(params)
    fns = {
        "dense": (jax.jit(model.apply), (params, x)),
        "50% masks (baked constants)": (jax.jit(masked), (params, x)),
        "50% channels removed": (jax.jit(small), (small_params, x)),
    }
    lat = interleaved(fns, rounds=2 if quick else 10, reps=3 if quick else 10)
    dense = lat["dense"]["median_ms"]
    return {
        "latency": lat,
        "ratio_to_dense": {k: v["median_ms"] / dense for k, v in lat.items()},
        "param_bytes": {
            "dense": qb.param_bytes(params),
            "50% channels removed": qb.param_bytes(small_params),
        },
        "plan": plan.report(),
    }


def _finetune(model, variables, data, tx, epochs, batch=64):
    from maas_jax.models import digits

    x_tr, y_tr, _, _ = data
    return finetune(digits.make_apply(model), variables, x_tr, y_tr, tx, epochs, batch)


def digits_section(epochs: int) -> dict:
    from maas_jax.models import digits

    model, variables, data = digits.pretrained("cnn_bn")
    _, _, x_te, y_te = data
    apply_fn = digits.make_apply(model)
    res = {"dense": digits.accuracy(apply_fn, variables, x_te, y_te)}
    steps = epochs * (len(data[0]) // 64)
    where = r"kernel$"
    for s in (0.5, 0.8, 0.9):
        sched = schedules.polynomial_decay(0.0, s, 0, int(0.7 * steps), frequency=10)
        tx = optax_wrapper.sparsify(optax.adam(1e-3), schedule=sched, where=where)
        pruned = _finetune(model, variables, data, tx, epochs)
        res[f"{int(s * 100)}% gradual magnitude"] = digits.accuracy(apply_fn, pruned, x_te, y_te)
        if s == 0.5:
            prog = maas_jax.trace(apply_fn, pruned, x_te)
            q = passes.fake_quant("int8", act="int8")(prog)
            res["50% + int8 w8a8"] = digits.accuracy(jax.jit(q), pruned, x_te, y_te)
            res["50% achieved sparsity of kernels"] = float(
                np.mean([np.mean(np.asarray(v) == 0) for k, v in _kernels(pruned)])
            )
    tx = optax_wrapper.sparsify(optax.adam(1e-3), schedule=0.5, where=r"dense0/kernel$", n=2, m=4)
    nm = _finetune(model, variables, data, tx, epochs)
    res["2:4 on the first dense layer"] = digits.accuracy(apply_fn, nm, x_te, y_te)
    res["drop_points_at_50"] = 100 * (res["dense"] - res["50% gradual magnitude"])
    return res


def _kernels(variables):
    from maas_jax._paths import flatten_leaves

    return [
        (leaf.path, leaf.value)
        for leaf in flatten_leaves(variables)
        if leaf.path.endswith("kernel")
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args(argv)
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
        },
        "command": "python " + " ".join(sys.argv),
        "mlp": mlp_section(ns.quick),
    }
    print(f"4x1024 MLP, batch {'64' if ns.quick else '256'}:")
    for k, v in res["mlp"]["latency"].items():
        print(f"  {k:<28} {v['median_ms']:7.2f} ms  ({res['mlp']['ratio_to_dense'][k]:.2f}x dense)")
    if not ns.quick:
        res["digits"] = digits_section(epochs=6)
        print("digits CNN test accuracy:")
        for k, v in res["digits"].items():
            print(f"  {k:<36} {v:.4f}")
    if ns.out:
        ns.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
